"""Quantized matrices read a block of rows at a time, and quantized params placed shard by
shard: converters/lazy.py's counterpart for `jaxlin.quantized.QuantizedArray`s.

A `LazyQuantized` stands for a quantized matrix still in its file (a GGUF tensor's memory
map). Its layout (bits, group, offsets) is known from the tensor's type and its shape from
the tensor index, so the params it feeds, their shardings and their bytes are known before
a block is decoded. Reading decodes only the rows asked for (a quantized block spans
columns, never rows). The family's transforms apply to it as to a QuantizedArray: `.T`
flips `transposed`, `np.take` of a row range narrows the view.

`place_quantized` builds a quantized param (the layers of a stacked one, in their common
layout) on a mesh with `jax.make_array_from_callback` per leaf: each distinct block of
(layers, rows) a device needs is decoded once, with all its columns, and the codes, scales
and offsets of every device holding that block are cut from it; the blocks are dropped once
the param is built, so the host holds at most one param decoded at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from converters.lazy import Index, LazyTensor, _bounded
from jaxlin.quantized import (
    Layout,
    QuantizedArray,
    abstract_matrix,
    as_layout,
    common_layout,
    dequantize,
    layout_of,
    to_device,
)
from jaxlin.quantized import stack as stack_quantized

# Rows [start, stop) of a stored matrix, decoded on the host (transposed=False).
RowReader = Callable[[slice], QuantizedArray]
# A block of a param's matrix: one slice per leading (layer) axis, then the rows; every column.
BlockReader = Callable[[Index], QuantizedArray]


@dataclasses.dataclass(frozen=True)
class LazyQuantized:
    """A view of a quantized matrix in a checkpoint: a range of its stored rows, and
    whether the param is the matrix's transpose."""

    read_rows: RowReader
    layout: Layout
    stored_shape: tuple[int, int]  # the stored matrix (rows, cols)
    rows: tuple[int, int]  # the stored rows this view covers
    transposed: bool = False

    @classmethod
    def of(cls, shape: Sequence[int], layout: Layout, read_rows: RowReader) -> LazyQuantized:
        rows, cols = (int(size) for size in shape)
        return cls(read_rows, layout, (rows, cols), (0, rows))

    @classmethod
    def from_array(cls, weight: QuantizedArray) -> LazyQuantized:
        """A host QuantizedArray (one matrix) behind the same interface."""
        if weight.ndim != 2:
            raise ValueError("only a single quantized matrix can be read lazily")
        matrix = dataclasses.replace(weight, transposed=False)
        lazy = cls.of(matrix.shape, layout_of(weight), lambda rows: matrix.map_rows(lambda leaf: leaf[rows]))
        return lazy.T if weight.transposed else lazy

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (self.rows[1] - self.rows[0], self.stored_shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the param it stands for (the matrix, or its transpose)."""
        rows, cols = self.matrix_shape
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def T(self) -> LazyQuantized:  # noqa: N802 - numpy's name
        return dataclasses.replace(self, transposed=not self.transposed)

    def take(
        self, indices: Any, axis: int, out: None = None, mode: str = "raise"
    ) -> LazyQuantized | QuantizedArray:
        """`np.take` (which calls this) along the matrix's rows: a contiguous range stays a
        lazy view; any other selection reads the matrix whole (no family's table asks for
        one). Columns are refused, as QuantizedArray.take refuses them."""
        row_axis = 1 if self.transposed else 0
        if axis % 2 != row_axis or out is not None:
            raise ValueError("a quantized matrix can only be sliced along its rows")
        indices = np.asarray(indices)
        count = self.matrix_shape[0]
        contiguous = (
            indices.ndim == 1
            and indices.size > 0
            and np.array_equal(indices, np.arange(indices[0], indices[0] + indices.size))
            and indices[0] >= 0
            and indices[-1] < count
        )
        if not contiguous:
            return np.take(self.whole(), indices, axis=axis, mode=mode)
        start = self.rows[0] + int(indices[0])
        return dataclasses.replace(self, rows=(start, start + indices.size))

    def read(self, rows: slice) -> QuantizedArray:
        """Rows of the view's matrix (not transposed), decoded on the host."""
        start, stop, step = rows.indices(self.matrix_shape[0])
        if step != 1:
            raise ValueError(f"only contiguous rows can be read lazily, got {rows}")
        return self.read_rows(slice(self.rows[0] + start, self.rows[0] + max(start, stop)))

    def whole(self) -> QuantizedArray:
        """The param it stands for as a host QuantizedArray."""
        return dataclasses.replace(self.read(slice(None)), transposed=self.transposed)

    def abstract(self, dtype: Any) -> QuantizedArray:
        """The param as ShapeDtypeStructs (dequantizing to `dtype`): nothing is read."""
        return abstract_matrix(self.layout, self.matrix_shape, self.transposed, dtype)

    def dequantized(self, dtype: Any) -> LazyTensor:
        """The param as a float LazyTensor in `dtype`: a slice decodes and dequantizes only
        its rows of the matrix (a layer kept in float among quantized ones makes the
        stacked param float)."""

        def read(index: Index) -> np.ndarray:
            rows, cols = index
            values = dequantize(to_device(self.read(rows), dtype))
            return np.asarray(values)[:, cols]

        lazy = LazyTensor.of(self.matrix_shape, read)
        return lazy.T if self.transposed else lazy


def is_lazy_quantized(value: Any) -> bool:
    return isinstance(value, LazyQuantized)


# A quantized param's source: one matrix, or one per layer of a stacked param.
QuantizedSource = LazyQuantized | list[LazyQuantized]


def abstract_param(source: QuantizedSource, dtype: Any) -> QuantizedArray:
    """The param a source builds, as ShapeDtypeStructs: a stacked param's layers share
    their `common_layout`."""
    if isinstance(source, LazyQuantized):
        return source.abstract(dtype)
    first = source[0]
    if any(part.matrix_shape != first.matrix_shape or part.transposed != first.transposed for part in source):
        raise ValueError("stacked quantized matrices must have one shape and orientation")
    layout = common_layout([part.layout for part in source])
    return abstract_matrix(layout, (len(source), *first.matrix_shape), first.transposed, dtype)


def block_reader(source: QuantizedSource) -> BlockReader:
    """Blocks of the param's matrix: (rows) of one matrix, or (layers, rows) of a stacked
    param, each layer decoded only in the rows asked for and put in the common layout."""
    if isinstance(source, LazyQuantized):
        return lambda index: source.read(index[0])
    layout = common_layout([part.layout for part in source])

    def read(index: Index) -> QuantizedArray:
        layers, rows = index
        parts = [as_layout(source[layer].read(rows), layout) for layer in range(*layers.indices(len(source)))]
        return stack_quantized(parts)

    return read


def place_quantized(target: QuantizedArray, read: BlockReader, dtype: Any) -> QuantizedArray:
    """The quantized param `target` (ShapeDtypeStructs, each leaf with its sharding or
    none) describes, from blocks of `read`. With shardings, each device's shard of each leaf
    is cut from the decoded block of its (layers, rows); without, the whole param goes to
    the default device."""
    codes = target.codes
    if codes.sharding is None:
        whole = read(tuple(slice(0, size) for size in codes.shape[:-1]))
        return to_device(dataclasses.replace(whole, transposed=target.transposed), dtype)
    blocks: dict[tuple[tuple[int, int], ...], QuantizedArray] = {}

    def leaf(name: str) -> jax.Array:
        spec = getattr(target, name)
        # Devices holding the same shard (replicas along `data`) share one buffer.
        shards: dict[tuple[tuple[int, int], ...], np.ndarray] = {}

        def shard(index: Index) -> np.ndarray:
            bounded = _bounded(index, spec.shape)
            key = tuple((part.start, part.stop) for part in bounded)
            if key not in shards:
                block_key = key[:-1]
                if block_key not in blocks:
                    blocks[block_key] = read(bounded[:-1])
                values = getattr(blocks[block_key], name)
                shards[key] = np.ascontiguousarray(values[..., bounded[-1]], dtype=spec.dtype)
            return shards[key]

        return jax.make_array_from_callback(tuple(spec.shape), spec.sharding, shard, dtype=spec.dtype)

    placed = {name: leaf(name) for name in ("codes", "scale")}
    offset = None if target.offset is None else leaf("offset")
    return dataclasses.replace(target, offset=offset, dtype=jnp.dtype(dtype), **placed)
