"""Many devices: under a "batch" mesh the batched products are split across its devices
(`jaxlin.devices`) and give the same numbers as without one.

In-process on the one device this process has, and in a subprocess on 2 and 4 forced host
CPU devices (`--xla_force_host_platform_device_count`; more devices than this machine has
cores, the case that deadlocked jaxlib's batched CPU eigendecomposition), and `jaxlin run`
on 2 of them. Run as a script, this file is that subprocess:
`python tests/test_devices.py MODEL_DIR DEVICES`."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":
    # Before jax creates its CPU client: the device count is fixed then.
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={sys.argv[2]}"

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_test_script
from jax.sharding import AxisType

from converters.hf import load_hf_model
from jaxlin import model as model_fns
from jaxlin.devices import batch_mesh, map_in_batches, map_matrices
from jaxlin.jacobian import linearize
from jaxlin.layer_sweep import tap_spectrum
from jaxlin.model import Tap
from jaxlin.operator import contributions, rows
from jaxlin.spectral import lanczos_top_k, per_token_top_k


def test_map_in_batches_under_a_mesh_is_lax_map():
    xs = jnp.arange(7 * 3, dtype=jnp.float64).reshape(7, 3)
    fn = lambda v: jnp.sin(v) * jnp.sum(v)  # noqa: E731
    expected = jax.lax.map(fn, xs, batch_size=3)
    with jax.set_mesh(batch_mesh()):
        # 7 rows in batches of 3 (rounded up to the mesh size): padding must be dropped.
        split = jax.jit(lambda x: map_in_batches(fn, x, 3))(xs)
        pytree = jax.jit(lambda x: map_in_batches(lambda t: t[0] * t[1], (x, 2 * x), None))(xs)
    np.testing.assert_array_equal(split, expected)
    np.testing.assert_array_equal(pytree, 2 * xs * xs)


def test_map_in_batches_without_a_chunk_runs_every_vector_at_once():
    # `lax.map` without a batch size is a scan over single vectors: "all at once" (chunk
    # None, as `operator.chunk_size` gives when the chunk covers the batch) must be a vmap,
    # as it is under a mesh.
    xs = jnp.arange(7 * 3, dtype=jnp.float64).reshape(7, 3)
    fn = lambda v: jnp.sin(v) * jnp.sum(v)  # noqa: E731
    program = jax.make_jaxpr(lambda x: map_in_batches(fn, x, None))(xs)
    assert "scan" not in str(program)
    np.testing.assert_array_equal(map_in_batches(fn, xs, None), jax.vmap(fn)(xs))
    assert "scan" in str(jax.make_jaxpr(lambda x: map_in_batches(fn, x, 3))(xs))


def test_map_matrices_is_vmap():
    matrices = jax.random.normal(jax.random.key(1), (5, 4, 4), jnp.float64)
    matrices = matrices + jnp.swapaxes(matrices, 1, 2)
    expected = jax.vmap(jnp.linalg.eigh)(matrices)
    for mesh in (None, batch_mesh()):
        with jax.set_mesh(mesh) if mesh else contextlib.nullcontext():
            values, vectors = jax.jit(lambda m: map_matrices(jnp.linalg.eigh, m))(matrices)
        np.testing.assert_allclose(values, expected[0], rtol=0, atol=1e-13)
        np.testing.assert_allclose(jnp.abs(vectors), jnp.abs(expected[1]), rtol=0, atol=1e-12)


def check_analyses_split_across_devices(model_dir: Path) -> None:
    """Every batched analysis, once as is and once under a "batch" mesh over all devices:
    the numbers must agree to float64 rounding (11 tokens: uneven over 2 and 4 devices)."""
    model = load_hf_model(model_dir, jnp.float64)
    config, params = model.config, model.params
    ids = np.random.default_rng(3).integers(0, 128, size=11)
    x = model_fns.embed(config, params, jnp.asarray(ids))
    d = config.hidden_size

    def tap(rows_in_memory: bool):  # layer 1's cumulative MLP tap
        jacobian = linearize(params, x, config, tap=Tap(1, "mlp"))
        return tap_spectrum(jacobian, 2, 5, rows_in_memory)[0]

    def analyses() -> dict[str, jax.Array]:
        jacobian = linearize(params, x, config)
        return {
            # chunk 6 does not divide d
            "rows": rows(jacobian, chunk=6),
            "contributions": contributions(jacobian, chunk=6),
            "per_token_sigma": per_token_top_k(jacobian, jnp.eye(d), 3, chunk=8)[1],
            "top_k_sigma": lanczos_top_k(jacobian, jax.random.key(0), 3, 12)[1],
            "layer_gram_streamed": tap(rows_in_memory=False).spectrum ** 2,
            "layer_gram_rows": tap(rows_in_memory=True).spectrum ** 2,
        }

    single = analyses()
    with jax.set_mesh(batch_mesh()):
        split = analyses()
    for name, value in single.items():
        scale = float(jnp.max(jnp.abs(value)))
        np.testing.assert_allclose(split[name], value, rtol=0, atol=1e-12 * scale, err_msg=name)


def test_analyses_under_a_batch_mesh_match(tiny_model_dir):
    check_analyses_split_across_devices(tiny_model_dir("gemma3_sliding"))


@pytest.mark.parametrize("devices", [2, 4])
def test_analyses_split_across_host_devices(tiny_model_dir, devices):
    model_dir = tiny_model_dir("gemma3_sliding")
    done = run_test_script(__file__, str(model_dir), str(devices), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{devices} devices agree" in done.stdout


def test_a_mesh_without_auto_batch_axis_is_refused():
    mesh = jax.make_mesh((1,), ("batch",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="Auto"):
        jax.jit(lambda x: map_in_batches(lambda v: v * 2, x, 2))(jnp.ones((4, 3)))


def test_cli_run_on_host_devices_replicated_and_sharded(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """`jaxlin run` splits its work over all devices it sees (parameters replicated onto
    the mesh), or shards the parameters over a configured `mesh:`, and writes the same
    results as on one device."""
    from test_cli import tiny_run_config, write_config

    from jaxlin.cli import main

    data = tiny_run_config(tmp_path, tiny_model_dir("gemma3_sliding"))
    data["analysis"]["layers"] = {"enabled": True, "kinds": ["mlp"], "top_k": 2}
    # Through the params cache, as the embedded default runs: restored params are
    # committed to one device, which a program under a 2-device mesh would refuse.
    data["model"]["cache"] = True
    monkeypatch.setenv("JAXLIN_CACHE", str(tmp_path / "cache"))
    config = write_config(tmp_path / "run.yaml", **data)
    assert main(["run", str(config), "--quiet", "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    run_on_host_devices(config, tmp_path / "two", 2)
    # The same run with the parameters sharded: data 1 × fsdp 2 × tensor 2 on 4 devices.
    data["mesh"] = {"fsdp": 2, "tensor": 2}
    sharded = write_config(tmp_path / "sharded.yaml", **data)
    run_on_host_devices(sharded, tmp_path / "sharded", 4)
    one, two, four = (
        json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two", "sharded")
    )
    assert (one["devices"], two["devices"], four["devices"]) == (1, 2, 1)  # devices along `data`
    assert four["config"]["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert two["params_from_cache"] and four["params_from_cache"]
    arrays_one = np.load(tmp_path / "one" / "arrays.npz")
    for run in ("two", "sharded"):
        arrays = np.load(tmp_path / run / "arrays.npz")
        for name in ("S", "per_token_S", "contributions", "layer_singular_values"):
            expected = arrays_one[name]
            atol = 1e-11 * np.max(np.abs(expected))
            np.testing.assert_allclose(arrays[name], expected, rtol=0, atol=atol, err_msg=f"{run}: {name}")


def run_on_host_devices(config: Path, out: Path, devices: int) -> None:
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    command = [sys.executable, "-m", "jaxlin.cli", "run", str(config), "--quiet", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == int(sys.argv[2]), jax.devices()
    check_analyses_split_across_devices(Path(sys.argv[1]))
    print(f"{jax.device_count()} devices agree")
