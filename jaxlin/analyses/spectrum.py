"""The whole J's top-k singular triplets with residual bounds: from J's rows (exact, when
they are computed anyway or `method: dense`) or by Lanczos on J·Jᵀ (matrix-free). The
left vectors are read as the tokens they push up, the right vectors at their dominant
token as the nearest input-embedding rows."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxlin._config import ModelConfig
from jaxlin.analyses.base import Analysis, Context
from jaxlin.analyses.certificate import CertificateResult
from jaxlin.decoding import decode_left_vectors, decode_right_vectors, orient_to
from jaxlin.errors import JaxlinError
from jaxlin.jacobian import DetachedJacobian
from jaxlin.run_config import AnalysisSection
from jaxlin.spectral import Triplets, check_request, rows_top_k, top_k


def method(options: AnalysisSection) -> str:
    """`auto` resolved: from the rows when exact per-token spectra compute them anyway."""
    if options.method == "auto":
        return "rows" if options.per_token.method == "exact" else "lanczos"
    return options.method


@dataclasses.dataclass(frozen=True, eq=False)
class SpectrumResult:
    method: str
    triplets: Triplets
    oriented_u: np.ndarray  # (k, d) left vectors with u·y ≥ 0
    left_tokens: list[dict[str, Any]]
    right_tokens: list[dict[str, Any]]

    @property
    def sigma_1(self) -> float:
        return float(self.triplets.S[0])

    def summary_entries(self) -> dict[str, Any]:
        triplets = self.triplets
        return {
            "singular_values": triplets.S.tolist(),
            "spectrum": {
                "method": self.method,
                "residual_bounds": triplets.bounds.tolist(),
                "krylov_depth": triplets.depth,
                "converged": triplets.converged,
                "tolerance": triplets.tolerance,
                "stop_reason": triplets.stop_reason,
                "worst_relative_bound": float(
                    np.max(triplets.bounds / np.maximum(triplets.S, np.finfo(np.float64).tiny))
                ),
                "left_vectors_top_tokens": self.left_tokens,
            },
            "right_vectors_nearest_embeddings": self.right_tokens,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        triplets = self.triplets
        return {
            "U": self.oriented_u.T,
            "S": triplets.S,
            "V": triplets.V.astype(np.float32),
            "bounds": triplets.bounds,
        }


def check(options: AnalysisSection, n: int, d: int) -> None:
    check_request(options.top_k, options.tolerance, d, "analysis.top_k")
    if options.method == "dense" and n > options.max_dense_tokens:
        raise JaxlinError(
            f"analysis.method=dense materializes J: {n} tokens > analysis.max_dense_tokens="
            f"{options.max_dense_tokens}; use method=lanczos"
        )


def memory_bytes(config: ModelConfig, n: int, dtype: Any, options: AnalysisSection) -> int:
    """The top-k right vectors (k × N × d) in the widened dtype."""
    wide = jnp.dtype(jnp.promote_types(dtype, jnp.float32)).itemsize
    return options.top_k * n * config.hidden_size * wide


def needs_rows(options: AnalysisSection) -> bool:
    return method(options) in ("rows", "dense")


def run(jacobian: DetachedJacobian, context: Context) -> SpectrumResult:
    options = context.options
    resolved = method(options)
    if context.rows is not None and resolved != "lanczos":
        d = jacobian.output.shape[0]
        with context.timer.step(f"exact top-{options.top_k} of J from its rows (J·Jᵀ, {d} × {d})"):
            triplets = rows_top_k(context.rows, options.top_k)
    else:
        with context.timer.step(f"Lanczos top-{options.top_k} of J"):
            triplets = top_k(
                jacobian,
                options.top_k,
                options.tolerance,
                options.krylov_depth,
                options.seed,
                min(options.chunk, options.top_k),
                context.progress,
                context.products,
            )
    y = context.earlier(CertificateResult).y
    oriented_u = orient_to(triplets.U.T, y)
    tokenizer, config, params, count = (
        context.tokenizer,
        context.config,
        context.params,
        options.decode_top_tokens,
    )
    return SpectrumResult(
        method=resolved,
        triplets=triplets,
        oriented_u=oriented_u,
        left_tokens=decode_left_vectors(tokenizer, oriented_u, triplets.S, config, params, y, count),
        right_tokens=decode_right_vectors(
            tokenizer, triplets.V, oriented_u, triplets.U.T, params, context.ids, count
        ),
    )


ANALYSIS = Analysis(
    "spectrum", run, check=check, memory_bytes=memory_bytes, needs_rows=needs_rows, uses_rows=True
)
