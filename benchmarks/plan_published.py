"""The planner on the published models (configs/published/): for each model at float32,
float64, bfloat16 and with Q4_K-quantized matrices (float32 compute), at N = 512, 4096 and
32768 tokens, the fewest 80 GB devices (a data × fsdp × tensor × sequence mesh of up to 8)
whose per-device peak fits, and that peak — compiled from the model's architecture alone
(no weight, no network: jaxlin/data/architectures when the hub id is not in the local cache).

    python benchmarks/plan_published.py [--models llama-3.1-8b ...] [--tokens 512 4096 32768]
                                        [--variants float32 "Q4_K (float32)" ...]
                                        [--devices 8] [--device-memory 80GB] [--name NAME]

The meshes are compiled for host CPU devices standing in for the accelerators (compiling
needs the devices, not their memory), as `jaxlin plan --device-memory` compiles them
(`jaxlin.plan.plan`'s `stand_in`: bfloat16 programs without the float32 copy of the
weights XLA's CPU backend would hoist out of the layer scan). To keep the sweep affordable
on a 2-core machine it compiles a few meshes per device count (1, 2, 4, 8), in
`smallest_mesh`'s order: for each sequence split s smaller than the count (s = 1, 2, 4;
one device: s = 1), the first mesh with sequence s — the data × fsdp × tensor mesh of
count / s devices holding the fewest weights, widest tensor axis first, times sequence s.
So 8 devices try, say, tensor 8, then tensor 4 × sequence 2, then tensor 2 × sequence 4:
at most 7 meshes for one cell, and "devices needed" is an upper bound (`jaxlin plan`
searches every mesh). A sequence-only mesh (s = the count) is not tried: it holds every
weight on every device. The sweep assumes that a mesh which does not fit a shorter input
does not fit a longer one (such meshes are not compiled again). Nothing is assumed across
dtypes: bfloat16 runs can peak above float32 ones. Quantized matrices are split on a mesh
as the float params they replace (jaxlin.mesh: columns only where each shard holds whole
groups).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "published"
# (label, dtype, quantized layout)
VARIANTS = (
    ("float32", "float32", None),
    ("bfloat16", "bfloat16", None),
    ("Q4_K (float32)", "float32", "Q4_K"),
    ("float64", "float64", None),
)
# The order of a mesh's sizes in the results and the table: data·fsdp·tensor·sequence, the
# sequence axis last so that a mesh without it reads as it did before the axis existed.
PRINTED_AXES = ("data", "fsdp", "tensor", "sequence")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", help="config names under configs/published (default: all)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 4096, 32768])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--device-memory", default="80GB")
    parser.add_argument(
        "--variants", nargs="*", help="labels of VARIANTS to plan, in this order (default: all)"
    )
    parser.add_argument("--name", default="plan_published", help="result name under benchmarks/results")
    args = parser.parse_args()

    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)  # before jax starts its backends
    jax.config.update("jax_enable_x64", True)

    import _common as C

    from jaxlin.plan import parse_bytes

    limit = parse_bytes(args.device_memory)
    names = args.models or sorted(path.stem for path in CONFIGS.glob("*.yaml"))
    rows: list[dict] = []
    labels = args.variants or [label for label, _, _ in VARIANTS]  # planned in the order given
    variants = [variant for label in labels for variant in VARIANTS if variant[0] == label]
    for label, dtype, quantized in variants:  # every model at one variant, then the next
        for name in names:
            misfits: set[tuple[int, ...]] = set()
            for n in sorted(args.tokens):
                start = time.perf_counter()
                row = {"model": name, "variant": label, "N": n}
                row |= _search(CONFIGS / f"{name}.yaml", n, dtype, quantized, args.devices, limit, misfits)
                row["seconds"] = round(time.perf_counter() - start, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
                C.save(args.name, {"device_memory_bytes": limit, "devices": args.devices, "rows": rows})
    print(_table(rows, args.tokens, limit, PRINTED_AXES))


def _search(
    config_path: Path, n: int, dtype: str, quantized: str | None, devices: int, limit: int, misfits: set
) -> dict:
    """The smallest mesh for one model, dtype and length; `misfits` (mesh keys) grows with
    the meshes found not to fit, which longer inputs then skip."""
    import jax.numpy as jnp

    from jaxlin.model_source import read_planning_config
    from jaxlin.plan import (
        AXIS_ORDER,
        SEQUENCE_AXIS,
        plans_by_mesh,
        run_workload,
        smallest_mesh,
        weights_per_device,
    )
    from jaxlin.run_config import load_run_config

    config = load_run_config(config_path)
    model, _ = read_planning_config(config.model)
    work = run_workload(config, n)  # what `jaxlin plan` plans: J's programs and the analyses' own
    key = lambda sizes: tuple(sizes.get(axis, 1) for axis in PRINTED_AXES)  # noqa: E731

    @functools.cache  # smallest_mesh asks for every candidate's weights twice
    def weights(sizes_key: tuple[int, ...]) -> int:
        sizes = dict(zip(PRINTED_AXES, sizes_key, strict=True))
        return weights_per_device(model, jnp.dtype(dtype), sizes, quantized)

    # smallest_mesh asks `known_misfit` about its candidates in its order (by device count,
    # fewest weights first) and stops at the first that fits; of each count it compiles
    # here only the first mesh of each sequence split smaller than the count.
    admitted: set[tuple[int, ...]] = set()
    splits_seen: set[tuple[int, int]] = set()

    def skipped(sizes: dict[str, int]) -> bool:
        count, split = math.prod(sizes.values()), sizes[SEQUENCE_AXIS]
        if (count, split) in splits_seen or (split == count and count > 1):
            return True
        splits_seen.add((count, split))
        admitted.add(key(sizes))
        return key(sizes) in misfits

    search = smallest_mesh(
        devices,
        limit,
        lambda sizes: weights(key(sizes)),
        plans_by_mesh(model, n, jnp.dtype(dtype), work, quantized, stand_in=True),  # for 80 GB accelerators
        skipped,
        axes=AXIS_ORDER,
    )
    # The meshes this sweep searched. A mesh whose weights alone exceed the limit is never
    # offered to `skipped`, nor is the rest of its count and split (as many weights or more).
    trials = [trial for trial in search.trials if key(trial.sizes) in admitted]
    for trial in trials:
        if search.found is None or trial is not trials[-1]:
            misfits.add(key(trial.sizes))
    compiled = [trial for trial in trials if trial.peak is not None]
    best = min(compiled, key=lambda trial: trial.peak, default=None)
    return {
        "devices_needed": None if search.found is None else math.prod(search.sizes.values()),
        "devices_searched": devices,
        "mesh": None if search.found is None else key(search.sizes),
        "peak_gib": None if search.found is None else search.found.peak / 2**30,
        "weights_gib": None if search.found is None else search.found.weights / 2**30,
        "jacobian_gib": None if search.found is None else search.found.jacobian / 2**30,
        # Nothing fits: the lowest peak among the compiled meshes, and where.
        "lowest_peak_gib": None if best is None else best.peak / 2**30,
        "lowest_peak_mesh": None if best is None else key(best.sizes),
        "compiled": len(compiled),
        "misfits": sorted(misfits),
    }


def _table(rows: list[dict], tokens: list[int], limit: int, axes: tuple[str, ...]) -> str:
    """Markdown: per model and variant, for each N, 'devices × peak GiB (mesh)'."""

    def cell(row: dict | None) -> str:
        if row is None:
            return ""
        if row["devices_needed"] is None:
            lowest = row["lowest_peak_gib"]
            return f"> {row['devices_searched']}" + (f" (≥ {lowest:.0f} GiB)" if lowest is not None else "")
        mesh = "·".join(str(size) for size in row["mesh"])
        return f"{row['devices_needed']} ({row['peak_gib']:.1f} GiB, {mesh})"

    header = ["model", "weights"] + [f"N = {n}" for n in tokens]
    lines = [
        f"Devices of {limit / 1e9:.0f} GB needed (per-device peak, mesh {'·'.join(axes)})",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    seen = []
    for row in rows:
        key = (row["model"], row["variant"])
        if key not in seen:
            seen.append(key)
    for model, variant in seen:
        found = {r["N"]: r for r in rows if r["model"] == model and r["variant"] == variant}
        lines.append(f"| {model} | {variant} | " + " | ".join(cell(found.get(n)) for n in tokens) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(ROOT))
    main()
