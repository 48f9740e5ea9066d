"""Conversion straight into shards (converters/lazy.py, converters/params.py) and the
params cache restored into another mesh (jaxlin/loading.py).

In a subprocess on 8 forced host CPU devices (the device count is fixed when jax creates
its CPU client): tiny HF directories and GGUF files of several families (Phi-3's fused
qkv and gate/up, GPT-2's fused Conv1D columns, Llama's permuted q/k rows in Q8_0),
converted straight onto two meshes, must equal bit for bit the params read whole, built
on one device and then `device_put` onto the mesh (the path conversion took before),
with each device holding only its shard; a cache entry saved under one mesh restores
under another (and under none) to the same bits. Run as a script, this file is that
subprocess: `python tests/test_shards.py HF_DIR... -- GGUF... -- CACHE_DIR`.

The host memory claim is measured by benchmarks/conversion_memory.py, which this file
runs on a ~400 MB model.

Kept quantized (`python tests/test_shards.py --quantized GGUF CACHE_DIR`): a GGUF in
several block layouts, converted onto two meshes, gives the one-device numbers, each
device holding its block of every quantized leaf, the planned bytes a device, and a cache
entry restored across meshes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":
    # Before jax creates its CPU client: the device count is fixed then.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, str(Path(__file__).parent))

import jax
import jax.numpy as jnp
import numpy as np

from converters.lazy import LazyTensor
from jaxlin.families import Family
from jaxlin.model import expected_param_shapes

ROOT = Path(__file__).parent.parent
HF_VARIANTS = ("phi3_fused", "gpt2_affine", "llama_gqa_untied", "qwen2_biases_untied")
GGUF_ARCHES = ("llama", "qwen3", "phi3")
MESHES = ({"tensor": 2, "fsdp": 2, "data": 2}, {"tensor": 4, "fsdp": 2})


# --------------------------------------------------------------------------- the old path


def _get(tree: dict, path: tuple[str, ...]) -> object:
    for key in path:
        tree = tree[key]
    return tree


def whole_then_device_put(config, family: Family, tensors: dict[str, np.ndarray], dtype, mesh=None) -> dict:
    """The params as conversion built them before shards: every tensor read whole, the
    family's transforms on numpy arrays, each cast with `jnp.asarray`, layers stacked with
    `jnp.stack` on one device, then `device_put` onto `mesh` by the rules."""
    from jaxlin.mesh import place_params

    expected = expected_param_shapes(config, dtype)
    params: dict = {}
    stacked: dict[tuple[str, ...], list] = {}

    def put(path: tuple[str, ...], value: jax.Array) -> None:
        tree = params
        for key in path[:-1]:
            tree = tree.setdefault(key, {})
        tree[path[-1]] = value

    def known(path: tuple[str, ...]) -> bool:
        try:
            _get(expected, path)
        except KeyError:
            return False
        return True

    for name, targets in family.global_tensors.items():
        for path, transform in targets:
            if known(path):
                put(path, jnp.asarray(transform(tensors[name], config), dtype=dtype))
    for suffix, targets in family.layer_tensors.items():
        for path, transform in targets:
            if known(("layers", *path)):
                for layer in range(config.num_layers):
                    value = transform(tensors[family.layer_prefix.format(layer=layer) + suffix], config)
                    stacked.setdefault(("layers", *path), []).append(jnp.asarray(value, dtype=dtype))
    for path, parts in stacked.items():
        put(path, jnp.stack(parts))
    return place_params(params, config, mesh) if mesh is not None else params


# --------------------------------------------------------------------------- checks


def bit_equal(a: dict, b: dict) -> None:
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert [path for path, _ in flat_a] == list(flat_b), "different param trees"
    for path, leaf in flat_a:
        other = flat_b[path]
        assert leaf.dtype == other.dtype and leaf.shape == other.shape, jax.tree_util.keystr(path)
        assert np.asarray(leaf).tobytes() == np.asarray(other).tobytes(), jax.tree_util.keystr(path)


def check_placed(params: dict, config, mesh) -> None:
    """Every param carries the rules' sharding, and each device holds exactly its shard
    (by the shards' shapes): the split weights a fraction, never the whole."""
    from jaxlin.mesh import param_shardings

    expected = param_shardings(params, config, mesh)
    for (path, leaf), sharding in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(expected), strict=True
    ):
        assert leaf.sharding == sharding, jax.tree_util.keystr(path)
        assert len(leaf.addressable_shards) == mesh.size
        want = sharding.shard_shape(leaf.shape)
        assert {shard.data.shape for shard in leaf.addressable_shards} == {want}, jax.tree_util.keystr(path)
    tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
    q = params["layers"]["attn"]["q_proj"]["kernel"]
    up = params["layers"]["mlp"]["up_proj"]["kernel"]
    if not isinstance(q, jax.Array) or not isinstance(up, jax.Array):
        return  # kept quantized: their leaves' shards are checked by check_quantized_shards
    assert q.addressable_shards[0].data.shape == (
        config.num_layers,
        config.hidden_size // fsdp,
        config.num_heads * config.head_dim // tensor,
    )
    assert up.addressable_shards[0].data.size == up.size // (tensor * fsdp)


def hf_tensors(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(directory / "model.safetensors")


def check_hf(directory: Path, meshes: list) -> None:
    from transformers import AutoConfig

    from converters.hf import load_hf_model
    from jaxlin.families import family_for_hf_config

    family = family_for_hf_config(AutoConfig.from_pretrained(directory))
    tensors = hf_tensors(directory)
    for dtype in (jnp.float32, jnp.bfloat16):
        model = load_hf_model(directory, dtype)  # no mesh: whole, on the default device
        bit_equal(model.params, whole_then_device_put(model.config, family, tensors, dtype))
        for mesh in meshes:
            sharded = load_hf_model(directory, dtype, mesh=mesh).params
            check_placed(sharded, model.config, mesh)
            bit_equal(sharded, whole_then_device_put(model.config, family, tensors, dtype, mesh))


def check_gguf(path: Path, meshes: list) -> None:
    from converters.gguf import read_gguf, read_gguf_state_dict
    from converters.gguf.architectures import gguf_family
    from converters.gguf_model import load_gguf_model
    from jaxlin.mesh import place_params
    from jaxlin.quantized import is_quantized

    family = gguf_family(read_gguf(path))
    tensors = read_gguf_state_dict(path)  # each tensor read whole (as conversion did before)
    model = load_gguf_model(path, jnp.float32)
    bit_equal(model.params, whole_then_device_put(model.config, family, tensors, jnp.float32))
    # Q8_0 matrices kept quantized: placed by the rules (here one group a row: the columns
    # stay whole), and layers of a param stored partly in float (layer 0 F32, layer 1 Q8_0)
    # dequantized.
    quantized = load_gguf_model(path, jnp.float32, keep_quantized=True).params
    assert any(is_quantized(leaf) for leaf in jax.tree_util.tree_leaves(quantized, is_leaf=is_quantized))
    for mesh in meshes:
        sharded = load_gguf_model(path, jnp.float32, mesh=mesh).params
        check_placed(sharded, model.config, mesh)
        bit_equal(sharded, whole_then_device_put(model.config, family, tensors, jnp.float32, mesh))
        kept = load_gguf_model(path, jnp.float32, keep_quantized=True, mesh=mesh).params
        check_placed(kept, model.config, mesh)
        bit_equal(kept, place_params(quantized, model.config, mesh))


def check_cache_across_meshes(directory: Path, cache: Path, meshes: list) -> None:
    """Saved (sharded) under one mesh, restored under another, and under none."""
    from jaxlin.loading import load_model

    first, second = meshes
    saved = load_model("hf", directory, "float32", cache_dir=cache, progress=False, mesh=first)
    assert not saved.from_cache
    restored = load_model("hf", directory, "float32", cache_dir=cache, progress=False, mesh=second)
    assert restored.from_cache
    check_placed(restored.model.params, restored.model.config, second)
    bit_equal(restored.model.params, saved.model.params)
    single = load_model("hf", directory, "float32", cache_dir=cache, progress=False)
    assert single.from_cache
    device = jax.local_devices()[0]
    assert all(leaf.devices() == {device} for leaf in jax.tree_util.tree_leaves(single.model.params))
    bit_equal(single.model.params, saved.model.params)


def check_quantized_cache_across_meshes(path: Path, cache: Path, meshes: list) -> None:
    """A GGUF's entry with Q8_0 matrices kept quantized, saved under one mesh and restored
    under another: every param placed by the rules on the new mesh, the same bits."""
    from jaxlin.loading import load_model

    first, second = meshes
    saved = load_model("gguf", path, "float32", cache_dir=cache, progress=False, quantized=True, mesh=first)
    again = load_model("gguf", path, "float32", cache_dir=cache, progress=False, quantized=True, mesh=second)
    assert not saved.from_cache and again.from_cache
    check_placed(again.model.params, again.model.config, second)
    bit_equal(again.model.params, saved.model.params)


def check_replicas_share_reads(mesh) -> None:
    """On data 2 × fsdp 2 × tensor 2, a (8, 8) param split along fsdp and tensor has 4
    distinct shards on 8 devices: the checkpoint is read 4 times, each read a quarter."""
    from jax.sharding import NamedSharding, PartitionSpec

    from converters.lazy import cast_reader, place

    stored = np.arange(64, dtype=np.float32).reshape(8, 8)
    reads: list[tuple[slice, ...]] = []

    def read(index: tuple[slice, ...]) -> np.ndarray:
        reads.append(index)
        return stored[index]

    target = jax.ShapeDtypeStruct(
        (8, 8), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("fsdp", "tensor"))
    )
    placed = place(target, cast_reader(LazyTensor.of(stored.shape, read), np.float32))
    np.testing.assert_array_equal(np.asarray(placed), stored)
    assert len(reads) == 4 and {stored[index].shape for index in reads} == {(4, 4)}, reads


# --------------------------------------------------------------------------- tiny GGUFs


def write_tiny_gguf(arch: str, directory: Path) -> Path:
    from test_gguf import (
        F16,
        F32,
        FFN,
        HEADS,
        HIDDEN,
        KV_HEADS,
        LAYERS,
        Q8_0,
        VOCAB,
        tiny_checkpoint,
        write_gguf,
    )

    if arch != "phi3":
        tensors, _, head_dim = tiny_checkpoint(arch)
        return write_gguf(
            directory / f"{arch}.gguf",
            arch,
            tensors,
            None,
            head_dim,
            "qwen2" if arch == "qwen3" else "llama-bpe",
        )
    # Phi-3 keeps HF's fused tensors: attn_qkv (rows q, k, v) and ffn_up (rows gate, up).
    rng = np.random.default_rng(3)
    head_dim = HIDDEN // HEADS

    def random(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    tensors = {
        "token_embd.weight": (random(VOCAB, HIDDEN), F16),
        "output_norm.weight": (random(HIDDEN), F32),
        "output.weight": (random(VOCAB, HIDDEN), Q8_0),
    }
    for layer in range(LAYERS):
        blk = f"blk.{layer}."
        tensors |= {
            blk + "attn_norm.weight": (random(HIDDEN), F32),
            blk + "ffn_norm.weight": (random(HIDDEN), F32),
            blk + "attn_qkv.weight": (random((HEADS + 2 * KV_HEADS) * head_dim, HIDDEN), Q8_0),
            blk + "attn_output.weight": (random(HIDDEN, HEADS * head_dim), F16),
            blk + "ffn_up.weight": (random(2 * FFN, HIDDEN), F32 if layer else Q8_0),
            blk + "ffn_down.weight": (random(HIDDEN, FFN), Q8_0),
        }
    return write_gguf(directory / "phi3.gguf", "phi3", tensors)


# --------------------------------------------------------------------------- in-process


def test_a_lazy_view_reads_only_its_slice():
    """Transpose and a contiguous `np.take` (the families' `linear` and `part`) stay lazy
    and compose with slicing; what is read is the slice's bytes, nothing more."""
    stored = np.arange(6 * 10, dtype=np.float32).reshape(6, 10)
    reads: list[tuple[slice, ...]] = []

    def read(index: tuple[slice, ...]) -> np.ndarray:
        reads.append(index)
        return stored[index]

    lazy = LazyTensor.of(stored.shape, read)
    view = np.take(lazy, np.arange(2, 5), axis=0).T  # part(…, axis=0, then=linear)
    assert isinstance(view, LazyTensor) and view.shape == (10, 3)
    np.testing.assert_array_equal(view[3:7, 1:3], stored[2:5].T[3:7, 1:3])
    assert reads == [(slice(3, 5), slice(3, 7))]
    np.testing.assert_array_equal(np.asarray(view), stored[2:5].T)
    # A selection that is not a range reads the tensor whole (no family asks for one).
    picked = np.take(lazy, np.array([0, 2]), axis=1)
    np.testing.assert_array_equal(picked, stored[:, [0, 2]])


def test_conversion_into_shards_equals_whole_then_device_put(tiny_model_dir, tmp_path):
    hf_dirs = [str(tiny_model_dir(variant)) for variant in HF_VARIANTS]
    ggufs = [str(write_tiny_gguf(arch, tmp_path)) for arch in GGUF_ARCHES]
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    done = subprocess.run(
        [sys.executable, __file__, *hf_dirs, "--", *ggufs, "--", str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in [Path(d).name for d in hf_dirs] + [Path(g).name for g in ggufs]:
        assert f"{name}: shards equal" in done.stdout, done.stdout
    assert "cache: restored across meshes" in done.stdout
    assert "replicas share reads" in done.stdout


def test_peak_host_memory_of_a_conversion_into_shards(tmp_path):
    """A ~400 MB float32 llama converted onto tensor 4 × fsdp 2 (8 host devices) in a
    fresh process: the growth of its anonymous memory (what the converted shards and any
    copy of the model take; the checkpoint's memory-mapped pages are page cache, not
    counted), with glibc returning freed buffers of 1 MiB and more, peaks below the
    model's size plus the largest param and 64 MiB (see benchmarks/conversion_memory.py for
    why that margin). Whole-then-device_put peaks at about twice the model (+840 MB)."""
    output = tmp_path / "memory.json"
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/conversion_memory.py",
            *("--paths", "shards", "--allocators", "returning"),
        ]
        + ["--json", str(output)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(output.read_text())
    model = result["model_bytes"]
    assert model > 350e6
    shards = result["paths"]["shards, returning allocator"]
    assert shards["peak_growth_bytes"] < result["bound_bytes"], result
    # The converted params themselves are in that memory (host devices): the measurement sees them.
    assert shards["peak_growth_bytes"] > 0.9 * model, result


# --------------------------------------------------------------------------- kept quantized on a mesh
#
# tests/test_quantized.py's mixed-layout GGUF (Q4_K, Q4_0, Q4_1, Q8_0, a widened stack, an
# MLP width of 96 = 3 groups of 32), kept quantized on each mesh. Each device's shard of
# each quantized param: the matrix's (rows, cols) divided by these factors, in every leaf
# (codes, scales, offsets). The columns split only where each shard holds whole groups:
# never ffn_down's (48 or 24 columns a shard). Vocabulary rows: 261 do not split.

QUANTIZED_SHARDS = {
    # tensor 2 × fsdp 2 × data 2
    0: {
        ("embedder", "embedding"): (1, 2),
        ("lm_head", "kernel"): (1, 2),
        ("layers", "attn", "q_proj", "kernel"): (2, 2),
        ("layers", "attn", "k_proj", "kernel"): (2, 2),
        ("layers", "attn", "v_proj", "kernel"): (2, 2),
        ("layers", "attn", "o_proj", "kernel"): (2, 2),
        ("layers", "mlp", "gate_proj", "kernel"): (2, 2),
        ("layers", "mlp", "up_proj", "kernel"): (2, 2),
        ("layers", "mlp", "down_proj", "kernel"): (2, 1),
    },
    # tensor 4 × data 2: 2 KV heads replicated; o_proj's 256 columns split 4 ways (2 groups each)
    1: {
        ("embedder", "embedding"): (1, 1),
        ("lm_head", "kernel"): (1, 1),
        ("layers", "attn", "q_proj", "kernel"): (4, 1),
        ("layers", "attn", "k_proj", "kernel"): (1, 1),
        ("layers", "attn", "v_proj", "kernel"): (1, 1),
        ("layers", "attn", "o_proj", "kernel"): (1, 4),
        ("layers", "mlp", "gate_proj", "kernel"): (4, 1),
        ("layers", "mlp", "up_proj", "kernel"): (4, 1),
        ("layers", "mlp", "down_proj", "kernel"): (1, 1),
    },
}
QUANTIZED_MESHES = ({"tensor": 2, "fsdp": 2, "data": 2}, {"tensor": 4, "data": 2})
TOKENS = np.array([3, 17, 5, 42, 8, 11, 2, 29, 14, 200, 7, 99, 31])


def check_quantized_shards(params: dict, divisors: dict) -> None:
    """Every quantized param is in `divisors`, and every device holds exactly its block
    of each leaf (by the shards' shapes)."""
    from jaxlin.quantized import is_quantized

    found = {
        tuple(str(key.key) for key in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
        if is_quantized(leaf)
    }
    assert set(found) == set(divisors), sorted(found)
    for path, weight in found.items():
        rows, cols = divisors[path]
        leaves = {"codes": weight.codes, "scale": weight.scale, "offset": weight.offset}
        for name, leaf in leaves.items():
            if leaf is None:
                continue
            *lead, height, width = leaf.shape
            assert height % rows == 0 and width % cols == 0, (path, name, leaf.shape)
            want = (*lead, height // rows, width // cols)
            shapes = [shard.data.shape for shard in leaf.addressable_shards]
            assert len(shapes) == 8 and set(shapes) == {want}, (path, name, shapes, want)


@jax.jit
def quantized_analyses(jacobian) -> dict[str, jax.Array]:
    from jaxlin.operator import contributions
    from jaxlin.spectral import lanczos_top_k

    return {
        "y": jacobian.output,
        "bias": jacobian.bias,
        "contributions": contributions(jacobian, chunk=6),
        "top_k_sigma": lanczos_top_k(jacobian, jax.random.key(0), 3, 32, chunk=2)[1],
    }


def device_bytes(params: dict, device) -> int:
    """What `device` holds of `params`: the bytes of its shards."""
    return sum(
        shard.data.nbytes
        for leaf in jax.tree_util.tree_leaves(params)
        for shard in leaf.addressable_shards
        if shard.device == device
    )


def check_quantized_on_meshes(path: Path, cache: Path) -> None:
    """Kept quantized on each mesh: the rules' shards, the one-device numbers (float64),
    the planned weights per device; the cache saved on one mesh restores on the other."""
    from converters.gguf_model import gguf_quantized_layouts, load_gguf_model
    from jaxlin import model as model_fns
    from jaxlin.jacobian import linearize
    from jaxlin.loading import load_model
    from jaxlin.mesh import input_sharding, make_mesh
    from jaxlin.plan import weights_per_device

    jax.config.update("jax_enable_x64", True)
    single = load_gguf_model(path, jnp.float64, keep_quantized=True)
    config = single.config
    x = model_fns.embed(config, single.params, jnp.asarray(TOKENS))
    reference = {"inputs": x, **quantized_analyses(linearize(single.params, x, config))}
    recorded = gguf_quantized_layouts(path)
    converted = []
    for index, sizes in enumerate(QUANTIZED_MESHES):
        mesh = make_mesh(sizes)
        params = load_gguf_model(path, jnp.float64, keep_quantized=True, mesh=mesh).params
        check_quantized_shards(params, QUANTIZED_SHARDS[index])
        converted.append(params)
        with jax.set_mesh(mesh):
            inputs = model_fns.embed(config, params, jnp.asarray(TOKENS))
            jacobian = linearize(params, jax.device_put(inputs, input_sharding(mesh)), config)
            split = {"inputs": inputs, **quantized_analyses(jacobian)}
        for name, value in reference.items():
            scale = float(jnp.max(jnp.abs(value)))
            np.testing.assert_allclose(
                split[name], value, rtol=0, atol=1e-12 * scale, err_msg=f"{sizes} {name}"
            )
        planned = weights_per_device(config, jnp.float64, sizes, recorded)
        held = {device_bytes(params, device) for device in mesh.devices.flat}
        assert held == {planned}, (sizes, held, planned)
        print(f"quantized {sizes}: equal to one device, {planned} bytes a device as planned", flush=True)
    first, second = (make_mesh(sizes) for sizes in QUANTIZED_MESHES)
    options = dict(cache_dir=cache, progress=False, quantized=True)
    saved = load_model("gguf", path, "float64", mesh=first, **options)
    restored = load_model("gguf", path, "float64", mesh=second, **options)
    assert not saved.from_cache and restored.from_cache
    check_quantized_shards(restored.model.params, QUANTIZED_SHARDS[1])
    bit_equal(restored.model.params, converted[1])
    bit_equal(saved.model.params, converted[0])
    print("quantized cache: restored across meshes", flush=True)


def test_kept_quantized_params_sharded_on_two_meshes(tmp_path):
    from conftest import run_test_script
    from test_quantized import write_mixed_layout_gguf

    path = write_mixed_layout_gguf(tmp_path / "mixed.gguf")
    done = run_test_script(__file__, "--quantized", str(path), str(tmp_path / "cache"), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("equal to one device") == 2, done.stdout
    assert "quantized cache: restored across meshes" in done.stdout


# --------------------------------------------------------------------------- subprocess


def main(argv: list[str]) -> None:
    from jaxlin.mesh import make_mesh

    assert jax.device_count() == 8, jax.devices()
    if argv[0] == "--quantized":
        check_quantized_on_meshes(Path(argv[1]), Path(argv[2]))
        return
    split = argv.index("--")
    hf_dirs, rest = argv[:split], argv[split + 1 :]
    split = rest.index("--")
    ggufs, (cache,) = rest[:split], rest[split + 1 :]
    meshes = [make_mesh(sizes) for sizes in MESHES]
    check_replicas_share_reads(meshes[0])
    print("replicas share reads", flush=True)
    for directory in hf_dirs:
        check_hf(Path(directory), meshes)
        print(f"{Path(directory).name}: shards equal", flush=True)
    for path in ggufs:
        check_gguf(Path(path), meshes)
        print(f"{Path(path).name}: shards equal", flush=True)
    check_cache_across_meshes(Path(hf_dirs[0]), Path(cache), meshes)
    check_quantized_cache_across_meshes(Path(ggufs[0]), Path(cache), meshes)
    print("cache: restored across meshes", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
