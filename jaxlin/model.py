"""A loaded model (config + params) and the pure functions over it."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxlin._config import ModelConfig
from jaxlin._modules import Transformer
from jaxlin._policy import FROZEN, FreezePolicy

Params = dict[str, Any]


def params_dtype(params: Params) -> jnp.dtype:
    return params["embedder"]["embedding"].dtype


def module(
    config: ModelConfig,
    params: Params,
    policy: FreezePolicy = FreezePolicy.DETACHED,
    attention_chunk: int | None = None,
) -> Transformer:
    return Transformer(config, policy, params_dtype(params), attention_chunk)


def embed(config: ModelConfig, params: Params, token_ids: jax.Array) -> jax.Array:
    """Raw embedding rows (N, d): the input X of the analysed map."""
    return module(config, params).apply({"params": params}, token_ids, method=Transformer.embed)


def final_hidden(
    config: ModelConfig,
    params: Params,
    embeddings: jax.Array,
    policy: FreezePolicy = FreezePolicy.DETACHED,
    attention_chunk: int | None = None,
) -> jax.Array:
    """Final-normed hidden states (N, d). Values do not depend on the policy (nor, up
    to rounding, on the attention implementation)."""
    return module(config, params, policy, attention_chunk).apply({"params": params}, embeddings)


@dataclasses.dataclass(frozen=True)
class Tap:
    """An intermediate quantity whose detached Jacobian can be taken: the residual
    stream after layer `layer` (0-based), or that layer's attention or MLP output (after
    its post-norm where the family has one). `final_norm` applies the final norm
    (logit-lens style). `local` takes the Jacobian w.r.t. the layer's own input (the
    residual stream before it) instead of the input embeddings.

    A pytree whose one leaf is `layer`: under `jit` the layer is data, so one compiled
    program serves every layer of a tap kind (a sweep over depth compiles once)."""

    layer: int | jax.Array
    kind: str = "residual"  # residual | attention | mlp
    final_norm: bool = True
    local: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("residual", "attention", "mlp"):
            raise ValueError(f"tap kind {self.kind!r} is not one of residual, attention, mlp")

    @property
    def label(self) -> str:
        scope = "local" if self.local else "cumulative"
        norm = "+final norm" if self.final_norm else ""
        return f"layer {self.layer} {self.kind}{norm} ({scope})"


jax.tree_util.register_dataclass(Tap, data_fields=["layer"], meta_fields=["kind", "final_norm", "local"])


def layer_slice(config: ModelConfig, params: Params, start: int, stop: int) -> tuple[ModelConfig, Params]:
    """The model restricted to layers [start, stop): same embedding and final norm."""
    if not 0 <= start < stop <= config.num_layers:
        raise ValueError(f"layers [{start}, {stop}) are outside 0..{config.num_layers}")
    sliced = dataclasses.replace(
        config,
        num_layers=stop - start,
        sliding_layers=config.sliding_layers[start:stop] if config.sliding_layers else (),
    )
    sub = dict(params)
    sub["layers"] = jax.tree_util.tree_map(lambda leaf: leaf[start:stop], params["layers"])
    return sliced, sub


def layer_inputs(
    config: ModelConfig, params: Params, embeddings: jax.Array, attention_chunk: int | None = None
) -> jax.Array:
    """The residual stream entering each layer, (L, N, d): the inputs of local taps."""
    transformer = module(config, params, attention_chunk=attention_chunk)
    variables = {"params": params}
    h0 = transformer.apply(variables, embeddings, method=Transformer.scale_embeddings)
    _, taps = transformer.apply(variables, h0, method=Transformer.blocks)
    return jnp.concatenate([h0[None], taps["residual"][:-1]], axis=0)


def tap_input(
    config: ModelConfig, params: Params, embeddings: jax.Array, tap: Tap, attention_chunk: int | None = None
) -> jax.Array:
    """What the tap's Jacobian is taken w.r.t.: X for cumulative taps, the residual
    stream entering layer `tap.layer` for local ones."""
    if not tap.local:
        return embeddings
    return layer_inputs(config, params, embeddings, attention_chunk)[tap.layer]


def tap_values(
    config: ModelConfig,
    params: Params,
    inputs: jax.Array,
    tap: Tap,
    policy: FreezePolicy = FreezePolicy.DETACHED,
    attention_chunk: int | None = None,
) -> jax.Array:
    """The tap (N, d) as a function of its input (see `tap_input`). The layer is data, so
    one compiled program serves every layer. A local tap picks its layer's params with a
    dynamic slice. A cumulative one runs the stack with the layers above the tap passed
    through under a `cond` (they cannot change it, and skipping them halves the products'
    cost on average over a sweep).

    Both are taken under `jax.checkpoint`. Linearizing a `cond` returns the weights its
    branch reads as fresh residuals, and so does a dynamic slice: J would hold a copy of
    every layer's weights (cumulative) or of its layer's (local). Under the checkpoint the
    partial evaluation hands the branch its operands, and the slice is recomputed from the
    params in each product, so J refers to the params themselves. It saves only the
    frozen coefficients (`FreezePolicy` names them), which with the weights are all the
    detached map needs: what else a plain linearization keeps (casts, weight-derived
    scales) is recomputed in each product (benchmarks/tap_residuals.py: the same
    products, bit for bit, in the same time)."""
    save_frozen = jax.checkpoint_policies.save_only_these_names(FROZEN)
    if tap.local:
        one = dataclasses.replace(config, num_layers=1, sliding_layers=())
        transformer = module(one, params, policy, attention_chunk)
        sliding = jnp.asarray(config.layer_is_sliding)

        def layer(params: Params, inputs: jax.Array, index: jax.Array) -> dict[str, jax.Array]:
            sub = dict(params)
            sub["layers"] = jax.tree_util.tree_map(
                lambda leaf: jax.lax.dynamic_slice_in_dim(leaf, index, 1), params["layers"]
            )
            flags = jax.lax.dynamic_slice_in_dim(sliding, index, 1)
            return transformer.apply({"params": sub}, inputs, flags, method=Transformer.blocks)[1]

        layer = jax.checkpoint(layer, policy=save_frozen)
        value = layer(params, inputs, tap.layer)[tap.kind][0]
        variables = {"params": params}
    else:
        transformer = module(config, params, policy, attention_chunk)
        variables = {"params": params}
        h0 = transformer.apply(variables, inputs, method=Transformer.scale_embeddings)

        def stack(params: Params, h0: jax.Array, layer: jax.Array) -> dict[str, jax.Array]:
            return transformer.apply({"params": params}, h0, None, layer, method=Transformer.blocks)[1]

        stack = jax.checkpoint(stack, policy=save_frozen)
        taps = stack(params, h0, tap.layer)
        value = jax.lax.dynamic_index_in_dim(taps[tap.kind], tap.layer, keepdims=False)
    if tap.final_norm:
        value = transformer.apply(variables, value, method=Transformer.normalize)
    return value


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
