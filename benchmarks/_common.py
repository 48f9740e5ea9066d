"""Shared helpers for the jaxlin benchmarks: model loading, real token ids, timing,
machine info and JSON output. Run every benchmark pinned to one core:
`taskset -c 1 python benchmarks/<name>.py`."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"

TEXT = (
    "The history of the bridge begins in the early twentieth century, when engineers first "
    "proposed a suspension span across the strait. Critics argued that the fog, the strong "
    "currents and the depth of the water made such a structure impossible, and that the cost "
    "would ruin the city. Yet the chief engineer persisted, gathering support from bankers, "
    "politicians and ordinary citizens who were tired of waiting for the ferries. Construction "
    "started during the Great Depression and employed thousands of workers, many of whom had "
    "lost their jobs elsewhere. Safety nets were hung beneath the deck, an unusual precaution "
    "at the time, and they saved the lives of several men who fell. When the bridge opened to "
    "pedestrians, hundreds of thousands of people walked across it on the first day, some on "
    "stilts, some roller skating, and one man reportedly playing the tuba. Today the towers, "
    "painted in a distinctive orange colour chosen to stand out in the fog, are among the most "
    "photographed structures in the world. Scientists who study the span measure how it moves "
    "in the wind, how the cables age, and how traffic loads change through the day. Writers "
    "have described it in novels and poems, painters have tried to capture the light on its "
    "cables at sunset, and every year visitors from distant countries arrive to see it for "
    "themselves. The story of the bridge is, in the end, a story about ambition, patience and "
    "the willingness of a community to imagine something that did not yet exist. "
)


def machine_info() -> dict[str, Any]:
    return {
        "jax_version": jax.__version__,
        "jaxlib_version": getattr(jax.lib, "__version__", None) if hasattr(jax, "lib") else None,
        "backend": jax.default_backend(),
        "cpu_count_visible": len(os.sched_getaffinity(0)),
        "cpu_count_total": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def load_model() -> Any:
    """Gemma 3 270M in float32 (the embedded GGUF)."""
    from converters.gguf_model import load_gguf_model
    from jaxlin.loading import embedded_gguf_path

    return load_gguf_model(embedded_gguf_path(), jnp.float32)


def load_config() -> Any:
    """The model config alone (no weights read)."""
    from converters.gguf import read_gguf_config
    from jaxlin.families import family_for_hf_config
    from jaxlin.loading import embedded_gguf_path

    hf_config = read_gguf_config(embedded_gguf_path())
    return family_for_hf_config(hf_config).config_from_hf(hf_config)


_TOKEN_CACHE = RESULTS / ".token_ids.npy"


def token_ids(n: int) -> np.ndarray:
    """n real token ids: the tokenized TEXT, repeated until long enough (cached)."""
    if _TOKEN_CACHE.exists():
        ids = np.load(_TOKEN_CACHE)
    else:
        from converters.gguf import load_gguf_tokenizer
        from jaxlin.loading import embedded_gguf_path

        tokenizer = load_gguf_tokenizer(embedded_gguf_path())
        ids = np.asarray(tokenizer(TEXT)["input_ids"], dtype=np.int32)
        RESULTS.mkdir(parents=True, exist_ok=True)
        np.save(_TOKEN_CACHE, ids)
    body = ids[1:] if ids[0] == 2 else ids  # drop BOS before repeating, put one in front
    reps = -(-n // len(body)) + 1
    out = np.concatenate([ids[:1], np.tile(body, reps)])[:n]
    return out.astype(np.int32)


def embeddings(model: Any, n: int) -> jax.Array:
    from jaxlin import model as M

    return M.embed(model.config, model.params, jnp.asarray(token_ids(n)))


def block(x: Any) -> Any:
    return jax.block_until_ready(x)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    block(fn())
    return time.perf_counter() - start


def timed_call(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = block(fn())
    return time.perf_counter() - start, value


def time_repeats(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    """First (compile + run) call timed separately, then `repeats` timed calls."""
    first = timed(fn)
    runs = [timed(fn) for _ in range(repeats)]
    return {"first_call_s": first, "median_s": statistics.median(runs), "min_s": min(runs), "runs_s": runs}


def peak_rss_bytes() -> int:
    """VmHWM of this process (peak resident set), falling back to getrusage."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc `malloc_trim`), so that the resident set
    measured next is live memory: after loading a model, hundreds of MB freed by the
    converter stay resident and a later run reuses them without raising the peak."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        ctypes.CDLL(name).malloc_trim(0)


def current_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine_info(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=_jsonable))
    print(f"saved {path}")
    return path


def report(name: str, rows: list[dict[str, Any]], quick: bool, **extra: Any) -> Path:
    """Print `rows` as a table and save them (with `extra`) as results/<name>[_quick].json."""
    print(table(rows, list(rows[0])))
    return save(name + ("_quick" if quick else ""), {**extra, "rows": rows})


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.ndarray | jax.Array):
        return np.asarray(x).tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x))


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A markdown table of `rows` restricted to `columns`."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
