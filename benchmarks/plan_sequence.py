"""The planner with and without the sequence axis (jaxlin.mesh): one published config at a
long input on up to 8 devices, each mesh's per-device weights, J's own residuals and peak,
and the smallest mesh of 80 GB devices that fits, searched without and with the axis.

    nice -n 10 python benchmarks/plan_sequence.py [--config configs/published/qwen3-14b.yaml]
        [--tokens 32768] [--meshes tensor=8 tensor=4,sequence=2 ...] [--device-memory 80GB]

Compiled for host CPU devices standing in for the accelerators (compiling needs the
devices, not their memory), as `jaxlin plan --devices 8` does; the sizes are XLA's
per-device memory analysis of the run's programs (`jaxlin.plan.plan`, the config's own
workload). No weight is read.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The sequence axis added to a fixed tensor × fsdp split (4 → 8 devices), then 8 devices
# with and without it: tensor 8 is the 8-device mesh of benchmarks/README.md §15.
MESHES = (
    "tensor=4",
    "tensor=4,sequence=2",
    "fsdp=2,tensor=2",
    "fsdp=2,tensor=2,sequence=2",
    "tensor=8",
    "fsdp=2,tensor=4",
    "sequence=2,tensor=2,fsdp=2",
    "tensor=2,sequence=4",
)


def parse_mesh(text: str) -> dict[str, int]:
    """'tensor=4,sequence=2' → {'tensor': 4, 'sequence': 2}."""
    return {axis: int(size) for axis, size in (part.split("=") for part in text.split(","))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "published" / "qwen3-14b.yaml")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--meshes", nargs="+", default=list(MESHES))
    parser.add_argument("--device-memory", default="80GB", help="the searches' limit per device")
    parser.add_argument("--name", default="plan_sequence", help="result name under benchmarks/results")
    args = parser.parse_args()
    meshes = [parse_mesh(text) for text in args.meshes]
    devices = max(8, *(math.prod(sizes.values()) for sizes in meshes))

    import jax

    jax.config.update("jax_num_cpu_devices", devices)  # before jax starts its backends
    jax.config.update("jax_enable_x64", True)
    import _common as C
    import jax.numpy as jnp

    from jaxlin.loading import enable_dtype
    from jaxlin.model_source import read_planning_config
    from jaxlin.plan import (
        AXIS_ORDER,
        MESH_AXES,
        mesh_label,
        parse_bytes,
        plans_by_mesh,
        run_workload,
        smallest_mesh,
        weights_per_device,
    )
    from jaxlin.run_config import load_run_config

    config = load_run_config(args.config)
    model, architecture = read_planning_config(config.model)
    dtype = jnp.dtype(enable_dtype(config.model.dtype))
    plan_on = plans_by_mesh(model, args.tokens, dtype, run_workload(config, args.tokens), None)
    limit = parse_bytes(args.device_memory)
    rows: list[dict] = []
    searches: dict[str, dict] = {}

    def save() -> None:
        C.save(
            args.name,
            {"config": str(args.config), "architecture": architecture, "N": args.tokens, "rows": rows}
            | {"device_memory_bytes": limit, "searches": searches},
        )

    for sizes in meshes:
        start = time.perf_counter()
        planned = plan_on(sizes)
        row = {
            "mesh": mesh_label(sizes),
            "weights_gib": planned.weights / 2**30,
            "jacobian_gib": planned.jacobian / 2**30,
            "peak_gib": planned.peak / 2**30,
            "programs": [[p.name, p.held, p.outputs, p.temporaries] for p in planned.programs],
            "seconds": round(time.perf_counter() - start, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()
    for label, axes in (("without sequence", MESH_AXES), ("with sequence", AXIS_ORDER)):
        start = time.perf_counter()
        weights_on = lambda sizes: weights_per_device(model, dtype, sizes, None)  # noqa: E731
        search = smallest_mesh(devices, limit, weights_on, plan_on, axes=axes)
        searches[label] = {
            "found": None if search.found is None else mesh_label(search.sizes or {}),
            "peak_gib": None if search.found is None else search.found.peak / 2**30,
            "jacobian_gib": None if search.found is None else search.found.jacobian / 2**30,
            "trials": [
                [mesh_label(trial.sizes), None if trial.peak is None else trial.peak / 2**30]
                for trial in search.trials
            ],
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(label, json.dumps(searches[label]), flush=True)
        save()
    print(f"{args.config.stem}, N = {args.tokens}, {config.model.dtype}, per device:")
    print("| mesh | weights | J's own residuals | peak |\n|---|---|---|---|")
    for row in rows:
        sizes = (row["weights_gib"], row["jacobian_gib"], row["peak_gib"])
        print(f"| {row['mesh']} | " + " | ".join(f"{size:.1f} GiB" for size in sizes) + " |")


if __name__ == "__main__":
    main()
