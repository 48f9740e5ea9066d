"""What every analysis shares: the `Analysis` entry a registry lists, the `Context` a run
passes from one analysis to the next, and the `Result` each returns.

An analysis is a module holding a frozen result dataclass, a `run(J, context) → result`
function and one `ANALYSIS = Analysis(...)` line naming what else it owns: when it is
enabled, the requests it refuses, the memory it needs beyond the linearization, and
whether it needs (or merely uses) J's rows, and — when it compiles programs of its own
beyond those on the input's J (`jaxlin.plan.Workload`) — how the planner lowers them."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import jax
import numpy as np

from jaxlin._config import ModelConfig
from jaxlin._policy import FreezePolicy
from jaxlin.jacobian import DetachedJacobian, Products, linearize
from jaxlin.loading import LoadedModel
from jaxlin.model import Model
from jaxlin.plan import Abstracts, ProgramMemory
from jaxlin.run_config import AnalysisSection, RunConfig


class Timer:
    """Wall time of each named step of a run (and, when verbose, a line as each starts)."""

    def __init__(self, verbose: bool) -> None:
        self.seconds: dict[str, float] = {}
        self.verbose = verbose

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        if self.verbose:
            print(f"[jaxlin] {name} …", file=sys.stderr, flush=True)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)


class Result(Protocol):
    """A frozen dataclass of arrays and scalars that knows its part of the run record."""

    def summary_entries(self) -> dict[str, Any]:
        """Its top-level keys of summary.json."""
        ...

    def arrays(self) -> dict[str, np.ndarray]:
        """Its entries of arrays.npz."""
        ...


ResultType = TypeVar("ResultType", bound=Result)


@dataclasses.dataclass
class Context:
    """What the analyses of one input share. `rows` are J's d rows (d, N, d) when an
    enabled analysis needs them (the runner drops them once no later analysis uses them);
    `results` holds the results of the analyses run so far, in order."""

    model: Model
    tokenizer: Any
    ids: np.ndarray
    options: AnalysisSection
    products: Products
    timer: Timer
    progress: Callable[[str], None] | None
    rows: jax.Array | None = None
    results: list[Result] = dataclasses.field(default_factory=list)
    _ordinary: DetachedJacobian | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def params(self) -> Any:
        return self.model.params

    def earlier(self, kind: type[ResultType]) -> ResultType:
        """The result of type `kind` an earlier analysis produced."""
        for result in self.results:
            if isinstance(result, kind):
                return result
        raise LookupError(f"no {kind.__name__} before this analysis (see the registry's order)")

    def ordinary(self, jacobian: DetachedJacobian) -> DetachedJacobian:
        """The ordinary (nothing frozen) Jacobian at the same input, linearized once on
        first request."""
        if self._ordinary is None:
            self._ordinary = linearize(
                self.params,
                jacobian.inputs,
                self.config,
                FreezePolicy.ORDINARY,
                self.options.attention_chunk,
                products=self.products,
            )
        return self._ordinary


def always(options: AnalysisSection, n: int) -> bool:
    return True


def never_needs_rows(options: AnalysisSection) -> bool:
    return False


def nothing_to_check(options: AnalysisSection, n: int, d: int) -> None:
    return None


def no_extra_memory(config: ModelConfig, n: int, dtype: Any, options: AnalysisSection) -> int:
    return 0


@dataclasses.dataclass(frozen=True)
class Analysis:
    """One analysis of one input, as the registry lists it.

    - `run(J, context)`: its result;
    - `enabled(options, n)`: whether it runs for an input of n tokens;
    - `check(options, n, d)`: refuses a bad request, naming the field, before any product;
    - `memory_bytes(config, n, dtype, options)`: what it keeps beyond the linearization
      and one batch of products (the runner adds those);
    - `needs_rows(options)`: it asks for all d rows of J (the runner computes them once);
    - `uses_rows`: it reads them when they are there (they are kept until it has run);
    - `programs(options, abstracts)`: its own programs' memory (`jaxlin.plan.program_memory`
      of each, lowered with the plan's abstract arrays), each with the bytes resident
      beside the weights while it runs — the input's J included (`abstracts.held`);
    - `program_bytes(config, n, dtype, options)`: a conservative formula of those programs'
      peak beyond what `memory_bytes` counts (what it keeps), the free check before any
      is compiled (`runner.check_memory`)."""

    name: str
    run: Callable[[DetachedJacobian, Context], Result]
    enabled: Callable[[AnalysisSection, int], bool] = always
    check: Callable[[AnalysisSection, int, int], None] = nothing_to_check
    memory_bytes: Callable[[ModelConfig, int, Any, AnalysisSection], int] = no_extra_memory
    needs_rows: Callable[[AnalysisSection], bool] = never_needs_rows
    uses_rows: bool = False
    programs: Callable[[AnalysisSection, Abstracts], Iterable[ProgramMemory]] | None = None
    program_bytes: Callable[[ModelConfig, int, Any, AnalysisSection], int] | None = None


def last_row_user(analyses: Sequence[Analysis]) -> int:
    """Index of the last analysis that reads J's rows (-1: none): the runner drops them
    after it, since they are the run's largest array and later ones (the layer sweep) need
    memory; the planner plans the analyses after it without them."""
    return max((i for i, analysis in enumerate(analyses) if analysis.uses_rows), default=-1)


@dataclasses.dataclass(frozen=True)
class RunAnalysis:
    """An analysis of the run as a whole rather than of one input (steering: it
    linearizes its own concept prompt), run once per run — after the single input's
    analyses, or after a many-prompt run's aggregation, when no input's J is held.
    `step(config)` names its timed step; `program_bytes(config, model, dtype, tokens_of)`
    is a conservative formula of what its programs need beside the weights, and
    `programs(config, tokens_of, abstracts)` its programs' memory as the planner reads it
    (`tokens_of(text)`: how many tokens a prompt takes)."""

    name: str
    run: Callable[[LoadedModel, RunConfig], Result]
    enabled: Callable[[RunConfig], bool]
    step: Callable[[RunConfig], str]
    program_bytes: Callable[[RunConfig, ModelConfig, Any, Callable[[str], int]], int] | None = None
    programs: Callable[[RunConfig, Callable[[str], int], Abstracts], Iterable[ProgramMemory]] | None = None
