"""An up-front estimate of what an analysis needs, so an input too long for memory is
refused with a number instead of dying mid-run — by every process of a run together
(`refusal_everywhere`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxlin._config import ModelConfig
from jaxlin.distributed import from_every_process
from jaxlin.errors import JaxlinError


class InsufficientMemoryError(JaxlinError):
    pass


def linearization_bytes(config: ModelConfig, n: int, dtype: jnp.dtype, attention_chunk: int | None) -> int:
    """Residuals `jax.linearize` keeps for the detached map, per the blocks' frozen
    coefficients: per layer the block input and norm inputs (≈4·N·d), frozen q/k in the
    compute dtype (N·(H+K)·h), the MLP gate (N·I) and, without chunked attention, the
    (H × N × N) probabilities."""
    item = jnp.dtype(dtype).itemsize
    wide = jnp.dtype(jnp.promote_types(dtype, jnp.float32)).itemsize
    per_layer = 4 * n * config.hidden_size * item + n * config.intermediate_size * item
    per_layer += n * (config.num_heads + config.num_kv_heads) * config.head_dim * wide
    per_layer += (n * n if attention_chunk is None or n <= attention_chunk else 0) * config.num_heads * wide
    return config.num_layers * per_layer


def product_bytes(
    config: ModelConfig, n: int, dtype: jnp.dtype, batch: int, attention_chunk: int | None
) -> int:
    """Transient memory of one batched J·v / Jᵀ·u: per vector two (N × width) activations
    of the widest layer, plus, when attention is chunked, one query chunk of recomputed
    probabilities (dense attention reads the stored ones, counted in the linearization).

    Calibrated on Gemma 3 270M float32, batch 16 (benchmarks/memory_scaling.py): with
    `linearization_bytes` this is 1.0–1.6× the measured peak above the loaded model for
    N = 1k–8k chunked and 1.15–1.2× for dense attention at 1k–4k — conservative, but no
    longer refusing inputs of twice the size that fit."""
    wide = jnp.dtype(jnp.promote_types(dtype, jnp.float32)).itemsize
    width = max(config.intermediate_size, config.num_heads * config.head_dim, config.hidden_size)
    chunked = attention_chunk is not None and n > attention_chunk
    probs = attention_chunk * n * config.num_heads * wide if chunked else 0
    return batch * (2 * n * width * wide + probs)


def _device_bytes(free: bool) -> int | None:
    """Memory of the default device (free, or in all): the accelerator's own stats, else
    the host's (/proc/meminfo's MemAvailable or MemTotal). This process's own device: in
    a distributed run the others' cannot be asked."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - (stats.get("bytes_in_use", 0) if free else 0))
    field = "MemAvailable:" if free else "MemTotal:"
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES" if free else "SC_PHYS_PAGES")
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def available_bytes() -> int | None:
    """Free memory of the default device."""
    return _device_bytes(free=True)


def total_bytes() -> int | None:
    """All the memory of the default device (what a plan is compared with)."""
    return _device_bytes(free=False)


ADVICE = "use a shorter input, a smaller analysis.chunk, or a machine with more memory"


@dataclasses.dataclass(frozen=True)
class Shortfall:
    """What a step needs (bytes, this process's device) beyond what is free there."""

    need: int
    free: int

    def error(self, what: str) -> InsufficientMemoryError:
        return InsufficientMemoryError(
            f"{what} needs about {_gib(self.need)} but only {_gib(self.free)} is available; {ADVICE}"
        )


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


def shortfall(estimate: int, fraction: float = 0.9) -> Shortfall | None:
    """None when `estimate` fits in `fraction` of the default device's free memory (or
    when that cannot be known)."""
    free = available_bytes()
    if free is not None and estimate > fraction * free:
        return Shortfall(estimate, free)
    return None


def refusal_everywhere(short: Shortfall | None, what: str) -> str | None:
    """The message every process of the run refuses `what` with when any process's own
    check fell short (`short` is this process's), else None: each process checks its own
    device, and a process that refused alone would leave the others waiting for it in
    their next collective. A collective (`jaxlin.distributed.from_every_process`): every
    process calls it at the same point."""
    verdicts = from_every_process(
        [short is not None, *((-(-short.need // 2**20), short.free // 2**20) if short else (0, 0))]
    )
    if short is not None:
        return str(short.error(what))
    for process, (refused, need, free) in enumerate(verdicts):
        if refused:
            return (
                f"process {process} of {len(verdicts)}: {what} needs about {_gib(need * 2**20)} but only "
                f"{_gib(free * 2**20)} is available on its device; {ADVICE}"
            )
    return None


def require_everywhere(short: Shortfall | None, what: str) -> None:
    """Refuse `what` in every process when any process is short (`refusal_everywhere`)."""
    message = refusal_everywhere(short, what)
    if message is not None:
        raise InsufficientMemoryError(message)


# What the planner does not see, measured on CPU (benchmarks/plan_accuracy.py): the
# process's peak exceeds the compiled programs' by a constant ≈ 0.24 GB (the compiler,
# host copies of results), whatever N.
PLAN_OVERHEAD_BYTES = 2**29


def planned_refusal(what: str, estimate: int, planned: Callable[[], int]) -> str | None:
    """Why every process refuses `what`, or None. The formula (`estimate`, conservative
    and free) decides when it says yes; otherwise `planned()` — the bytes the compiled
    programs add above the resident weights (`jaxlin.plan.Plan.above_weights`), costly —
    decides. Each process decides for its own device and all refuse together when one
    does (`refusal_everywhere`: a collective, every process calls it at the same point)."""
    short = shortfall(estimate)
    if short is not None:
        what += " (compiled programs' plan)"
        short = shortfall(planned() + PLAN_OVERHEAD_BYTES)
    return refusal_everywhere(short, what)
