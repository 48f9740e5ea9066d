"""Checkpoint tensors read a slice at a time, and params placed shard by shard.

A `LazyTensor` stands for a checkpoint tensor that is still in its file (a safetensors
slice handle, a GGUF tensor's memory map): it knows its shape and reads only the slice it
is asked for. The family's transforms (`jaxlin.families._base`: `linear` is `.T`, `part`
is `np.take` of a contiguous range) give views of it, so a param's shard is read from the
file without the rest of the tensor, let alone the rest of the model.

`place` builds a param from such a reader: under a mesh with `jax.make_array_from_callback`,
each device reading only its shard; without one, whole, on the default device (as
`jnp.asarray` leaves an array: uncommitted).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# A slice of a tensor: one `slice` per dimension, with concrete bounds and step 1.
Index = tuple[slice, ...]
SliceReader = Callable[[Index], np.ndarray]


def whole(shape: Sequence[int]) -> Index:
    return tuple(slice(0, size) for size in shape)


def _bounded(index: Index, shape: Sequence[int]) -> Index:
    """`index` (as jax or numpy write it: None bounds, fewer dimensions) with concrete bounds."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    bounded = []
    for part, size in zip(index, shape, strict=True):
        start, stop, step = part.indices(size)
        if step != 1:
            raise ValueError(f"only contiguous slices can be read lazily, got {part}")
        bounded.append(slice(start, max(start, stop)))
    return tuple(bounded)


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A view of a tensor in a checkpoint: a transposition and a sub-range of each of the
    stored tensor's axes. Indexing reads that slice (numpy, the stored dtype) and nothing
    more; `np.asarray` reads it whole."""

    read_stored: SliceReader  # the stored tensor's slices
    stored_shape: tuple[int, ...]
    axes: tuple[int, ...]  # view axis i is stored axis axes[i]
    bounds: tuple[tuple[int, int], ...]  # per stored axis, the range the view covers

    @classmethod
    def of(cls, shape: Sequence[int], read: SliceReader) -> LazyTensor:
        shape = tuple(int(size) for size in shape)
        return cls(read, shape, tuple(range(len(shape))), tuple((0, size) for size in shape))

    @classmethod
    def from_array(cls, array: np.ndarray) -> LazyTensor:
        """An array already in memory, behind the same interface."""
        return cls.of(array.shape, lambda index: array[index])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.bounds[axis][1] - self.bounds[axis][0] for axis in self.axes)

    @property
    def ndim(self) -> int:
        return len(self.axes)

    @property
    def T(self) -> LazyTensor:  # noqa: N802 - numpy's name
        return dataclasses.replace(self, axes=self.axes[::-1])

    def take(self, indices: Any, axis: int, out: None = None, mode: str = "raise") -> LazyTensor | np.ndarray:
        """`np.take` (which calls this): a contiguous range stays a lazy view; any other
        selection reads the whole tensor (no family's table asks for one)."""
        indices = np.asarray(indices)
        axis = axis % self.ndim
        contiguous = (
            indices.ndim == 1
            and indices.size > 0
            and out is None
            and np.array_equal(indices, np.arange(indices[0], indices[0] + indices.size))
            and indices[0] >= 0
            and indices[-1] < self.shape[axis]
        )
        if not contiguous:
            return np.take(np.asarray(self), indices, axis=axis, out=out, mode=mode)
        stored = self.axes[axis]
        start = self.bounds[stored][0] + int(indices[0])
        bounds = list(self.bounds)
        bounds[stored] = (start, start + indices.size)
        return dataclasses.replace(self, bounds=tuple(bounds))

    def __getitem__(self, index: Index) -> np.ndarray:
        index = _bounded(index if isinstance(index, tuple) else (index,), self.shape)
        stored: list[slice] = [slice(0)] * len(self.stored_shape)
        for part, axis in zip(index, self.axes, strict=True):
            offset = self.bounds[axis][0]
            stored[axis] = slice(offset + part.start, offset + part.stop)
        return np.transpose(self.read_stored(tuple(stored)), self.axes)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        values = self[whole(self.shape)]
        return values if dtype is None else values.astype(dtype, copy=False)


def is_lazy(value: Any) -> bool:
    return isinstance(value, LazyTensor)


def stacked_reader(layers: Sequence[LazyTensor], dtype: Any) -> SliceReader:
    """Slices of the layers stacked along a leading axis, cast to `dtype`: only the layers
    in the slice's range are read, each only its slice."""

    def read(index: Index) -> np.ndarray:
        chosen = range(*index[0].indices(len(layers)))
        rest = index[1:]
        shape = tuple(part.stop - part.start for part in _bounded(rest, layers[0].shape))
        out = np.empty((len(chosen), *shape), dtype=dtype)
        for row, layer in enumerate(chosen):
            out[row] = layers[layer][rest]  # numpy's cast, as jnp.asarray(…, dtype) does
        return out

    return read


def cast_reader(tensor: LazyTensor, dtype: Any) -> SliceReader:
    return lambda index: np.asarray(tensor[index], dtype=dtype)


def place(target: jax.ShapeDtypeStruct, read: SliceReader) -> jax.Array:
    """The param `target` describes, from `read` (slices in `target.dtype`). With a
    sharding, each device's shard is read on its own (`jax.make_array_from_callback`);
    without one, the whole param goes to the default device."""
    dtype = np.dtype(target.dtype)
    if target.sharding is None:
        return jnp.asarray(read(whole(target.shape)), dtype=dtype)
    # Devices holding the same shard (replicas along `data`) share one read and one buffer.
    shards: dict[tuple[tuple[int, int], ...], np.ndarray] = {}

    def shard(index: Index) -> np.ndarray:
        bounded = _bounded(index, target.shape)
        key = tuple((part.start, part.stop) for part in bounded)
        if key not in shards:
            shards[key] = read(bounded)
        return shards[key]

    return jax.make_array_from_callback(tuple(target.shape), target.sharding, shard, dtype=dtype)
