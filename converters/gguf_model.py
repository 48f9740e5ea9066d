"""A GGUF file → `Model`: llama.cpp names and conventions are translated to Hugging
Face's by `converters.gguf`, then the same table as for safetensors applies."""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from converters.gguf import read_gguf_config
from converters.gguf.reader import GGUFFile, GGUFSource, parsed
from converters.gguf.tensors import gguf_tensors
from converters.params import param_sources, params_from_tensors, source_shapes
from jaxlin._config import ModelConfig
from jaxlin.families import Family, family_for_hf_config
from jaxlin.model import Model
from jaxlin.quantized import layouts


def load_gguf_model(
    source: GGUFSource,
    dtype: jnp.dtype = jnp.float32,
    progress: bool = False,
    keep_quantized: bool = False,
    mesh: Mesh | None = None,
) -> Model:
    """The model of a GGUF file: a parsed `GGUFFile` (so that its tokenizer can share the
    one parse) or a path. `keep_quantized`: quantized matrices stay quantized on device
    (jaxlin/quantized.py), dequantized to `dtype` layer by layer where they are used.
    Each param is built on `mesh` (default: none, the default device) from the slices of
    the file its devices hold (for a quantized matrix, its rows decoded), by
    `jaxlin.mesh`'s rules (which split a quantized matrix as the float param it replaces)."""
    file = parsed(source)
    config, family = _config_and_family(file)
    # Dequantize straight to float64 when asked, so nothing is rounded twice.
    read_dtype = np.float64 if jnp.dtype(dtype) == jnp.float64 else np.float32
    tensors = gguf_tensors(file, dtype=read_dtype, keep_quantized=keep_quantized)
    params = params_from_tensors(
        config, family, list(tensors), tensors.__getitem__, dtype, file.path, progress, mesh
    )
    return Model(config, params, name=os.path.basename(file.path))


def gguf_quantized_layouts(source: GGUFSource) -> dict[str, dict[str, Any]]:
    """`jaxlin.quantized.layouts` of the params `load_gguf_model(keep_quantized=True)`
    builds from the file (mixed layers in their common layout, layers partly kept in float
    made float), from its header and tensor index alone: no weight is decoded."""
    file = parsed(source)
    config, family = _config_and_family(file)
    tensors = gguf_tensors(file, keep_quantized=True)
    sources = param_sources(config, family, list(tensors), tensors.__getitem__, jnp.float32, file.path)
    return layouts(source_shapes(sources, config, jnp.float32))


def _config_and_family(file: GGUFFile) -> tuple[ModelConfig, Family]:
    hf_config = read_gguf_config(file)
    family = family_for_hf_config(hf_config)
    return family.config_from_hf(hf_config), family
