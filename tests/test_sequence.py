"""The token axis split along a mesh's `sequence` axis (`jaxlin.mesh`) gives the
single-device numbers, with J's per-token residuals split across the axis's devices.

In a subprocess on 8 forced host CPU devices (as tests/test_mesh.py): gemma3 (sliding
window), llama (GQA) and qwen2 (biases) tiny models, with dense attention and with the
chunked attention (chunk 4, shorter than the inputs), once on one device and once under
sequence 2 × tensor 2 × data 2 or sequence 4 × data 2 (gemma3: both, and sequence 8; see
RUNS):
y, J·v, Jᵀ·u, contributions, bias term, whole-J top-k and per-token spectra equal to
float64 rounding. Every leaf of J's own residuals whose shape grows with the input
(found by linearizing at two lengths) is split along `sequence`: each device holds at
most 1/sequence of it. An input whose length does not divide the axis (13 tokens) gives
the same numbers too, its residuals split as well (padded to a multiple of the axis:
`jaxlin.mesh.pad_tokens`). Run as a script, this file is that subprocess."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    # Before jax creates its CPU client: the device count is fixed then.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_test_script
from jax.sharding import PartitionSpec
from test_mesh import analyses

from converters.hf import load_hf_model
from jaxlin import model as model_fns
from jaxlin.jacobian import DetachedJacobian, linearize
from jaxlin.mesh import SEQUENCE_AXIS, MeshError, input_sharding, make_mesh, place_params, token_devices

FAMILY_VARIANTS = ("gemma3_sliding", "llama_gqa_untied", "qwen2_biases_untied")
MESHES = ({"sequence": 2, "tensor": 2, "data": 2}, {"sequence": 4, "data": 2})
# Both divisible by every sequence size used (an array's shards are even).
TOKENS, LONGER = 16, 24
ATTENTION_CHUNK = 4  # chunked attention: 4 query chunks per 16 tokens


def own_residuals(jacobian: DetachedJacobian, params: dict) -> list[jax.Array]:
    """The leaves of J's residuals that are not the caller's parameters."""
    weights = {id(leaf) for leaf in jax.tree_util.tree_leaves(params)}
    return [leaf for leaf in jax.tree_util.tree_leaves(jacobian.linear) if id(leaf) not in weights]


def mentions(spec: PartitionSpec, axis: str) -> bool:
    return any(axis == entry or (isinstance(entry, tuple) and axis in entry) for entry in spec)


def check_token_residuals_split(
    short: DetachedJacobian, long: DetachedJacobian, params: dict, devices: int, label: str
) -> int:
    """Each residual whose shape differs between the two lengths (a per-token activation
    or frozen coefficient) is split along the sequence axis, each device holding at most
    1/devices of it; returns how many there are."""
    # Scalars never grow with the input (a padded input's J keeps one more: the padding value).
    short_leaves, long_leaves = (
        [leaf for leaf in own_residuals(jacobian, params) if leaf.ndim] for jacobian in (short, long)
    )
    assert len(short_leaves) == len(long_leaves), label
    pairs = zip(short_leaves, long_leaves, strict=True)
    per_token = [leaf for leaf, other in pairs if leaf.shape != other.shape]
    assert per_token, label
    for leaf in per_token:
        shard = leaf.addressable_shards[0].data
        assert mentions(leaf.sharding.spec, SEQUENCE_AXIS), (label, leaf.shape, leaf.sharding.spec)
        assert shard.size * devices <= leaf.size, (label, leaf.shape, shard.shape)
    return len(per_token)


def check_family(
    model_dir: Path, attention_chunk: int | None, runs: tuple[tuple[dict[str, int], tuple[int, ...]], ...]
) -> None:
    """On each mesh of `runs`, its lengths against one device; J's per-token residuals
    split (from TOKENS and LONGER tokens)."""
    model = load_hf_model(model_dir, jnp.float64)
    config, params = model.config, model.params
    ids = np.random.default_rng(5).integers(0, 128, size=LONGER)
    compared = sorted({n for _, lengths in runs for n in lengths})
    inputs = {n: model_fns.embed(config, params, jnp.asarray(ids[:n])) for n in {*compared, TOKENS, LONGER}}
    single = {
        n: analyses(linearize(params, inputs[n], config, attention_chunk=attention_chunk)) for n in compared
    }
    for sizes, lengths in runs:
        mesh = make_mesh(sizes)
        sharded = place_params(params, config, mesh)
        label = f"{model_dir.name} chunk {attention_chunk} {sizes}"
        with jax.set_mesh(mesh):
            placed = {
                n: jax.device_put(inputs[n], input_sharding(mesh, n)) for n in {*lengths, TOKENS, LONGER}
            }
            jacobians = {
                n: linearize(sharded, x, config, attention_chunk=attention_chunk) for n, x in placed.items()
            }
            split = {n: analyses(jacobians[n]) for n in lengths}
        for n in lengths:
            for name, value in single[n].items():
                scale = float(jnp.max(jnp.abs(value)))
                np.testing.assert_allclose(
                    split[n][name], value, rtol=0, atol=1e-12 * scale, err_msg=f"{label} N={n} {name}"
                )
        count = check_token_residuals_split(
            jacobians[TOKENS], jacobians[LONGER], sharded, token_devices(mesh), label
        )
        for n in lengths:
            if n % token_devices(mesh):  # padded to split: as split as a length that divides
                uneven = check_token_residuals_split(
                    jacobians[n], jacobians[LONGER], sharded, token_devices(mesh), f"{label} N={n}"
                )
                assert uneven == count, (label, n, uneven, count)
        print(f"{label}: {count} per-token residuals split", flush=True)


def check_plan_shrinks(model_dir: Path) -> None:
    """`jaxlin plan`'s programs on a sequence axis: J's own residuals per device shrink
    about as the axis grows (N = 64, chunked attention), and the plan names the axis."""
    from jaxlin.model_source import read_model_config
    from jaxlin.plan import Workload, describe, plans_by_mesh
    from jaxlin.run_config import ModelSection

    config = read_model_config(ModelSection(source="hf", path=str(model_dir)))
    work = Workload(top_k=2, chunk=4, per_token="projected", per_token_rank=4)
    plan_on = plans_by_mesh(config, 64, jnp.dtype("float64"), work, None)
    one = plan_on({})
    for devices in (2, 4):
        planned = plan_on({"sequence": devices})
        assert f"sequence {devices}" in describe(planned, None)
        # The replicated leaves (a layer's norm scales) are small beside the per-token ones.
        assert planned.jacobian * devices <= 1.15 * one.jacobian, (devices, planned.jacobian, one.jacobian)
        print(
            f"plan: J's residuals {one.jacobian} → {planned.jacobian} bytes on sequence {devices}", flush=True
        )


def check_held_rows_placed(model_dir: Path) -> None:
    """Rows an analysis keeps between its programs count one device's share in the plan:
    the layer sweep's tap rows (d, N, d), split by token on sequence 2, are held at half
    their size beside the programs that read them."""
    from jaxlin.analyses import INPUT_ANALYSES
    from jaxlin.model_source import read_model_config
    from jaxlin.plan import plans_by_mesh, workload
    from jaxlin.run_config import AnalysisSection, ModelSection

    config = read_model_config(ModelSection(source="hf", path=str(model_dir)))
    n, d, item = 64, config.hidden_size, 8
    layers = {"enabled": True, "kinds": ["mlp"], "local": True}
    options = AnalysisSection(top_k=2, chunk=4, per_token={"method": "off"}, layers=layers)
    enabled = [analysis for analysis in INPUT_ANALYSES if analysis.enabled(options, n)]
    plan_on = plans_by_mesh(config, n, jnp.dtype("float64"), workload(options, enabled), None)
    for devices in (1, 2):
        held = {program.name: program.held for program in plan_on({"sequence": devices}).programs}
        for scope in ("cumulative", "local"):
            rows = held[f"layers {scope} mlp: spectrum"] - held[f"layers {scope} mlp: rows"]
            assert rows == d * n * d * item // devices, (scope, devices, rows)
    print("plan: held rows placed", flush=True)


def test_sequence_axis_on_eight_host_devices(tiny_model_dir):
    dirs = [str(tiny_model_dir(variant)) for variant in FAMILY_VARIANTS]
    done = run_test_script(__file__, *dirs, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "plan: J's residuals" in done.stdout and "plan: held rows placed" in done.stdout
    for directory in dirs:
        for chunk in (None, ATTENTION_CHUNK):
            assert f"{Path(directory).name} chunk {chunk}: meshes agree" in done.stdout, done.stdout


def test_the_sequence_axis_exists_only_where_it_splits():
    """sequence 1 (the default) leaves the data × fsdp × tensor mesh as it was; the input
    is split by token only when its length divides the axis."""
    assert make_mesh({"sequence": 1, "data": 1}).axis_names == ("data", "fsdp", "tensor")
    assert token_devices(make_mesh({"data": 1})) == 1
    if jax.device_count() >= 2:
        mesh = make_mesh({"sequence": 2})
        assert mesh.axis_names == ("data", "fsdp", "sequence", "tensor") and token_devices(mesh) == 2
        assert input_sharding(mesh, 16).spec == PartitionSpec("sequence")
        assert input_sharding(mesh, 13).spec == PartitionSpec()


def test_a_mesh_too_large_for_the_devices_names_the_sequence_axis():
    with pytest.raises(MeshError, match="1 data × 1 fsdp × 256 sequence × 1 tensor needs 256 devices"):
        make_mesh({"sequence": 256})


def test_the_mesh_config_accepts_the_sequence_axis():
    from jaxlin.run_config import MeshSection

    assert MeshSection(sequence=4, tensor=2).sizes() == {"data": 1, "fsdp": 1, "tensor": 2, "sequence": 4}
    assert MeshSection(sequence=4).model_dump()["sequence"] == 4
    # Recorded as before the axis existed when it does not split.
    assert MeshSection(fsdp=2, tensor=2).model_dump() == {"data": 1, "fsdp": 2, "tensor": 2}
    assert MeshSection().sizes()["sequence"] == 1


def test_the_mesh_search_tries_the_sequence_axis_before_data():
    """With the sequence axis among the searched axes: 35 meshes of up to 8 devices (20
    without it); at equal weights, the wider tensor, then fsdp, then sequence axis first;
    a model whose heads stop the tensor axis fits with it and not without."""
    from jaxlin.mesh import AXIS_ORDER
    from jaxlin.plan import Plan, ProgramMemory, mesh_candidates, smallest_mesh

    assert len(mesh_candidates(8, AXIS_ORDER)) == 35 and len(mesh_candidates(8)) == 20
    # A model with 2 heads: tensor splits at most 2 ways (jaxlin.mesh replicates beyond).
    heads = lambda sizes: min(sizes["tensor"], 2)  # noqa: E731
    weights = lambda sizes: 100 // (sizes["fsdp"] * heads(sizes))  # noqa: E731

    def plan_on(sizes: dict[str, int]) -> Plan:
        # The activations are split by heads and by token.
        activations = 400 // (heads(sizes) * sizes.get("sequence", 1))
        program = ProgramMemory("linearize", 0, activations, 0, 0)
        return Plan(1, "float32", weights(sizes), activations, (program,), tuple(sizes.items()))

    search = smallest_mesh(8, 160, weights, plan_on, axes=AXIS_ORDER)
    assert search.sizes == {"data": 1, "fsdp": 1, "sequence": 2, "tensor": 2}, search.trials
    assert search.found.peak == 150
    assert [trial.sizes for trial in search.trials if math.prod(trial.sizes.values()) == 2] == [
        {"data": 1, "fsdp": 1, "sequence": 1, "tensor": 2},
        {"data": 1, "fsdp": 2, "sequence": 1, "tensor": 1},
        {"data": 1, "fsdp": 1, "sequence": 2, "tensor": 1},
        {"data": 2, "fsdp": 1, "sequence": 1, "tensor": 1},
    ]
    # Without it, no mesh of up to 8 devices brings the activations under the limit.
    assert smallest_mesh(8, 160, weights, plan_on).found is None


# (family index, attention chunk) → the meshes it runs on and the lengths compared: each
# family with dense and chunked attention, sequence 2, 4 and 8 among them; gemma3's
# sliding window (the chunked form's local key spans) and llama's dense attention on 13
# tokens too, not a multiple of the axis (padded to one, `jaxlin.mesh.pad_tokens`).
SEQUENCE_2, SEQUENCE_4 = MESHES
RUNS = {
    (0, None): (({"sequence": 8}, (TOKENS,)),),
    (0, ATTENTION_CHUNK): ((SEQUENCE_2, (TOKENS,)), (SEQUENCE_4, (TOKENS, 13))),
    (1, None): ((SEQUENCE_2, (TOKENS, 13)),),
    (1, ATTENTION_CHUNK): ((SEQUENCE_4, (TOKENS,)),),
    (2, None): ((SEQUENCE_4, (TOKENS,)),),
    (2, ATTENTION_CHUNK): ((SEQUENCE_2, (TOKENS,)),),
}

if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 8, jax.devices()
    check_plan_shrinks(Path(sys.argv[2]))
    check_held_rows_placed(Path(sys.argv[2]))
    for index, directory in enumerate(sys.argv[1:]):
        for chunk in (None, ATTENTION_CHUNK):
            check_family(Path(directory), chunk, RUNS[index, chunk])
            print(f"{Path(directory).name} chunk {chunk}: meshes agree", flush=True)
