"""Parameters sharded over a named mesh (`jaxlin.mesh`) give the single-device numbers.

In a subprocess on 8 forced host CPU devices (the device count is fixed when jax creates
its CPU client, so this process cannot change it): a tiny model of every family, once on
one device and once under each of two meshes (tensor 2 × fsdp 2 × data 2, tensor 4 ×
data 2), must give the same y, J·v, Jᵀ·u, contributions, bias term, whole-J top-k and
per-token spectra to float64 rounding, with each device holding only its shard of the
split parameters. The rules themselves are checked in-process on abstract meshes. Run as
a script, this file is that subprocess: `python tests/test_mesh.py MODEL_DIR...`."""

from __future__ import annotations

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
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from converters.hf import load_hf_model
from jaxlin import model as model_fns
from jaxlin.jacobian import DetachedJacobian, linearize
from jaxlin.mesh import MeshError, input_sharding, make_mesh, param_specs, place_params, vectors_sharding
from jaxlin.operator import contributions
from jaxlin.spectral import lanczos_top_k, per_token_top_k

# One variant per family (tests/conftest.py): untied heads, biases, MHA (4 KV heads: split
# under tensor 4) and GQA (2 KV heads: replicated under tensor 4), QK-norm per head and
# over the projection, softcaps, learned positions and LayerNorm biases.
FAMILY_VARIANTS = (
    "gemma3_sliding",
    "llama_gqa_untied",
    "qwen3_mha_tied",
    "mistral_sliding",
    "qwen2_biases_untied",
    "gemma2_softcaps",
    "olmo2_post_norm",
    "phi3_fused",
    "gpt2_affine",
)
MESHES = ({"tensor": 2, "fsdp": 2, "data": 2}, {"tensor": 4, "data": 2})


@jax.jit
def analyses(jacobian: DetachedJacobian) -> dict[str, jax.Array]:
    """Every quantity compared across placements, in one program of the linearized J
    (13 tokens; chunks that do not divide the batches)."""
    x = jacobian.inputs
    d = x.shape[1]
    tangent = jax.random.normal(jax.random.key(1), x.shape, x.dtype)
    cotangent = jax.random.normal(jax.random.key(2), (d,), x.dtype)
    return {
        "y": jacobian.output,
        "bias": jacobian.bias,
        "matvec": jacobian.matvec(tangent),
        "rmatvec": jacobian.rmatvec(cotangent),
        "contributions": contributions(jacobian, chunk=6),
        "top_k_sigma": lanczos_top_k(jacobian, jax.random.key(0), 3, 32, chunk=2)[1],
        "per_token_sigma": per_token_top_k(jacobian, jnp.eye(d), 3, chunk=24)[1],
    }


def held_fraction(leaf: jax.Array) -> float:
    """The fraction of `leaf` each device holds (the same on every device, checked)."""
    sizes = {int(np.prod(shard.data.shape)) for shard in leaf.addressable_shards}
    assert len(sizes) == 1, sizes
    assert len(leaf.addressable_shards) == 8
    return sizes.pop() / leaf.size


def check_shards(params: dict, config: model_fns.ModelConfig, sizes: dict[str, int]) -> None:
    """Each device holds its fraction of the big weights, by the shapes of its shards."""
    tensor, fsdp = sizes.get("tensor", 1), sizes.get("fsdp", 1)
    layers = params["layers"]
    kv_split = tensor if config.num_kv_heads % tensor == 0 else 1
    expected = {
        "q_proj": (layers["attn"]["q_proj"]["kernel"], 1 / (tensor * fsdp)),
        "k_proj": (layers["attn"]["k_proj"]["kernel"], 1 / (kv_split * fsdp)),
        "o_proj": (layers["attn"]["o_proj"]["kernel"], 1 / (tensor * fsdp)),
        "up_proj": (layers["mlp"]["up_proj"]["kernel"], 1 / (tensor * fsdp)),
        "down_proj": (layers["mlp"]["down_proj"]["kernel"], 1 / (tensor * fsdp)),
        "embedding": (params["embedder"]["embedding"], 1 / (tensor * fsdp)),
        "norm": (params["final_norm"]["scale"], 1.0),
    }
    if "lm_head" in params:
        expected["lm_head"] = (params["lm_head"]["kernel"], 1 / (tensor * fsdp))
    for name, (leaf, fraction) in expected.items():
        assert held_fraction(leaf) == fraction, (name, sizes, [s.data.shape for s in leaf.addressable_shards])
    # The query kernel (layers, d, heads·head_dim): d along fsdp, whole heads along tensor.
    shard = layers["attn"]["q_proj"]["kernel"].addressable_shards[0].data
    assert shard.shape == (
        config.num_layers,
        config.hidden_size // fsdp,
        config.num_heads * config.head_dim // tensor,
    )


def residual_fraction(jacobian: DetachedJacobian) -> float:
    """The fraction of the linearization's large residuals (the weights it refers to,
    activations, attention probabilities) that each device holds (Jᵀ·u transposes the
    same residuals)."""
    large = [leaf for leaf in jax.tree_util.tree_leaves(jacobian.linear) if leaf.size > 500]
    held = sum(leaf.addressable_shards[0].data.size for leaf in large)
    return held / sum(leaf.size for leaf in large)


def check_family_on_meshes(model_dir: Path, attention_chunk: int | None) -> None:
    model = load_hf_model(model_dir, jnp.float64)
    config, params = model.config, model.params
    ids = np.random.default_rng(5).integers(0, 128, size=13)
    x = model_fns.embed(config, params, jnp.asarray(ids))
    single = analyses(linearize(params, x, config, attention_chunk=attention_chunk))
    for sizes in MESHES:
        mesh = make_mesh(sizes)
        sharded = place_params(params, config, mesh)
        check_shards(sharded, config, sizes)
        with jax.set_mesh(mesh):
            jacobian = linearize(
                sharded, jax.device_put(x, input_sharding(mesh)), config, attention_chunk=attention_chunk
            )
            split = analyses(jacobian)
        # The linearization keeps the weights it stores as sharded as the parameters.
        fraction = residual_fraction(jacobian)
        assert fraction < 0.5, f"{model_dir.name} {sizes}: each device holds {fraction:.2f} of J's residuals"
        for name, value in single.items():
            scale = float(jnp.max(jnp.abs(value)))
            np.testing.assert_allclose(
                split[name], value, rtol=0, atol=1e-12 * scale, err_msg=f"{model_dir.name} {sizes} {name}"
            )
        print(f"{model_dir.name} {sizes}: residuals held per device {fraction:.2f}", flush=True)


def check_vector_placement() -> None:
    """A batch of 6 vectors (13, 64) on tensor 2 × fsdp 2 × data 2: 3 whole vectors per
    device; the input X whole on every device."""
    mesh = make_mesh(MESHES[0])
    batch = jax.device_put(jnp.zeros((6, 13, 64)), vectors_sharding(mesh))
    assert {shard.data.shape for shard in batch.addressable_shards} == {(3, 13, 64)}
    x = jax.device_put(jnp.zeros((13, 64)), input_sharding(mesh))
    assert {shard.data.shape for shard in x.addressable_shards} == {(13, 64)}


def test_every_family_on_two_meshes_of_eight_host_devices(tiny_model_dir):
    dirs = [str(tiny_model_dir(variant)) for variant in FAMILY_VARIANTS]
    done = run_test_script(__file__, *dirs, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "vectors split along data" in done.stdout
    for directory in dirs:
        assert f"{Path(directory).name}: 2 meshes agree" in done.stdout


def abstract_mesh(data: int, fsdp: int, tensor: int) -> AbstractMesh:
    return AbstractMesh((data, fsdp, tensor), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def test_rules_split_heads_width_vocab_and_hidden(tiny_model_dir):
    model = load_hf_model(tiny_model_dir("qwen2_biases_untied"), jnp.float64)
    shapes = jax.eval_shape(lambda: model.params)
    specs = param_specs(shapes, model.config, abstract_mesh(2, 2, 2))
    attn, mlp = specs["layers"]["attn"], specs["layers"]["mlp"]
    assert specs["embedder"]["embedding"] == PartitionSpec("tensor", "fsdp")
    assert specs["lm_head"]["kernel"] == PartitionSpec("fsdp", "tensor")
    assert attn["q_proj"]["kernel"] == PartitionSpec(None, "fsdp", "tensor")
    assert attn["q_proj"]["bias"] == PartitionSpec(None, "tensor")
    assert attn["k_proj"]["kernel"] == PartitionSpec(None, "fsdp", "tensor")  # 2 KV heads over 2
    assert attn["o_proj"]["kernel"] == PartitionSpec(None, "tensor", "fsdp")
    assert mlp["gate_proj"]["kernel"] == PartitionSpec(None, "fsdp", "tensor")
    assert mlp["down_proj"]["kernel"] == PartitionSpec(None, "tensor", "fsdp")
    assert specs["layers"]["input_norm"]["scale"] == PartitionSpec(None, None)
    assert specs["final_norm"]["scale"] == PartitionSpec(None)


def test_an_axis_that_does_not_divide_is_replicated(tiny_model_dir):
    """2 KV heads over tensor 4 (and 1 over tensor 2, as Gemma 3 270M): replicated; a
    width that does not split into whole heads or evenly (d = 64 over fsdp 3) too."""
    model = load_hf_model(tiny_model_dir("llama_mqa"), jnp.float64)
    shapes = jax.eval_shape(lambda: model.params)
    one_kv_head = param_specs(shapes, model.config, abstract_mesh(1, 1, 2))["layers"]["attn"]
    assert one_kv_head["k_proj"]["kernel"] == PartitionSpec(None, None, None)
    assert one_kv_head["v_proj"]["kernel"] == PartitionSpec(None, None, None)
    assert one_kv_head["q_proj"]["kernel"] == PartitionSpec(None, None, "tensor")
    gqa = load_hf_model(tiny_model_dir("llama_gqa_untied"), jnp.float64)
    gqa_shapes = jax.eval_shape(lambda: gqa.params)
    specs = param_specs(gqa_shapes, gqa.config, abstract_mesh(1, 3, 4))
    assert specs["layers"]["attn"]["k_proj"]["kernel"] == PartitionSpec(None, None, None)
    assert specs["layers"]["attn"]["q_proj"]["kernel"] == PartitionSpec(None, None, "tensor")
    assert specs["layers"]["mlp"]["up_proj"]["kernel"] == PartitionSpec(None, None, "tensor")  # 96 / 4
    assert specs["embedder"]["embedding"] == PartitionSpec("tensor", None)  # 64 / 3 does not divide
    # 4 heads of 16 over tensor 8: the flat 64 divides by 8, whole heads do not.
    eight = param_specs(gqa_shapes, gqa.config, abstract_mesh(1, 1, 8))
    assert eight["layers"]["attn"]["q_proj"]["kernel"] == PartitionSpec(None, None, None)


def test_a_mesh_without_sizes_puts_every_device_on_data():
    mesh = make_mesh()
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
    assert all(kind == AxisType.Auto for kind in mesh.axis_types)


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"pipeline": 1}, "mesh.pipeline: unknown axis"),
        ({"tensor": 0}, "mesh.tensor: 0 is not a positive integer"),
        ({"fsdp": 2.0}, "mesh.fsdp: 2.0 is not a positive integer"),
        ({"tensor": 2, "data": 64}, "needs 128 devices"),
    ],
)
def test_bad_mesh_sizes_are_refused(sizes, message):
    with pytest.raises(MeshError, match=message):
        make_mesh(sizes)


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 8, jax.devices()
    check_vector_placement()
    print("vectors split along data", flush=True)
    for index, directory in enumerate(sys.argv[1:]):
        # Every other family through the chunked attention (block 4 < 13 tokens).
        check_family_on_meshes(Path(directory), attention_chunk=4 if index % 2 else None)
        print(f"{Path(directory).name}: 2 meshes agree", flush=True)
