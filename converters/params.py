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
from jaxlin.families._base import GLOBAL_TENSORS
from jaxlin.model import Params, expected_param_shapes

log = logging.getLogger(__name__)

_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Tensors some checkpoints carry that are derived or unused, never an error.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.masked_bias|\.attn\.bias)$")


class CheckpointError(JaxlinError):
    pass


TensorReader = Callable[[str], np.ndarray]


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
    numpy array; each is cast to `dtype`, transposed where HF's layout is (out, in),
    and layer tensors are stacked along a leading layer axis."""
    expected = expected_param_shapes(config, dtype)
    available = set(names)
    params: dict = {}
    layer_parts: dict[tuple[str, ...], list[np.ndarray | None]] = {}

    wanted: list[tuple[str, tuple[str, ...], bool, int | None]] = []
    for name, (path, transpose) in GLOBAL_TENSORS.items():
        if path[0] == "lm_head" and config.tie_word_embeddings:
            continue
        wanted.append((name, path, transpose, None))
    layer_params = expected["layers"]
    for suffix, (path, transpose) in family.layer_tensors.items():
        try:
            _get(layer_params, path)
        except KeyError:
            continue  # e.g. q_norm on a family without QK-norm
        for layer in range(config.num_layers):
            wanted.append((f"model.layers.{layer}.{suffix}", ("layers",) + path, transpose, layer))

    used: set[str] = set()
    for name, path, transpose, layer in tqdm(
        wanted, desc=f"converting {source}", disable=not progress, unit="tensor"
    ):
        if name not in available:
            raise CheckpointError(f"{source}: tensor {name!r} is missing from the checkpoint")
        array = np.asarray(read(name))
        if transpose:
            array = array.T
        target = _get(expected, path)
        want_shape = target.shape[1:] if layer is not None else target.shape
        if array.shape != tuple(want_shape):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {array.shape if not transpose else array.T.shape}, "
                f"expected {tuple(want_shape)[::-1] if transpose else tuple(want_shape)}"
            )
        used.add(name)
        value = jnp.asarray(array, dtype=dtype)
        if layer is None:
            _set(params, path, value)
        else:
            parts = layer_parts.setdefault(path, [None] * config.num_layers)
            parts[layer] = value
    for path, parts in layer_parts.items():
        _set(params, path, jnp.stack(parts))

    unused = sorted(n for n in available - used if not _IGNORED.search(n))
    if config.tie_word_embeddings:
        unused = [n for n in unused if n != "lm_head.weight"]
    if unused:
        raise CheckpointError(
            f"{source}: {len(unused)} tensor(s) not used by the {family.name} port, e.g. {unused[:5]}"
        )
    return params
