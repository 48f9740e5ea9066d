"""The runner of one input: text → token ids → the detached Jacobian (linearized once, its
rows computed once when an enabled analysis needs them) → the enabled analyses of
`jaxlin.analyses.INPUT_ANALYSES` in order → summary.json's dict and arrays.npz's arrays,
and the run directory written from them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlin import model as model_fns
from jaxlin._config import ModelConfig
from jaxlin._policy import FreezePolicy
from jaxlin.analyses import INPUT_ANALYSES, RUN_ANALYSES, Analysis, Context, Result, Timer
from jaxlin.analyses.base import last_row_user
from jaxlin.distributed import to_host
from jaxlin.errors import JaxlinError
from jaxlin.jacobian import Products, linearize
from jaxlin.loading import LoadedModel
from jaxlin.memory import InsufficientMemoryError, linearization_bytes, planned_refusal, product_bytes
from jaxlin.operator import rows
from jaxlin.outputs import RunKind, staged_directory, write_npz_atomic
from jaxlin.plan import Plan, Quantized, Workload, plan, run_sources, workload
from jaxlin.plots import write_figures
from jaxlin.quantized import layouts
from jaxlin.record import parse_record, write_record
from jaxlin.report import render_report
from jaxlin.run_config import AnalysisSection, RunConfig
from jaxlin.tokens import bos_added, bos_policy, token_text, tokenize

JACOBIAN_INPUT = (
    "raw embedding rows (before any embedding scale); y = final-normed hidden state of the last token"
)


@dataclasses.dataclass
class RunResult:
    summary: dict[str, Any]
    arrays: dict[str, np.ndarray]


def memory_estimate(
    config: ModelConfig, n: int, dtype: Any, options: AnalysisSection, analyses: Sequence[Analysis]
) -> int:
    """The linearization, one batch of products, and what each enabled analysis keeps."""
    estimate = linearization_bytes(config, n, dtype, options.attention_chunk)
    estimate += product_bytes(config, n, dtype, options.chunk, options.attention_chunk)
    return estimate + sum(analysis.memory_bytes(config, n, dtype, options) for analysis in analyses)


def check_memory(
    config: ModelConfig,
    n: int,
    dtype: Any,
    options: AnalysisSection,
    analyses: Sequence[Analysis],
    quantized: Quantized | None = None,
) -> None:
    """Refuse up front what cannot fit: the analysis of one input — the programs on its J
    and the enabled analyses' own (`Analysis.programs`), planned with the weights in the
    `quantized` layouts when the model keeps them (`quantized_layouts`)."""

    def planned() -> Plan:
        return plan(config, n, dtype, workload(options, analyses), run_mesh(), quantized)

    # What the analyses keep, and (conservatively, all at once) their own programs' peaks.
    estimate = memory_estimate(config, n, dtype, options, analyses)
    formulas = [analysis.program_bytes for analysis in analyses if analysis.program_bytes]
    estimate += sum(formula(config, n, dtype, options) for formula in formulas)
    _check(f"the analysis of {n} tokens", estimate, planned)


def check_run_memory(loaded: LoadedModel, config: RunConfig) -> None:
    """Refuse up front what the run's whole-run analyses (steering) cannot fit: they run
    after the inputs' analyses, with no input's J held, on prompts of their own."""
    analyses = [analysis for analysis in RUN_ANALYSES if analysis.enabled(config) and analysis.programs]
    if not analyses:
        return
    model = loaded.model

    def tokens_of(text: str) -> int:
        return len(tokenize(loaded.tokenizer, text, config.add_bos))

    def planned() -> Plan:
        work = Workload(linearize=False, extra=run_sources(config, tokens_of))
        return plan(model.config, 0, model.dtype, work, run_mesh(), quantized_layouts(model.params))

    formulas = [analysis.program_bytes for analysis in analyses if analysis.program_bytes]
    estimate = sum(formula(config, model.config, model.dtype, tokens_of) for formula in formulas)
    names = ", ".join(analysis.name for analysis in analyses)
    _check(names, estimate, planned)


def quantized_layouts(params: Any) -> Quantized | None:
    """The layouts of the params a model keeps quantized (`jaxlin.quantized.layouts`), by
    param path, for a plan of the programs the run compiles on them (the weights' bytes,
    the dequantizations in the layers); None for float params."""
    return layouts(params) or None


def run_mesh() -> jax.sharding.Mesh | None:
    """The mesh the run's programs are partitioned over (`jax.set_mesh`), if any: a plan
    is compiled on it, so its sizes are one device's as the run's are."""
    mesh = jax.sharding.get_mesh()
    return None if mesh.empty else mesh


def _check(what: str, estimate: int, planned: Callable[[], Plan]) -> None:
    """Refuse `what` in every process unless the formula (`estimate`) or, where it says
    no, the programs compiled with abstract weights (`jaxlin.plan`) say it fits
    (`jaxlin.memory.planned_refusal`). The weights are already resident: only what the
    programs add must fit."""
    message = planned_refusal(what, estimate, lambda: planned().above_weights)
    if message is not None:
        raise InsufficientMemoryError(message)


def analyse(
    loaded: LoadedModel,
    text: str,
    options: AnalysisSection,
    add_bos: bool | None = None,
    timer: Timer | None = None,
    progress: Callable[[str], None] | None = None,
) -> RunResult:
    """Every enabled analysis of `text`'s detached Jacobian (see the module docstring)."""
    timer = timer or Timer(verbose=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    config, params = model.config, model.params
    ids = tokenize(tokenizer, text, add_bos)
    n, d = len(ids), config.hidden_size
    if config.max_positions is not None and n > config.max_positions:
        raise JaxlinError(f"the text has {n} tokens; {model.name} has only {config.max_positions} positions")
    analyses = [analysis for analysis in INPUT_ANALYSES if analysis.enabled(options, n)]
    for analysis in analyses:
        analysis.check(options, n, d)
    check_memory(config, n, model.dtype, options, analyses, quantized_layouts(params))

    inputs = model_fns.embed(config, params, jnp.asarray(ids))
    products = Products()
    context = Context(model, tokenizer, ids, options, products, timer, progress)
    keep_rows = any(analysis.needs_rows(options) for analysis in analyses)
    with timer.step(f"detached Jacobian ({n} tokens)" + (": all d rows" if keep_rows else "")):
        jacobian = linearize(
            params, inputs, config, FreezePolicy.DETACHED, options.attention_chunk, products=products
        )
        if keep_rows:
            context.rows = rows(jacobian, None, options.chunk, products)
    last = last_row_user(analyses)
    for index, analysis in enumerate(analyses):
        context.results.append(analysis.run(jacobian, context))
        if index == last:
            context.rows = None

    summary: dict[str, Any] = {
        "model": model.name,
        "family": config.family,
        "text": text,
        "n_tokens": n,
        "tokens": token_text(tokenizer, ids),
        "token_ids": ids.tolist(),
        "add_bos": bos_policy(add_bos),
        "bos_added": bos_added(tokenizer, text, ids),
        "dtype": str(jnp.dtype(model.dtype)),
        "jacobian_input": JACOBIAN_INPUT,
    }
    arrays: dict[str, np.ndarray] = {"token_ids": ids, "inputs": to_host(inputs, np.float32)}
    for result in context.results:
        summary.update(result.summary_entries())
        arrays.update(result.arrays())
    summary["products"] = products.as_dict()
    summary["timings_seconds"] = timer.seconds
    return RunResult(summary, arrays)


def analyse_run(loaded: LoadedModel, config: RunConfig, timer: Timer) -> list[Result]:
    """The enabled analyses of the run as a whole (`RUN_ANALYSES`), each once."""
    results = []
    for analysis in RUN_ANALYSES:
        if analysis.enabled(config):
            with timer.step(analysis.step(config)):
                results.append(analysis.run(loaded, config))
    return results


def write_run(result: RunResult, out_dir: Path, kind: RunKind = "single") -> Path:
    """The run directory, written in staging and renamed into place once complete (see
    `jaxlin.outputs`); `out_dir` must be absent, empty or a jaxlin run. summary.json is the
    run record (`jaxlin.record`); the figures and the report are rendered from it."""
    record = parse_record(result.summary)
    with staged_directory(out_dir, kind) as staging:
        write_record(staging / "summary.json", record)
        write_npz_atomic(staging / "arrays.npz", result.arrays)
        write_figures(staging, record, result.arrays)
        render_report(staging, record, name=out_dir.name)
    return out_dir
