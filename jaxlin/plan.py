"""What a run needs, read from its compiled programs instead of a formula.

The planner builds abstract parameters from the model's config alone (shapes and dtypes,
no weight is read), lowers and compiles each program a run executes — the linearization
and the analyses that use its `DetachedJacobian` — and reads XLA's memory analysis of
each. The programs run one after another; between them the parameters and J's own
residuals stay resident. So the peak is

    weights + max(linearization: outputs + temporaries,
                  each analysis: J's residuals + its outputs + temporaries)

(arguments of a program are already resident: the weights, J, small vectors). This is
what XLA will allocate, not a calibration: `benchmarks/memory_scaling.py` compares it
with the measured peak resident memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxlin._config import ModelConfig
from jaxlin._modules import Transformer
from jaxlin._policy import FreezePolicy
from jaxlin.jacobian import DEFAULT_ATTENTION_BLOCK, DetachedJacobian, _linearize, linearize

Abstract = jax.ShapeDtypeStruct


@dataclasses.dataclass(frozen=True)
class Workload:
    """The parts of a run's analysis that decide its programs' shapes."""

    top_k: int = 8
    depth: int | None = None  # first Lanczos depth; None: `spectral.top_k`'s default
    chunk: int = 16
    attention_block: int | None = DEFAULT_ATTENTION_BLOCK
    method: str = "lanczos"  # lanczos | rows (J's d rows, then exact spectra from them)
    per_token: str = "off"  # off | exact | projected
    per_token_top_k: int = 3
    per_token_rank: int = 64
    contributions: bool = True
    ordinary: bool = False  # the ordinary Jacobian's contributions (a second linearization, dense attention)


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """One compiled program's memory analysis (bytes, per device)."""

    name: str
    arguments: int
    outputs: int
    temporaries: int
    aliased: int
    held: int = 0  # a Jacobian's own residuals, resident while this program runs

    @property
    def transient(self) -> int:
        """What running it adds to what is already resident (its arguments are)."""
        return self.outputs + self.temporaries - self.aliased


@dataclasses.dataclass(frozen=True)
class Plan:
    tokens: int
    dtype: str
    weights: int  # every parameter, resident for the whole run
    jacobian: int  # J's own residuals (N-dependent; the weights it refers to are not copied)
    programs: tuple[ProgramMemory, ...]

    @property
    def peak(self) -> int:
        """Per-device peak: weights + the largest program on top of what it finds resident."""
        return self.weights + max(program.held + program.transient for program in self.programs)

    @property
    def above_weights(self) -> int:
        return self.peak - self.weights


def abstract_params(config: ModelConfig, dtype: jnp.dtype) -> Any:
    """The params pytree as shapes and dtypes, from the config alone."""
    model = Transformer(config, FreezePolicy.DETACHED, dtype)
    ids = jnp.zeros((1,), jnp.int32)
    init = lambda: model.init(jax.random.key(0), ids, method=Transformer.embed_and_decode)  # noqa: E731
    return jax.eval_shape(init)["params"]


def nbytes(tree: Any) -> int:
    leaves = jax.tree_util.tree_leaves(tree)
    return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in leaves)


def _memory(name: str, lowered: Any, held: int = 0) -> ProgramMemory:
    stats = lowered.compile().memory_analysis()
    return ProgramMemory(
        name,
        int(stats.argument_size_in_bytes),
        int(stats.output_size_in_bytes),
        int(stats.temp_size_in_bytes),
        int(stats.alias_size_in_bytes),
        held,
    )


def _analysis_programs(
    jacobian: DetachedJacobian, config: ModelConfig, work: Workload
) -> Iterator[tuple[str, Callable[[], Any]]]:
    """(name, lower) for each program the analysis runs on J, in run order."""
    from jaxlin import operator, spectral

    d = config.hidden_size
    wide = jnp.promote_types(jacobian.output.dtype, jnp.float32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    need_rows = work.method == "rows" or work.per_token == "exact"
    if need_rows:
        identity = Abstract((d, d), jacobian.dtype)
        dense = jax.eval_shape(operator._rows, jacobian, identity, work.chunk)
        yield "rows", lambda: operator._rows.lower(jacobian, identity, work.chunk)
    if work.method == "rows":
        yield "top_k from rows", lambda: spectral._rows_top_k.lower(dense, work.top_k)
    else:
        depth = min(d, work.depth or max(3 * work.top_k + 24, 48))
        chunk = min(work.chunk, work.top_k)
        yield "lanczos", lambda: spectral.lanczos_top_k.lower(jacobian, key, work.top_k, depth, chunk)
    if work.contributions and not need_rows:
        yield "contributions", lambda: operator._contributions.lower(jacobian, work.chunk)
    if work.per_token == "exact":
        basis = Abstract((d, d), wide)
        yield "per-token", lambda: spectral.per_token_from_rows.lower(dense, basis, work.per_token_top_k)
    elif work.per_token == "projected":
        basis = Abstract((work.per_token_rank, d), jacobian.dtype)
        projected = jax.eval_shape(operator._rows, jacobian, basis, work.chunk)
        yield "per-token rows", lambda: operator._rows.lower(jacobian, basis, work.chunk)
        wide_basis, k = basis.update(dtype=wide), work.per_token_top_k
        yield "per-token", lambda: spectral.per_token_from_rows.lower(projected, wide_basis, k)


def plan(config: ModelConfig, tokens: int, dtype: jnp.dtype, work: Workload | None = None) -> Plan:
    """Compile the run's programs for `tokens` input tokens with abstract weights and read
    their memory analyses (minutes for a large model on CPU: compiling is the cost)."""
    work = work or Workload()
    dtype = jnp.dtype(dtype)
    params = abstract_params(config, dtype)
    inputs = Abstract((tokens, config.hidden_size), dtype)

    def linearization(policy: FreezePolicy, block: int | None) -> tuple[ProgramMemory, DetachedJacobian, int]:
        program = _memory("linearize", _linearize.lower(params, inputs, config, policy, block, None))
        # What J holds itself: the program's outputs, where the weights are `ParamRef`s.
        own = nbytes(jax.eval_shape(_linearize, params, inputs, config, policy, block, None))
        jacobian = jax.eval_shape(lambda p, x: linearize(p, x, config, policy, block), params, inputs)
        return program, jacobian, own

    first, jacobian, held = linearization(FreezePolicy.DETACHED, work.attention_block)
    programs = [first]
    for name, lower in _analysis_programs(jacobian, config, work):
        programs.append(_memory(name, lower(), held))
    if work.ordinary:
        from jaxlin import operator

        # The ordinary Jacobian is only comparable with dense attention (see `target_function`).
        second, ordinary, ordinary_held = linearization(FreezePolicy.ORDINARY, None)
        programs.append(dataclasses.replace(second, name="ordinary linearize", held=held))
        lowered = operator._contributions.lower(ordinary, work.chunk)
        programs.append(_memory("ordinary contributions", lowered, held + ordinary_held))
    return Plan(tokens, dtype.name, nbytes(params), held, tuple(programs))


def workload(options: Any) -> Workload:
    """The `Workload` of a run config's `analysis` section."""
    per_token = options.per_token
    rows = options.method == "dense" or (options.method == "auto" and per_token.method == "exact")
    return Workload(
        top_k=options.top_k,
        depth=options.krylov_depth,
        chunk=options.chunk,
        attention_block=options.attention_block,
        method="rows" if rows else "lanczos",
        per_token=per_token.method,
        per_token_top_k=per_token.top_k,
        per_token_rank=per_token.rank,
        ordinary=options.ordinary_jacobian,
    )


def describe(planned: Plan, limit: int | None) -> str:
    """The plan as terminal lines: each program, the peak, and whether it fits."""
    gib = lambda value: f"{value / 2**30:8.2f} GiB"  # noqa: E731
    lines = [
        f"{planned.tokens} tokens, {planned.dtype}: weights {gib(planned.weights)}, "
        f"J's own residuals {gib(planned.jacobian)}",
        f"  {'program':<24}{'held':>12}{'outputs':>12}{'temporaries':>12}",
    ]
    for program in planned.programs:
        lines.append(
            f"  {program.name:<24}{gib(program.held)}{gib(program.outputs)}{gib(program.temporaries)}"
        )
    verdict = "" if limit is None else (" — fits" if planned.peak <= limit else " — does NOT fit")
    device = "" if limit is None else f" of {gib(limit).strip()} per device"
    lines.append(f"  peak per device {gib(planned.peak).strip()}{device}{verdict}")
    return "\n".join(lines)


def plan_run(config: Any, tokens: Sequence[int]) -> list[Plan]:
    """The plans of a run config's analysis for each input length, from the model's config
    alone: no weight is read (`jaxlin.model_source`)."""
    from jaxlin.errors import JaxlinError
    from jaxlin.loading import enable_dtype
    from jaxlin.model_source import read_model_config

    bad = [n for n in tokens if n < 1]
    if bad:
        raise JaxlinError(f"--tokens: every length must be at least 1 (got {bad[0]})")
    model = read_model_config(config.model)
    if model.max_positions is not None and max(tokens) > model.max_positions:
        raise JaxlinError(f"--tokens: {max(tokens)} exceeds the model's {model.max_positions} positions")
    dtype = enable_dtype(config.model.dtype)
    work = workload(config.analysis)
    return [plan(model, n, dtype, work) for n in tokens]
