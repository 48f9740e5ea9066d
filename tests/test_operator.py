"""The detached-Jacobian operator: exact reconstruction, identities, dense agreement."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import VARIANTS

from converters.hf import load_hf_model
from jaxlin import model as model_fns
from jaxlin._policy import FreezePolicy
from jaxlin.jacobian import linearize, target_function
from jaxlin.operator import certify, contributions, rows

TOKENS = np.random.default_rng(5).integers(0, 128, size=19)  # longer than every window


def loaded(tiny_model_dir, variant, dtype=jnp.float64):
    model = load_hf_model(tiny_model_dir(variant), dtype)
    inputs = model_fns.embed(model.config, model.params, jnp.asarray(TOKENS))
    return model, inputs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_float64_reconstruction_is_exact_and_ordinary_is_not(variant, tiny_model_dir):
    model, inputs = loaded(tiny_model_dir, variant)
    jacobian = linearize(model.params, inputs, model.config)
    y, c, c_bias = jacobian.output, contributions(jacobian), jacobian.bias
    logits_of = lambda h: model_fns.logits(model.config, model.params, h)  # noqa: E731
    certificate = certify(y, c, logits_of, c_bias)
    assert certificate.relative_error <= 1e-12
    assert certificate.argmax_matches
    # Biased families are affine: the bias term is needed, and is zero otherwise.
    assert (float(jnp.linalg.norm(c_bias)) > 1e-3) == model.config.has_biases
    ordinary_jacobian = linearize(model.params, inputs, model.config, FreezePolicy.ORDINARY)
    c_ordinary, c_bias_ordinary = contributions(ordinary_jacobian), ordinary_jacobian.bias
    ordinary = certify(y, c_ordinary, logits_of, c_bias_ordinary)
    assert ordinary.relative_error > 1e-3  # the ordinary Jacobian does not reconstruct y
    # The linearized program computes the same y as the plain forward (to rounding:
    # XLA may order the bias-scaled program's operations differently).
    np.testing.assert_allclose(
        np.asarray(y), np.asarray(model_fns.final_hidden(model.config, model.params, inputs)[-1]), rtol=1e-13
    )


def test_float32_reconstruction(tiny_model_dir):
    model, inputs = loaded(tiny_model_dir, "gemma3_sliding", jnp.float32)
    jacobian = linearize(model.params, inputs, model.config)
    y, c = jacobian.output, contributions(jacobian)
    assert c.dtype == jnp.float32
    error = float(jnp.linalg.norm(c.sum(0) - y) / jnp.linalg.norm(y))
    assert error <= 1e-5


def test_bfloat16_params_run_and_roughly_reconstruct(tiny_model_dir):
    model, inputs = loaded(tiny_model_dir, "llama_gqa_untied", jnp.bfloat16)
    assert model.dtype == jnp.bfloat16
    jacobian = linearize(model.params, inputs, model.config)
    y, c = jacobian.output, contributions(jacobian)
    assert y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(c)))
    y32, c32 = np.asarray(y, np.float32), np.asarray(c, np.float32)
    # bf16 has ~3 significant digits; a sum of 19 rounded contributions stays within a few %.
    assert np.linalg.norm(c32.sum(0) - y32) / np.linalg.norm(y32) < 0.1


@pytest.mark.parametrize("variant", ["gemma3_sliding", "qwen3_sliding", "llama3_rope_tied"])
def test_adjoint_identity(variant, tiny_model_dir):
    """⟨u, J·v⟩ = ⟨Jᵀ·u, v⟩ for random u, v."""
    model, inputs = loaded(tiny_model_dir, variant)

    @jax.jit
    def both_sides(u, v):
        op = linearize(model.params, inputs, model.config)
        return jnp.vdot(u, op.matvec(v)), jnp.vdot(op.rmatvec(u), v)

    keys = jax.random.split(jax.random.key(0), 2)
    u = jax.random.normal(keys[0], (model.config.hidden_size,), jnp.float64)
    v = jax.random.normal(keys[1], inputs.shape, jnp.float64)
    left, right = both_sides(u, v)
    assert abs(float(left - right)) <= 1e-12 * abs(float(left))


@pytest.mark.parametrize("policy", list(FreezePolicy))
def test_materialized_jacobian_equals_jacrev(policy, tiny_model_dir):
    model, inputs = loaded(tiny_model_dir, "gemma3_untied_softcap")
    dense = rows(linearize(model.params, inputs, model.config, policy), chunk=16)
    reference = jax.jacrev(target_function(model.config, model.params, policy))(inputs)
    assert dense.shape == (model.config.hidden_size, *inputs.shape)
    np.testing.assert_allclose(np.asarray(dense), np.asarray(reference), rtol=1e-12, atol=1e-14)


def test_contributions_agree_across_token_and_row_strategies(tiny_model_dir):
    """N ≤ d uses one forward-mode product per token, N > d one transposed product per
    output coordinate; both must give the same c_t = J_t·x_t as the dense J does."""
    model = load_hf_model(tiny_model_dir("qwen3_sliding"), jnp.float64)
    d = model.config.hidden_size
    long_tokens = np.random.default_rng(9).integers(0, 128, size=d + 6)
    inputs = model_fns.embed(model.config, model.params, jnp.asarray(long_tokens))
    jacobian = linearize(model.params, inputs, model.config)
    y, by_rows = jacobian.output, contributions(jacobian, chunk=32)  # N > d: rows
    dense = np.asarray(rows(jacobian, chunk=32))
    expected = np.einsum("itj,tj->ti", dense, np.asarray(inputs))
    np.testing.assert_allclose(np.asarray(by_rows), expected, rtol=1e-10, atol=1e-12)
    short = inputs[:20]
    short_jacobian = linearize(model.params, short, model.config)
    by_tokens = contributions(short_jacobian, chunk=8)  # N ≤ d: tokens
    dense_short = np.asarray(rows(short_jacobian))
    np.testing.assert_allclose(
        np.asarray(by_tokens), np.einsum("itj,tj->ti", dense_short, np.asarray(short)), rtol=1e-10, atol=1e-12
    )
    assert float(jnp.linalg.norm(by_rows.sum(0) - y) / jnp.linalg.norm(y)) <= 1e-12
