"""The layer sweep (one program for every layer) against per-tap dense Jacobians."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from converters.hf import load_hf_model
from jaxlin import model as model_fns
from jaxlin.analyses.layers import dynamics
from jaxlin.jacobian import linearize
from jaxlin.layer_sweep import sweep
from jaxlin.model import Tap, tap_input
from jaxlin.operator import rows
from jaxlin.run_config import AnalysisSection


@pytest.mark.parametrize(
    ("variant", "local", "rows_in_memory"),
    [
        ("gemma3_sliding", False, True),
        ("gemma3_sliding", True, True),
        ("gpt2_affine", False, True),
        ("gpt2_affine", True, True),
        # The streamed path (long inputs): products instead of J's rows.
        ("gemma3_sliding", False, False),
        ("gpt2_affine", True, False),
    ],
)
def test_sweep_matches_dense_per_tap(variant, local, rows_in_memory, tiny_model_dir):
    model = load_hf_model(tiny_model_dir(variant), jnp.float64)
    config, params = model.config, model.params
    ids = np.random.default_rng(4).integers(0, 128, size=13)
    embeddings = model_fns.embed(config, params, jnp.asarray(ids))
    results = sweep(
        config,
        params,
        embeddings,
        ("residual", "mlp"),
        local=local,
        final_norm=True,
        keep_right_vectors=True,
        rows_in_memory=rows_in_memory,
    )
    assert len(results) == 2 * config.num_layers
    for result in results:
        assert result.reconstruction_error <= 1e-12
        tap = Tap(result.layer, result.kind, final_norm=True, local=local)
        dense = np.asarray(
            rows(linearize(params, tap_input(config, params, embeddings, tap), config, tap=tap))
        )
        reference = np.linalg.svd(dense.reshape(dense.shape[0], -1), compute_uv=True, full_matrices=False)
        s_ref = reference[1]
        np.testing.assert_allclose(result.singular_values[:8], s_ref[:8], rtol=1e-9)
        assert result.stable_rank == pytest.approx(np.sum(s_ref**2) / s_ref[0] ** 2, rel=1e-9)
        p = s_ref**2 / np.sum(s_ref**2)
        p = p[p > 0]
        assert result.entropy_rank == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-6)
        # The top left vector agrees up to sign.
        assert abs(float(result.left_vectors[0] @ reference[0][:, 0])) == pytest.approx(1.0, abs=1e-8)
        # Right vectors: J v = σ u and Jᵀ u = σ v against the dense tap Jacobian, unit norm,
        # and the in-program residual agrees.
        matrix = dense.reshape(dense.shape[0], -1)
        k = len(result.left_vectors)
        right = result.right_vectors.reshape(k, -1)
        np.testing.assert_allclose(result.right_sigmas, s_ref[:k], rtol=1e-10)
        np.testing.assert_allclose(np.linalg.norm(right, axis=1), 1.0, rtol=1e-12)
        scale = s_ref[0]
        np.testing.assert_allclose(
            right @ matrix.T, result.right_sigmas[:, None] * result.left_vectors, rtol=0, atol=1e-10 * scale
        )
        np.testing.assert_allclose(
            result.left_vectors @ matrix, result.right_sigmas[:, None] * right, rtol=0, atol=1e-10 * scale
        )
        assert np.all(result.right_residuals <= 1e-10)
        # The row read for decoding is v_i at the position carrying most of its norm.
        energy = np.sum(result.right_vectors**2, axis=2)
        np.testing.assert_array_equal(result.right_positions, np.argmax(energy, axis=1))
        np.testing.assert_allclose(result.right_shares, np.max(energy, axis=1), rtol=1e-12)
        np.testing.assert_array_equal(
            result.right_rows, result.right_vectors[np.arange(k), result.right_positions]
        )


def test_layer_right_vectors_decode_to_planted_embedding_rows(tiny_model_dir):
    """Each tap's top right vector, read at its dominant position, is planted (scaled) as the
    embedding row of a token the input does not use, so J is unchanged; the decoding must
    find that row with cosine 1 (a sign error would give −1), for cumulative taps (input-
    embedding space) and local ones (residual stream compared with embedding rows)."""

    class Tokenizer:
        def decode(self, ids: list[int]) -> str:
            return f"t{ids[0]}"

    model = load_hf_model(tiny_model_dir("gemma3_sliding"), jnp.float64)
    config, params = model.config, model.params
    ids = np.random.default_rng(4).integers(0, 64, size=13)  # rows ≥ 64 are free to plant
    embeddings = model_fns.embed(config, params, jnp.asarray(ids))
    kinds = ("residual", "mlp")
    taps = [
        r for local in (False, True) for r in sweep(config, params, embeddings, kinds, local, final_norm=True)
    ]
    planted = {(r.layer, r.kind, r.local): 64 + i for i, r in enumerate(taps)}
    table = np.array(params["embedder"]["embedding"])
    for r in taps:
        table[planted[(r.layer, r.kind, r.local)]] = 3.0 * r.right_rows[0]
    planted_params = {**params, "embedder": {**params["embedder"], "embedding": jnp.asarray(table)}}
    options = AnalysisSection(
        layers={"enabled": True, "kinds": list(kinds), "local": True}, decode_top_tokens=3
    )
    rows = dynamics(config, planted_params, embeddings, ids, Tokenizer(), options, None).rows
    assert len(rows) == len(taps)
    for row in rows:
        first = row["right_vectors"][0]
        token = planted[(row["layer"], row["tap"], row["scope"] == "local")]
        # Layer 0's local tap is J w.r.t. the scaled embeddings, parallel to its cumulative
        # twin: their planted rows tie at cosine 1, so ask for the planted row among the ties.
        exact = [
            tok
            for tok, cosine in zip(first["nearest_tokens"], first["cosines"], strict=True)
            if cosine > 1 - 1e-5
        ]
        assert f"t{token}" in exact, (row["layer"], row["tap"], row["scope"], first)
        assert first["dominant_token"] == f"t{ids[first['dominant_position']]}"
        assert first["relative_residual"] <= 1e-10
        assert ("residual stream" in row["right_vector_space"]) == (row["scope"] == "local")


def test_one_linearizing_program_serves_every_layer(tiny_model_dir):
    """The tap's layer is data: a sweep compiles one linearization per tap kind, not per layer."""
    from jaxlin import jacobian

    model = load_hf_model(tiny_model_dir("gemma3_sliding"), jnp.float64)
    config, params = model.config, model.params
    assert config.num_layers > 1
    embeddings = model_fns.embed(config, params, jnp.asarray(np.arange(5)))
    jacobian._linearize.clear_cache()
    sweep(config, params, embeddings, ("residual", "mlp"), local=False, final_norm=True)
    assert jacobian._linearize._cache_size() == 2
