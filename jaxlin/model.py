"""A loaded model (config + params) and the pure functions over it."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxlin._config import ModelConfig
from jaxlin._modules import Transformer
from jaxlin._policy import FreezePolicy

Params = dict[str, Any]


def params_dtype(params: Params) -> jnp.dtype:
    return params["embedder"]["embedding"].dtype


def module(
    config: ModelConfig,
    params: Params,
    policy: FreezePolicy = FreezePolicy.DETACHED,
    attention_block: int | None = None,
) -> Transformer:
    return Transformer(config, policy, params_dtype(params), attention_block)


def embed(config: ModelConfig, params: Params, token_ids: jax.Array) -> jax.Array:
    """Raw embedding rows (N, d): the input X of the analysed map."""
    return module(config, params).apply({"params": params}, token_ids, method=Transformer.embed)


def final_hidden(
    config: ModelConfig,
    params: Params,
    embeddings: jax.Array,
    policy: FreezePolicy = FreezePolicy.DETACHED,
    attention_block: int | None = None,
) -> jax.Array:
    """Final-normed hidden states (N, d). Values do not depend on the policy (nor, up
    to rounding, on the attention implementation)."""
    return module(config, params, policy, attention_block).apply({"params": params}, embeddings)


def logits(config: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
    return module(config, params).apply({"params": params}, hidden, method=Transformer.logits)


def expected_param_shapes(config: ModelConfig, dtype: jnp.dtype) -> Params:
    """The param tree the model expects, as ShapeDtypeStructs (no memory allocated)."""
    transformer = Transformer(config, FreezePolicy.DETACHED, dtype)
    ids = jnp.zeros((2,), dtype=jnp.int32)
    variables = jax.eval_shape(
        lambda: transformer.init(jax.random.key(0), ids, method=Transformer.embed_and_decode)
    )
    return variables["params"]


@dataclasses.dataclass(frozen=True)
class Model:
    """What a converter returns: everything needed to run and analyse the network."""

    config: ModelConfig
    params: Params
    name: str = ""

    @property
    def dtype(self) -> jnp.dtype:
        return params_dtype(self.params)
