"""The matrix-free spectral engine against dense SVDs of the materialized J."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import VARIANTS

from converters.hf import load_hf_model
from jaxlin import model as model_fns
from jaxlin.jacobian import linearize
from jaxlin.operator import rows
from jaxlin.spectral import (
    SpectralError,
    _frobenius_estimate,
    dense_top_k,
    frobenius_estimate,
    krylov_basis,
    lanczos_top_k,
    per_token_top_k,
    rows_top_k,
    top_k,
)

N = 19  # longer than every sliding window of the tiny variants
EPS64 = np.finfo(np.float64).eps


@pytest.fixture(scope="module")
def cases(tiny_model_dir):
    built = {}

    def get(variant: str, dtype=jnp.float64):
        if (variant, dtype) not in built:
            model = load_hf_model(tiny_model_dir(variant), dtype)
            ids = np.random.default_rng(21).integers(0, 128, size=N)
            inputs = model_fns.embed(model.config, model.params, jnp.asarray(ids))
            jacobian = linearize(model.params, inputs, model.config)
            built[(variant, dtype)] = (model, jacobian, np.asarray(rows(jacobian), np.float64))
        return built[(variant, dtype)]

    return get


def subspace_gap(a: np.ndarray, b: np.ndarray) -> float:
    """‖P_a − P_b‖₂ for column-orthonormal a, b: sine of the largest principal angle."""
    return float(np.linalg.norm(a @ a.T - b @ b.T, 2))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_whole_jacobian_top_k_matches_dense_svd(variant, cases):
    model, jacobian, dense = cases(variant)
    reference = dense_top_k(dense, 6)
    found = top_k(jacobian, 6)
    assert found.converged
    np.testing.assert_allclose(found.S, reference.S, rtol=1e-10)
    assert subspace_gap(found.U, reference.U) <= 1e-7
    d = model.config.hidden_size
    assert subspace_gap(found.V.reshape(6, -1).T, reference.V.reshape(6, -1).T) <= 1e-7
    # U diag(S) Vᵀ is the rank-6 truncation of J.
    approx = np.einsum("ik,k,ktj->itj", found.U, found.S, found.V)
    truncation = np.einsum("ik,k,ktj->itj", reference.U, reference.S, reference.V)
    assert np.linalg.norm(approx - truncation) <= 1e-8 * np.linalg.norm(truncation)
    assert found.V.shape == (6, N, d)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_whole_jacobian_top_k_from_rows_matches_dense_svd(variant, cases):
    """The exact route (J·Jᵀ from J's rows, one eigh) against a float64 SVD of J."""
    model, _, dense = cases(variant)
    reference = dense_top_k(dense, 6)
    found = rows_top_k(dense, 6)
    np.testing.assert_allclose(found.S, reference.S, rtol=1e-10)
    assert subspace_gap(found.U, reference.U) <= 1e-7
    assert subspace_gap(found.V.reshape(6, -1).T, reference.V.reshape(6, -1).T) <= 1e-7
    # Rigorous bounds at rounding level: each σ lies within its bound of a true one.
    everything = np.linalg.svd(dense.reshape(dense.shape[0], -1), compute_uv=False)
    for sigma, bound in zip(found.S, found.bounds, strict=True):
        assert np.min(np.abs(everything - sigma)) <= bound + 100 * EPS64 * everything[0]
    assert np.all(found.bounds <= 1e-10 * found.S)


@pytest.mark.parametrize("depth", [8, 12, 40])
def test_residual_bounds_are_true_bounds(depth, cases):
    """Each reported σ lies within its bound of a true singular value, converged or
    not (shallow Krylov spaces give loose but still valid bounds)."""
    model, jacobian, dense = cases("gemma3_sliding")
    everything = np.linalg.svd(dense.reshape(dense.shape[0], -1), compute_uv=False)
    u, s, v, bounds, _ = lanczos_top_k(jacobian, jax.random.key(3), 6, depth)
    rounding = 100 * EPS64 * everything[0]
    for sigma, bound in zip(np.asarray(s), np.asarray(bounds), strict=True):
        assert np.min(np.abs(everything - sigma)) <= bound + rounding
    if depth == 8:
        assert np.max(np.asarray(bounds) / np.asarray(s)) > 1e-10  # this one is not converged


def test_results_are_deterministic_for_a_seed(cases):
    model, jacobian, _ = cases("llama3_rope_tied")
    first = top_k(jacobian, 4, seed=5)
    second = top_k(jacobian, 4, seed=5)
    np.testing.assert_array_equal(first.S, second.S)
    np.testing.assert_array_equal(first.U, second.U)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_token_jacobian_matches_dense_svd(variant, cases):
    model, jacobian, dense = cases(variant)
    d = model.config.hidden_size
    left, sigma, right, bounds, frob_sq = per_token_top_k(jacobian, jnp.eye(d), 4)
    for t in range(N):
        u_ref, s_ref, vt_ref = np.linalg.svd(dense[:, t, :])
        if s_ref[0] == 0:
            # Outside the last token's receptive field (every layer sliding): J_t = 0
            # exactly, and its singular vectors are arbitrary.
            assert np.all(np.asarray(sigma[t]) == 0)
            continue
        np.testing.assert_allclose(np.asarray(sigma[t]), s_ref[:4], rtol=1e-10)
        assert subspace_gap(np.asarray(left[t]).T, u_ref[:, :4]) <= 1e-6
        assert subspace_gap(np.asarray(right[t]).T, vt_ref[:4].T) <= 1e-6
        assert np.all(np.asarray(bounds[t]) <= 1e-10 * s_ref[0])
    np.testing.assert_allclose(np.asarray(frob_sq), np.sum(dense**2, axis=(0, 2)), rtol=1e-12)


@pytest.mark.parametrize("variant", ["gemma3_sliding", "llama_gqa_untied"])
def test_per_token_spectra_in_token_groups_match(variant, cases):
    # Groups of 5 over N tokens: the last group overlaps the one before it.
    model, jacobian, dense = cases(variant)
    d = model.config.hidden_size
    whole = per_token_top_k(jacobian, jnp.eye(d), 4)
    grouped = per_token_top_k(jacobian, jnp.eye(d), 4, token_group=5)
    assert N % 5 != 0
    s_ref = np.stack([np.linalg.svd(dense[:, t, :], compute_uv=False)[:4] for t in range(N)])
    np.testing.assert_allclose(np.asarray(grouped[1]), s_ref, rtol=1e-10, atol=1e-12 * s_ref.max())
    # Bounds are rounding-sized: each must still be a tight bound.
    assert np.all(np.asarray(grouped[3]) <= 1e-10 * s_ref[:, :1])
    compared = (r[:3] + r[4:] for r in (whole, grouped))  # all but the bounds
    for name, a, b in zip(("U", "S", "V", "frobenius"), *compared, strict=True):
        scale = float(jnp.max(jnp.abs(a)))
        # Singular vectors are compared up to sign (one eigh per group, not per run).
        a, b = (jnp.abs(a), jnp.abs(b)) if name in ("U", "V") else (a, b)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-9 * scale, err_msg=name)


def test_projected_per_token_spectra_trade_accuracy_for_rank(cases):
    model, jacobian, dense = cases("qwen3_sliding")
    d = model.config.hidden_size
    exact = np.asarray(per_token_top_k(jacobian, jnp.eye(d), 3)[1])
    full = krylov_basis(jacobian, d)
    np.testing.assert_allclose(
        np.asarray(per_token_top_k(jacobian, full, 3)[1]),
        exact,
        rtol=1e-9,
    )
    partial = krylov_basis(jacobian, 24)
    projected = np.asarray(per_token_top_k(jacobian, partial, 3)[1])
    # A projection can only shrink singular values (interlacing), and rank 24 of 64 keeps most.
    assert np.all(projected <= exact * (1 + 1e-12))
    assert np.median(projected[:, 0] / exact[:, 0]) > 0.5


def test_hutchinson_frobenius_estimate(cases):
    model, jacobian, dense = cases("llama_gqa_untied")
    estimate = np.asarray(frobenius_estimate(jacobian, jax.random.key(0), 2000))
    exact = np.sum(dense**2, axis=(0, 2))
    assert abs(estimate.sum() / exact.sum() - 1) < 0.05
    assert np.median(np.abs(estimate / exact - 1)) < 0.15


def test_hutchinson_samples_run_a_chunk_at_a_time(cases):
    # Each sample is an (N, d) transposed product: all at once, the samples alone would hold
    # samples·N·d numbers (32 GiB for 64 samples of an 8B model at 32k tokens).
    _, jacobian, _ = cases("llama_gqa_untied")
    key = jax.random.key(3)
    whole = np.asarray(frobenius_estimate(jacobian, key, 64, chunk=None))
    chunked = np.asarray(frobenius_estimate(jacobian, key, 64, chunk=4))
    np.testing.assert_allclose(chunked, whole, rtol=1e-12)  # the same samples, the same mean

    # The program's memory, on a longer input (chunked attention) where the per-sample
    # vectors dominate it.
    model = cases("llama_gqa_untied")[0]
    inputs = jax.random.normal(key, (1024, model.config.hidden_size), jnp.float64)
    longer = linearize(model.params, inputs, model.config)

    def temporaries(samples: int, chunk: int) -> int:
        lowered = _frobenius_estimate.lower(longer, key, samples, chunk)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    sizes = {(samples, chunk): temporaries(samples, chunk) for samples, chunk in ((4, 4), (64, 4), (64, 64))}
    # Chunked, 64 samples cost what 4 do; unchunked (chunk ≥ samples) all run at once.
    assert sizes[(64, 4)] < 2 * sizes[(4, 4)] < sizes[(64, 64)] / 2


def test_bfloat16_operator_keeps_krylov_in_float32(cases):
    model, jacobian, _ = cases("llama_gqa_untied", jnp.bfloat16)
    found = top_k(jacobian, 3, tolerance=1e-2)
    assert found.U.dtype == np.float32 and np.all(np.isfinite(found.S))
    reference = cases("llama_gqa_untied")[2]
    s_ref = np.linalg.svd(reference.reshape(reference.shape[0], -1), compute_uv=False)[:3]
    np.testing.assert_allclose(found.S, s_ref, rtol=0.05)


@pytest.mark.parametrize(
    ("k", "tolerance", "match"),
    [(65, None, "top_k=65"), (0, None, "top_k=0"), (3, 0.0, "tolerance"), (3, -1e-3, "tolerance")],
)
def test_bad_requests_are_refused(k, tolerance, match, cases):
    model, jacobian, _ = cases("llama_gqa_untied")
    with pytest.raises(SpectralError, match=match):
        top_k(jacobian, k, tolerance)
