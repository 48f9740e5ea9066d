"""Peak resident memory of a whole-J top-k run against input length N, jaxlin's
chunked attention (attention_chunk=256) against naive linearization (dense attention,
attention_chunk=None, which stores every heads × N × N probability matrix).

Each (N, implementation) runs in a fresh child process: load the model, reset the
kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`, so the transient peak of
model loading does not mask the run), then one `spectral.lanczos_top_k(k=8, depth=16,
chunk=16)` — linearize, 16 Lanczos steps on J·Jᵀ, and the batched triplet/bound passes —
compiled ahead of time (compile time reported separately) and run once. Peak = VmHWM.
The parent polls the child's VmRSS and kills it above `--cap-gb` (RLIMIT_AS is
unreliable with XLA); naive sizes whose estimated need (`jaxlin.memory`) exceeds the
cap are skipped outright.

    taskset -c 1 python benchmarks/memory_scaling.py [--quick] [--sizes 1024 2048 4096 8192]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as C
import numpy as np

HERE = Path(__file__).resolve()
TARGET_SLOPE = 1.15
TARGET_PEAK_8K_BYTES = 8 * 10**9
K, DEPTH, CHUNK = 8, 16, 16


def child(n: int, chunk: int | None) -> None:
    import jax
    import jax.numpy as jnp

    from jaxlin import spectral
    from jaxlin.jacobian import linearize

    model = C.load_model()
    x = jax.block_until_ready(C.embeddings(model, n))
    load_peak = C.peak_rss_bytes()
    C.release_free_heap()
    baseline = C.current_rss_bytes()
    was_reset = C.reset_peak()
    key = jax.random.key(0)
    start = time.perf_counter()
    # The linearization is its own program now: its residuals (the DetachedJacobian's
    # leaves) are live arrays between it and the Lanczos program that uses them.
    jacobian = jax.block_until_ready(linearize(model.params, x, model.config, attention_chunk=chunk))
    compiled = spectral.lanczos_top_k.lower(jacobian, key, k=K, depth=DEPTH, chunk=CHUNK).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(jacobian, key))
    run_s = time.perf_counter() - start
    s = np.asarray(out[1])
    bounds = np.asarray(out[3])
    record = {
        "N": n,
        "attention_chunk": chunk,
        "peak_bytes": C.peak_rss_bytes(),
        "baseline_bytes": baseline,
        "load_peak_bytes": load_peak,
        "peak_reset": was_reset,
        "compile_s": compile_s,
        "run_s": run_s,
        "sigma": s.tolist(),
        "max_rel_bound": float(np.max(bounds / s)),
        "dtype": str(jnp.float32.dtype),
    }
    print("RESULT " + json.dumps(record), flush=True)


def estimate_bytes(config: Any, n: int, chunk: int | None) -> int:
    import jax.numpy as jnp

    from jaxlin.memory import linearization_bytes, product_bytes

    return linearization_bytes(config, n, jnp.float32, chunk) + product_bytes(
        config, n, jnp.float32, CHUNK, chunk
    )


def rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_child(n: int, chunk: int | None, cap_bytes: int, log: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE), "--child", str(n), str(chunk if chunk is not None else 0)]
    start = time.perf_counter()
    with open(log, "a") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        max_seen = 0
        killed = False
        while proc.poll() is None:
            rss = rss_of(proc.pid)
            max_seen = max(max_seen, rss)
            if rss > cap_bytes:
                proc.kill()
                killed = True
                break
            time.sleep(0.2)
        stdout, _ = proc.communicate()
    wall = time.perf_counter() - start
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            record = json.loads(line[len("RESULT ") :])
            record["wall_s"] = wall
            return record
    return {
        "N": n,
        "attention_chunk": chunk,
        "failed": True,
        "killed_at_cap": killed,
        "max_rss_seen_bytes": max_seen,
        "returncode": proc.returncode,
        "wall_s": wall,
    }


def slope(ns: list[int], values: list[float]) -> float | None:
    if len(ns) < 2:
        return None
    return float(np.polyfit(np.log(ns), np.log(values), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", nargs=2, type=int, metavar=("N", "BLOCK"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, smoke run")
    parser.add_argument("--sizes", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--impl", choices=["both", "jaxlin", "naive"], default="both")
    parser.add_argument("--cap-gb", type=float, default=18.0)
    parser.add_argument("--name", default="memory_scaling", help="result file name (merged if it exists)")
    args = parser.parse_args()
    if args.child:
        n, chunk = args.child
        child(n, chunk or None)
        return

    config = C.load_config()
    sizes = [64, 128] if args.quick else args.sizes
    name = args.name + ("_quick" if args.quick else "")
    cap = int(args.cap_gb * 10**9)
    impls = {"jaxlin": 256, "naive": None}
    if args.impl != "both":
        impls = {args.impl: impls[args.impl]}
    path = C.RESULTS / f"{name}.json"
    rows: list[dict[str, Any]] = json.loads(path.read_text())["rows"] if path.exists() else []
    log = C.RESULTS / f".{name}.stderr.log"
    for impl, chunk in impls.items():
        for n in sizes:
            estimate = estimate_bytes(config, n, chunk)
            if chunk is None and estimate > cap:
                record: dict[str, Any] = {"N": n, "attention_chunk": None, "skipped": True}
                print(f"{impl} N={n}: skipped, estimated {estimate / 1e9:.1f} GB > cap {args.cap_gb} GB")
            else:
                print(f"{impl} N={n}: running (estimate {estimate / 1e9:.2f} GB + model) ...", flush=True)
                record = run_child(n, chunk, cap, log)
            record["impl"] = impl
            record["estimate_bytes"] = estimate
            rows = [r for r in rows if not (r["N"] == n and r["impl"] == impl)] + [record]
            if "peak_bytes" in record:
                peak, base = record["peak_bytes"] / 1e9, record["baseline_bytes"] / 1e9
                print(
                    f"  peak {peak:.2f} GB (after load {base:.2f} GB), "
                    f"compile {record['compile_s']:.1f} s, run {record['run_s']:.1f} s"
                )
            summary = summarize(rows)
            C.save(name, {"k": K, "depth": DEPTH, "chunk": CHUNK, "rows": rows, "summary": summary})
    print(C.table(sorted(rows, key=lambda r: (r["impl"], r["N"])), TABLE_COLUMNS))
    print(json.dumps(summarize(rows), indent=2))


TABLE_COLUMNS = [
    "impl",
    "N",
    "peak_gb",
    "over_baseline_gb",
    "bytes_per_token",
    "compile_s",
    "run_s",
    "skipped",
]


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in rows:
        if "peak_bytes" in r:
            r["peak_gb"] = r["peak_bytes"] / 1e9
            r["over_baseline_gb"] = (r["peak_bytes"] - r["baseline_bytes"]) / 1e9
            r["bytes_per_token"] = (r["peak_bytes"] - r["baseline_bytes"]) / r["N"]
    for impl in ("jaxlin", "naive"):
        done = sorted((r for r in rows if r["impl"] == impl and "peak_bytes" in r), key=lambda r: r["N"])
        ns = [r["N"] for r in done]
        out[impl] = {
            "sizes": ns,
            "slope_peak": slope(ns, [r["peak_bytes"] for r in done]),
            "slope_over_baseline": slope(ns, [r["peak_bytes"] - r["baseline_bytes"] for r in done]),
        }
        big = [r for r in done if r["N"] >= 1024]
        if len(big) >= 2:
            out[impl]["slope_peak_from_1k"] = slope([r["N"] for r in big], [r["peak_bytes"] for r in big])
            out[impl]["slope_over_baseline_from_1k"] = slope(
                [r["N"] for r in big], [r["peak_bytes"] - r["baseline_bytes"] for r in big]
            )
        if impl == "jaxlin":
            at_8k = [r for r in done if r["N"] == 8192]
            out[impl]["peak_8k_within_8GB"] = (
                bool(at_8k[0]["peak_bytes"] <= TARGET_PEAK_8K_BYTES) if at_8k else None
            )
            s = out[impl].get("slope_peak_from_1k")
            out[impl]["slope_target_met"] = None if s is None else bool(s <= TARGET_SLOPE)
    out["targets"] = {"slope": TARGET_SLOPE, "peak_8k_bytes": TARGET_PEAK_8K_BYTES}
    return out


if __name__ == "__main__":
    main()
