"""A named device mesh (data × fsdp × tensor, × sequence for long inputs) and the rules
that shard a model on it.

The engine is JAX's own: a `jax.sharding.Mesh` whose axes are all of type Auto, the
parameters placed with `NamedSharding`s, and every jaxlin program jitted under the mesh
(`jax.set_mesh`), where XLA's partitioner (GSPMD) propagates the parameters' shardings
through the linearization, the J·v / Jᵀ·u products and the analyses:

    mesh = jaxlin.mesh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params = jaxlin.mesh.place_params(params, config, mesh)
    with jax.set_mesh(mesh):
        jacobian = linearize(params, x, config)      # sharded weights, same numbers
        values = per_token_top_k(jacobian, jnp.eye(d), 4)

Axes:
- `data`: the batches of vectors pushed through the operator (J's rows, the per-token
  tangents, Ritz vectors) are split along it (`jaxlin.devices.map_in_batches`); the
  parameters are replicated along it.
- `fsdp`: the hidden dimension d of every weight matrix (and of the embedding table) is
  split along it; the partitioner gathers a layer's weights where they are used.
- `tensor`: attention heads (query heads, and key/value heads when their count divides
  the axis), the MLP width and the vocabulary are split along it (Megatron-style).
- `sequence` (only in a mesh that gives it a size above 1): the token axis of the
  activations is split along it (context parallelism); the parameters are replicated
  along it. See "The sequence axis" below.

Rules, in the spirit of MaxText's logical axes: each parameter (found by its path in the
params pytree of `jaxlin._modules.Transformer`, stacked layers under `layers`) names a
logical axis per dimension, and `LOGICAL_AXIS_RULES` maps logical axes to mesh axes. A
dimension whose count does not divide the mesh axis (Gemma 3 270M's single KV head, a
tiny model's odd width) is replicated along that axis instead of refused; heads count in
whole heads (a head is never split). Norm scales and d-sized biases are replicated: they
are O(layers · d) and multiply activations that are not split along d. The scanned layer
axis is never split (each scan step needs its whole layer).

A quantized matrix (`jaxlin.quantized.QuantizedArray`, kept from a GGUF) is split as the
float param it stands for: its rows (output features, in the checkpoint's order) and its
columns along the mesh axes of the matching param dimensions (mind `transposed`: the param
is then the matrix's transpose), the same split for its codes, scales and offsets. Each
row is cut into groups of `group` values sharing a scale, so the columns are split only
when every shard holds whole groups (and so whole bytes of 4-bit codes); otherwise they
stay whole on every device, like a KV projection with too few heads.

Checkpoints are converted straight into these shardings (`sharded_shapes`, used by
converters/params.py and the params cache's restore): each device reads only its shard
from the safetensors or GGUF file, so the whole model is never on one device or on the
host; `place_params` re-places params already built.

The sequence axis: sharding constraints (`split_tokens`, MaxText's "activation_length"
in spirit) split the token axis of the input X (N, d), of the residual stream at every
layer boundary and of each layer's queries, keys and values along `sequence`; the
partitioner carries the split to everything computed per token from them. So every
per-token array the linearization keeps — the norms' frozen inverse RMS, the MLP's frozen
gates (N, ff), attention's frozen probabilities (split by query row) or, in the chunked
form, its frozen q, k and log-sum-exp — and the products' activations are split: each
device holds N / sequence tokens of each. Attention needs every key for its queries: the
keys and values (N × kv_heads × head_dim, small beside the MLP's activations) are kept
split, and the partitioner brings queries and keys together where they meet — gathering
keys and values to a device's queries, or (what it picks for the chunked form's J·v and
Jᵀ·u on CPU, read off the compiled HLO) gathering one scan step's query chunks and
log-sum-exps, one chunk per device, to the devices holding the keys and summing their
partial outputs: never all N queries on a device. The chunked form's scans run over the
chunks of one device's block (the devices' blocks are a batch dimension split along
`sequence`, `_attention.chunked_frozen_attention`): a scan over the split token axis
itself would gather every query on every device. A jax array is only split evenly, so a
length that does not divide the axis is padded (`pad_tokens`): J's target runs on X with
zero rows appended up to a multiple of the axis and reads the last real token, which no
appended row can reach (attention is causal); every array J keeps is then split, and its
products still take and give (N, d). The sequence axis is placed between fsdp
and tensor (its gathers are once per layer; tensor's are inside each layer).

Tested on 8 forced host CPU devices (tests/test_mesh.py): every family's tiny model
under tensor 2 × fsdp 2 × data 2 and tensor 4 × data 2 gives the single-device numbers
to float64 rounding; so does a GGUF kept quantized in several block layouts
(tests/test_shards.py), each device holding its block of every quantized leaf; and
(tests/test_sequence.py) gemma3, llama GQA and qwen2 with biases under sequence 2 ×
tensor 2 × data 2, sequence 4 × data 2 and sequence 8, dense and chunked attention, each
per-token array J keeps split along `sequence`. Whole `jaxlin run`s with a `mesh:`
section — the analyses' own programs (layer sweep, ablation, steering, Hutchinson,
focus), a length study, a GGUF kept quantized — write the one-device run's summary.json
and arrays.npz to float64 rounding, with the same products counted
(tests/test_mesh_runs.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxlin._config import ModelConfig
from jaxlin.errors import JaxlinError
from jaxlin.quantized import QuantizedArray, is_quantized

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
SEQUENCE_AXIS = "sequence"
TENSOR_AXIS = "tensor"
# The axes every jaxlin mesh has. The sequence axis is there only when it splits (size
# > 1), so every mesh without it is the data × fsdp × tensor mesh it always was.
MESH_AXES = (DATA_AXIS, FSDP_AXIS, TENSOR_AXIS)
# Outer to inner: the tensor axis, which communicates inside every layer, gets
# neighbouring devices (the fastest links on a GPU node or TPU slice); the sequence axis,
# which gathers keys and values once per layer, the next fastest.
AXIS_ORDER = (DATA_AXIS, FSDP_AXIS, SEQUENCE_AXIS, TENSOR_AXIS)

# Logical axis of a parameter dimension → the mesh axis it is split along.
LOGICAL_AXIS_RULES: dict[str, str] = {
    "vocab": TENSOR_AXIS,
    "heads": TENSOR_AXIS,
    "kv_heads": TENSOR_AXIS,
    "mlp": TENSOR_AXIS,
    "embed": FSDP_AXIS,
}

# Parameter path (module names, the leading `layers` dropped) → logical axis per
# dimension of one layer's array. None: replicated. Paths not listed (norm scales,
# d-sized biases, position tables' rows) are replicated.
PARAM_LOGICAL_AXES: dict[tuple[str, ...], tuple[str | None, ...]] = {
    ("embedder", "embedding"): ("vocab", "embed"),
    ("position_embedder", "embedding"): (None, "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("attn", "q_proj", "kernel"): ("embed", "heads"),
    ("attn", "q_proj", "bias"): ("heads",),
    ("attn", "k_proj", "kernel"): ("embed", "kv_heads"),
    ("attn", "k_proj", "bias"): ("kv_heads",),
    ("attn", "v_proj", "kernel"): ("embed", "kv_heads"),
    ("attn", "v_proj", "bias"): ("kv_heads",),
    ("attn", "o_proj", "kernel"): ("heads", "embed"),
    ("mlp", "gate_proj", "kernel"): ("embed", "mlp"),
    ("mlp", "gate_proj", "bias"): ("mlp",),
    ("mlp", "up_proj", "kernel"): ("embed", "mlp"),
    ("mlp", "up_proj", "bias"): ("mlp",),
    ("mlp", "down_proj", "kernel"): ("mlp", "embed"),
}

LAYERS = "layers"

# A batch of vectors pushed through the operator (b, …): the batch along `data`, each
# vector's tokens as the activations' (along `sequence` inside the programs).
VECTORS_SPEC = PartitionSpec(DATA_AXIS)


class MeshError(JaxlinError):
    pass


def make_mesh(sizes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The data × fsdp × tensor mesh, with a sequence axis when `sizes` gives it a size
    above 1. `sizes` names some axes' sizes (the others are 1) and uses the first
    prod(sizes) of `devices` (default: all); without `sizes`, every device is on `data`
    (the parameters replicated, the batches split: what fits on one device needs no
    more). All axes are Auto: jaxlin leaves placement to the partitioner."""
    devices = list(devices) if devices is not None else jax.devices()
    if sizes is None:
        sizes = {DATA_AXIS: len(devices)}
    for name, size in sizes.items():
        if name not in AXIS_ORDER:
            raise MeshError(f"mesh.{name}: unknown axis (expected one of {', '.join(AXIS_ORDER)})")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise MeshError(f"mesh.{name}: {size!r} is not a positive integer")
    names = tuple(name for name in AXIS_ORDER if name in MESH_AXES or sizes.get(name, 1) > 1)
    shape = tuple(sizes.get(name, 1) for name in names)
    needed = math.prod(shape)
    if needed > len(devices):
        named = " × ".join(f"{size} {name}" for name, size in zip(names, shape, strict=True))
        raise MeshError(
            f"mesh: {named} needs {needed} devices, "
            f"but {len(devices)} {devices[0].platform} device(s) are available"
        )
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices[:needed])


def token_devices(mesh: Mesh | jax.sharding.AbstractMesh | None = None) -> int:
    """How many ways `mesh` (default: the ambient one) splits the token axis: the size of
    its sequence axis, 1 without one (or without a mesh)."""
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if mesh.empty or SEQUENCE_AXIS not in mesh.axis_names:
        return 1
    return dict(mesh.shape)[SEQUENCE_AXIS]


def split_tokens(activation: jax.Array, axis: int = 0) -> jax.Array:
    """`activation` with its token dimension `axis` split along the ambient mesh's
    sequence axis, its other dimensions left to the partitioner; as it is without a
    sequence axis. A sharding constraint (inside a jitted program): a length that does
    not divide the axis is padded by the partitioner, not refused."""
    if token_devices() == 1:
        return activation
    spec = [PartitionSpec.UNCONSTRAINED] * activation.ndim
    spec[axis] = SEQUENCE_AXIS
    return jax.lax.with_sharding_constraint(activation, PartitionSpec(*spec))


def _unit(logical: str, config: ModelConfig) -> int:
    """Elements per indivisible unit of a logical axis: a whole head for head axes."""
    return config.head_dim if logical in ("heads", "kv_heads") else 1


def _splits(size: int, unit: int, devices: int) -> bool:
    """Whether `size` elements, in indivisible units of `unit`, split evenly over `devices`."""
    return size % unit == 0 and (size // unit) % devices == 0


def logical_axes(path: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
    """The logical axis of each dimension of the parameter at `path` (its module names)."""
    stacked = bool(path) and path[0] == LAYERS
    per_layer = path[1:] if stacked else path
    axes = PARAM_LOGICAL_AXES.get(per_layer, (None,) * (ndim - stacked))
    axes = ((None,) if stacked else ()) + axes  # the scanned layer axis stays whole
    if len(axes) != ndim:
        raise ValueError(f"parameter {'/'.join(path)} has {ndim} dimensions, its rule names {len(axes)}")
    return axes


def param_spec(
    path: tuple[str, ...], shape: tuple[int, ...], config: ModelConfig, axis_sizes: Mapping[str, int]
) -> PartitionSpec:
    """The PartitionSpec of one parameter: each dimension along its logical axis's mesh
    axis when that axis exists and evenly splits the dimension's units, else replicated."""
    spec: list[str | None] = []
    for logical, size in zip(logical_axes(path, len(shape)), shape, strict=True):
        axis = LOGICAL_AXIS_RULES.get(logical) if logical is not None else None
        devices = axis_sizes.get(axis, 1) if axis is not None else 1
        spec.append(axis if devices > 1 and _splits(size, _unit(logical, config), devices) else None)
    return PartitionSpec(*spec)


def quantized_spec(
    path: tuple[str, ...], weight: QuantizedArray, config: ModelConfig, axis_sizes: Mapping[str, int]
) -> QuantizedArray:
    """The PartitionSpecs of a quantized param's codes, scales and offsets (as a
    QuantizedArray of specs): the float param's split, moved onto the matrix's (rows,
    cols), the columns left whole unless each shard holds whole groups (whole groups are
    whole bytes of 4-bit codes too: the two values of a byte are in one group)."""
    *lead, first, second = param_spec(path, weight.shape, config, axis_sizes)
    rows, cols = (second, first) if weight.transposed else (first, second)
    if cols is not None and (weight.matrix_shape[-1] // axis_sizes[cols]) % weight.group:
        cols = None  # a shard would cut through a group of values that share a scale
    spec = PartitionSpec(*lead, rows, cols)
    offset = None if weight.offset is None else spec
    return dataclasses.replace(weight, codes=spec, scale=spec, offset=offset)


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(getattr(key, "key", key)) for key in path)


def param_specs(params: Any, config: ModelConfig, mesh: Mesh | jax.sharding.AbstractMesh) -> Any:
    """The params pytree's PartitionSpecs on `mesh` (leaves need only `.shape`, so
    `jax.ShapeDtypeStruct`s serve: no weights are needed to plan a placement). A quantized
    param gets a QuantizedArray of specs, one per leaf (`quantized_spec`)."""
    axis_sizes = dict(mesh.shape)

    def spec(path: tuple[Any, ...], leaf: Any) -> PartitionSpec | QuantizedArray:
        if is_quantized(leaf):
            return quantized_spec(_path_names(path), leaf, config, axis_sizes)
        return param_spec(_path_names(path), tuple(leaf.shape), config, axis_sizes)

    return jax.tree_util.tree_map_with_path(spec, params, is_leaf=is_quantized)


def param_shardings(params: Any, config: ModelConfig, mesh: Mesh) -> Any:
    """`param_specs` as NamedShardings on `mesh` (e.g. `jit`'s in_shardings)."""
    specs = param_specs(params, config, mesh)
    return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), specs)


def sharded_shapes(shapes: Any, config: ModelConfig, mesh: Mesh | None) -> Any:
    """`shapes` (leaves with `.shape` and `.dtype`, e.g. `expected_param_shapes`) as
    ShapeDtypeStructs carrying each param's NamedSharding on `mesh`: what a converter
    builds each param into, or an orbax restore its target. Without a mesh (or with an
    empty one) the sharding is None: the default device."""
    if mesh is None or mesh.empty:
        return jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), shapes)
    return jax.tree_util.tree_map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        shapes,
        param_shardings(shapes, config, mesh),
    )


def pad_tokens(activation: jax.Array) -> jax.Array:
    """`activation` (N, …) with zero rows appended up to a multiple of the ambient mesh's
    sequence axis, so that every per-token array computed from it splits evenly; as it
    is when N divides the axis (always without one). The appended rows come after every
    real token: under causal attention they change no real row (their keys are masked
    for every real query), and padding is linear, so J·v and Jᵀ·u through it are exact."""
    extra = -activation.shape[0] % token_devices()
    if extra == 0:
        return activation
    return jnp.pad(activation, ((0, extra),) + ((0, 0),) * (activation.ndim - 1))


def place_params(params: Any, config: ModelConfig, mesh: Mesh | None = None) -> Any:
    """`params` placed on `mesh` (default: the ambient one from `jax.set_mesh`) by the
    rules: each device holds only its shard of every split parameter. Without a mesh
    the params are returned as they are."""
    mesh = mesh if mesh is not None else jax.sharding.get_mesh()
    if mesh.empty:
        return params
    return jax.device_put(params, param_shardings(params, config, mesh))


def input_sharding(mesh: Mesh, tokens: int | None = None) -> NamedSharding:
    """The input X (`tokens`, d): its tokens along the sequence axis when `mesh` has one
    and `tokens` splits evenly over it (an array placed on devices needs even shards;
    inside a program `split_tokens` splits any length), otherwise whole on every device."""
    devices = token_devices(mesh)
    if devices > 1 and tokens is not None and tokens % devices == 0:
        return NamedSharding(mesh, PartitionSpec(SEQUENCE_AXIS))
    return NamedSharding(mesh, PartitionSpec())


def vectors_sharding(mesh: Mesh) -> NamedSharding:
    """A batch of vectors (b, …) through the operator: the batch along `data`, each
    vector whole (what `jaxlin.devices.map_in_batches` constrains each batch to)."""
    return NamedSharding(mesh, VECTORS_SPEC)
