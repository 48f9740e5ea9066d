"""The detached Jacobian as a value: linearized once, passed between jitted programs,
and every quantity read off J's rows equal to the same quantity from fresh products."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters.hf import load_hf_model
from jaxlin import model as model_fns
from jaxlin.jacobian import DetachedJacobian, Products, linearize
from jaxlin.model import Tap
from jaxlin.operator import (
    contributions,
    contributions_from_rows,
    rows,
    token_jacobian,
    token_jacobian_from_rows,
)
from jaxlin.run_config import AnalysisSection
from jaxlin.runner import analyse

TOKENS = np.random.default_rng(11).integers(0, 128, size=13)


def jacobian_of(tiny_model_dir, variant="gemma3_sliding") -> tuple:
    model = load_hf_model(tiny_model_dir(variant), jnp.float64)
    inputs = model_fns.embed(model.config, model.params, jnp.asarray(TOKENS))
    return model, inputs, linearize(model.params, inputs, model.config)


def test_jacobian_crosses_jit_boundaries_without_retracing(tiny_model_dir):
    model, inputs, jacobian = jacobian_of(tiny_model_dir)
    traces = []

    @jax.jit
    def both(op: DetachedJacobian, v: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
        traces.append(1)
        return op.matvec(v), op.rmatvec(u)

    v = jax.random.normal(jax.random.key(0), inputs.shape, jnp.float64)
    u = jax.random.normal(jax.random.key(1), (model.config.hidden_size,), jnp.float64)
    jv, jtu = both(jacobian, v, u)
    # A second linearization of the same input is a value of the same structure: no retrace.
    again = linearize(model.params, inputs, model.config)  # a second value, same program
    jv2, jtu2 = both(again, v, u)
    assert len(traces) == 1
    np.testing.assert_array_equal(jv, jv2)
    np.testing.assert_allclose(jnp.vdot(u, jv), jnp.vdot(jtu, v), rtol=1e-12)


def test_quantities_read_off_rows_equal_fresh_products(tiny_model_dir):
    model, inputs, jacobian = jacobian_of(tiny_model_dir, "qwen2_biases_untied")
    dense = rows(jacobian)
    np.testing.assert_allclose(
        contributions_from_rows(dense, inputs), contributions(jacobian), rtol=1e-11, atol=1e-13
    )
    for token in (0, 5, len(TOKENS) - 1):
        np.testing.assert_allclose(
            token_jacobian_from_rows(dense, token), token_jacobian(jacobian, token), rtol=1e-11, atol=1e-13
        )
    total = contributions_from_rows(dense, inputs).sum(0) + jacobian.bias
    assert float(jnp.linalg.norm(total - jacobian.output) / jnp.linalg.norm(jacobian.output)) <= 1e-12


def test_default_analysis_linearizes_once_per_policy_and_counts_its_products(tiny_model_dir):
    """The default analysis (exact per-token spectra) computes J's d rows once and reads the
    contributions, the whole-J spectrum, every J_t and the focus block off them; only the
    ordinary comparison needs a second linearization (N forward products for its
    contributions and d for its focus block)."""
    from jaxlin.loading import load_model

    loaded = load_model("hf", tiny_model_dir("gemma3_sliding"), "float64", use_cache=False, progress=False)
    text = "Hello, world! The bridge."
    summary = analyse(loaded, text, AnalysisSection()).summary
    n, d = summary["n_tokens"], loaded.model.config.hidden_size
    assert summary["products"] == {"linearizations": 2, "matvecs": n + d, "rmatvecs": d}
    assert summary["spectrum"]["method"] == "rows"
    # Lanczos instead of the rows: the same top singular values to its bounds.
    lanczos = analyse(loaded, text, AnalysisSection(method="lanczos")).summary
    assert lanczos["products"]["linearizations"] == 2
    np.testing.assert_allclose(lanczos["singular_values"], summary["singular_values"], rtol=1e-9)


def test_bias_term_costs_one_product_only_where_there_are_biases(tiny_model_dir):
    for variant, biased in (("qwen2_biases_untied", True), ("gemma3_sliding", False)):
        model = load_hf_model(tiny_model_dir(variant), jnp.float64)
        inputs = model_fns.embed(model.config, model.params, jnp.asarray(TOKENS))
        counted = Products()
        jacobian = linearize(model.params, inputs, model.config, products=counted)
        assert counted.as_dict() == {"linearizations": 1, "matvecs": int(biased), "rmatvecs": 0}
        assert (float(jnp.linalg.norm(jacobian.bias)) > 0) == biased


@pytest.mark.parametrize(
    "tap",
    [None, Tap(1, "residual"), Tap(0, "attention", final_norm=False), Tap(1, "mlp", local=True)],
    ids=str,
)
def test_jacobian_refers_to_the_weights_instead_of_copying_them(tap, tiny_model_dir):
    # A jitted program's outputs are fresh buffers: weights returned as residuals would be
    # a second copy of every layer matrix the tangent passes through (≈0.5 GB on Gemma 3
    # 270M). The value must hold the caller's own arrays, and only N-dependent ones besides.
    # A cumulative tap runs its layers under a `cond`, and a local tap takes its layer's
    # weights with a dynamic slice: a linearization copies both (every layer's weights, or
    # one layer's) unless the tap is taken under `jax.checkpoint` (model.tap_values).
    model, inputs, _ = jacobian_of(tiny_model_dir)
    jacobian = linearize(model.params, inputs, model.config, tap=tap)
    own = {leaf.unsafe_buffer_pointer() for leaf in jax.tree_util.tree_leaves(model.params)}
    stacked = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(model.params) if leaf.ndim == 3]
    residuals = jax.tree_util.tree_leaves(jacobian.linear)
    referred = [leaf for leaf in residuals if leaf.unsafe_buffer_pointer() in own]
    assert referred, "the tangent passes through weight matrices: some residuals must be the weights"
    for leaf in residuals:
        if leaf.unsafe_buffer_pointer() in own or leaf.ndim != 3:
            continue
        for weights in stacked:  # (layers, in, out): the whole stack, or any run of its layers
            if leaf.shape[1:] == weights.shape[1:] and leaf.shape[0] <= weights.shape[0]:
                copies = [
                    np.array_equal(np.asarray(leaf), weights[i : i + leaf.shape[0]])
                    for i in range(weights.shape[0] - leaf.shape[0] + 1)
                ]
                assert not any(copies), f"a residual {leaf.shape} is a copy of weight matrices"
    # Still the same map: ⟨u, Jv⟩ = ⟨Jᵀu, v⟩ with the transpose taken from the shared residuals.
    v = jax.random.normal(jax.random.key(2), inputs.shape, jnp.float64)
    u = jax.random.normal(jax.random.key(3), (model.config.hidden_size,), jnp.float64)
    np.testing.assert_allclose(jnp.vdot(u, jacobian.matvec(v)), jnp.vdot(jacobian.rmatvec(u), v), rtol=1e-12)
