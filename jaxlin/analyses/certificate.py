"""The certificate of exactness: y = Σ_t c_t + c_bias with c_t = J_t·x_t, and the next
token read from both sides. With `analysis.ordinary_jacobian`, the same reconstruction
from the ordinary Jacobian (nothing frozen), which is not exact: the comparison shows
what detaching buys."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxlin import model as model_fns
from jaxlin.analyses.base import Analysis, Context
from jaxlin.distributed import to_host
from jaxlin.jacobian import DetachedJacobian
from jaxlin.operator import Certificate, certify, contributions, contributions_from_rows
from jaxlin.run_config import AnalysisSection


@dataclasses.dataclass(frozen=True, eq=False)
class CertificateResult:
    certificate: Certificate
    predicted_token: str
    affine: bool
    # c (N, d) in the dtype it was computed in: the ablation reads it as the model would.
    contributions: jax.Array
    y: np.ndarray  # (d,) float64
    bias: np.ndarray  # (d,) float64, c_bias
    ordinary_contributions: np.ndarray | None  # (N, d) float64
    ordinary_bias: np.ndarray | None  # (d,) float64
    ordinary_error: float | None

    @property
    def contributions_float64(self) -> np.ndarray:
        return to_host(self.contributions, np.float64)

    def summary_entries(self) -> dict[str, Any]:
        return {
            "predicted_token": self.predicted_token,
            "predicted_token_id": self.certificate.predicted_token_id,
            "reconstruction_relative_error": self.certificate.relative_error,
            "reconstruction_argmax_matches": self.certificate.argmax_matches,
            "affine": self.affine,
            "bias_contribution_norm": float(np.linalg.norm(self.bias)),
            "ordinary_jacobian_relative_error": self.ordinary_error,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        arrays = {"y": self.y, "contributions": self.contributions_float64, "bias_contribution": self.bias}
        if self.ordinary_contributions is not None and self.ordinary_bias is not None:
            arrays.update(
                ordinary_contributions=self.ordinary_contributions,
                ordinary_bias_contribution=self.ordinary_bias,
            )
        return arrays


def compares_ordinary(options: AnalysisSection, n: int) -> bool:
    """Whether the ordinary Jacobian is computed (it needs dense attention: short inputs)."""
    return options.ordinary_jacobian and n <= options.max_ordinary_tokens


def run(jacobian: DetachedJacobian, context: Context) -> CertificateResult:
    config, params, options = context.config, context.params, context.options
    n = jacobian.inputs.shape[0]
    with context.timer.step(f"certificate: Σ_t J_t·x_t + c_bias = y ({n} tokens)"):
        c = (
            contributions(jacobian, options.chunk, context.products)
            if context.rows is None
            else contributions_from_rows(context.rows, jacobian.inputs)
        )
        certificate = certify(
            jacobian.output, c, lambda h: model_fns.logits(config, params, h), jacobian.bias
        )
    y = to_host(jacobian.output, np.float64)
    ordinary_contributions = ordinary_bias = ordinary_error = None
    if compares_ordinary(options, n):
        with context.timer.step("ordinary Jacobian contributions"):
            ordinary = context.ordinary(jacobian)
            c_ordinary = contributions(ordinary, options.chunk, context.products)
            ordinary_contributions = to_host(c_ordinary, np.float64)
            ordinary_bias = to_host(ordinary.bias, np.float64)
            total = ordinary_contributions.sum(0) + ordinary_bias
            ordinary_error = float(np.linalg.norm(total - y) / np.linalg.norm(y))
    return CertificateResult(
        certificate=certificate,
        predicted_token=context.tokenizer.decode([certificate.predicted_token_id]),
        affine=config.has_biases,
        contributions=c,
        y=y,
        bias=to_host(jacobian.bias, np.float64),
        ordinary_contributions=ordinary_contributions,
        ordinary_bias=ordinary_bias,
        ordinary_error=ordinary_error,
    )


ANALYSIS = Analysis("certificate", run, uses_rows=True)
