"""The layer sweep (one program for every layer) against per-tap dense Jacobians."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from converters.hf import load_hf_model
from jaxlin import model as model_fns
from jaxlin.layers import sweep
from jaxlin.model import Tap, tap_input
from jaxlin.operator import materialize


@pytest.mark.parametrize("variant", ["gemma3_sliding", "gpt2_affine"])
@pytest.mark.parametrize("local", [False, True])
def test_sweep_matches_dense_per_tap(variant, local, tiny_model_dir):
    model = load_hf_model(tiny_model_dir(variant), jnp.float64)
    config, params = model.config, model.params
    ids = np.random.default_rng(4).integers(0, 128, size=13)
    embeddings = model_fns.embed(config, params, jnp.asarray(ids))
    results = sweep(config, params, embeddings, ("residual", "mlp"), local=local, final_norm=True)
    assert len(results) == 2 * config.num_layers
    for result in results:
        assert result.reconstruction_error <= 1e-12
        tap = Tap(result.layer, result.kind, final_norm=True, local=local)
        dense = np.asarray(materialize(params, tap_input(config, params, embeddings, tap), config, tap=tap))
        reference = np.linalg.svd(dense.reshape(dense.shape[0], -1), compute_uv=True, full_matrices=False)
        s_ref = reference[1]
        np.testing.assert_allclose(result.singular_values[:8], s_ref[:8], rtol=1e-9)
        assert result.stable_rank == pytest.approx(np.sum(s_ref**2) / s_ref[0] ** 2, rel=1e-9)
        p = s_ref**2 / np.sum(s_ref**2)
        p = p[p > 0]
        assert result.entropy_rank == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-6)
        # The top left vector agrees up to sign.
        assert abs(float(result.left_vectors[0] @ reference[0][:, 0])) == pytest.approx(1.0, abs=1e-8)
