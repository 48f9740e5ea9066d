"""The planner (`jaxlin.plan`) against measured peaks: for each N that
`memory_scaling.py` measured (Gemma 3 270M, float32, linearize + Lanczos k = 8, depth 16,
chunk 16), the planner's peak above the weights — compiled from the model's config alone,
no weight read — beside the measured peak resident memory above the loaded model.

    python benchmarks/plan_accuracy.py [--source memory_scaling_jacobian_value] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time

import _common as C
import jax.numpy as jnp
from memory_scaling import CHUNK, DEPTH, K

from jaxlin.plan import Workload, plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="memory_scaling_s5", help="memory_scaling result name")
    parser.add_argument("--quick", action="store_true", help="the quick memory_scaling sizes")
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
