"""What a run needs, read from its compiled programs instead of a formula.

The planner builds abstract parameters from the model's config alone (shapes and dtypes,
no weight is read), lowers and compiles each program a run executes — the linearization
and the analyses that use its `DetachedJacobian` — and reads XLA's memory analysis of
each. The programs run one after another; between them the parameters and J's own
residuals stay resident. So the peak is

    weights + max(linearization: outputs + temporaries,
                  each analysis: J's residuals + its outputs + temporaries)

(arguments of a program are already resident: the weights, J, small vectors). This is
what XLA will allocate, not a calibration: `benchmarks/plan_accuracy.py` compares it
with the measured peak resident memory.

Beyond the programs on J (`Workload`), each enabled analysis that compiles programs of
its own plans them itself (`Analysis.programs`, `RunAnalysis.programs`: the layer
sweep's tap linearizations and spectra, the ablation's edited forwards, the Hutchinson
pass, the focus block, steering's concept Jacobian and greedy step, a length study's
prefixes), lowered with the same abstract arrays (`Abstracts`) and each with what it finds
held: J's residuals, J's rows while the analyses that read them run, the ordinary
Jacobian once made, a previous tap's J. `jaxlin run` plans on its own mesh
(`runner.check_memory`), and every process of a run refuses when one does.

On a data × fsdp × tensor mesh (`jaxlin.mesh`) the abstract weights carry the shardings
its rules give them, the programs are partitioned as a run's are, and every size is one
device's: the weights' shards, J's residuals as the partitioner placed them, and XLA's
per-device memory analysis. `smallest_mesh` searches meshes by device count for the first
whose peak fits a device's memory; `jaxlin plan --devices N` compiles for N host CPU
devices when fewer are present (compiling needs the devices, not their memory).
`--quantized Q4_K` plans the matrices in that GGUF block layout, as `model.quantized`
keeps a GGUF's on device (jaxlin.quantized). A GGUF source with `model.quantized: true`
is planned in the file's own layouts, read from its header and tensor index (no weight),
and split on a mesh as `jaxlin.mesh` splits quantized params.

A plan compiled on host CPU devices for other hardware (`jaxlin plan --device-memory`)
stands in for an accelerator (`stand_in`): XLA's CPU backend computes bfloat16 dots in
float32, and its loop-invariant code motion then hoists every layer's weight conversion
out of the layer scan — a float32 copy of all the weights in the temporaries, which a
GPU or TPU, computing in bfloat16, never makes. Such a plan is compiled without that pass
(float32, float64 and quantized programs then differ by bytes — a loop's hoisted scalars
— tests/test_plan.py).
A plan for this machine's own run (`jaxlin run`'s refusal) compiles as the run does.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxlin._config import ModelConfig
from jaxlin._modules import Transformer
from jaxlin._policy import FreezePolicy
from jaxlin.jacobian import DEFAULT_ATTENTION_CHUNK, DetachedJacobian, _linearize, _resolve_params
from jaxlin.mesh import AXIS_ORDER, MESH_AXES, SEQUENCE_AXIS, input_sharding, make_mesh, param_specs
from jaxlin.model import Tap

Abstract = jax.ShapeDtypeStruct
MeshSizes = dict[str, int]  # axis → size (jaxlin.mesh's data × fsdp × tensor × sequence); one left out is 1
# The quantized layouts planned: a GGUF block type's name (`QUANTIZED_LAYOUTS`), or a file's
# own layouts by param path (`jaxlin.quantized.layouts`, as `gguf_quantized_layouts` reads them).
Quantized = str | Mapping[str, Mapping[str, Any]]
GGUF_OWN_LAYOUTS = "the GGUF's own"

# GGUF block layouts a plan can assume for an HF source's matrices (`--quantized`), as
# jaxlin.quantized holds them on device: (bits, values per group, per-group offset).
# Q4_K: 4-bit codes with a float32 scale and offset per 32 values (6 bits a value on
# device; llama.cpp's file stores 4.5). Q8_0: int8 codes, a float32 scale per 32 values.
QUANTIZED_LAYOUTS: dict[str, tuple[int, int, bool]] = {
    "Q4_K": (4, 32, True),
    "Q4_0": (4, 32, False),
    "Q4_1": (4, 32, True),
    "Q8_0": (8, 32, False),
}


@dataclasses.dataclass(frozen=True)
class Workload:
    """The parts of a run's analysis that decide its programs' shapes."""

    top_k: int = 8
    depth: int | None = None  # first Lanczos depth; None: `spectral.top_k`'s default
    chunk: int = 16
    attention_chunk: int | None = DEFAULT_ATTENTION_CHUNK
    method: str = "lanczos"  # lanczos | rows (J's d rows, then exact spectra from them)
    per_token: str = "off"  # off | exact | projected
    per_token_top_k: int = 3
    per_token_rank: int = 64
    contributions: bool = True
    ordinary: bool = False  # the ordinary Jacobian's contributions (a second linearization, dense attention)
    # The input's own J and the programs above; False: only `extra` (the whole run's analyses).
    linearize: bool = True
    # The enabled analyses' own programs, each source planned by its analysis module
    # (`Analysis.programs`, `RunAnalysis.programs`), in run order.
    extra: tuple[ProgramSource, ...] = ()


# XLA options a plan standing in for an accelerator compiles with (see the module docstring).
STAND_IN_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
_compiler_options: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "jaxlin_plan_compiler_options", default=None
)


def _compile(lowered: jax.stages.Lowered) -> jax.stages.Compiled:
    """`lowered` compiled as the plan in progress asks (`plan(..., stand_in=)`)."""
    options = _compiler_options.get()
    return lowered.compile(compiler_options=options) if options else lowered.compile()


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
    weights: int  # every parameter (this device's shards), resident for the whole run
    jacobian: int  # J's own residuals (N-dependent; the weights it refers to are not copied)
    programs: tuple[ProgramMemory, ...]
    mesh: tuple[tuple[str, int], ...] = ()  # the data × fsdp × tensor sizes; () for one device
    quantized: str | None = None  # the block layout assumed for the matrices, if any
    stand_in: bool = False  # compiled on CPU for an accelerator (see the module docstring)

    @property
    def peak(self) -> int:
        """Per-device peak: weights + the largest program on top of what it finds resident."""
        return self.weights + max((program.held + program.transient for program in self.programs), default=0)

    @property
    def above_weights(self) -> int:
        return self.peak - self.weights


def abstract_params(
    config: ModelConfig, dtype: jnp.dtype, mesh: Any = None, quantized: Quantized | None = None
) -> Any:
    """The params pytree as shapes and dtypes, from the config alone; with `quantized`, its
    matrices in that GGUF block layout (`quantized_layouts`) or in a file's own layouts; on
    `mesh`, each leaf carries the NamedSharding `jaxlin.mesh`'s rules give it."""
    model = Transformer(config, FreezePolicy.DETACHED, dtype)
    ids = jnp.zeros((1,), jnp.int32)
    init = lambda: model.init(jax.random.key(0), ids, method=Transformer.embed_and_decode)  # noqa: E731
    params = jax.eval_shape(init)["params"]
    if quantized is not None:
        from jaxlin.quantized import with_layouts

        recorded = quantized_layouts(params, quantized) if isinstance(quantized, str) else quantized
        params = with_layouts(params, recorded, dtype)
    if mesh is not None:
        specs = param_specs(params, config, mesh)
        params = jax.tree_util.tree_map(
            lambda leaf, spec: leaf.update(sharding=jax.sharding.NamedSharding(mesh, spec)), params, specs
        )
    return params


def quantized_layouts(params: Any, kind: str) -> dict[str, dict[str, Any]]:
    """`jaxlin.quantized.layouts` of the params as a GGUF file quantized to `kind` would have
    them: every Dense kernel and the embedding (matrices whose rows split into whole groups);
    norm scales, biases and position tables stay float, as llama.cpp keeps them."""
    from jaxlin.errors import JaxlinError

    if kind not in QUANTIZED_LAYOUTS:
        raise JaxlinError(f"--quantized: {kind!r} is not one of {', '.join(QUANTIZED_LAYOUTS)}")
    bits, group, with_offset = QUANTIZED_LAYOUTS[kind]
    layouts: dict[str, dict[str, Any]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(getattr(key, "key", key)) for key in path]
        kernel = names[-1] == "kernel" and len(leaf.shape) >= 2
        embedding = names[-2:] == ["embedder", "embedding"]
        if not (kernel or embedding):
            continue
        # GGUF stores HF's (out, in) matrix; a Flax kernel is its transpose (in, out).
        *lead, rows, cols = leaf.shape if embedding else (*leaf.shape[:-2], leaf.shape[-1], leaf.shape[-2])
        if cols % group:
            continue  # llama.cpp falls back to another type for such rows: planned as float
        scale = [*lead, rows, cols // group]
        codes = [*lead, rows, cols // 2 if bits == 4 else cols]
        layouts[jax.tree_util.keystr(path)] = {
            "bits": bits,
            "group": group,
            "code_offset": -8 if kind == "Q4_0" else 0,
            "transposed": kernel,
            "codes": [codes, "uint8" if bits == 4 else "int8"],
            "scale": scale,
            "offset": with_offset,
        }
    return layouts


def _leaf_bytes(leaf: Any) -> int:
    """Bytes of one (abstract) array on one device: its shard when it carries a sharding."""
    sharding = getattr(leaf, "sharding", None)
    shape = sharding.shard_shape(tuple(leaf.shape)) if sharding is not None else leaf.shape
    return math.prod(shape) * jnp.dtype(leaf.dtype).itemsize


def nbytes(tree: Any) -> int:
    """Bytes of a pytree of (abstract) arrays on one device."""
    return sum(_leaf_bytes(leaf) for leaf in jax.tree_util.tree_leaves(tree))


def placed(outputs: Any, compiled: Any, mesh: Any) -> Any:
    """A program's abstract `outputs` (`jax.eval_shape`'s) as `compiled` places them on
    `mesh`, so that `nbytes` counts one device's share of each (rows split by token along
    a sequence axis, say); as they are without a mesh."""
    if mesh is None:
        return outputs
    return jax.tree_util.tree_map(
        lambda leaf, sharding: leaf.update(sharding=sharding), outputs, compiled.output_shardings
    )


def program_memory(name: str, program: Any, held: int = 0) -> ProgramMemory:
    """The memory analysis of a lowered (`jit(f).lower(...)`) or compiled program, with
    `held` bytes resident beside the weights while it runs (what it is given that is
    neither a weight nor already counted: J's residuals, rows an earlier program made)."""
    compiled = _compile(program) if isinstance(program, jax.stages.Lowered) else program
    return _compiled_memory(name, compiled, held)


def _compiled_memory(name: str, compiled: Any, held: int = 0) -> ProgramMemory:
    stats = compiled.memory_analysis()
    return ProgramMemory(
        name,
        int(stats.argument_size_in_bytes),
        int(stats.output_size_in_bytes),
        int(stats.temp_size_in_bytes),
        int(stats.alias_size_in_bytes),
        held,
    )


@dataclasses.dataclass(frozen=True)
class Abstracts:
    """The run's arrays as a plan sees them (shapes, dtypes and, on a mesh, the shardings
    a run's arrays get): what an analysis's planning hook lowers its programs with."""

    config: ModelConfig
    params: Any  # the abstract weights (on a mesh: with the shardings of `jaxlin.mesh`'s rules)
    inputs: Abstract  # X (N, d)
    jacobian: DetachedJacobian | None  # J at X (weights resolved); None when only `extra` is planned
    held: int  # bytes resident beside the weights when a program starts: J's own residuals, …
    mesh: Any
    # J's d rows (d, N, d) while the analyses that read them run (the run's `Context.rows`),
    # and the ordinary Jacobian once made: an analysis planned after them finds them held.
    rows: Abstract | None = None
    ordinary: DetachedJacobian | None = None

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.inputs.dtype)

    def embeddings(self, tokens: int) -> Abstract:
        """An input of `tokens` embedding rows, placed as X is."""
        return self.inputs.update(shape=(tokens, self.config.hidden_size))

    def replicated(self, shape: tuple[int, ...], dtype: Any) -> Abstract:
        """A small array every device holds whole (token ids, scalars, vectors)."""
        whole = jax.sharding.PartitionSpec()
        sharding = None if self.mesh is None else jax.sharding.NamedSharding(self.mesh, whole)
        return Abstract(shape, dtype, sharding=sharding)

    def without_rows(self) -> Abstracts:
        """What an analysis after the last one that reads J's rows finds: the runner has
        dropped them."""
        if self.rows is None:
            return self
        return dataclasses.replace(self, rows=None, held=self.held - nbytes(self.rows))

    def program(self, name: str, function: Any, *args: Any, held: int = 0) -> tuple[ProgramMemory, Any]:
        """The program of the jitted `function` at `args` and its outputs as it places them
        on the plan's mesh: what a later program finds held is counted per device (J's
        rows split by token along a sequence axis, say)."""
        compiled = _compile(function.lower(*args))
        outputs = placed(jax.eval_shape(function, *args), compiled, self.mesh)
        return _compiled_memory(name, compiled, held), outputs

    def linearization(
        self,
        inputs: Abstract,
        block: int | None,
        tap: Tap | None = None,
        policy: FreezePolicy = FreezePolicy.DETACHED,
        name: str = "linearize",
        held: int = 0,
    ) -> tuple[ProgramMemory, DetachedJacobian, int]:
        """The linearizing program at `inputs` (`jaxlin.jacobian._linearize`), the abstract
        J it returns and that J's own residuals in bytes: its outputs, where the weights
        are `ParamRef`s — so whatever it copies (a tap's layer weights) counts, and what it
        refers to does not. On a mesh, each output as the partitioner placed it."""
        compiled = _compile(_linearize.lower(self.params, inputs, self.config, policy, block, tap))
        out = placed(
            jax.eval_shape(_linearize, self.params, inputs, self.config, policy, block, tap),
            compiled,
            self.mesh,
        )
        jacobian = dataclasses.replace(out, linear=_resolve_params(out.linear, self.params))
        return _compiled_memory(name, compiled, held), jacobian, nbytes(out)


# What an analysis module plans: its programs, lowered with the run's abstract arrays.
ProgramSource = Callable[[Abstracts], Iterable[ProgramMemory]]


def _jacobian_programs(planned: Abstracts, work: Workload) -> tuple[list[ProgramMemory], Abstracts]:
    """The programs the analysis runs on J, in run order, and what the analyses after them
    find: J's rows while the analyses that read them run, and the ordinary Jacobian, kept
    once made (`Context.ordinary`)."""
    from jaxlin import operator, spectral

    jacobian, held, d = planned.jacobian, planned.held, planned.config.hidden_size
    assert jacobian is not None
    wide = jnp.promote_types(jacobian.output.dtype, jnp.float32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    need_rows = work.method == "rows" or work.per_token == "exact"
    programs: list[ProgramMemory] = []
    dense, dense_held = None, held
    if need_rows:
        identity = Abstract((d, d), jacobian.dtype)
        program, dense = planned.program("rows", operator._rows, jacobian, identity, work.chunk, held=held)
        programs.append(program)
        dense_held = held + nbytes(dense)  # the rows stay while the programs that read them run
    if work.method == "rows":
        lowered = spectral._rows_top_k.lower(dense, work.top_k)
        programs.append(program_memory("top_k from rows", lowered, dense_held))
    else:
        depth = min(d, work.depth or max(3 * work.top_k + 24, 48))
        chunk = min(work.chunk, work.top_k)
        lowered = spectral.lanczos_top_k.lower(jacobian, key, work.top_k, depth, chunk)
        programs.append(program_memory("lanczos", lowered, dense_held))
    if work.contributions and not need_rows:
        lowered = operator._contributions.lower(jacobian, work.chunk)
        programs.append(program_memory("contributions", lowered, held))
    if work.per_token == "exact":
        basis = Abstract((d, d), wide)
        lowered = spectral.per_token_from_rows.lower(dense, basis, work.per_token_top_k)
        programs.append(program_memory("per-token", lowered, dense_held))
    elif work.per_token == "projected":
        basis = Abstract((work.per_token_rank, d), jacobian.dtype)
        program, projected = planned.program(
            "per-token rows", operator._rows, jacobian, basis, work.chunk, held=dense_held
        )
        programs.append(program)
        wide_basis, k = basis.update(dtype=wide), work.per_token_top_k
        lowered = spectral.per_token_from_rows.lower(projected, wide_basis, k)
        programs.append(program_memory("per-token", lowered, dense_held + nbytes(projected)))
    after = dataclasses.replace(planned, rows=dense, held=dense_held)
    if work.ordinary:
        # The ordinary Jacobian is only comparable with dense attention (see `target_function`).
        second, ordinary, ordinary_held = planned.linearization(
            planned.inputs, None, policy=FreezePolicy.ORDINARY, name="ordinary linearize", held=dense_held
        )
        lowered = operator._contributions.lower(ordinary, work.chunk)
        contributions = program_memory("ordinary contributions", lowered, dense_held + ordinary_held)
        programs += [second, contributions]
        after = dataclasses.replace(after, ordinary=ordinary, held=dense_held + ordinary_held)
    return programs, after


def plan(
    config: ModelConfig,
    tokens: int,
    dtype: jnp.dtype,
    work: Workload | None = None,
    mesh: jax.sharding.Mesh | None = None,
    quantized: Quantized | None = None,
    stand_in: bool = False,
) -> Plan:
    """Compile the run's programs for `tokens` input tokens with abstract weights and read
    their memory analyses (minutes for a large model on CPU: compiling is the cost). On
    `mesh` the programs are partitioned as a run under it partitions them (the weights
    placed by `jaxlin.mesh`'s rules) and every size is one device's. `stand_in`: the CPU
    compiles stand in for an accelerator's (`STAND_IN_OPTIONS`, the module docstring)."""
    token = _compiler_options.set(STAND_IN_OPTIONS if stand_in else None)
    try:
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            planned = _plan(config, tokens, jnp.dtype(dtype), work or Workload(), mesh, quantized)
    finally:
        _compiler_options.reset(token)
    return dataclasses.replace(planned, stand_in=stand_in)


def _plan(
    config: ModelConfig, tokens: int, dtype: jnp.dtype, work: Workload, mesh: Any, quantized: Quantized | None
) -> Plan:
    params = abstract_params(config, dtype, mesh, quantized)
    sharding = input_sharding(mesh, tokens) if mesh is not None else None
    inputs = Abstract((tokens, config.hidden_size), dtype, sharding=sharding)
    planned = Abstracts(config, params, inputs, None, 0, mesh)
    programs: list[ProgramMemory] = []
    jacobian_held = 0
    if work.linearize:
        first, jacobian, jacobian_held = planned.linearization(inputs, work.attention_chunk)
        held = jacobian_held
        planned = dataclasses.replace(planned, jacobian=jacobian, held=held)
        on_jacobian, planned = _jacobian_programs(planned, work)
        programs += [first, *on_jacobian]
    for source in work.extra:
        programs += source(planned)
    sizes = tuple(mesh.shape.items()) if mesh is not None else ()
    label = quantized if quantized is None or isinstance(quantized, str) else GGUF_OWN_LAYOUTS
    return Plan(tokens, dtype.name, nbytes(params), jacobian_held, tuple(programs), sizes, label)


def workload(options: Any, analyses: Sequence[Any] = (), whole_run: Sequence[ProgramSource] = ()) -> Workload:
    """The `Workload` of a run config's `analysis` section: the programs on J it decides,
    the own programs of `analyses` (the enabled `jaxlin.analyses.Analysis` entries, in run
    order), then `whole_run`'s (the run analyses' sources, `run_sources`)."""
    from jaxlin.analyses.base import last_row_user

    per_token = options.per_token
    rows = options.method == "dense" or (options.method == "auto" and per_token.method == "exact")
    last = last_row_user(analyses)
    own = tuple(
        _analysis_source(analysis, options, index <= last)
        for index, analysis in enumerate(analyses)
        if analysis.programs
    )
    return Workload(
        top_k=options.top_k,
        depth=options.krylov_depth,
        chunk=options.chunk,
        attention_chunk=options.attention_chunk,
        method="rows" if rows else "lanczos",
        per_token=per_token.method,
        per_token_top_k=per_token.top_k,
        per_token_rank=per_token.rank,
        ordinary=options.ordinary_jacobian,
        extra=own + tuple(whole_run),
    )


def _analysis_source(analysis: Any, options: Any, rows_kept: bool) -> ProgramSource:
    """An input analysis's programs, finding J's rows held only when the runner still
    keeps them for it (it drops them after the last analysis that reads them)."""

    def programs(planned: Abstracts) -> Iterable[ProgramMemory]:
        return analysis.programs(options, planned if rows_kept else planned.without_rows())

    return programs


def run_sources(config: Any, tokens_of: Callable[[str], int]) -> tuple[ProgramSource, ...]:
    """The own programs of the run config's enabled whole-run analyses (steering), whose
    prompts take `tokens_of(text)` tokens."""
    from jaxlin.analyses import RUN_ANALYSES

    return tuple(
        functools.partial(analysis.programs, config, tokens_of)
        for analysis in RUN_ANALYSES
        if analysis.programs and analysis.enabled(config)
    )


def token_bound(text: str) -> int:
    """At most how many tokens `text` takes, without its tokenizer: every token of a
    byte-level BPE or SentencePiece vocabulary spans at least one UTF-8 byte, plus BOS,
    EOS and SentencePiece's dummy prefix."""
    return len(text.encode("utf-8")) + 3


def mesh_label(sizes: MeshSizes) -> str:
    """'data 1 × fsdp 2 × tensor 4 (8 devices)'; 'data 1 × fsdp 1 × tensor 2 × sequence 4
    (8 devices)' (the sequence axis named only where it splits)."""
    named = [*MESH_AXES, *([SEQUENCE_AXIS] if sizes.get(SEQUENCE_AXIS, 1) > 1 else [])]
    count = math.prod(sizes.get(axis, 1) for axis in named)
    axes = " × ".join(f"{axis} {sizes.get(axis, 1)}" for axis in named)
    return f"{axes} ({count} device{'s' if count > 1 else ''})"


def describe(planned: Plan, limit: int | None) -> str:
    """The plan as terminal lines: each program, the peak, and whether it fits."""
    gib = lambda value: f"{value / 2**30:8.2f} GiB"  # noqa: E731
    placement = f", {mesh_label(dict(planned.mesh))}" if planned.mesh else ""
    weights = f"weights ({planned.quantized} layout) " if planned.quantized else "weights "
    lines = [
        f"{planned.tokens} tokens, {planned.dtype}{placement}: {weights}{gib(planned.weights)}, "
        f"J's own residuals {gib(planned.jacobian)}"
        + (" (CPU compiles standing in for an accelerator's)" if planned.stand_in else ""),
    ]
    width = max([24, *(len(program.name) + 2 for program in planned.programs)])
    lines.append(f"  {'program':<{width}}{'held':>12}{'outputs':>12}{'temporaries':>12}")
    for program in planned.programs:
        lines.append(
            f"  {program.name:<{width}}{gib(program.held)}{gib(program.outputs)}{gib(program.temporaries)}"
        )
    verdict = "" if limit is None else (" — fits" if planned.peak <= limit else " — does NOT fit")
    device = "" if limit is None else f" of {gib(limit).strip()} per device"
    lines.append(f"  peak per device {gib(planned.peak).strip()}{device}{verdict}")
    return "\n".join(lines)


# ------------------------------------------------------------------ the smallest mesh


def mesh_candidates(devices: int, axes: Sequence[str] = MESH_AXES) -> list[MeshSizes]:
    """Every mesh over `axes` (default data × fsdp × tensor; `AXIS_ORDER` adds the
    sequence axis) whose device count divides `devices`."""
    divisors = [n for n in range(1, devices + 1) if devices % n == 0]
    return [
        dict(zip(axes, sizes, strict=True))
        for sizes in itertools.product(divisors, repeat=len(axes))
        if devices % math.prod(sizes) == 0
    ]


def weights_per_device(
    config: ModelConfig, dtype: jnp.dtype, sizes: MeshSizes, quantized: Quantized | None
) -> int:
    """One device's share of the weights on a mesh of `sizes` (an abstract mesh: no devices)."""
    shape = tuple(sizes.get(axis, 1) for axis in MESH_AXES)
    mesh = jax.sharding.AbstractMesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
    return nbytes(abstract_params(config, jnp.dtype(dtype), mesh, quantized))


@dataclasses.dataclass(frozen=True)
class MeshTrial:
    sizes: MeshSizes
    weights: int  # one device's weights
    peak: (
        int | None
    )  # the compiled plan's peak; None: not compiled (weights over the limit, or known not to fit)


@dataclasses.dataclass(frozen=True)
class MeshSearch:
    """The search for the fewest devices whose per-device peak fits `limit`."""

    devices: int
    limit: int
    trials: tuple[MeshTrial, ...]
    found: Plan | None  # the first mesh that fits; None: none of `devices` or fewer fits

    @property
    def sizes(self) -> MeshSizes | None:
        return None if self.found is None else self.trials[-1].sizes


def smallest_mesh(
    devices: int,
    limit: int,
    weights_on: Callable[[MeshSizes], int],
    plan_on: Callable[[MeshSizes], Plan],
    known_misfit: Callable[[MeshSizes], bool] = lambda sizes: False,
    per_count: int | None = None,
    axes: Sequence[str] = MESH_AXES,
) -> MeshSearch:
    """The mesh of fewest devices (up to `devices`) whose plan's peak fits `limit`.

    Meshes are tried by device count; within a count, those holding the fewest weights per
    device first, then the wider tensor axis, then fsdp (data splits only the batches of
    vectors; with `axes` = `AXIS_ORDER`, the wider sequence axis before data: it splits the
    activations). A mesh whose weights alone exceed the limit is not compiled (a peak is at
    least the weights), nor one the caller knows not to fit (`known_misfit`: say, one that
    did not fit a shorter input). So every mesh of fewer devices than the answer — each
    neighbour with an axis halved among them — was tried and does not fit.

    `per_count` limits the search to the first that many meshes of each device count (in
    the order above): cheaper, and then only an upper bound on the devices needed."""

    def order(sizes: MeshSizes) -> tuple[int, int, int, int, int]:
        count = math.prod(sizes.values())
        return (count, weights_on(sizes), -sizes["tensor"], -sizes["fsdp"], -sizes.get(SEQUENCE_AXIS, 1))

    candidates = sorted(mesh_candidates(devices, axes), key=order)
    if per_count is not None:
        by_count = itertools.groupby(candidates, key=lambda sizes: math.prod(sizes.values()))
        candidates = [sizes for _, group in by_count for sizes in itertools.islice(group, per_count)]
    trials: list[MeshTrial] = []
    for sizes in candidates:
        weights = weights_on(sizes)
        if weights > limit or known_misfit(sizes):
            trials.append(MeshTrial(sizes, weights, None))
            continue
        planned = plan_on(sizes)
        trials.append(MeshTrial(sizes, weights, planned.peak))
        if planned.peak <= limit:
            return MeshSearch(devices, limit, tuple(trials), planned)
    return MeshSearch(devices, limit, tuple(trials), None)


def request_host_devices(count: int) -> None:
    """Ask jax for `count` host CPU devices to compile a plan for `count` assumed devices
    (compiling needs the devices, not their memory). Only possible before jax starts its
    backends; afterwards `planning_devices` says what is missing."""
    from jax._src import xla_bridge

    if count > 1 and not xla_bridge.backends_are_initialized():
        jax.config.update("jax_num_cpu_devices", count)


def planning_devices(count: int) -> list[jax.Device]:
    """`count` devices to compile for: the default backend's when it has them, else host
    CPU devices standing in for them."""
    from jaxlin.errors import JaxlinError

    for devices in (jax.devices(), jax.devices("cpu")):
        if len(devices) >= count:
            return list(devices[:count])
    raise JaxlinError(
        f"--devices {count}: this process has {len(jax.devices())} device(s); "
        "jaxlin plan asks for host CPU devices to compile for only before jax has started"
    )


def parse_bytes(text: str) -> int:
    """'80GB' → 80·10⁹, '80GiB' → 80·2³⁰, '8e10' → 8·10¹⁰ (the --device-memory option)."""
    from jaxlin.errors import JaxlinError

    units = {"tib": 2**40, "gib": 2**30, "mib": 2**20, "tb": 10**12, "gb": 10**9, "mb": 10**6, "b": 1}
    lowered = text.strip().lower()
    unit = next((name for name in units if lowered.endswith(name)), "b")
    try:
        value = float(lowered.removesuffix(unit) if lowered.endswith(unit) else lowered)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value <= 0:
        raise JaxlinError(f"--device-memory: {text!r} is not a size (e.g. 80GB, 80GiB)")
    return int(value * units[unit])


# ------------------------------------------------------------------ `jaxlin plan`


def _mesh_key(sizes: MeshSizes) -> tuple[int, ...]:
    return tuple(sizes.get(axis, 1) for axis in AXIS_ORDER)


def plans_by_mesh(
    config: ModelConfig,
    tokens: int,
    dtype: jnp.dtype,
    work: Workload,
    quantized: Quantized | None,
    stand_in: bool = False,
) -> Callable[[MeshSizes], Plan]:
    """mesh sizes → the plan on that mesh (one device: no mesh), each compiled once
    (`stand_in`: for an accelerator, `plan`)."""

    @functools.cache
    def planned(key: tuple[int, ...]) -> Plan:
        count = math.prod(key)
        mesh = (
            make_mesh(dict(zip(AXIS_ORDER, key, strict=True)), planning_devices(count)) if count > 1 else None
        )
        return plan(config, tokens, dtype, work, mesh, quantized, stand_in)

    return lambda sizes: planned(_mesh_key(sizes))


@dataclasses.dataclass(frozen=True)
class PlanReport:
    """What `jaxlin plan` prints: where the model's architecture came from, each length's
    plan on the configured mesh (or one device), and the smallest mesh that fits."""

    architecture: str
    limit: int | None
    plans: tuple[Plan, ...]
    searches: tuple[MeshSearch | None, ...]

    def text(self) -> str:
        lines = [f"model: {self.architecture}"]
        for planned, search in zip(self.plans, self.searches, strict=True):
            lines.append(describe(planned, self.limit))
            if search is not None:
                lines.append("  " + _search_line(search))
        return "\n".join(lines)


def _search_line(search: MeshSearch) -> str:
    limit = f"{search.limit / 2**30:.2f} GiB"
    compiled = sum(trial.peak is not None for trial in search.trials)
    tried = f"{len(search.trials)} meshes tried, {compiled} compiled"
    if search.found is None:
        return f"smallest mesh: none of up to {search.devices} devices of {limit} fits ({tried})"
    peak = f"{search.found.peak / 2**30:.2f} GiB"
    return f"smallest mesh that fits {limit}: {mesh_label(search.sizes or {})}, {peak} at peak ({tried})"


def run_workload(config: Any, n: int) -> Workload:
    """What a run config computes for an input of `n` tokens, as the run decides: the
    ordinary Jacobian only for inputs short enough for it, the analyses enabled for n
    tokens, the whole run's with prompts of at most `token_bound` tokens (their tokenizer
    is not read); for a length study, its prefix of n tokens instead."""
    from jaxlin.analyses import INPUT_ANALYSES
    from jaxlin.analyses.certificate import compares_ordinary
    from jaxlin.length_study import StudySettings, study_workload

    if config.length_study is not None:
        return study_workload(StudySettings.from_config(config, "study"), n)
    enabled = [analysis for analysis in INPUT_ANALYSES if analysis.enabled(config.analysis, n)]
    work = workload(config.analysis, enabled, run_sources(config, token_bound))
    return dataclasses.replace(work, ordinary=compares_ordinary(config.analysis, n))


def plan_run(
    config: Any,
    tokens: Sequence[int],
    devices: int | None = None,
    device_memory: int | None = None,
    quantized: str | None = None,
) -> PlanReport:
    """The plans of a run config's analysis for each input length, from the model's config
    alone: no weight is read (`jaxlin.model_source`). On the config's `mesh:` if it has
    one; then the smallest mesh of up to `devices` (default: those present) whose peak fits
    `device_memory` (default: the default device's memory). Given `device_memory` on a CPU
    backend, the plans are for other hardware: compiled standing in for an accelerator
    (`plan`'s `stand_in`)."""
    from jaxlin.errors import JaxlinError
    from jaxlin.loading import enable_dtype
    from jaxlin.memory import total_bytes
    from jaxlin.model_source import read_planning_config

    bad = [n for n in tokens if n < 1]
    if bad:
        raise JaxlinError(f"--tokens: every length must be at least 1 (got {bad[0]})")
    if devices is not None and devices < 1:
        raise JaxlinError(f"--devices: {devices} is not a positive device count")
    model, architecture = read_planning_config(config.model)
    planned_layouts: Quantized | None = quantized
    if getattr(config.model, "quantized", False) and quantized is None:
        from converters.gguf_model import gguf_quantized_layouts
        from jaxlin.model_source import gguf_path

        planned_layouts = gguf_quantized_layouts(gguf_path(config.model))  # its header only
        architecture += f"; model.quantized: {GGUF_OWN_LAYOUTS} block layouts"
    if model.max_positions is not None and max(tokens) > model.max_positions:
        raise JaxlinError(f"--tokens: {max(tokens)} exceeds the model's {model.max_positions} positions")
    dtype = enable_dtype(config.model.dtype)
    limit = device_memory if device_memory is not None else total_bytes()
    count = devices if devices is not None else len(jax.devices())
    configured = config.mesh.sizes() if config.mesh is not None else {axis: 1 for axis in MESH_AXES}

    @functools.cache
    def weights_on(key: tuple[int, ...]) -> int:
        return weights_per_device(model, dtype, dict(zip(AXIS_ORDER, key, strict=True)), planned_layouts)

    stand_in = device_memory is not None and jax.default_backend() == "cpu"
    plans, searches = [], []
    for n in tokens:
        plan_on = plans_by_mesh(model, n, dtype, run_workload(config, n), planned_layouts, stand_in)
        plans.append(plan_on(configured))
        searches.append(
            None
            if limit is None
            else smallest_mesh(
                count, limit, lambda sizes: weights_on(_mesh_key(sizes)), plan_on, axes=AXIS_ORDER
            )
        )
    return PlanReport(architecture, limit, tuple(plans), tuple(searches))
