"""How the detached Jacobian changes with sequence length and position: one long
document, and for each prefix length p the Jacobian of the target at position p (the
p-th token's final-normed hidden state) with respect to the first p input embeddings.

Per length (one JSON file each under OUT/lengths/, so an interrupted study resumes):

- the certificate ‖Σ_t c_t + c_bias − y‖/‖y‖ (with exact influence from the per-token c_t
  read off the d rows of J; otherwise ‖Σ_g c_g + c_bias − y‖/‖y‖ from group contributions
  c_g = J·X_g, one forward product per group: the `sink_tokens` first tokens, then
  contiguous bins of the distance from the target δ = p − 1 − t in factor-2 bins, δ = 0,
  1, 2–3, 4–7, … clipped at the sink — about log2 p + 2 products, where every c_t would
  cost min(p, d) and the single product J·X would repeat the forward's own arithmetic
  and so certify nothing);
- the group table: each group's tokens, distances and ‖c_g‖ (with exact influence the
  sums of the exact c_t over the group, so both paths report the same table);
- the top-k singular values of J with rigorous residual bounds (from J's rows when they
  are computed, `spectral.rows_top_k`, else matrix-free Lanczos, `spectral.top_k`);
- ‖J‖_F and the stable rank ‖J‖_F²/σ₁²;
- the entropy effective rank exp H(q), q_i = σ_i²/‖J‖_F² over all d singular values:
  exact when J's rows give the whole spectrum; otherwise only the top k are known, and it
  is reported as the interval its unknown tail allows: the remainder energy
  ‖J‖_F² − Σ_{i≤k} σ_i² held by one value (lower bound) or spread evenly over the d − k
  others (upper bound, each ≤ σ_k², so attainable);
- per-token influence ‖J_t‖_F and contribution norm ‖c_t‖ for every token: exact from J's
  d rows Jᵀe_i (d transposed products, memory d·p·d), or, for long prefixes, unbiased
  estimates with standard errors: for Gaussian u, E‖J_tᵀu‖² = ‖J_t‖_F² and
  E⟨J_tᵀu, x_t⟩² = ‖J_t x_t‖² = ‖c_t‖², so one product Jᵀu gives every token's term and s
  samples give mean ± std/√s (squared norms are the unbiased quantities);
- the share of the first `sink_tokens` tokens (the attention sink) in Σ_t ‖J_t‖_F² and
  in Σ_t ‖c_t‖²;
- influence against distance from the target, δ = p − 1 − t: a least-squares line of
  log ‖J_t‖_F on log δ over the tokens past the sink (δ ≥ 1), whose negated slope is the
  decay exponent α (‖J_t‖_F ∝ δ^−α);
- time (wall, and compute = wall − JAX tracing and compilation) and peak memory: the
  device's peak_bytes_in_use where the backend reports it (a process-wide running
  maximum: lengths run in increasing order, so it is each length's peak as long as memory
  grows with length), else the process's VmHWM, reset before each length through
  /proc/self/clear_refs.

Across lengths: log-log slopes of compute time and peak memory against length.

`jaxlin bench` is the same study run with the run config's own analysis settings
(per-token method → exact or stochastic influence) on the lengths given on the command
line; its headline is time and memory per length.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxlin import model as model_fns
from jaxlin._config import ModelConfig
from jaxlin._policy import FreezePolicy
from jaxlin.devices import batch_devices, map_in_batches
from jaxlin.distributed import is_writer, to_host
from jaxlin.errors import JaxlinError
from jaxlin.jacobian import DetachedJacobian, Products, linearize
from jaxlin.memory import linearization_bytes, planned_refusal, product_bytes
from jaxlin.operator import (
    Certificate,
    certify,
    chunk_size,
    contributions_from_rows,
    group_contributions,
    group_sums,
    rows,
)
from jaxlin.outputs import claim_output, make_directory, write_json_atomic
from jaxlin.plan import Abstracts, ProgramMemory, Quantized, Workload, program_memory
from jaxlin.run_config import LengthStudySection, RunConfig, read_text_file
from jaxlin.spectral import rows_top_k, top_k, widened

StudyKind = Literal["study", "bench"]

# Bumped when a length's record changes meaning or content: older records are recomputed.
# 3: the certificate from group contributions (version 2's stochastic lengths certified
# with J·X in one product, which certifies nothing) and every record's group table.
STUDY_VERSION = 3

# Public-domain documents shipped in jaxlin/data (see jaxlin/data/SOURCES.md).
BUILTIN_DOCUMENTS = {"alice": "alice_ch1-5.txt"}

# JAX's own timing events for tracing, lowering and compiling one program.
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """What the per-length computation depends on (and so what a resumed length must match)."""

    top_k: int
    tolerance: float | None
    krylov_depth: int | None
    seed: int
    chunk: int
    attention_chunk: int
    influence: Literal["auto", "exact", "stochastic"]
    max_exact_tokens: int
    influence_samples: int
    sink_tokens: int

    @classmethod
    def from_config(cls, config: RunConfig, kind: StudyKind) -> StudySettings:
        """A study reads its `length_study` section; a bench without one takes the run's own
        per-token setting (exact token Jacobians → exact influence, else the Frobenius estimate's samples)."""
        analysis, section = config.analysis, config.length_study
        if section is None:
            section = LengthStudySection(
                influence="exact" if analysis.per_token.method == "exact" else "stochastic",
                influence_samples=max(2, analysis.frobenius_samples),
            )
        return cls(
            top_k=analysis.top_k,
            tolerance=analysis.tolerance,
            krylov_depth=analysis.krylov_depth,
            seed=analysis.seed,
            chunk=analysis.chunk,
            attention_chunk=analysis.attention_chunk,
            influence=section.influence,
            max_exact_tokens=section.max_exact_tokens,
            influence_samples=section.influence_samples,
            sink_tokens=section.sink_tokens,
        )

    def exact_influence(self, length: int) -> bool:
        if self.influence == "auto":
            return length <= self.max_exact_tokens
        return self.influence == "exact"


# ----------------------------------------------------------------------------- the document


@dataclasses.dataclass(frozen=True)
class Document:
    text: str
    source: str  # "inline", "file: PATH" or "builtin: NAME"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def builtin_document(name: str) -> str:
    return (resources.files("jaxlin") / "data" / BUILTIN_DOCUMENTS[name]).read_text(encoding="utf-8")


def study_document(section: LengthStudySection | None) -> Document:
    """The section's document: inline text, a file, or a built-in one (alice by default)."""
    if section is not None and section.document is not None:
        return Document(section.document, "inline")
    if section is not None and section.document_file is not None:
        path = Path(section.document_file).expanduser()
        text = read_text_file(path, "length_study.document_file")
        if not text.strip():
            raise JaxlinError(f"length_study.document_file: {path} is empty")
        return Document(text, f"file: {path}")
    name = (section.builtin if section is not None else None) or "alice"
    return Document(builtin_document(name), f"builtin: {name}")


# ----------------------------------------------------------------------------- per-token norms


@functools.partial(jax.jit, static_argnames=("samples", "chunk"))
def _sampled_token_norms(
    jacobian: DetachedJacobian, key: jax.Array, samples: int, chunk: int | None
) -> tuple[jax.Array, jax.Array]:
    """Per sample s and token t: ‖J_tᵀu_s‖² and ⟨J_tᵀu_s, x_t⟩² (each (samples, p)), u_s ~ N(0, I)."""
    _, rmatvec, wide = widened(jacobian)
    inputs = jacobian.inputs.astype(wide)
    probes = jax.random.normal(key, (samples, jacobian.output.shape[0]), wide)

    def one_probe(u: jax.Array) -> tuple[jax.Array, jax.Array]:
        pulled = rmatvec(u)  # (p, d): J_tᵀu for every token at once
        return jnp.sum(pulled**2, axis=-1), jnp.sum(pulled * inputs, axis=-1) ** 2

    return map_in_batches(one_probe, probes, chunk_size(samples, chunk))


@dataclasses.dataclass(frozen=True)
class TokenNorms:
    """Squared per-token norms with their standard errors (zero when exact)."""

    method: Literal["exact", "stochastic"]
    influence_sq: np.ndarray  # ‖J_t‖_F² (p,)
    influence_sq_se: np.ndarray
    contribution_sq: np.ndarray  # ‖c_t‖² (p,)
    contribution_sq_se: np.ndarray
    frobenius_sq: float  # ‖J‖_F² = Σ_t ‖J_t‖_F²
    frobenius_sq_se: float


def mean_and_error(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over axis 0 and its standard error std/√s."""
    count = samples.shape[0]
    return samples.mean(axis=0), samples.std(axis=0, ddof=1) / math.sqrt(count)


def sampled_token_norms(
    jacobian: DetachedJacobian, key: jax.Array, samples: int, chunk: int, products: Products | None = None
) -> TokenNorms:
    """Unbiased estimates of ‖J_t‖_F² and ‖c_t‖² for every token from `samples` products Jᵀu."""
    if products is not None:
        products.rmatvecs += samples
    energy, projected = to_host(_sampled_token_norms(jacobian, key, samples, chunk), np.float64)
    influence, influence_se = mean_and_error(energy)
    contribution, contribution_se = mean_and_error(projected)
    total, total_se = mean_and_error(energy.sum(axis=1))  # the same samples give ‖J‖_F²
    return TokenNorms(
        "stochastic", influence, influence_se, contribution, contribution_se, float(total), float(total_se)
    )


# ----------------------------------------------------------------------------- token groups


@dataclasses.dataclass(frozen=True)
class TokenGroup:
    """Tokens first … last (inclusive) of a prefix of `length` tokens: the sink, or one
    factor-2 bin of the distance from the target."""

    kind: Literal["sink", "distance"]
    first: int
    last: int
    length: int

    @property
    def distances(self) -> tuple[int, int]:
        """(nearest, farthest) distance δ = length − 1 − t from the target."""
        return self.length - 1 - self.last, self.length - 1 - self.first


def token_groups(length: int, sink_tokens: int) -> list[TokenGroup]:
    """The sink (the first `sink_tokens` tokens), then the tokens past it in bins of the
    distance from the target, δ = 0, 1, 2–3, 4–7, …, the farthest bin clipped at the sink:
    every token in exactly one group; ⌊log2 δ_max⌋ + 2 distance bins, δ_max = length − 1 − sink."""
    sink_end = min(sink_tokens, length)
    groups = [TokenGroup("sink", 0, sink_end - 1, length)] if sink_end > 0 else []
    nearest = 0
    while length - 1 - nearest >= sink_end:
        farthest = 2 * nearest - 1 if nearest > 0 else 0
        first = max(length - 1 - farthest, sink_end)
        groups.append(TokenGroup("distance", first, length - 1 - nearest, length))
        nearest = 2 * nearest if nearest > 0 else 1
    return groups


def group_masks(groups: list[TokenGroup], length: int, dtype: Any) -> jax.Array:
    """(G, length) 0/1 masks: row g is 1 on group g's tokens."""
    masks = np.zeros((len(groups), length))
    for row, group in zip(masks, groups, strict=True):
        row[group.first : group.last + 1] = 1.0
    return jnp.asarray(masks, dtype)


# ----------------------------------------------------------------------------- one length


@dataclasses.dataclass(frozen=True)
class PrefixMeasures:
    """Everything measured on the Jacobian of one prefix."""

    length: int
    certificate: Certificate
    singular_values: np.ndarray
    residual_bounds: np.ndarray
    converged: bool
    krylov_depth: int | None
    stop_reason: str
    norms: TokenNorms
    products: dict[str, int]
    groups: list[TokenGroup]
    group_norms: np.ndarray  # ‖c_g‖ per group
    all_singular_values: np.ndarray | None = None  # every σ_i, when J's rows were computed


def measure_prefix(
    config: ModelConfig, params: Any, inputs: jax.Array, length: int, settings: StudySettings
) -> PrefixMeasures:
    """Linearize at X[:length] once and measure it (see the module docstring)."""
    products = Products()
    prefix = inputs[:length]
    jacobian = linearize(
        params, prefix, config, FreezePolicy.DETACHED, settings.attention_chunk, products=products
    )

    def logits_of(hidden: jax.Array) -> jax.Array:
        return model_fns.logits(config, params, hidden)

    spectrum = None
    groups = token_groups(length, settings.sink_tokens)
    masks = group_masks(groups, length, prefix.dtype)
    if settings.exact_influence(length):
        dense = rows(jacobian, None, settings.chunk, products)  # (d, p, d): J itself
        contributions = contributions_from_rows(dense, prefix)
        certificate = certify(jacobian.output, contributions, logits_of, jacobian.bias)
        grouped = group_sums(contributions, masks)
        influence = np.sum(to_host(dense, np.float64) ** 2, axis=(0, 2))
        contribution = np.sum(to_host(contributions, np.float64) ** 2, axis=-1)
        zeros = np.zeros(length)
        norms = TokenNorms("exact", influence, zeros, contribution, zeros.copy(), float(influence.sum()), 0.0)
        triplets = rows_top_k(dense, settings.top_k)  # every σ_i too (`spectrum`)
        spectrum = triplets.spectrum
        del dense
    else:
        key = jax.random.fold_in(jax.random.key(settings.seed), length)
        norms = sampled_token_norms(jacobian, key, settings.influence_samples, settings.chunk, products)
        grouped = group_contributions(jacobian, masks, settings.chunk, products)
        certificate = certify(jacobian.output, grouped, logits_of, jacobian.bias)
        triplets = top_k(
            jacobian,
            settings.top_k,
            settings.tolerance,
            settings.krylov_depth,
            settings.seed,
            min(settings.chunk, settings.top_k),
            products=products,
        )
    return PrefixMeasures(
        length,
        certificate,
        triplets.S,
        triplets.bounds,
        triplets.converged,
        triplets.depth,
        triplets.stop_reason,
        norms,
        products.as_dict(),
        groups,
        np.linalg.norm(to_host(grouped, np.float64), axis=-1),
        spectrum,
    )


def study_workload(settings: StudySettings, length: int) -> Workload:
    """What `measure_prefix` compiles at `length`, as the planner plans it (`jaxlin plan`
    of a config with a length_study section): the linearization, then J's rows and their
    spectrum (exact influence) or Lanczos, and the study's own programs (`programs`)."""
    exact = settings.exact_influence(length)
    return Workload(
        top_k=settings.top_k,
        depth=settings.krylov_depth,
        chunk=settings.chunk,
        attention_chunk=settings.attention_chunk,
        method="rows" if exact else "lanczos",
        per_token="off",
        contributions=False,
        ordinary=False,
        extra=(functools.partial(programs, settings, exact),),
    )


def programs(settings: StudySettings, exact: bool, planned: Abstracts) -> Iterator[ProgramMemory]:
    """The study's programs beyond those `study_workload` names: the contributions from
    J's rows (exact influence), else the sampled influence and the group contributions."""
    jacobian = planned.jacobian
    assert jacobian is not None
    if exact:
        lowered = jax.jit(contributions_from_rows).lower(planned.rows, jacobian.inputs)
        yield program_memory("length study: contributions", lowered, planned.held)
        return
    key = jax.eval_shape(lambda: jax.random.key(0))
    samples, chunk = settings.influence_samples, settings.chunk
    lowered = _sampled_token_norms.lower(jacobian, key, samples, chunk)
    yield program_memory("length study: sampled influence", lowered, planned.held)
    length = jacobian.inputs.shape[0]
    masks = planned.replicated((len(token_groups(length, settings.sink_tokens)), length), planned.dtype)
    lowered = jax.jit(functools.partial(group_contributions, chunk=chunk)).lower(jacobian, masks)
    yield program_memory("length study: group contributions", lowered, planned.held)


# ----------------------------------------------------------------------------- derived quantities


def entropy_rank_bounds(sigma: np.ndarray, frobenius_sq: float, rank_bound: int) -> tuple[float, float]:
    """exp H(σ_i²/‖J‖_F²) over all `rank_bound` singular values, bounded from the top k
    (see the module docstring): the tail energy in one value (lower) or spread evenly (upper)."""
    energy = np.asarray(sigma, np.float64) ** 2
    total = max(float(frobenius_sq), float(energy.sum()))
    shares = energy / total
    head = -float(np.sum(shares[shares > 0] * np.log(shares[shares > 0])))
    rest = max(total - float(energy.sum()), 0.0) / total
    others = rank_bound - len(energy)
    if rest <= 0.0 or others <= 0:
        return math.exp(head), math.exp(head)
    return math.exp(head - rest * math.log(rest)), math.exp(head - rest * math.log(rest / others))


def loglog_fit(x: np.ndarray, y: np.ndarray) -> dict[str, float] | None:
    """Least-squares line log10 y = intercept + slope·log10 x over positive pairs (None if < 2)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = (x > 0) & (y > 0) & np.isfinite(y)
    if np.count_nonzero(keep) < 2 or np.unique(x[keep]).size < 2:
        return None
    lx, ly = np.log10(x[keep]), np.log10(y[keep])
    slope, intercept = np.polyfit(lx, ly, 1)
    residual = ly - (intercept + slope * lx)
    spread = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residual**2)) / spread if spread > 0 else 1.0
    return {
        "slope": float(slope),
        "intercept": float(intercept),
        "r2": r2,
        "points": int(np.count_nonzero(keep)),
    }


def binned_loglog_fit(x: np.ndarray, y: np.ndarray, per_octave: int = 1) -> dict[str, float] | None:
    """`loglog_fit` through the means of log x and log y in log-spaced bins of x
    (`per_octave` bins per factor of 2): each scale of x weighs the same, where a pointwise
    fit is dominated by the many large x (most tokens of a long prefix are far from the
    target). A pure power law is recovered exactly: bin means of a line lie on it."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = (x > 0) & (y > 0) & np.isfinite(y)
    if not np.any(keep):
        return None
    lx, ly = np.log2(x[keep]), np.log2(y[keep])
    bins = np.floor(lx * per_octave).astype(np.int64)
    labels, index = np.unique(bins, return_inverse=True)
    counts = np.bincount(index)
    mean_x = np.bincount(index, lx) / counts
    mean_y = np.bincount(index, ly) / counts
    fit = loglog_fit(2.0**mean_x, 2.0**mean_y)
    return None if fit is None else {**fit, "points": int(labels.size)}


def influence_decay(influence: np.ndarray, sink_tokens: int) -> dict[str, Any] | None:
    """The fit of ‖J_t‖_F ∝ δ^−α over tokens past the sink, δ = distance from the target:
    pointwise least squares, and (`binned`) through the bin means of factor-2 distance bins."""
    p = len(influence)
    tokens = np.arange(sink_tokens, p - 1)
    distance, values = p - 1 - tokens, influence[tokens]
    fit = loglog_fit(distance, values)
    if fit is None:
        return None
    binned = binned_loglog_fit(distance, values)
    return {
        "exponent": -fit["slope"],
        **fit,
        "binned": None if binned is None else {"exponent": -binned["slope"], **binned},
    }


def sink_shares(norms: TokenNorms, sink_tokens: int) -> dict[str, float]:
    sink = slice(0, sink_tokens)
    influence_total, contribution_total = norms.influence_sq.sum(), norms.contribution_sq.sum()
    return {
        "tokens": sink_tokens,
        "influence_share": float(norms.influence_sq[sink].sum() / influence_total)
        if influence_total
        else 0.0,
        "contribution_share": float(norms.contribution_sq[sink].sum() / contribution_total)
        if contribution_total
        else 0.0,
    }


def group_table(groups: list[TokenGroup], norms: np.ndarray) -> list[dict[str, Any]]:
    """One row per group: its kind, tokens and distances (inclusive ranges) and ‖c_g‖."""
    return [
        {
            "group": group.kind,
            "tokens": [group.first, group.last],
            "distance": list(group.distances),
            "norm": float(norm),
        }
        for group, norm in zip(groups, norms, strict=True)
    ]


def length_record(
    measures: PrefixMeasures, token_texts: list[str], settings: StudySettings, rank_bound: int
) -> dict[str, Any]:
    """The JSON-ready record of one length (without time and memory)."""
    norms, sigma = measures.norms, measures.singular_values
    sigma_1 = float(sigma[0])
    influence = np.sqrt(np.maximum(norms.influence_sq, 0.0))
    if measures.all_singular_values is not None:  # the whole spectrum: exact
        lower = upper = entropy_rank_bounds(measures.all_singular_values, norms.frobenius_sq, rank_bound)[0]
    else:
        lower, upper = entropy_rank_bounds(sigma, norms.frobenius_sq, rank_bound)
    loudest = np.argsort(norms.influence_sq)[::-1][:5]
    total = norms.influence_sq.sum()
    certificate = measures.certificate
    return {
        "length": measures.length,
        "target_token": token_texts[-1],
        "first_token": token_texts[0],
        "certificate": {
            "from": "per-token contributions"
            if norms.method == "exact"
            else f"group contributions ({len(measures.groups)} groups)",
            "relative_error": certificate.relative_error,
            "argmax_matches": certificate.argmax_matches,
            "predicted_token_id": certificate.predicted_token_id,
            "reconstructed_token_id": certificate.reconstructed_token_id,
        },
        "spectrum": {
            "singular_values": sigma.tolist(),
            "residual_bounds": measures.residual_bounds.tolist(),
            "converged": measures.converged,
            "krylov_depth": measures.krylov_depth,
            "stop_reason": measures.stop_reason,
        },
        "frobenius": math.sqrt(max(norms.frobenius_sq, 0.0)),
        "frobenius_sq": norms.frobenius_sq,
        "frobenius_sq_se": norms.frobenius_sq_se,
        "stable_rank": norms.frobenius_sq / sigma_1**2,
        "stable_rank_se": norms.frobenius_sq_se / sigma_1**2,
        "entropy_rank": {"lower": lower, "upper": upper},
        "influence": {
            "method": norms.method,
            "samples": settings.influence_samples if norms.method == "stochastic" else None,
            "jacobian_sq": norms.influence_sq.tolist(),
            "jacobian_sq_se": norms.influence_sq_se.tolist(),
            "contribution_sq": norms.contribution_sq.tolist(),
            "contribution_sq_se": norms.contribution_sq_se.tolist(),
            "loudest": [
                {"position": int(t), "token": token_texts[t], "share": float(norms.influence_sq[t] / total)}
                for t in loudest
            ],
        },
        "groups": group_table(measures.groups, measures.group_norms),
        "sink": sink_shares(norms, settings.sink_tokens),
        "decay": influence_decay(influence, settings.sink_tokens),
        "products": measures.products,
    }


# ----------------------------------------------------------------------------- time and memory


def _vm_field(name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{name}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets the process's peak resident set size (VmHWM)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def measured() -> Iterator[dict[str, Any]]:
    """Wall and compile seconds, and peak memory, of the block (filled in when it ends)."""
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    result: dict[str, Any] = {}
    compile_seconds = [0.0]

    def on_event(event: str, duration: float, **_: Any) -> None:
        if event in COMPILE_EVENTS:
            compile_seconds[0] += duration

    if stats and "peak_bytes_in_use" in stats:
        source = f"{device.platform} device memory_stats peak_bytes_in_use (running maximum)"
        baseline = int(stats.get("bytes_in_use", 0))
    else:
        reset = _reset_peak_rss()
        source = "process VmHWM" + (" (reset before each length)" if reset else " (not resettable here)")
        baseline = _vm_field("VmRSS")
    jax.monitoring.register_event_duration_secs_listener(on_event)
    start = time.perf_counter()
    try:
        yield result
    finally:
        wall = time.perf_counter() - start
        jax.monitoring.unregister_event_duration_listener(on_event)
    after = device.memory_stats() if stats else None
    peak = int(after["peak_bytes_in_use"]) if after and "peak_bytes_in_use" in after else _vm_field("VmHWM")
    result.update(
        seconds=wall,
        compile_seconds=compile_seconds[0],
        compute_seconds=max(wall - compile_seconds[0], 0.0),
        memory={
            "source": source,
            "peak_bytes": peak,
            "baseline_bytes": baseline,
            "peak_above_baseline_bytes": None if peak is None or baseline is None else peak - baseline,
        },
    )


# ----------------------------------------------------------------------------- planning


def _memory_estimate(config: ModelConfig, length: int, dtype: Any, settings: StudySettings) -> int:
    chunk = settings.attention_chunk
    wide = jnp.dtype(jnp.promote_types(dtype, jnp.float32)).itemsize
    estimate = linearization_bytes(config, length, dtype, chunk)
    estimate += product_bytes(config, length, dtype, settings.chunk, chunk)
    if settings.exact_influence(length):
        # J's rows, kept for the exact spectrum, and the copy the contributions' contraction
        # makes of them (XLA transposes the token axis ahead: `contributions_from_rows`).
        estimate += 2 * config.hidden_size**2 * length * wide
    return estimate


def plan_lengths(
    lengths: list[int],
    n_tokens: int,
    config: ModelConfig,
    dtype: Any,
    settings: StudySettings,
    quantized: Quantized | None = None,
) -> tuple[list[int], list[dict[str, Any]]]:
    """The lengths that can run, and why the others cannot (document, positions, memory).
    Memory is decided as `jaxlin run` decides it (`jaxlin.memory.planned_refusal`): the
    formula where it says yes, else the study's programs at that length compiled on the
    ambient mesh with abstract weights in the model's `quantized` layouts
    (`study_workload`, what `jaxlin plan` plans for the study)."""
    from jaxlin.plan import plan
    from jaxlin.runner import run_mesh

    def planned(length: int) -> int:
        work = study_workload(settings, length)
        return plan(config, length, dtype, work, run_mesh(), quantized).above_weights

    kept, skipped = [], []
    for length in lengths:
        reason = None
        if length > n_tokens:
            reason = f"the document has only {n_tokens} tokens"
        elif config.max_positions is not None and length > config.max_positions:
            reason = f"the model has only {config.max_positions} positions"
        else:
            # Every process keeps the same lengths (`jaxlin.memory.refusal_everywhere`).
            estimate = _memory_estimate(config, length, dtype, settings)
            reason = planned_refusal(f"length {length}", estimate, functools.partial(planned, length))
        if reason is None:
            kept.append(length)
        else:
            skipped.append({"length": length, "reason": reason})
    return kept, skipped


# ----------------------------------------------------------------------------- the study


def fingerprint(
    config: RunConfig, document: Document, settings: StudySettings, length: int
) -> dict[str, Any]:
    """What a stored length must match to be reused: the settings as they apply to this
    length (the influence method it resolves to, the samples only when stochastic), so that
    changing `max_exact_tokens` keeps every length whose method it does not change."""
    applied = dataclasses.asdict(settings)
    applied["influence"] = "exact" if settings.exact_influence(length) else "stochastic"
    del applied["max_exact_tokens"]
    if applied["influence"] == "exact":
        del applied["influence_samples"]
    record = {
        "version": STUDY_VERSION,
        "model": config.model.model_dump(),
        "add_bos": config.add_bos,
        "document_sha256": document.sha256,
        "settings": applied,
    }
    return json.loads(json.dumps(record))


def length_path(out: Path, length: int) -> Path:
    return out / "lengths" / f"p{length:06d}.json"


def stored_length(path: Path, expected: dict[str, Any], length: int) -> dict[str, Any] | None:
    """A stored length's record if it is complete and was computed under the same fingerprint."""
    if not is_writer() or not path.is_file():  # the writer alone reads back what it wrote
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        not isinstance(record, dict)
        or record.get("fingerprint") != expected
        or record.get("length") != length
    ):
        return None
    return record


def default_output(config: RunConfig, kind: StudyKind) -> str:
    return config.output_dir if kind == "study" else f"{config.output_dir.rstrip('/')}-bench"


def run_study(
    config: RunConfig,
    kind: StudyKind = "study",
    lengths: list[int] | None = None,
    output_dir: str | None = None,
    verbose: bool = True,
) -> tuple[dict[str, Any], Path]:
    """The study (or bench) of `config` written to its output directory; returns (summary, dir)."""
    from jaxlin.command import device_mesh, start
    from jaxlin.model_source import read_model_config

    settings = StudySettings.from_config(config, kind)
    lengths = sorted(set(lengths)) if lengths else (config.length_study or LengthStudySection()).lengths
    document = study_document(config.length_study)  # read (and checked) before any expensive step
    model_config = read_model_config(config.model)
    config.check_against(model_config)
    out = output_dir or default_output(config, kind)
    verbose = start(config, verbose)
    with claim_output(out, kind, config.overwrite) as output, device_mesh(config.devices, config.mesh):
        return _run(config, kind, settings, document, lengths, output.target, verbose)


def _progress(verbose: bool) -> Callable[[str], None]:
    def say(message: str) -> None:
        if verbose:
            print(f"[jaxlin] {message}", file=sys.stderr, flush=True)

    return say


def _run(
    config: RunConfig,
    kind: StudyKind,
    settings: StudySettings,
    document: Document,
    lengths: list[int],
    out: Path,
    verbose: bool,
) -> tuple[dict[str, Any], Path]:
    from jaxlin.command import load_placed
    from jaxlin.runner import quantized_layouts
    from jaxlin.tokens import token_text, tokenize

    say = _progress(verbose)
    say("loading model …")
    loaded = load_placed(config.model, verbose)
    model, tokenizer = loaded.model, loaded.tokenizer
    params = model.params
    ids = tokenize(tokenizer, document.text, config.add_bos)
    quantized = quantized_layouts(params)
    kept, skipped = plan_lengths(lengths, len(ids), model.config, model.dtype, settings, quantized)
    for entry in skipped:
        say(f"length {entry['length']} skipped: {entry['reason']}")
    if not kept:
        raise JaxlinError(f"length_study.lengths: none of {lengths} can run ({skipped[0]['reason']})")
    inputs = model_fns.embed(model.config, params, jnp.asarray(ids[: kept[-1]]))
    texts = token_text(tokenizer, ids[: kept[-1]])
    make_directory(out / "lengths")
    records, reused = [], []
    for length in kept:
        path = length_path(out, length)
        expected = fingerprint(config, document, settings, length)
        record = stored_length(path, expected, length)
        if record is not None:
            reused.append(length)
            records.append(record)
            continue
        say(f"length {length} …")
        with measured() as cost:
            measures = measure_prefix(model.config, params, inputs, length, settings)
        record = length_record(measures, texts[:length], settings, model.config.hidden_size)
        record.update(cost, fingerprint=expected)
        write_json_atomic(path, record)
        records.append(record)
        say(
            f"length {length}: {cost['seconds']:.1f} s, certificate "
            f"{record['certificate']['relative_error']:.1e}, "
            f"σ₁ {record['spectrum']['singular_values'][0]:.3f}"
        )
        # Each length compiles its own programs; live CPU executables hold memory maps.
        jax.clear_caches()
    if reused:
        say(f"resumed: {len(reused)} of {len(kept)} lengths were already complete")
    summary = study_summary(config, kind, loaded, document, settings, records, skipped, reused, len(ids))
    write_json_atomic(out / "summary.json", summary)
    from jaxlin.length_plots import write_figures

    write_figures(out, summary, records)
    return summary, out


def product_count(record: dict[str, Any]) -> int:
    """Products through J (both directions) that one length made."""
    return max(1, record["products"]["matvecs"] + record["products"]["rmatvecs"])


def study_summary(
    config: RunConfig,
    kind: StudyKind,
    loaded: Any,
    document: Document,
    settings: StudySettings,
    records: list[dict[str, Any]],
    skipped: list[dict[str, Any]],
    reused: list[int],
    n_tokens: int,
) -> dict[str, Any]:
    """summary.json: one row per length (without per-token arrays, which stay in lengths/) and fits."""
    model = loaded.model
    per_token = ("jacobian_sq", "jacobian_sq_se", "contribution_sq", "contribution_sq_se")
    rows = [
        {
            **{k: v for k, v in r.items() if k not in ("fingerprint", "influence")},
            # Derived from the stored ‖J_t‖_F², so a resumed length gets today's fits too.
            "decay": influence_decay(
                np.sqrt(np.maximum(np.asarray(r["influence"]["jacobian_sq"], np.float64), 0.0)),
                settings.sink_tokens,
            ),
            "influence": {k: v for k, v in r["influence"].items() if k not in per_token},
            "predicted_token": loaded.tokenizer.decode([r["certificate"]["predicted_token_id"]]),
        }
        for r in records
    ]
    lengths = np.asarray([r["length"] for r in records])
    memory = [r["memory"]["peak_above_baseline_bytes"] for r in records]
    return {
        "kind": "length_study" if kind == "study" else "bench",
        "model": model.name,
        "family": model.config.family,
        "dtype": str(jnp.dtype(model.dtype)),
        "document": {"source": document.source, "sha256": document.sha256, "n_tokens": n_tokens},
        "settings": dataclasses.asdict(settings),
        "lengths": lengths.tolist(),
        "skipped_lengths": skipped,
        "lengths_reused": reused,
        "rows": rows,
        "fits": {
            "compute_seconds_vs_length": loglog_fit(lengths, [r["compute_seconds"] for r in records]),
            "seconds_vs_length": loglog_fit(lengths, [r["seconds"] for r in records]),
            # comparable across lengths whose influence method (and so product count) differs
            "compute_seconds_per_product_vs_length": loglog_fit(
                lengths, [r["compute_seconds"] / product_count(r) for r in records]
            ),
            "peak_memory_vs_length": loglog_fit(lengths, [np.nan if m is None else m for m in memory]),
            "influence_decay_longest": rows[-1]["decay"],
        },
        "max_certificate": max(r["certificate"]["relative_error"] for r in records),
        "definitions": DEFINITIONS,
        "devices": batch_devices(),
        "platform": jax.devices()[0].platform,
        "config": config.model_dump(),
        "params_from_cache": loaded.from_cache,
        "checkpoint_sha256": loaded.checkpoint_sha256,
    }


DEFINITIONS = {
    "target": "the final-normed hidden state of the prefix's last token (position length − 1)",
    "certificate": "‖Σ_t J_t·x_t + c_bias − y‖/‖y‖: from the per-token c_t with exact influence, else "
    "‖Σ_g c_g + c_bias − y‖/‖y‖ from the group contributions c_g = J·X_g (one product per group, see "
    "groups); argmax_matches: the reconstruction predicts the same next token as y",
    "groups": "the tokens partitioned into the first sink_tokens tokens, then contiguous bins of the "
    "distance from the target δ = length − 1 − t in factor-2 bins (δ = 0, 1, 2–3, 4–7, …, the farthest "
    "clipped at the sink); per group its tokens and distances (inclusive) and ‖c_g‖, c_g = Σ_{t ∈ g} "
    "J_t·x_t (with exact influence the sum of the exact c_t, else one product J·X_g)",
    "stable_rank": "‖J‖_F² / σ₁²",
    "entropy_rank": "exp H(σ_i²/‖J‖_F²) over all d singular values: exact (lower = upper) with exact "
    "influence; else bounded from the top k: tail energy in one value (lower) or spread evenly over the "
    "other d − k (upper)",
    "influence": "‖J_t‖_F per token; stochastic: mean of ‖J_tᵀu‖² over Gaussian u ± std/√s (squared norms)",
    "contribution": "‖c_t‖ = ‖J_t·x_t‖; stochastic: mean of ⟨J_tᵀu, x_t⟩² ± std/√s (squared norms)",
    "sink": "share of the first sink_tokens tokens in Σ_t ‖J_t‖_F² (influence) and in Σ_t ‖c_t‖² "
    "(contribution)",
    "decay": "least squares of log ‖J_t‖_F on log δ, δ = length − 1 − t, tokens past the sink; "
    "exponent = −slope; binned: the same through the means of log δ and log ‖J_t‖_F in factor-2 bins of "
    "δ (each scale weighs the same)",
    "compute_seconds": "wall seconds minus JAX tracing, lowering and compilation",
    "peak_memory": "peak above the memory in use before the length (device peak_bytes_in_use or VmHWM)",
}


def group_label(group: dict[str, Any]) -> str:
    """The group's name in tables: sink, or its distance range (0, 2–3, …)."""
    if group["group"] == "sink":
        return "sink"
    nearest, farthest = group["distance"]
    return f"{nearest}" if nearest == farthest else f"{nearest}–{farthest}"


def group_line(groups: list[dict[str, Any]]) -> str:
    return "  ".join(f"{group_label(g)}: {g['norm']:.3g}" for g in groups)


def print_summary(summary: dict[str, Any], out: Path) -> None:
    """The terminal table of a study or bench."""
    print(f"model      {summary['model']} ({summary['family']}, {summary['dtype']}), {summary['platform']}")
    print(f"document   {summary['document']['source']} ({summary['document']['n_tokens']} tokens)")
    print(
        f"{'length':>7} {'certificate':>11} {'σ₁':>9} {'stable r':>9} {'entropy r':>15} "
        f"{'sink':>6} {'decay α':>8} {'binned α':>8} {'compute s':>9} {'peak MiB':>9}"
    )
    for row in summary["rows"]:
        decay = row["decay"]["exponent"] if row["decay"] else float("nan")
        fits = row["decay"] or {}
        binned = fits["binned"]["exponent"] if fits.get("binned") else float("nan")
        peak = row["memory"]["peak_above_baseline_bytes"]
        entropy = row["entropy_rank"]
        print(
            f"{row['length']:>7} {row['certificate']['relative_error']:>11.2e} "
            f"{row['spectrum']['singular_values'][0]:>9.3f} {row['stable_rank']:>9.2f} "
            f"{entropy['lower']:>7.2f}–{entropy['upper']:<7.2f} {row['sink']['influence_share']:>6.3f} "
            f"{decay:>8.3f} {binned:>8.3f} {row['compute_seconds']:>9.2f} "
            f"{(peak or 0) / 2**20:>9.1f}"
        )
    print("‖c_g‖ per group (sink, then distance δ from the target):")
    for row in summary["rows"]:
        print(f"{row['length']:>7} {group_line(row['groups'])}")
    for entry in summary["skipped_lengths"]:
        print(f"skipped {entry['length']}: {entry['reason']}")
    fits = summary["fits"]
    for name, label in (
        ("compute_seconds_vs_length", "time"),
        ("compute_seconds_per_product_vs_length", "time per product"),
        ("peak_memory_vs_length", "memory"),
    ):
        if fits[name] is not None:
            print(f"{label} ∝ length^{fits[name]['slope']:.2f} (R² {fits[name]['r2']:.3f})")
    print(f"wrote      {out}/ (summary.json, lengths/, PNG figures, report.html)")
