"""Every token Jacobian J_t: its top singular triplets with residual bounds, exact
(from J's d rows) or projected on a rank-r Krylov basis of the whole J. The first left
vector of each J_t is read as the tokens it pushes up, the first right vector as the
nearest input-embedding rows."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxlin._config import ModelConfig
from jaxlin.analyses.base import Analysis, Context
from jaxlin.analyses.certificate import CertificateResult
from jaxlin.decoding import decode_left_vectors, nearest_embedding_tokens
from jaxlin.distributed import to_host
from jaxlin.errors import JaxlinError
from jaxlin.jacobian import DetachedJacobian
from jaxlin.operator import rows
from jaxlin.run_config import AnalysisSection
from jaxlin.spectral import TOKEN_GROUP_BYTES, check_request, krylov_basis, per_token_from_rows
from jaxlin.tokens import token_text


@dataclasses.dataclass(frozen=True, eq=False)
class PerTokenResult:
    method: str
    # All None with method "off".
    left: np.ndarray | None = None  # (N, k, d)
    sigma: np.ndarray | None = None  # (N, k)
    right: np.ndarray | None = None  # (N, k, d)
    bounds: np.ndarray | None = None  # (N, k)
    # ‖J_t‖_F (exact) or the Frobenius norm captured by the projection (projected).
    frobenius: np.ndarray | None = None
    top_left_vector: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def exact_token_frobenius(self) -> np.ndarray | None:
        """‖J_t‖_F (N,) when the token Jacobians are exact."""
        return self.frobenius if self.method == "exact" else None

    def summary_entries(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"method": self.method}
        if self.sigma is not None and self.bounds is not None:
            entry["top_left_vector"] = self.top_left_vector
            entry["singular_values"] = self.sigma.tolist()
            entry["max_relative_bound"] = float(np.max(self.bounds / np.maximum(self.sigma, 1e-300)))
        return {"per_token": entry}

    def arrays(self) -> dict[str, np.ndarray]:
        if self.left is None or self.sigma is None or self.right is None or self.bounds is None:
            return {}
        arrays = {
            "per_token_U": self.left,
            "per_token_S": self.sigma,
            "per_token_V": self.right.astype(np.float32),
            "per_token_bounds": self.bounds,
        }
        if self.method == "projected" and self.frobenius is not None:
            arrays["per_token_captured_frobenius"] = self.frobenius
        return arrays


def check(options: AnalysisSection, n: int, d: int) -> None:
    section = options.per_token
    if section.method == "off":
        return
    check_request(section.top_k, None, d, "analysis.per_token.top_k")
    if section.method == "projected" and not section.top_k <= section.rank <= d:
        raise JaxlinError(
            f"analysis.per_token.rank={section.rank} must lie between per_token.top_k and d={d}"
        )


def memory_bytes(config: ModelConfig, n: int, dtype: Any, options: AnalysisSection) -> int:
    """The rows (rank × N × d) stay in memory; their Gram matrices are formed a group of
    tokens at a time."""
    if options.per_token.method == "off":
        return 0
    wide = jnp.dtype(jnp.promote_types(dtype, jnp.float32)).itemsize
    rank = config.hidden_size if options.per_token.method == "exact" else options.per_token.rank
    return rank * n * config.hidden_size * wide + TOKEN_GROUP_BYTES


def needs_rows(options: AnalysisSection) -> bool:
    return options.per_token.method == "exact"


def run(jacobian: DetachedJacobian, context: Context) -> PerTokenResult:
    options, section = context.options, context.options.per_token
    if section.method == "off":
        return PerTokenResult("off")
    n, d = jacobian.inputs.shape
    with context.timer.step(f"per-token top-{section.top_k} for all {n} tokens ({section.method})"):
        if section.method == "exact":
            if context.rows is None:
                raise LookupError("per_token exact runs on J's rows (the runner computes them)")
            wide = jnp.promote_types(context.model.dtype, jnp.float32)
            basis, projected = jnp.eye(d, dtype=wide), context.rows
        else:
            basis = krylov_basis(jacobian, section.rank, options.seed, context.products)
            projected = rows(jacobian, basis, options.chunk, context.products)
        left, sigma, right, bounds, frob_sq = to_host(per_token_from_rows(projected, basis, section.top_k))
    y = context.earlier(CertificateResult).y
    return PerTokenResult(
        method=section.method,
        left=left,
        sigma=sigma,
        right=right,
        bounds=bounds,
        frobenius=np.sqrt(np.asarray(frob_sq, np.float64)),
        top_left_vector=_top_left_vectors(context, left, sigma, right, y),
    )


def _top_left_vectors(
    context: Context, left: np.ndarray, sigma: np.ndarray, right: np.ndarray, y: np.ndarray
) -> list[dict[str, Any]]:
    """Each J_t's first left vector decoded, and its first right vector read as the
    input-embedding rows nearest to it (its sign follows the left vector's orientation
    u·y ≥ 0)."""
    tokenizer, params, count = context.tokenizer, context.params, context.options.decode_top_tokens
    first = left[:, 0, :]
    entries = [
        {"token": token, **entry}
        for token, entry in zip(
            token_text(tokenizer, context.ids),
            decode_left_vectors(tokenizer, first, sigma[:, 0], context.config, params, y, count),
            strict=True,
        )
    ]
    signs = np.where(first @ y < 0, -1.0, 1.0)
    right_first = right[:, 0, :] * signs[:, None]
    for entry, nearest in zip(
        entries, nearest_embedding_tokens(tokenizer, right_first, params, count), strict=True
    ):
        entry["right_vector_nearest_tokens"] = nearest
    return entries


ANALYSIS = Analysis(
    "per_token", run, check=check, memory_bytes=memory_bytes, needs_rows=needs_rows, uses_rows=True
)
