"""`jaxlin run` on a device mesh (data × fsdp × tensor; sequence) writes what it writes on one device.

tests/test_mesh.py checks the programs on J under a mesh; this file checks the runs: the
analyses' own programs (the layer sweep's cumulative and layer-local taps, the ablation's
linear and real edits, steering, the Hutchinson estimate, the focus block, per-token
spectra exact and projected), a length study (exact and stochastic influence) and a GGUF
kept quantized, each run through `jaxlin.command` / `jaxlin.length_study` once under a
`mesh:` section (tensor 2 × fsdp 2 × data 2) and once on one device; then the rows-based
analyses and a length study under sequence 4 × data 2, on lengths the axis does not
divide (padded, `jaxlin.mesh.pad_tokens`). Every array of
arrays.npz and every number of summary.json (a length study: of every length's record)
must agree to float64 rounding, the products counted must be equal, and each device must
hold only its shard of the split parameters.

In a subprocess on 8 forced host CPU devices (the device count is fixed when jax creates
its CPU client). Run as a script, this file is that subprocess:
`python tests/test_mesh_runs.py WORK_DIR HF_DIR_A HF_DIR_B GGUF`."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    # Before jax creates its CPU client: the device count is fixed then.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, str(Path(__file__).parent))

import jax
import numpy as np

MESH = {"tensor": 2, "fsdp": 2, "data": 2}
# float64 rounding: what may differ when the partitioner splits a sum over devices.
TOLERANCE = 1e-12
# What differs between two runs of the same numbers: wall time, memory, where it ran and
# the config's own mesh / devices / output directory.
RUN_ONLY_KEYS = {
    "timings_seconds",
    "devices",
    "config",
    "seconds",
    "compute_seconds",
    "compile_seconds",
    "memory",
}
# A length study's fits of those (its fit of the influence decay is compared).
RUN_ONLY_FITS = {
    "compute_seconds_vs_length",
    "seconds_vs_length",
    "compute_seconds_per_product_vs_length",
    "peak_memory_vs_length",
}


# --------------------------------------------------------------------------- comparisons


# Keys of measured rounding: relative errors (the largest certificate), residuals and their
# bounds, O(ε) on either placement, where a relative comparison of two roundings means
# nothing. They are# themselves relative quantities and must agree to TOLERANCE absolutely.
ROUNDING_KEYS = ("error", "residual", "bound", "max_certificate")


def _numeric(values: list) -> bool:
    flat = np.asarray(values, dtype=object).ravel()
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat)


def _table(values: list) -> bool:
    """A list of records with the same keys (a table's rows)."""
    return bool(values) and all(isinstance(row, dict) and row.keys() == values[0].keys() for row in values)


def agree(mesh: Any, single: Any, where: str, scale: float | None = None) -> None:
    """The JSON values of a mesh run and a one-device run agree: strings, booleans and
    integers exactly; floats to float64 rounding relative to the largest magnitude of the
    list or table column they belong to (a lone float: of itself); measured rounding
    (`ROUNDING_KEYS`) to TOLERANCE absolutely."""
    name = where.rsplit(".", 1)[-1]
    if scale is None and any(word in name for word in ROUNDING_KEYS):
        scale = 1.0
    if isinstance(single, dict):
        assert isinstance(mesh, dict) and mesh.keys() == single.keys(), (where, mesh, single)
        for key in single:
            agree(mesh[key], single[key], f"{where}.{key}", scale)
    elif isinstance(single, list) and _table(single):
        # Each column compared as one list, so that its scale is the column's.
        assert isinstance(mesh, list) and len(mesh) == len(single) and _table(mesh), where
        for key in single[0]:
            agree([row[key] for row in mesh], [row[key] for row in single], f"{where}[].{key}", scale)
    elif isinstance(single, list) and single and _numeric(single):
        close(np.asarray(mesh, np.float64), np.asarray(single, np.float64), where, scale=scale)
        if all(isinstance(v, int) for v in np.asarray(single, dtype=object).ravel()):
            assert mesh == single, where
    elif isinstance(single, list):
        assert isinstance(mesh, list) and len(mesh) == len(single), where
        for index, (a, b) in enumerate(zip(mesh, single, strict=True)):
            agree(a, b, f"{where}[{index}]", scale)
    elif isinstance(single, float) and not isinstance(mesh, bool):
        close(np.asarray(mesh, np.float64), np.asarray(single, np.float64), where, scale=scale)
    else:
        assert type(mesh) is type(single) and mesh == single, (where, mesh, single)


def close(
    mesh: np.ndarray, single: np.ndarray, where: str, tolerance: float = TOLERANCE, scale: float | None = None
) -> None:
    """Equal non-finite entries; finite ones within `tolerance` × `scale` (default: the
    largest magnitude of `single`)."""
    assert mesh.shape == single.shape, (where, mesh.shape, single.shape)
    finite = np.isfinite(single)
    np.testing.assert_array_equal(np.isfinite(mesh), finite, err_msg=where)
    np.testing.assert_array_equal(mesh[~finite], single[~finite], err_msg=where)
    if scale is None:
        scale = float(np.max(np.abs(single[finite]), initial=0.0))
    np.testing.assert_allclose(mesh[finite], single[finite], rtol=0, atol=tolerance * scale, err_msg=where)


def arrays_agree(mesh: dict[str, np.ndarray], single: dict[str, np.ndarray], where: str) -> None:
    """arrays.npz: the same arrays, dtypes and shapes. Float64 arrays to float64 rounding;
    an array the run stores in float32 (X, the focus block) is a float32 rounding of
    float64 values that agree to 1e-12, so it agrees to one float32 rounding. Measured
    rounding (`ROUNDING_KEYS`: residual bounds) absolutely, as in summary.json."""
    assert mesh.keys() == single.keys(), (where, sorted(mesh), sorted(single))
    for name, value in single.items():
        other = mesh[name]
        assert other.dtype == value.dtype, (where, name, other.dtype, value.dtype)
        if np.issubdtype(value.dtype, np.floating):
            tolerance = TOLERANCE if value.dtype == np.float64 else float(np.finfo(value.dtype).eps)
            rounding = any(word in name for word in ROUNDING_KEYS)
            close(other, value, f"{where} {name}", tolerance, scale=1.0 if rounding else None)
        else:
            np.testing.assert_array_equal(other, value, err_msg=f"{where} {name}")


def without_run_only(value: Any) -> Any:
    """`value` without the entries that say how a run went rather than what it computed."""
    if isinstance(value, dict):
        return {
            key: without_run_only(item)
            for key, item in value.items()
            if key not in RUN_ONLY_KEYS and key not in RUN_ONLY_FITS
        }
    if isinstance(value, list):
        return [without_run_only(item) for item in value]
    return value


# --------------------------------------------------------------------------- placement


def check_sharded(params: dict, config: Any) -> None:
    """Each device holds its fraction of the big weights (tests/test_mesh.py's check)."""
    from test_mesh import check_shards

    check_shards(params, config, MESH)


def check_quantized_sharded(params: dict) -> None:
    """Each device holds its block of every quantized leaf (tests/test_shards.py's check)."""
    from test_shards import QUANTIZED_MESHES, QUANTIZED_SHARDS, check_quantized_shards

    assert QUANTIZED_MESHES[0] == MESH
    check_quantized_shards(params, QUANTIZED_SHARDS[0])


# --------------------------------------------------------------------------- runs


def loading_recorded() -> list[Any]:
    """The models `jaxlin run` loads from now on (`jaxlin.command.load_placed`, which the
    length study calls too), appended as they are loaded."""
    from jaxlin import command

    loaded: list[Any] = []
    load = command.load_placed

    def recorded(*args: Any, **kwargs: Any) -> Any:
        loaded.append(load(*args, **kwargs))
        return loaded[-1]

    command.load_placed = recorded
    return loaded


def run_twice(
    data: dict[str, Any], out: Path, loaded: list[Any], mesh: dict[str, int] = MESH
) -> tuple[Any, Any]:
    """The config run under `mesh`, then on one device: each run's output directory, and
    the model the mesh run loaded."""
    from jaxlin.command import run
    from jaxlin.length_study import run_study
    from jaxlin.run_config import parse_run_config

    outputs = []
    for name, placement in (("mesh", {"mesh": mesh}), ("single", {"devices": 1})):
        config = parse_run_config({**data, **placement, "output_dir": str(out / name)})
        before = len(loaded)
        if config.length_study is not None:
            run_study(config, verbose=False)
        else:
            run(config, verbose=False)
        assert len(loaded) == before + 1
        outputs.append(out / name)
    return outputs, loaded[-2]


def compare_run(data: dict[str, Any], out: Path, loaded: list[Any], sizes: dict[str, int] = MESH) -> Any:
    (mesh, single), model = run_twice(data, out, loaded, sizes)
    summaries = [json.loads((path / "summary.json").read_text()) for path in (mesh, single)]
    assert summaries[0]["devices"] == sizes["data"] and summaries[1]["devices"] == 1
    assert summaries[0]["products"] == summaries[1]["products"], [s["products"] for s in summaries]
    agree(*(without_run_only(summary) for summary in summaries), "summary")
    with np.load(mesh / "arrays.npz") as split, np.load(single / "arrays.npz") as whole:
        arrays_agree(dict(split), dict(whole), "arrays.npz")
    return model, summaries[1]


def compare_study(data: dict[str, Any], out: Path, loaded: list[Any], sizes: dict[str, int] = MESH) -> Any:
    (mesh, single), model = run_twice(data, out, loaded, sizes)
    summaries = [json.loads((path / "summary.json").read_text()) for path in (mesh, single)]
    assert summaries[0]["devices"] == sizes["data"] and summaries[1]["devices"] == 1
    agree(*(without_run_only(summary) for summary in summaries), "summary")
    for length in summaries[1]["lengths"]:
        name = f"lengths/p{length:06d}.json"
        records = [json.loads((path / name).read_text()) for path in (mesh, single)]
        assert records[0]["products"] == records[1]["products"], (length, [r["products"] for r in records])
        agree(*(without_run_only(record) for record in records), name)
    return model, summaries[1]


def hf_config(directory: str, **analysis: Any) -> dict[str, Any]:
    return {
        "model": {"source": "hf", "path": directory, "dtype": "float64", "cache": False},
        "text": "Hello, world!",
        "analysis": {"top_k": 4, "decode_top_tokens": 3, "chunk": 24, "attention_chunk": 8, **analysis},
    }


def main(work: Path, first: str, second: str, gguf: str) -> None:
    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 8, jax.devices()
    loaded = loading_recorded()
    started = time.perf_counter()

    # J's rows kept: exact per-token spectra, dense top-k, the focus block from the rows
    # (and the ordinary Jacobian's); the layer sweep's cumulative and local taps; the
    # ablation; steering after the input.
    data = hf_config(
        first,
        method="dense",
        per_token={"method": "exact", "top_k": 3},
        layers={"enabled": True, "kinds": ["residual"], "local": True, "top_k": 2},
        ablation=True,
    )
    data["steering"] = {"enabled": True, "lambdas": [4.0], "max_new_tokens": 2}
    model, summary = compare_run(data, work / "rows", loaded)
    check_sharded(model.model.params, model.model.config)
    assert summary["layers"] and summary["ablation"] and summary["steering"], sorted(summary)
    print(f"rows, layers, ablation, steering: mesh = one device ({time.perf_counter() - started:.0f} s)")

    # Without J's rows: Lanczos, projected per-token spectra, the Hutchinson estimate of
    # ‖J_t‖_F, the focus block from forward products.
    data = hf_config(
        second,
        method="lanczos",
        per_token={"method": "projected", "top_k": 2, "rank": 16},
        frobenius_samples=8,
        ordinary_jacobian=False,
    )
    model, summary = compare_run(data, work / "lanczos", loaded)
    check_sharded(model.model.params, model.model.config)
    assert summary["norms"]["frobenius_method"].startswith("Hutchinson"), summary["norms"]
    print(f"lanczos, projected, Hutchinson, focus: mesh = one device ({time.perf_counter() - started:.0f} s)")

    # A length study: exact influence at 8 tokens, stochastic at 12.
    study = {
        "model": {"source": "hf", "path": first, "dtype": "float64", "cache": False},
        "analysis": {"top_k": 3, "chunk": 24, "attention_chunk": 8},
        "length_study": {
            "document": "Alice was beginning to get very tired of sitting by her sister.",
            "lengths": [8, 12],
            "influence": "auto",
            "max_exact_tokens": 10,
            "influence_samples": 8,
        },
    }
    model, summary = compare_study(study, work / "study", loaded)
    check_sharded(model.model.params, model.model.config)
    methods = [row["influence"]["method"] for row in summary["rows"]]
    assert methods == ["exact", "stochastic"], methods
    print(f"length study: mesh = one device ({time.perf_counter() - started:.0f} s)")

    # A GGUF kept quantized (Q4_K, Q4_0, Q4_1, Q8_0), dequantized to float64 (d = 256:
    # no per-token spectra, whose d² per token would dominate the test's time).
    data = {
        "model": {"source": "gguf", "path": gguf, "dtype": "float64", "cache": False, "quantized": True},
        "text": "The bridge out of Marin",
        "add_bos": False,
        "analysis": {
            "top_k": 2,
            "decode_top_tokens": 3,
            "per_token": {"method": "off"},
            "frobenius_samples": 8,
            "ordinary_jacobian": False,
        },
    }
    model, summary = compare_run(data, work / "quantized", loaded)
    check_quantized_sharded(model.model.params)
    print(f"kept quantized: mesh = one device ({time.perf_counter() - started:.0f} s)")

    # The sequence axis, on lengths it does not divide (padded: jaxlin.mesh.pad_tokens):
    # J's rows, exact per-token spectra, the layer sweep's local and cumulative taps and
    # the ablation; then a length study's prefixes.
    sequence = {"sequence": 4, "data": 2}
    data = hf_config(
        second,
        method="dense",
        per_token={"method": "exact", "top_k": 2},
        layers={"enabled": True, "kinds": ["mlp"], "local": True, "top_k": 2},
        ablation=True,
    )
    model, summary = compare_run(data, work / "sequence", loaded, sequence)
    assert len(summary["tokens"]) % sequence["sequence"], len(summary["tokens"])
    study["length_study"]["lengths"] = [9, 13]
    compare_study(study, work / "sequence_study", loaded, sequence)
    print(f"sequence axis, uneven lengths: mesh = one device ({time.perf_counter() - started:.0f} s)")


def test_runs_on_a_mesh_equal_one_device(tiny_model_dir, tmp_path):
    from conftest import run_test_script
    from test_quantized import write_mixed_layout_gguf

    first, second = (str(tiny_model_dir(variant)) for variant in ("llama_gqa_untied", "gemma3_sliding"))
    gguf = write_mixed_layout_gguf(tmp_path / "mixed.gguf")
    done = run_test_script(__file__, str(tmp_path), first, second, str(gguf), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for line in (
        "rows, layers, ablation, steering: mesh = one device",
        "lanczos, projected, Hutchinson, focus: mesh = one device",
        "length study: mesh = one device",
        "kept quantized: mesh = one device",
        "sequence axis, uneven lengths: mesh = one device",
    ):
        assert line in done.stdout, done.stdout


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
