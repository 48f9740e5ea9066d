"""Hugging Face-named tensors → the Flax param tree, checked against the shapes the
model itself expects (so a missing or mis-shaped tensor is named before any compute)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxlin._config import ModelConfig
from jaxlin.errors import JaxlinError
from jaxlin.families import Family
from jaxlin.model import Params, expected_param_shapes
from jaxlin.quantized import QuantizedArray, is_quantized, param_value
from jaxlin.quantized import stack as stack_quantized
from jaxlin.quantized import to_device as quantized_to_device

log = logging.getLogger(__name__)

_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Tensors some checkpoints carry that are derived or unused, never an error.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.masked_bias|\.attn\.bias)$")


class CheckpointError(JaxlinError):
    pass


# A reader may return a host QuantizedArray for a quantized matrix (GGUF, keep_quantized):
# the family's transforms apply to it as to an array, and it stays quantized in the params.
TensorReader = Callable[[str], np.ndarray | QuantizedArray]


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
) -> Params:
    """Build params from tensors named as in HF checkpoints. `read(name)` returns a
    numpy array; the family's table says which params it feeds and how (transpose,
    slice of a fused tensor); each is cast to `dtype` and layer params are stacked along
    a leading layer axis. Every expected param must be fed, with its exact shape."""
    expected = expected_param_shapes(config, dtype)
    available = set(names)
    params: dict = {}
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
    for name, targets, layer in tqdm(
        wanted, desc=f"converting {source}", disable=not progress, unit="tensor"
    ):
        if name not in available:
            raise CheckpointError(f"{source}: tensor {name!r} is missing from the checkpoint")
        array = read(name)
        array = array if is_quantized(array) else np.asarray(array)
        used.add(name)
        for path, transform in targets:
            value = transform(array, config)
            target = _get(expected, path)
            want_shape = tuple(target.shape[1:] if layer is not None else target.shape)
            if value.shape != want_shape:
                raise CheckpointError(
                    f"{source}: tensor {name!r} has shape {array.shape}, which does not give "
                    f"{'/'.join(path)} of shape {want_shape}"
                )
            if layer is None:
                _set(params, path, _on_device(value, dtype))
            else:
                # Quantized parts are stacked on the host (layers quantized differently
                # share one layout there), float ones on device as before.
                value = value if is_quantized(value) else jnp.asarray(value, dtype=dtype)
                layer_parts.setdefault(path, [None] * config.num_layers)[layer] = value
    for path, parts in layer_parts.items():
        if all(is_quantized(part) for part in parts):
            _set(params, path, quantized_to_device(stack_quantized(parts), dtype))
        else:  # some layers float (e.g. kept in F16): the param is float in every layer
            _set(params, path, jnp.stack([_float(part, dtype) for part in parts]))

    unused = sorted(n for n in available - used if not _IGNORED.search(n))
    if config.tie_word_embeddings:
        unused = [n for n in unused if n != "lm_head.weight"]
    if unused:
        raise CheckpointError(
            f"{source}: {len(unused)} tensor(s) not used by the {family.name} port, e.g. {unused[:5]}"
        )
    return params


def _float(value: jnp.ndarray | QuantizedArray, dtype: jnp.dtype) -> jnp.ndarray:
    return param_value(quantized_to_device(value, dtype)) if is_quantized(value) else value


def _on_device(value: np.ndarray | QuantizedArray, dtype: jnp.dtype) -> jnp.ndarray | QuantizedArray:
    return quantized_to_device(value, dtype) if is_quantized(value) else jnp.asarray(value, dtype=dtype)
