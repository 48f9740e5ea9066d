"""Norms of J and of its blocks: ‖J_t‖_F per token (exact from the per-token blocks when
they are exact, else a Hutchinson estimate), ‖J‖_F, the stable rank ‖J‖_F²/σ₁², and
each token's contribution norm ‖c_t‖."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from jaxlin._config import ModelConfig
from jaxlin.analyses.base import Analysis, Context
from jaxlin.analyses.certificate import CertificateResult
from jaxlin.analyses.per_token import PerTokenResult
from jaxlin.analyses.spectrum import SpectrumResult
from jaxlin.distributed import to_host
from jaxlin.jacobian import DetachedJacobian
from jaxlin.memory import product_bytes
from jaxlin.plan import Abstracts, ProgramMemory, program_memory
from jaxlin.run_config import AnalysisSection
from jaxlin.spectral import _frobenius_estimate, frobenius_estimate


@dataclasses.dataclass(frozen=True, eq=False)
class NormsResult:
    token_frobenius: np.ndarray  # (N,) ‖J_t‖_F
    frobenius_method: str
    sigma_1: float
    token_contribution_norms: np.ndarray  # (N,) ‖c_t‖

    @property
    def frobenius(self) -> float:
        return float(np.sqrt(np.sum(self.token_frobenius**2)))

    def summary_entries(self) -> dict[str, Any]:
        return {
            "norms": {
                "frobenius": self.frobenius,
                "frobenius_method": self.frobenius_method,
                "stable_rank": self.frobenius**2 / self.sigma_1**2,
                "token_frobenius": self.token_frobenius.tolist(),
                "token_contribution_norms": self.token_contribution_norms.tolist(),
            }
        }

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "token_frobenius": self.token_frobenius,
            "token_contribution_norms": self.token_contribution_norms,
        }


def run(jacobian: DetachedJacobian, context: Context) -> NormsResult:
    token_frobenius = context.earlier(PerTokenResult).exact_token_frobenius
    method = "exact (per-token blocks)"
    if token_frobenius is None:
        samples = context.options.frobenius_samples
        with context.timer.step(f"Hutchinson estimate of ‖J_t‖_F ({samples} samples)"):
            key = jax.random.key(context.options.seed)
            estimate = frobenius_estimate(jacobian, key, samples, context.products, context.options.chunk)
            token_frobenius = np.sqrt(np.maximum(to_host(estimate, np.float64), 0.0))
        method = f"Hutchinson estimate, {samples} samples"
    contributions = context.earlier(CertificateResult).contributions_float64
    return NormsResult(
        token_frobenius=token_frobenius,
        frobenius_method=method,
        sigma_1=context.earlier(SpectrumResult).sigma_1,
        token_contribution_norms=np.linalg.norm(contributions, axis=-1),
    )


def programs(options: AnalysisSection, planned: Abstracts) -> Iterator[ProgramMemory]:
    """The Hutchinson estimate when the per-token blocks are not exact: the samples'
    transposed products, `chunk` at a time."""
    if options.per_token.method != "exact":
        assert planned.jacobian is not None
        key = jax.eval_shape(lambda: jax.random.key(0))
        lowered = _frobenius_estimate.lower(planned.jacobian, key, options.frobenius_samples, options.chunk)
        yield program_memory("norms: Hutchinson estimate", lowered, planned.held)


def program_bytes(config: ModelConfig, n: int, dtype: Any, options: AnalysisSection) -> int:
    """The Hutchinson pass: `frobenius_samples` transposed products, `chunk` at a time."""
    if options.per_token.method == "exact":
        return 0
    batch = min(options.frobenius_samples, options.chunk or options.frobenius_samples)
    return product_bytes(config, n, dtype, batch, options.attention_chunk)


ANALYSIS = Analysis("norms", run, programs=programs, program_bytes=program_bytes)
