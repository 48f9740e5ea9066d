"""The O(N)-memory attention gives the same operator as the naive one, and its
linearization stores no N × N array."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters.hf import load_hf_model
from jaxlin import model as model_fns
from jaxlin._policy import FreezePolicy
from jaxlin.jacobian import linearize, target_function

N = 41  # longer than the windows (8, 6) and than several chunks


def setup(tiny_model_dir, variant):
    model = load_hf_model(tiny_model_dir(variant), jnp.float64)
    ids = np.random.default_rng(11).integers(0, 128, size=N)
    return model, model_fns.embed(model.config, model.params, jnp.asarray(ids))


def relative(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("variant", ["gemma3_sliding", "qwen3_sliding", "gemma3_untied_softcap"])
@pytest.mark.parametrize("chunk", [4, 16])
def test_chunked_operator_equals_naive(variant, chunk, tiny_model_dir):
    model, inputs = setup(tiny_model_dir, variant)
    keys = jax.random.split(jax.random.key(4), 2)
    v = jax.random.normal(keys[0], inputs.shape, jnp.float64)
    u = jax.random.normal(keys[1], (model.config.hidden_size,), jnp.float64)

    @jax.jit
    def products(inputs, v, u):
        naive = linearize(model.params, inputs, model.config, attention_chunk=None)
        chunked = linearize(model.params, inputs, model.config, attention_chunk=chunk)
        return (
            naive.output,
            chunked.output,
            naive.matvec(v),
            chunked.matvec(v),
            naive.rmatvec(u),
            chunked.rmatvec(u),
        )

    y_n, y_b, jv_n, jv_b, jtu_n, jtu_b = products(inputs, v, u)
    assert relative(y_b, y_n) <= 1e-12
    assert relative(jv_b, jv_n) <= 1e-12
    assert relative(jtu_b, jtu_n) <= 1e-12


def test_chunked_linearization_keeps_no_quadratic_residual(tiny_model_dir):
    model, inputs = setup(tiny_model_dir, "gemma3_sliding")

    def residual_shapes(chunk):
        _, jvp = jax.linearize(
            target_function(model.config, model.params, FreezePolicy.DETACHED, chunk), inputs
        )
        return [leaf.shape for leaf in jax.tree_util.tree_leaves(jvp) if hasattr(leaf, "shape")]

    def has_n_by_n(shapes):
        return any(sum(dim == N for dim in shape) >= 2 for shape in shapes)

    assert has_n_by_n(residual_shapes(None))  # the naive one stores the probabilities
    assert not has_n_by_n(residual_shapes(8))


def test_chunked_refuses_the_ordinary_policy(tiny_model_dir):
    model, inputs = setup(tiny_model_dir, "llama_gqa_untied")
    transformer = model_fns.module(model.config, model.params, FreezePolicy.ORDINARY, attention_chunk=8)
    with pytest.raises(ValueError, match="detached"):
        transformer.apply({"params": model.params}, inputs)
