"""The planner (`jaxlin.plan`) against measured peaks.

Whole J (default): for each N that `memory_scaling.py` measured (Gemma 3 270M, float32,
linearize + Lanczos k = 8, depth 16, chunk 16), the planner's peak above the weights —
compiled from the model's config alone, no weight read — beside the measured peak
resident memory above the loaded model.

Layer sweep (`--layers`): for each N, a fresh child process loads Gemma 3 270M (float32),
linearizes the input's J and keeps it, then runs the layer sweep's loop for one tap kind
(`jaxlin.layer_sweep.sweep`'s body: the tap's linearization, then its spectrum and
certificate, the previous tap's J alive until the next exists) over the first
`--swept` layers — the programs are the same for every layer (the tap's layer is data;
the layers above it are skipped), so the steady state is reached from layer 1 on, and
the layers deeper than a few cost compute but not memory. Peak = VmHWM above the
resident set after loading (large blocks returned to the system once freed:
`CHILD_ENV`); planned = the plan's peak above the weights over the input's
linearization and the sweep's programs (`jaxlin.analyses.layers.programs`).

    python benchmarks/plan_accuracy.py [--source memory_scaling_jacobian_value] [--quick]
    python benchmarks/plan_accuracy.py --layers [--sizes 32 64 128] [--kind mlp] [--swept 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _common as C
import jax.numpy as jnp
from memory_scaling import CHUNK, DEPTH, K

from jaxlin.plan import Workload, plan

HERE = Path(__file__).resolve()
# glibc returns every freed block of 128 kB or more to the system at once, so the resident
# set tracks live memory: otherwise heap the loading freed stays resident, a later
# allocation reuses it without raising the peak, and the measured peak varies between
# identical runs (0.33 against 0.98 GB at N = 32).
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}


def whole_jacobian(args: argparse.Namespace) -> None:
    source = args.source + ("_quick" if args.quick else "")
    measured = [
        row
        for row in json.loads((C.RESULTS / f"{source}.json").read_text())["rows"]
        if row.get("impl") == "jaxlin" and "peak_bytes" in row
    ]
    config = C.load_config()
    work = Workload(top_k=K, depth=DEPTH, chunk=CHUNK, contributions=False)
    rows = []
    for row in sorted(measured, key=lambda r: r["N"]):
        start = time.perf_counter()
        planned = plan(config, row["N"], jnp.float32, work)
        above = row["peak_bytes"] - row["baseline_bytes"]
        rows.append(
            {
                "N": row["N"],
                "measured_above_model_gb": above / 1e9,
                "planned_above_weights_gb": planned.above_weights / 1e9,
                "planned_jacobian_gb": planned.jacobian / 1e9,
                "relative_error": (planned.above_weights - above) / above,
                "programs": {p.name: p.transient for p in planned.programs},
                "plan_s": time.perf_counter() - start,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    columns = ["N", "measured_above_model_gb", "planned_above_weights_gb", "relative_error", "plan_s"]
    print(C.table(rows, columns))
    C.save("plan_accuracy" + ("_quick" if args.quick else ""), {"source": source, "rows": rows})


def sweep_options(kind: str):  # noqa: ANN201
    from jaxlin.run_config import AnalysisSection

    return AnalysisSection(layers={"enabled": True, "kinds": [kind]}, ordinary_jacobian=False)


def sweep_child(n: int, kind: str, swept: int) -> None:
    """The measured side (module docstring), in this fresh process."""
    import jax
    import numpy as np

    from jaxlin.distributed import to_host
    from jaxlin.jacobian import linearize
    from jaxlin.layer_sweep import _rows_fit, tap_spectrum
    from jaxlin.model import Tap

    options = sweep_options(kind)
    model = C.load_model()
    x = jax.block_until_ready(C.embeddings(model, n))
    C.release_free_heap()
    baseline = C.current_rss_bytes()
    was_reset = C.reset_peak()
    start = time.perf_counter()
    block = options.attention_chunk
    # The input's J, held (as the runner holds it) while the sweep runs.
    whole = jax.block_until_ready(linearize(model.params, x, model.config, attention_chunk=block))
    rows_in_memory = _rows_fit(model.config, x)
    for layer in range(swept):
        tap = Tap(layer, kind, options.layers.final_norm, False)
        jacobian = linearize(model.params, x, model.config, attention_chunk=block, tap=tap)
        triplets, total = tap_spectrum(jacobian, options.layers.top_k, options.chunk, rows_in_memory)
        to_host((jacobian.output, total, jacobian.bias, triplets.S), np.float64)
    record = {
        "N": n,
        "kind": kind,
        "layers_swept": swept,
        "rows_in_memory": rows_in_memory,
        "peak_bytes": C.peak_rss_bytes(),
        "baseline_bytes": baseline,
        "peak_reset": was_reset,
        "seconds": time.perf_counter() - start,
        "jacobian_output": float(np.linalg.norm(to_host(whole.output, np.float64))),
    }
    print("RESULT " + json.dumps(record), flush=True)


def layer_sweep(args: argparse.Namespace) -> None:
    from jaxlin.analyses import layers

    config = C.load_config()
    options = sweep_options(args.kind)
    rows = []
    for n in args.sizes:
        command = [sys.executable, str(HERE), "--child", str(n), args.kind, str(args.swept)]
        done = subprocess.run(command, capture_output=True, text=True, check=True, env=CHILD_ENV)
        measured = json.loads(
            next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:]
        )
        start = time.perf_counter()
        work = Workload(chunk=options.chunk, extra=(lambda planned: layers.programs(options, planned),))
        planned = plan(config, n, jnp.float32, work)
        run = [p for p in planned.programs if p.name == "linearize" or p.name.startswith("layers")]
        planned_above = max(p.held + p.transient for p in run)
        largest = max(run, key=lambda p: p.held + p.transient)
        above = measured["peak_bytes"] - measured["baseline_bytes"]
        rows.append(
            {
                "N": n,
                "kind": args.kind,
                "rows_in_memory": measured["rows_in_memory"],
                "measured_above_model_gb": above / 1e9,
                "planned_above_weights_gb": planned_above / 1e9,
                "planned_tap_jacobian_gb": (largest.held - planned.jacobian) / 1e9 if largest.held else 0.0,
                "largest_program": largest.name,
                "relative_error": (planned_above - above) / above,
                "difference_gb": (planned_above - above) / 1e9,
                "programs": {p.name: [p.held, p.transient] for p in run},
                "sweep_s": measured["seconds"],
                "plan_s": time.perf_counter() - start,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    columns = [
        "N",
        "measured_above_model_gb",
        "planned_above_weights_gb",
        "difference_gb",
        "relative_error",
        "largest_program",
        "sweep_s",
    ]
    print(C.table(rows, columns))
    C.save("plan_accuracy_layers", {"kind": args.kind, "layers_swept": args.swept, "rows": rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="memory_scaling_s5", help="memory_scaling result name")
    parser.add_argument("--quick", action="store_true", help="the quick memory_scaling sizes")
    parser.add_argument("--layers", action="store_true", help="the layer sweep instead of the whole J")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--kind", default="mlp", choices=["residual", "attention", "mlp"])
    parser.add_argument("--swept", type=int, default=3, help="layers swept in the measured child")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sweep_child(int(args.child[0]), args.child[1], int(args.child[2]))
    elif args.layers:
        layer_sweep(args)
    else:
        whole_jacobian(args)


if __name__ == "__main__":
    main()
