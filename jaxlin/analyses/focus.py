"""The most important token's Jacobian J_t (d × d) as an image, detached and (when the
ordinary Jacobian is compared) ordinary. The focus token is the one with the largest
contribution ‖c_t‖, past a leading BOS, which often acts as an attention sink."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxlin.analyses.base import Analysis, Context
from jaxlin.analyses.certificate import CertificateResult
from jaxlin.distributed import to_host
from jaxlin.jacobian import DetachedJacobian
from jaxlin.operator import _token_jacobian, token_jacobian, token_jacobian_from_rows
from jaxlin.plan import Abstracts, ProgramMemory, program_memory
from jaxlin.run_config import AnalysisSection
from jaxlin.tokens import starts_with_bos


@dataclasses.dataclass(frozen=True, eq=False)
class FocusResult:
    position: int
    jacobian: np.ndarray  # (d, d) float32
    ordinary_jacobian: np.ndarray | None  # (d, d) float32

    def summary_entries(self) -> dict[str, Any]:
        return {}

    def arrays(self) -> dict[str, np.ndarray]:
        arrays = {"focus_jacobian": self.jacobian, "focus_position": np.asarray(self.position)}
        if self.ordinary_jacobian is not None:
            arrays["focus_jacobian_ordinary"] = self.ordinary_jacobian
        return arrays


def focus_position(contributions: np.ndarray, starts_with_bos: bool) -> int:
    """argmax_t ‖c_t‖, past a leading BOS (when there is another token)."""
    skip = 1 if len(contributions) > 1 and starts_with_bos else 0
    return skip + int(np.argmax(np.linalg.norm(contributions[skip:], axis=-1)))


def run(jacobian: DetachedJacobian, context: Context) -> FocusResult:
    certificate = context.earlier(CertificateResult)
    focus = focus_position(certificate.contributions_float64, starts_with_bos(context.tokenizer, context.ids))
    chunk, products = context.options.chunk, context.products
    with context.timer.step(f"Jacobian of token {focus}"):
        focus_jacobian = (
            token_jacobian(jacobian, focus, chunk, products)
            if context.rows is None
            else token_jacobian_from_rows(context.rows, focus)
        )
        ordinary = None
        if certificate.ordinary_error is not None:
            ordinary = to_host(token_jacobian(context.ordinary(jacobian), focus, chunk, products), np.float32)
    return FocusResult(focus, to_host(focus_jacobian, np.float32), ordinary)


def programs(options: AnalysisSection, planned: Abstracts) -> Iterator[ProgramMemory]:
    """The focus token's Jacobian from d forward products when J's rows are not at hand,
    and the ordinary Jacobian's when it is compared."""
    token = planned.replicated((), jnp.int32)
    if planned.rows is None and planned.jacobian is not None:
        lowered = _token_jacobian.lower(planned.jacobian, token, options.chunk)
        yield program_memory("focus: token Jacobian", lowered, planned.held)
    if planned.ordinary is not None:
        lowered = _token_jacobian.lower(planned.ordinary, token, options.chunk)
        yield program_memory("focus: ordinary token Jacobian", lowered, planned.held)


ANALYSIS = Analysis("focus", run, uses_rows=True, programs=programs)
