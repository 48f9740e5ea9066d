"""Layer dynamics: for every layer and tap (residual, attention, MLP output at the last
token; cumulative w.r.t. the input embeddings and, optionally, local w.r.t. the layer's
input), the tap's exact spectrum, its effective dimensionality, its decoded top left
vectors and how far each follows the final layer's (the 'path'), its top right vectors
read as their nearest input-embedding rows, and the tap's certificate. Each tap is its
own linearization (`jaxlin.layer_sweep.sweep`), its products counted with the run's."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxlin._config import ModelConfig
from jaxlin.analyses.base import Analysis, Context
from jaxlin.decoding import decode_left_vectors, nearest_embedding_rows, right_vector_entries
from jaxlin.jacobian import DetachedJacobian, Products
from jaxlin.layer_sweep import LayerSpectrum, sweep
from jaxlin.model import Params
from jaxlin.run_config import AnalysisSection

# What a layer tap's right singular vectors are, and so what their nearest embedding rows mean.
RIGHT_VECTOR_SPACE = {
    "cumulative": "input-embedding space (as for the whole J)",
    "local": "residual stream entering the layer (residual-stream vectors, compared with embedding rows)",
}


@dataclasses.dataclass(frozen=True, eq=False)
class LayersResult:
    rows: list[dict[str, Any]]  # one per (scope, tap, layer), as summary.json records them
    singular_values: np.ndarray  # (rows, d): every tap's full spectrum

    def summary_entries(self) -> dict[str, Any]:
        return {"layers": self.rows}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"layer_singular_values": self.singular_values}


def dynamics(
    config: ModelConfig,
    params: Params,
    inputs: jax.Array,
    ids: np.ndarray,
    tokenizer: Any,
    options: AnalysisSection,
    progress: Callable[[str], None] | None,
    products: Products | None = None,
) -> LayersResult:
    """Every tap of every layer, per scope (cumulative, and local when asked)."""
    section = options.layers
    rows: list[dict[str, Any]] = []
    sigmas: list[np.ndarray] = []
    for local in [False, True] if section.local else [False]:
        spectra = sweep(
            config,
            params,
            inputs,
            tuple(section.kinds),
            local,
            section.final_norm,
            section.top_k,
            options.chunk,
            options.attention_chunk,
            progress,
            products=products,
        )
        rows += _scope_rows(
            config, params, spectra, ids, tokenizer, options, "local" if local else "cumulative"
        )
        sigmas += [r.singular_values for r in spectra]
    return LayersResult(rows, np.stack(sigmas))


def _scope_rows(
    config: ModelConfig,
    params: Params,
    spectra: list[LayerSpectrum],
    ids: np.ndarray,
    tokenizer: Any,
    options: AnalysisSection,
    scope: str,
) -> list[dict[str, Any]]:
    top_k, count = options.layers.top_k, options.decode_top_tokens
    final = {r.kind: r for r in spectra if r.layer == config.num_layers - 1}
    # One nearest-row search for all taps' right vectors: every search scans the whole
    # embedding table (262k rows for Gemma), so one per tap would cost 3·L scans.
    rows_all = np.concatenate([r.right_rows for r in spectra])
    counts = np.cumsum([0, *(len(r.right_rows) for r in spectra)])
    nearest, cosines = nearest_embedding_rows(rows_all, params["embedder"]["embedding"], count)
    rows = []
    for index, r in enumerate(spectra):
        decoded = decode_left_vectors(
            tokenizer, r.left_vectors, r.singular_values[:top_k], config, params, r.value, count
        )
        entries = right_vector_entries(
            tokenizer,
            r.right_positions,
            r.right_shares,
            nearest[counts[index] : counts[index + 1]],
            cosines[counts[index] : counts[index + 1]],
            ids,
        )
        rows.append(
            {
                "layer": r.layer,
                "tap": r.kind,
                "scope": scope,
                "stable_rank": r.stable_rank,
                "entropy_rank": r.entropy_rank,
                "sigma_1": float(r.singular_values[0]),
                "reconstruction_relative_error": r.reconstruction_error,
                "path_cosines": np.abs(np.sum(r.left_vectors * final[r.kind].left_vectors, axis=1)).tolist(),
                "top_tokens": [entry["tokens"] for entry in decoded],
                "right_vector_space": RIGHT_VECTOR_SPACE[scope],
                "right_vectors": [
                    {**entry, "sigma": float(sigma), "relative_residual": float(residual)}
                    for sigma, residual, entry in zip(r.right_sigmas, r.right_residuals, entries, strict=True)
                ],
            }
        )
    return rows


def enabled(options: AnalysisSection, n: int) -> bool:
    return options.layers.enabled


def run(jacobian: DetachedJacobian, context: Context) -> LayersResult:
    section = context.options.layers
    with context.timer.step(f"layer sweep ({len(section.kinds)} taps × {context.config.num_layers} layers)"):
        return dynamics(
            context.config,
            context.params,
            jacobian.inputs,
            context.ids,
            context.tokenizer,
            context.options,
            context.progress,
            context.products,
        )


ANALYSIS = Analysis("layers", run, enabled=enabled)
