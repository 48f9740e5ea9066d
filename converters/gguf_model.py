"""A GGUF file → `Model`: llama.cpp names and conventions are translated to Hugging
Face's by `converters.gguf`, then the same table as for safetensors applies."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from converters.gguf import read_gguf_config
from converters.gguf.reader import GGUFSource, parsed
from converters.gguf.tensors import gguf_tensors
from converters.params import params_from_tensors
from jaxlin.families import family_for_hf_config
from jaxlin.model import Model


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
    Each float param is built on `mesh` (default: none, the default device) from the
    slices of the file its devices hold; quantized ones are placed whole."""
    file = parsed(source)
    hf_config = read_gguf_config(file)
    family = family_for_hf_config(hf_config)
    config = family.config_from_hf(hf_config)
    # Dequantize straight to float64 when asked, so nothing is rounded twice.
    read_dtype = np.float64 if jnp.dtype(dtype) == jnp.float64 else np.float32
    tensors = gguf_tensors(file, dtype=read_dtype, keep_quantized=keep_quantized)
    params = params_from_tensors(
        config, family, list(tensors), tensors.__getitem__, dtype, file.path, progress, mesh
    )
    return Model(config, params, name=os.path.basename(file.path))
