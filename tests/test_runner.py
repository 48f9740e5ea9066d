"""The runner and its registry of analyses: every array and number of a run with every
analysis on equals the same quantity computed independently from the model (a dense
Jacobian, fresh operator products, the ablation and layer sweep called directly), and
the memory estimate is the sum of its parts."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlin import model as model_fns
from jaxlin import runner
from jaxlin._policy import FreezePolicy
from jaxlin.analyses import INPUT_ANALYSES, Analysis, Context
from jaxlin.analyses.ablation import ablate
from jaxlin.analyses.layers import dynamics
from jaxlin.analyses.spectrum import SpectrumResult
from jaxlin.jacobian import DetachedJacobian, linearize
from jaxlin.layer_sweep import sweep
from jaxlin.loading import load_model
from jaxlin.memory import linearization_bytes, product_bytes
from jaxlin.operator import contributions, rows, token_jacobian
from jaxlin.run_config import AnalysisSection
from jaxlin.runner import analyse, memory_estimate
from jaxlin.spectral import TOKEN_GROUP_BYTES
from jaxlin.tokens import tokenize

TEXT = "Hello, the bridge."


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model("hf", tiny_model_dir("gemma3_sliding"), "float64", use_cache=False, progress=False)


def everything_on() -> AnalysisSection:
    return AnalysisSection(
        top_k=4,
        decode_top_tokens=2,
        ablation=True,
        per_token={"method": "exact", "top_k": 3},
        layers={"enabled": True, "kinds": ["residual", "mlp"], "local": True, "top_k": 2},
    )


def close(actual, expected, rtol=1e-10, atol=1e-12) -> None:
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)


def test_every_result_equals_an_independent_computation(loaded):
    options = everything_on()
    result = analyse(loaded, TEXT, options)
    summary, arrays = result.summary, result.arrays
    config, params = loaded.model.config, loaded.model.params
    ids = tokenize(loaded.tokenizer, TEXT, None)
    n, d = len(ids), config.hidden_size
    inputs = model_fns.embed(config, params, jnp.asarray(ids))
    detached = linearize(params, inputs, config)
    ordinary = linearize(params, inputs, config, FreezePolicy.ORDINARY, None)
    dense = np.asarray(rows(detached), np.float64)  # (d, N, d)

    # Certificate and the ordinary comparison, from fresh products.
    c = np.asarray(contributions(detached), np.float64)
    close(arrays["y"], detached.output, rtol=0, atol=0)
    close(arrays["contributions"], c)
    close(arrays["contributions"].sum(0), arrays["y"], rtol=0, atol=1e-12 * n)
    close(arrays["ordinary_contributions"], contributions(ordinary))
    assert summary["predicted_token_id"] == int(np.argmax(model_fns.logits(config, params, detached.output)))

    # The whole J's spectrum: a dense SVD of J (d × N·d).
    u, s, vt = np.linalg.svd(dense.reshape(d, -1), full_matrices=False)
    close(arrays["S"], s[:4])
    close(summary["singular_values"], s[:4])
    for i in range(4):  # singular vectors up to sign
        assert abs(abs(float(arrays["U"][:, i] @ u[:, i])) - 1) < 1e-8
        assert abs(abs(float(arrays["V"][i].ravel() @ vt[i])) - 1) < 1e-5  # V is stored in float32

    # Every J_t's spectrum and Frobenius norm, and the norms built on them.
    blocks = np.moveaxis(dense, 1, 0)  # (N, d, d)
    block_sigma = np.linalg.svd(blocks, compute_uv=False)
    close(arrays["per_token_S"], block_sigma[:, :3])
    token_frobenius = np.linalg.norm(blocks, axis=(1, 2))
    close(arrays["token_frobenius"], token_frobenius)
    close(summary["norms"]["stable_rank"], np.sum(token_frobenius**2) / s[0] ** 2)
    close(arrays["token_contribution_norms"], np.linalg.norm(c, axis=-1))

    # The focus block: past the leading BOS, the token with the largest ‖c_t‖.
    assert int(ids[0]) == loaded.tokenizer.bos_token_id
    focus = 1 + int(np.argmax(np.linalg.norm(c[1:], axis=-1)))
    assert int(arrays["focus_position"]) == focus
    close(arrays["focus_jacobian"], np.asarray(token_jacobian(detached, focus), np.float32), rtol=0, atol=0)
    ordinary_focus = np.asarray(token_jacobian(ordinary, focus), np.float32)
    close(arrays["focus_jacobian_ordinary"], ordinary_focus, rtol=0, atol=0)

    # The ablation and the layer sweep, called directly.
    ablated = ablate(config, params, ids, detached.output, contributions(detached))
    close(arrays["ablation_linear"], ablated.linear_change)
    close(arrays["ablation_removed"], ablated.removed_change)
    close(arrays["ablation_zeroed"], ablated.zeroed_change)
    spectra = [
        r
        for local in (False, True)
        for r in sweep(config, params, inputs, ("residual", "mlp"), local, True, 2, options.chunk)
    ]
    close(arrays["layer_singular_values"], np.stack([r.singular_values for r in spectra]))
    assert [(row["scope"], row["tap"], row["layer"]) for row in summary["layers"]] == [
        ("local" if r.local else "cumulative", r.kind, r.layer) for r in spectra
    ]
    assert summary["layers"] == dynamics(config, params, inputs, ids, loaded.tokenizer, options, None).rows

    # One linearization per policy; J's d rows once; the ordinary side's N + d products;
    # the layer sweep: one linearization and d rows (short input: rows in memory) per tap.
    assert not config.has_biases
    taps = 2 * 2 * config.num_layers  # (cumulative, local) × (residual, mlp) × layers
    assert summary["products"] == {"linearizations": 2 + taps, "matvecs": n + d, "rmatvecs": d + taps * d}


def test_memory_estimate_is_the_linearization_plus_each_analysis(loaded):
    config, dtype = loaded.model.config, loaded.model.dtype
    n, d, wide = 300, config.hidden_size, 8
    base = linearization_bytes(config, n, dtype, 256) + product_bytes(config, n, dtype, 64, 256)
    cases = [
        (everything_on(), (4 + d) * n * d * wide + TOKEN_GROUP_BYTES),
        (AnalysisSection(top_k=5, per_token={"method": "projected", "rank": 16}), (5 + 16) * n * d * wide),
        (AnalysisSection(top_k=5, per_token={"method": "off"}), 5 * n * d * wide),
    ]
    for options, analyses_bytes in cases:
        if options.per_token.method == "projected":
            analyses_bytes += TOKEN_GROUP_BYTES
        enabled = [a for a in INPUT_ANALYSES if a.enabled(options, n)]
        assert memory_estimate(config, n, dtype, options, enabled) == base + analyses_bytes


@dataclasses.dataclass(frozen=True, eq=False)
class ProbeResult:
    rows_present: bool
    sigma_1: float

    def summary_entries(self) -> dict[str, Any]:
        return {"probe": {"rows_present": self.rows_present}}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"probe_sigma_1": np.asarray(self.sigma_1)}


def probe(jacobian: DetachedJacobian, context: Context) -> ProbeResult:
    return ProbeResult(context.rows is not None, context.earlier(SpectrumResult).sigma_1)


def test_an_added_analysis_reaches_the_record_and_rows_are_dropped_after_their_last_user(loaded, monkeypatch):
    """A new analysis is one registry entry; J's rows are gone once no later analysis
    reads them (an analysis that only needs memory, like the layer sweep, runs without
    them) and kept for one that does."""
    registry = list(INPUT_ANALYSES)
    monkeypatch.setattr(runner, "INPUT_ANALYSES", (*registry, Analysis("probe", probe)))
    result = analyse(loaded, TEXT, AnalysisSection(top_k=2, per_token={"method": "exact", "top_k": 1}))
    assert result.summary["probe"] == {"rows_present": False}
    assert float(result.arrays["probe_sigma_1"]) == result.summary["singular_values"][0]
    monkeypatch.setattr(runner, "INPUT_ANALYSES", (*registry, Analysis("probe", probe, uses_rows=True)))
    result = analyse(loaded, TEXT, AnalysisSection(top_k=2, per_token={"method": "exact", "top_k": 1}))
    assert result.summary["probe"] == {"rows_present": True}
