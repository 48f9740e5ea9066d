"""The analyses, one module each, and the registry the runner follows.

Each module of an input analysis owns a frozen result dataclass (with its summary.json
entries and arrays.npz entries), `run(J, context) → result`, and one `ANALYSIS` line
naming when it runs, what it refuses, its memory and its use of J's rows (see
`base.Analysis`); its config section is a field of `AnalysisSection` in
`jaxlin.run_config`. Adding an analysis = one module + one config section + one line in
`INPUT_ANALYSES` (and, when it compiles programs of its own, its `programs` hook, so
that `jaxlin plan` and the run's memory check see them). The order is the order they
run in: a later analysis reads earlier results through `context.earlier(ResultType)`."""

from __future__ import annotations

from jaxlin.analyses import ablation, certificate, focus, layers, norms, per_token, spectrum, steering
from jaxlin.analyses.base import Analysis, Context, Result, RunAnalysis, Timer

# Analyses of each input's detached Jacobian, in the order they run.
INPUT_ANALYSES: tuple[Analysis, ...] = (
    certificate.ANALYSIS,
    spectrum.ANALYSIS,
    per_token.ANALYSIS,
    norms.ANALYSIS,
    focus.ANALYSIS,
    ablation.ANALYSIS,
    layers.ANALYSIS,
)

# Analyses of the run as a whole, once per run.
RUN_ANALYSES: tuple[RunAnalysis, ...] = (steering.ANALYSIS,)

__all__ = ["INPUT_ANALYSES", "RUN_ANALYSES", "Analysis", "Context", "Result", "RunAnalysis", "Timer"]
