"""Quantized weight matrices kept quantized on device, dequantized where they are used.

One representation for every block format: a matrix (rows, cols) in the checkpoint's
order, cut along each row into groups of `group` consecutive values, each value

    value = scale[group] · code + offset[group]        (float32, then cast once)

with integer codes (int8, or two per byte when `bits` = 4: `code = nibble + code_offset`),
a float32 scale per group, and a float32 offset per group or none. GGUF's Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K all have this form (converters/gguf/quantized.py
decodes their blocks into it), and it reproduces `gguf.quants.dequantize` bit for bit:
the scales are the same float32 products gguf forms, `scale · code` is the same single
rounding, and `+ offset` is gguf's `+ m` / `− dm` (a − b is a + (−b) in IEEE arithmetic).
Where gguf has no offset the product is final (`offset` is None). Wherever an offset is
added the product is exact (≤ 22 significant bits), so a fused multiply-add gives the
same numbers.

A `QuantizedArray` rides in the params tree in place of a float kernel or embedding
(`transposed`: the param is the matrix's transpose, as Flax's (in, out) kernels are of
HF's (out, in) weights). Stacked layer params carry a leading layer axis on every leaf,
which the layer scan slices like any other param. `dense` and `embedding_rows` dequantize
inside `jax.checkpoint`: the linearization keeps the quantized leaves (the params
themselves) as residuals and J·v / Jᵀ·u dequantize again, so no float copy of a weight
outlives the layer that uses it.

On a device mesh the leaves are split as the float param would be (`jaxlin.mesh.
quantized_spec`: rows freely, columns only in whole groups); the dequantization is
elementwise per group, so the partitioner runs it on each device's block, and the
products are partitioned as the float path's.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A quantized matrix (see the module docstring); leaves may be numpy (host) or jax."""

    codes: Any  # (..., rows, cols) int8, or (..., rows, cols // 2) uint8 when bits == 4
    scale: Any  # (..., rows, cols // group) float32
    offset: Any  # like scale, or None
    bits: int = dataclasses.field(metadata=dict(static=True))
    group: int = dataclasses.field(metadata=dict(static=True))
    code_offset: int = dataclasses.field(metadata=dict(static=True))
    transposed: bool = dataclasses.field(metadata=dict(static=True))
    dtype: Any = dataclasses.field(metadata=dict(static=True))  # what it dequantizes to

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        """Shape of the dequantized matrix in the checkpoint's order (leading axes included)."""
        *lead, cols = self.codes.shape
        return (*lead, cols * 2 if self.bits == 4 else cols)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the param it stands for (the matrix, or its transpose)."""
        shape = self.matrix_shape
        return (*shape[:-2], shape[-1], shape[-2]) if self.transposed else shape

    @property
    def ndim(self) -> int:
        return len(self.codes.shape)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(self))

    # numpy's transpose and `np.take`, so that a family's tensor table (`linear`, `part`)
    # applies to a quantized tensor as to a float one.
    @property
    def T(self) -> QuantizedArray:  # noqa: N802 - numpy's name
        if self.ndim != 2:
            raise ValueError("only a single matrix can be transposed")
        return dataclasses.replace(self, transposed=not self.transposed)

    def take(self, indices: Any, axis: int, out: None = None, mode: str = "raise") -> QuantizedArray:
        """Rows of the matrix (whole groups move with them); any other axis is refused."""
        row_axis = 1 if self.transposed else 0
        if self.ndim != 2 or axis % 2 != row_axis or out is not None:
            raise ValueError("a quantized matrix can only be sliced along its rows")
        return self.map_rows(lambda leaf: np.take(leaf, indices, axis=0, mode=mode))

    def map_rows(self, function: Any) -> QuantizedArray:
        """The same matrix with `function` applied to every leaf (it must move rows only)."""
        return jax.tree_util.tree_map(function, self)

    def astype(self, dtype: Any) -> QuantizedArray:
        """Dequantizing to `dtype` instead (the stored blocks do not change)."""
        return dataclasses.replace(self, dtype=jnp.dtype(dtype))


def is_quantized(value: Any) -> bool:
    return isinstance(value, QuantizedArray)


def _codes(weight: QuantizedArray) -> jax.Array:
    """Integer codes (..., rows, cols // group, group) as float32 (exact: |code| < 2⁸)."""
    codes = jnp.asarray(weight.codes)
    *lead, rows, _ = codes.shape
    if weight.bits == 4:
        pairs = codes.reshape(*lead, rows, -1, weight.group // 2)
        # Byte k of a group holds its values k (low nibble) and k + group/2 (high nibble).
        codes = jnp.concatenate([pairs & 0x0F, pairs >> 4], axis=-1).astype(jnp.int32)
        codes = codes + weight.code_offset
    else:
        codes = codes.reshape(*lead, rows, -1, weight.group).astype(jnp.int32) + weight.code_offset
    return codes.astype(jnp.float32)


def dequantize(weight: QuantizedArray) -> jax.Array:
    """The float matrix in the checkpoint's order, in `weight.dtype` (formed in float32)."""
    values = _codes(weight) * jnp.asarray(weight.scale, jnp.float32)[..., None]
    if weight.offset is not None:
        values = values + jnp.asarray(weight.offset, jnp.float32)[..., None]
    return values.reshape(weight.matrix_shape).astype(weight.dtype)


def param_value(weight: QuantizedArray) -> jax.Array:
    """The float param it stands for (transposed back into the param's layout)."""
    matrix = dequantize(weight)
    return jnp.swapaxes(matrix, -1, -2) if weight.transposed else matrix


@functools.partial(jax.checkpoint, static_argnums=(2,))
def _dot_last(inputs: jax.Array, weight: QuantizedArray, precision: Any) -> jax.Array:
    # The barrier keeps XLA from fusing the dequantization into the product, which would
    # change how the product is computed (and its float32 rounding) from the float path's.
    kernel = jax.lax.optimization_barrier(param_value(weight))
    return jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=precision)


def dense(inputs: jax.Array, kernel: QuantizedArray, precision: Any = None) -> jax.Array:
    """inputs @ kernel as flax's `nn.Dense` computes it (in the kernel's dtype), the kernel
    dequantized inside `jax.checkpoint`: a linearization holds the quantized leaves, not
    the float kernel, and its products dequantize again."""
    return _dot_last(inputs.astype(kernel.dtype), kernel, precision)


@jax.checkpoint
def _attend(query: jax.Array, embedding: QuantizedArray) -> jax.Array:
    return jnp.dot(query, jax.lax.optimization_barrier(param_value(embedding)).T)


def attend(query: jax.Array, embedding: QuantizedArray) -> jax.Array:
    """query @ embeddingᵀ as flax's `nn.Embed.attend` computes it (tied unembedding)."""
    return _attend(query.astype(embedding.dtype), embedding)


def embedding_rows(embedding: QuantizedArray, token_ids: jax.Array) -> jax.Array:
    """The rows of a (vocab, features) embedding for `token_ids`: only those rows are
    dequantized (the lookup is not on the analysed map's linear path)."""
    if embedding.transposed:
        return jnp.take(param_value(embedding), token_ids, axis=0)
    rows = embedding.map_rows(lambda leaf: jnp.take(leaf, token_ids, axis=0))
    return dequantize(rows)


# ----------------------------------------------------------------- host-side assembly


def widen(weight: QuantizedArray, group: int, with_offset: bool) -> QuantizedArray:
    """The same values as int8 codes (code_offset folded in) in groups of `group` (which
    divides the weight's), with an offset if asked (−0.0 where it had none: x + (−0.0) is
    x exactly, −0.0 included). So layers quantized differently share one layout."""
    if weight.group % group:
        raise ValueError(f"group {group} does not divide {weight.group}")
    codes = np.asarray(_codes(dataclasses.replace(weight, dtype=jnp.float32)), np.float32)
    codes = codes.astype(np.int8).reshape(weight.codes.shape[:-1] + (-1,))
    repeat = weight.group // group
    scale = np.repeat(np.asarray(weight.scale, np.float32), repeat, axis=-1)
    offset = weight.offset
    if offset is not None:
        offset = np.repeat(np.asarray(offset, np.float32), repeat, axis=-1)
    elif with_offset:
        offset = np.full_like(scale, -0.0)
    return QuantizedArray(codes, scale, offset, 8, group, 0, weight.transposed, weight.dtype)


class Layout(NamedTuple):
    """How a matrix's values are stored (the static fields but orientation and dtype):
    what the layers of a stacked param must share. Known from a GGUF tensor's type alone."""

    bits: int
    group: int
    code_offset: int
    has_offset: bool


def layout_of(weight: QuantizedArray) -> Layout:
    return Layout(weight.bits, weight.group, weight.code_offset, weight.offset is not None)


def common_layout(layouts: Sequence[Layout]) -> Layout:
    """The layout of a stack of matrices in `layouts`: theirs when they agree; otherwise
    int8 codes in groups of the groups' gcd, with an offset if any has one (`widen`), which
    holds each of them exactly (llama.cpp's K-quant mixes give some layers more bits)."""
    if len(set(layouts)) == 1:
        return layouts[0]
    group = int(np.gcd.reduce([layout.group for layout in layouts]))
    return Layout(8, group, 0, any(layout.has_offset for layout in layouts))


def as_layout(weight: QuantizedArray, layout: Layout) -> QuantizedArray:
    """`weight` stored in `layout` (`common_layout` of a stack that includes it)."""
    if layout_of(weight) == layout:
        return weight
    if layout.bits != 8 or layout.code_offset:
        raise ValueError(f"a matrix cannot be re-stored as {layout}")
    return widen(weight, layout.group, layout.has_offset)


def abstract_matrix(
    layout: Layout, matrix_shape: Sequence[int], transposed: bool, dtype: Any
) -> QuantizedArray:
    """The QuantizedArray of a matrix of `matrix_shape` (leading axes included, in the
    checkpoint's order) stored in `layout`, as ShapeDtypeStructs: no values needed."""
    *lead, rows, cols = (int(size) for size in matrix_shape)
    packed = layout.bits == 4
    codes_dtype = np.uint8 if packed else np.int8
    codes = jax.ShapeDtypeStruct((*lead, rows, cols // 2 if packed else cols), codes_dtype)
    scale = jax.ShapeDtypeStruct((*lead, rows, cols // layout.group), np.float32)
    return QuantizedArray(
        codes=codes,
        scale=scale,
        offset=scale if layout.has_offset else None,
        bits=layout.bits,
        group=layout.group,
        code_offset=layout.code_offset,
        transposed=transposed,
        dtype=jnp.dtype(dtype),
    )


def stack(weights: Sequence[QuantizedArray]) -> QuantizedArray:
    """One QuantizedArray with a leading axis over `weights` (the layers of a stacked
    param), stored in their `common_layout`."""
    first = weights[0]
    if any(w.matrix_shape != first.matrix_shape or w.transposed != first.transposed for w in weights):
        raise ValueError("stacked quantized matrices must have one shape and orientation")
    layout = common_layout([layout_of(w) for w in weights])
    weights = [as_layout(w, layout) for w in weights]

    def stacked(*leaves: Any) -> Any:
        return np.stack([np.asarray(leaf) for leaf in leaves])

    return jax.tree_util.tree_map(stacked, *weights)


def to_device(weight: QuantizedArray, dtype: Any) -> QuantizedArray:
    """The leaves as jax arrays, dequantizing to `dtype`."""
    return dataclasses.replace(jax.tree_util.tree_map(jnp.asarray, weight), dtype=jnp.dtype(dtype))


def params_nbytes(params: Any) -> int:
    """Bytes held by a params tree (quantized leaves at their stored size)."""
    return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(params))


def dequantized_params(params: Any) -> Any:
    """The params tree with every quantized leaf replaced by its float param."""
    return jax.tree_util.tree_map(
        lambda leaf: param_value(leaf) if is_quantized(leaf) else leaf, params, is_leaf=is_quantized
    )


# ----------------------------------------------------------------- cache entries
#
# A params cache entry of a quantized model records each quantized param's layout (the
# static fields and the leaves' shapes), so the restore target has the same structure.


def layouts(params: Any) -> dict[str, dict[str, Any]]:
    """Every quantized param of `params`, by its path, as JSON-ready data."""
    found = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
    return {
        jax.tree_util.keystr(path): {
            "bits": leaf.bits,
            "group": leaf.group,
            "code_offset": leaf.code_offset,
            "transposed": leaf.transposed,
            "codes": [list(leaf.codes.shape), np.dtype(leaf.codes.dtype).name],
            "scale": list(leaf.scale.shape),
            "offset": leaf.offset is not None,
        }
        for path, leaf in found
        if is_quantized(leaf)
    }


def with_layouts(target: Any, recorded: dict[str, dict[str, Any]], dtype: Any) -> Any:
    """`target` (float params as ShapeDtypeStructs) with the recorded quantized params in
    place of their float ones; ValueError when a recorded path is not a param of `target`."""
    paths = {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(target)[0]}
    unknown = sorted(set(recorded) - paths)
    if unknown:
        raise ValueError(f"quantized param {unknown[0]} is not a param of the model")

    def replace(path: Any, leaf: Any) -> Any:
        layout = recorded.get(jax.tree_util.keystr(path))
        if layout is None:
            return leaf
        codes_shape, codes_dtype = layout["codes"]
        scale = jax.ShapeDtypeStruct(tuple(layout["scale"]), jnp.float32)
        return QuantizedArray(
            codes=jax.ShapeDtypeStruct(tuple(codes_shape), jnp.dtype(codes_dtype)),
            scale=scale,
            offset=scale if layout["offset"] else None,
            bits=int(layout["bits"]),
            group=int(layout["group"]),
            code_offset=int(layout["code_offset"]),
            transposed=bool(layout["transposed"]),
            dtype=jnp.dtype(dtype),
        )

    return jax.tree_util.tree_map_with_path(replace, target)


def as_float(value: Any) -> Any:
    """A param as a float array: dequantized if it is quantized, else itself."""
    return param_value(value) if is_quantized(value) else value
