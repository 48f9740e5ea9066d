"""Hugging Face-named tensors → the Flax param tree, checked against the shapes the
model itself expects (so a missing or mis-shaped tensor is named before any compute),
then built param by param, each device reading only its shard from the checkpoint
(converters/lazy.py, and converters/lazy_quantized.py for matrices kept quantized): the
whole model is never in host memory at once."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from converters.lazy import LazyTensor, cast_reader, is_lazy, place, stacked_reader
from converters.lazy_quantized import (
    LazyQuantized,
    QuantizedSource,
    abstract_param,
    block_reader,
    is_lazy_quantized,
    place_quantized,
)
from jaxlin._config import ModelConfig
from jaxlin.errors import JaxlinError
from jaxlin.families import Family
from jaxlin.mesh import sharded_shapes
from jaxlin.model import Params, expected_param_shapes
from jaxlin.quantized import QuantizedArray, is_quantized

log = logging.getLogger(__name__)

_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Tensors some checkpoints carry that are derived or unused, never an error.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.masked_bias|\.attn\.bias)$")


class CheckpointError(JaxlinError):
    pass


# A reader returns a checkpoint tensor still in its file: a LazyTensor, or a LazyQuantized
# for a matrix kept quantized (GGUF, keep_quantized; a host QuantizedArray is taken too).
# The family's transforms apply to either as to an array: both stay lazy through them, and
# a quantized matrix stays quantized in the params.
TensorReader = Callable[[str], LazyTensor | LazyQuantized | QuantizedArray]
# What a param is built from: a lazy tensor or quantized matrix, or one per layer for a
# stacked param.
_Source = LazyTensor | list[LazyTensor] | QuantizedSource


def _set(tree: dict, path: tuple[str, ...], value: object) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]) -> object:
    for key in path:
        tree = tree[key]
    return tree


def params_from_tensors(
    config: ModelConfig,
    family: Family,
    names: list[str],
    read: TensorReader,
    dtype: jnp.dtype,
    source: str,
    progress: bool = False,
    mesh: Mesh | None = None,
) -> Params:
    """Build params from tensors named as in HF checkpoints. `read(name)` returns the
    tensor still in its file; the family's table says which params it feeds and how
    (transpose, slice of a fused tensor); each is cast to `dtype` and layer params are
    stacked along a leading layer axis. Every expected param must be fed, with its exact
    shape; all of that is checked before any weight is read (`param_sources`).

    Each param is then built on `mesh` by `jaxlin.mesh`'s rules, every device reading
    only its shard (the layers in its range, each only its slice; for a quantized matrix,
    only its rows decoded); without a mesh, whole on the default device."""
    sources = param_sources(config, family, names, read, dtype, source)
    placements = sharded_shapes(source_shapes(sources, config, dtype), config, mesh)
    params: dict = {}
    for path, value in tqdm(sources.items(), desc=f"converting {source}", disable=not progress, unit="param"):
        _set(params, path, _build(value, _get(placements, path), dtype))
    return params


def param_sources(
    config: ModelConfig,
    family: Family,
    names: list[str],
    read: TensorReader,
    dtype: jnp.dtype,
    source: str,
) -> dict[tuple[str, ...], _Source]:
    """What each param is built from, by its path, checked against the model's expected
    params (see `params_from_tensors`); nothing is read from the checkpoint."""
    expected = expected_param_shapes(config, dtype)
    available = set(names)
    layer_parts: dict[tuple[str, ...], list] = {}

    def feeds_expected(path: tuple[str, ...]) -> bool:
        try:
            _get(expected, path)
        except KeyError:
            return False  # e.g. q_norm on a family variant without QK-norm
        return True

    # (checkpoint name, [(param path, transform)], layer index or None)
    wanted: list[tuple[str, list, int | None]] = []
    for name, targets in family.global_tensors.items():
        live = [(path, fn) for path, fn in targets if feeds_expected(path)]
        if live:
            wanted.append((name, live, None))
    for suffix, targets in family.layer_tensors.items():
        live = [(("layers", *path), fn) for path, fn in targets if feeds_expected(("layers", *path))]
        if live:
            for layer in range(config.num_layers):
                wanted.append((family.layer_prefix.format(layer=layer) + suffix, live, layer))

    used: set[str] = set()
    globals_: dict[tuple[str, ...], LazyTensor | LazyQuantized] = {}
    for name, targets, layer in wanted:
        if name not in available:
            raise CheckpointError(f"{source}: tensor {name!r} is missing from the checkpoint")
        tensor = read(name)
        used.add(name)
        for path, transform in targets:
            value = _lazy_or_quantized(transform(tensor, config))
            target = _get(expected, path)
            want_shape = tuple(target.shape[1:] if layer is not None else target.shape)
            if value.shape != want_shape:
                raise CheckpointError(
                    f"{source}: tensor {name!r} has shape {tensor.shape}, which does not give "
                    f"{'/'.join(path)} of shape {want_shape}"
                )
            if layer is None:
                globals_[path] = value
            else:
                layer_parts.setdefault(path, [None] * config.num_layers)[layer] = value

    unused = sorted(n for n in available - used if not _IGNORED.search(n))
    if config.tie_word_embeddings:
        unused = [n for n in unused if n != "lm_head.weight"]
    if unused:
        raise CheckpointError(
            f"{source}: {len(unused)} tensor(s) not used by the {family.name} port, e.g. {unused[:5]}"
        )

    sources: dict[tuple[str, ...], _Source] = dict(globals_)
    for path, parts in layer_parts.items():
        sources[path] = _stacked_source(parts, dtype)
    return sources


def source_shapes(sources: dict[tuple[str, ...], _Source], config: ModelConfig, dtype: jnp.dtype) -> dict:
    """The params `sources` build, as ShapeDtypeStructs (a quantized param as a
    QuantizedArray of them, in the layout it will have): nothing is read."""
    expected = expected_param_shapes(config, dtype)
    shapes: dict = {}
    for path, value in sources.items():
        if _is_quantized_source(value):
            _set(shapes, path, abstract_param(value, dtype))
        else:
            _set(shapes, path, jax.ShapeDtypeStruct(_get(expected, path).shape, dtype))
    return shapes


def _is_quantized_source(value: _Source) -> bool:
    return is_lazy_quantized(value) or (isinstance(value, list) and is_lazy_quantized(value[0]))


def _lazy_or_quantized(value: object) -> LazyTensor | LazyQuantized:
    """A transform's result: lazy views and lazy quantized matrices as they are; a host
    quantized matrix, or an array a transform had to read whole (none of the families'
    tables does), behind the same interfaces."""
    if is_lazy(value) or is_lazy_quantized(value):
        return value
    if is_quantized(value):
        return LazyQuantized.from_array(value)
    return LazyTensor.from_array(np.asarray(value))


def _stacked_source(parts: list, dtype: jnp.dtype) -> list[LazyTensor] | list[LazyQuantized]:
    """A stacked param's layers: all quantized, they stay quantized (layers quantized
    differently share one layout, `jaxlin.quantized.common_layout`); when some layers are
    float (e.g. kept in F16) the param is float in every layer, a quantized layer's rows
    dequantized whenever a slice of it is read."""
    if all(is_lazy_quantized(part) for part in parts):
        return parts
    return [part.dequantized(dtype) if is_lazy_quantized(part) else part for part in parts]


def _build(value: _Source, target: object, dtype: jnp.dtype) -> jax.Array | QuantizedArray:
    """One param from its source, placed as `target` (ShapeDtypeStructs) says."""
    if _is_quantized_source(value):
        return place_quantized(target, block_reader(value), dtype)
    np_dtype = np.dtype(dtype)
    read = stacked_reader(value, np_dtype) if isinstance(value, list) else cast_reader(value, np_dtype)
    return place(target, read)
