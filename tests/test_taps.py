"""Detached Jacobians of intermediate quantities (taps): exact certificates, and
layer-local / cumulative consistency."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters.hf import load_hf_model
from jaxlin import model as model_fns
from jaxlin.jacobian import linearize
from jaxlin.model import Tap, tap_input, tap_values
from jaxlin.operator import certify, contributions

N = 17
TAP_VARIANTS = ["gemma3_sliding", "gpt2_affine", "olmo2_post_norm", "qwen2_biases_untied"]


@functools.cache
def setup(directory):
    model = load_hf_model(directory, jnp.float64)
    ids = np.random.default_rng(8).integers(0, 128, size=N)
    return model, model_fns.embed(model.config, model.params, jnp.asarray(ids))


@pytest.mark.parametrize("variant", TAP_VARIANTS)
@pytest.mark.parametrize("local", [False, True])
def test_every_tap_reconstructs_exactly(variant, local, tiny_model_dir):
    model, embeddings = setup(tiny_model_dir(variant))
    config, params = model.config, model.params
    # Every kind, at the first layer without the final norm and the last with it.
    for kind in ("residual", "attention", "mlp"):
        for layer, final_norm in ((0, False), (config.num_layers - 1, True)):
            tap = Tap(layer, kind, final_norm, local)
            inputs = tap_input(config, params, embeddings, tap)
            jacobian = linearize(params, inputs, config, tap=tap)
            y, c, c_bias = jacobian.output, contributions(jacobian), jacobian.bias
            expected = tap_values(config, params, inputs, tap)[-1]
            np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-12, atol=1e-13)
            certificate = certify(y, c, lambda h: h, c_bias)
            assert certificate.relative_error <= 1e-12, tap.label


def test_last_residual_tap_with_final_norm_is_the_main_target(tiny_model_dir):
    model, embeddings = setup(tiny_model_dir("gemma3_sliding"))
    config, params = model.config, model.params
    tap = Tap(config.num_layers - 1, "residual", final_norm=True)
    c_tap = contributions(linearize(params, embeddings, config, tap=tap))
    c = contributions(linearize(params, embeddings, config))
    np.testing.assert_allclose(np.asarray(c_tap), np.asarray(c), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("variant", TAP_VARIANTS)
@pytest.mark.parametrize("kind", ["residual", "mlp"])
def test_cumulative_equals_local_composed_with_previous_cumulative(variant, kind, tiny_model_dir):
    """J_cum(ℓ)·v = J_local(ℓ)·(∂H_{ℓ−1}/∂X · v): the chain rule of the detached map."""
    model, embeddings = setup(tiny_model_dir(variant))
    config, params = model.config, model.params
    layer = config.num_layers - 1
    cumulative = Tap(layer, kind, final_norm=True)
    local = Tap(layer, kind, final_norm=True, local=True)
    v = jax.random.normal(jax.random.key(2), embeddings.shape, jnp.float64)

    @jax.jit
    def both(embeddings, v):
        direct = linearize(params, embeddings, config, tap=cumulative).matvec(v)
        h, dh = jax.jvp(lambda x: tap_input(config, params, x, local), (embeddings,), (v,))
        composed = linearize(params, h, config, tap=local).matvec(dh)
        return direct, composed

    direct, composed = both(embeddings, v)
    np.testing.assert_allclose(np.asarray(composed), np.asarray(direct), rtol=1e-11, atol=1e-13)


def test_tap_kind_is_validated():
    with pytest.raises(ValueError, match="tap kind"):
        Tap(0, "logits")
