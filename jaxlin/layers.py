"""Layer dynamics: the detached Jacobian of every layer's taps, swept over depth.

One compiled program serves every layer: the layer index is data. Cumulative taps
(w.r.t. the input embeddings) read layer ℓ's output from the stacked per-layer taps of
one forward; local taps (w.r.t. the layer's own input) run the single layer ℓ, its
params picked with a dynamic slice. For each (layer, tap) the Gram matrix J·Jᵀ (d × d)
is formed from d products J·(Jᵀ·e_i), so every singular value is exact and the
effective dimensionalities need no truncation.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlin._config import ModelConfig
from jaxlin._modules import Transformer
from jaxlin._policy import FreezePolicy
from jaxlin.model import Params, module
from jaxlin.operator import DEFAULT_ATTENTION_BLOCK, on_token, scale_biases

TAP_KINDS = ("residual", "attention", "mlp")


def layer_inputs(config: ModelConfig, params: Params, embeddings: jax.Array) -> jax.Array:
    """The residual stream entering each layer, (L, N, d): the inputs of local taps."""
    transformer = module(config, params)
    variables = {"params": params}
    h0 = transformer.apply(variables, embeddings, method=Transformer.scale_embeddings)
    _, taps = transformer.apply(variables, h0, method=Transformer.blocks)
    return jnp.concatenate([h0[None], taps["residual"][:-1]], axis=0)


def sweep_target(
    config: ModelConfig,
    params: Params,
    kind: str,
    final_norm: bool,
    local: bool,
    attention_block: int | None = DEFAULT_ATTENTION_BLOCK,
) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """(inputs, β, layer) → the tap of `layer` at the last token (detached policy)."""

    def target(inputs: jax.Array, beta: jax.Array, layer: jax.Array) -> jax.Array:
        scaled = scale_biases(params, beta) if config.has_biases else params
        if local:
            one = dataclasses.replace(config, num_layers=1, sliding_layers=())
            sub = dict(scaled)
            sub["layers"] = jax.tree_util.tree_map(
                lambda leaf: jax.lax.dynamic_slice_in_dim(leaf, layer, 1), scaled["layers"]
            )
            transformer = module(one, sub, FreezePolicy.DETACHED, attention_block)
            flags = jax.lax.dynamic_slice_in_dim(jnp.asarray(config.layer_is_sliding), layer, 1)
            _, taps = transformer.apply({"params": sub}, inputs, flags, method=Transformer.blocks)
            value, variables = taps[kind][0], {"params": sub}
        else:
            transformer = module(config, scaled, FreezePolicy.DETACHED, attention_block)
            variables = {"params": scaled}
            h0 = transformer.apply(variables, inputs, method=Transformer.scale_embeddings)
            _, taps = transformer.apply(variables, h0, method=Transformer.blocks)
            value = jax.lax.dynamic_index_in_dim(taps[kind], layer, keepdims=False)
        if final_norm:
            value = transformer.apply(variables, value, method=Transformer.normalize)
        return value[-1]

    return target


@functools.partial(
    jax.jit, static_argnames=("config", "kind", "final_norm", "local", "chunk", "attention_block")
)
def layer_gram(
    params: Params,
    inputs: jax.Array,
    layer: jax.Array,
    config: ModelConfig,
    kind: str,
    final_norm: bool,
    local: bool,
    chunk: int = 64,
    attention_block: int | None = DEFAULT_ATTENTION_BLOCK,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """For one layer's tap: (value at the last token, J·Jᵀ (d × d), Σ_t J_t·x_t, c_bias),
    the sum over per-token products J_t·x_t (one forward product per token), so the
    certificate checks the per-token decomposition, not just J·X."""
    target = sweep_target(config, params, kind, final_norm, local, attention_block)
    beta = jnp.ones((), inputs.dtype)
    value, joint = jax.linearize(lambda x, b: target(x, b, layer), inputs, beta)
    transpose = jax.linear_transpose(joint, inputs, beta)
    zero = jnp.zeros((), inputs.dtype)
    wide = jnp.promote_types(value.dtype, jnp.float32)

    def gram_column(unit: jax.Array) -> jax.Array:
        return joint(transpose(unit.astype(value.dtype))[0], zero).astype(wide)

    basis = jnp.eye(value.shape[0], dtype=wide)
    gram = jax.lax.map(gram_column, basis, batch_size=min(chunk, value.shape[0]))
    n = inputs.shape[0]

    def token_contribution(t: jax.Array) -> jax.Array:
        return joint(on_token(inputs, t), zero).astype(wide)

    contributions = jax.lax.map(token_contribution, jnp.arange(n), batch_size=min(chunk, n))
    reconstruction = jnp.sum(contributions, axis=0)
    bias = joint(jnp.zeros_like(inputs), beta) if config.has_biases else jnp.zeros_like(value)
    return value, gram, reconstruction, bias


@dataclasses.dataclass
class LayerSpectrum:
    layer: int
    kind: str
    local: bool
    singular_values: np.ndarray  # all d, descending
    left_vectors: np.ndarray  # (k, d), top-k, oriented so that u·value ≥ 0
    value: np.ndarray  # the tap at the last token
    reconstruction_error: float

    @property
    def stable_rank(self) -> float:
        return float(np.sum(self.singular_values**2) / self.singular_values[0] ** 2)

    @property
    def entropy_rank(self) -> float:
        """exp of the entropy of σ_i²/Σσ²: an effective number of directions."""
        energy = self.singular_values**2
        p = energy[energy > 0] / energy.sum()
        return float(np.exp(-np.sum(p * np.log(p))))


def sweep(
    config: ModelConfig,
    params: Params,
    embeddings: jax.Array,
    kinds: tuple[str, ...],
    local: bool,
    final_norm: bool,
    top_k: int = 3,
    chunk: int = 64,
    attention_block: int | None = DEFAULT_ATTENTION_BLOCK,
    progress: Callable[[str], None] | None = None,
) -> list[LayerSpectrum]:
    """Every layer × tap kind: full spectrum (from the exact Gram matrix), top left
    vectors, and the tap's reconstruction certificate."""
    inputs_per_layer = layer_inputs(config, params, embeddings) if local else None
    results = []
    for kind in kinds:
        for layer in range(config.num_layers):
            inputs = inputs_per_layer[layer] if local else embeddings
            value, gram, recon, bias = layer_gram(
                params, inputs, jnp.asarray(layer), config, kind, final_norm, local, chunk, attention_block
            )
            eigenvalues, eigenvectors = np.linalg.eigh(np.asarray(gram, np.float64))
            order = np.argsort(eigenvalues)[::-1]
            sigma = np.sqrt(np.clip(eigenvalues[order], 0, None))
            value_np = np.asarray(value, np.float64)
            total = np.asarray(recon, np.float64) + np.asarray(bias, np.float64)
            error = float(np.linalg.norm(total - value_np) / max(np.linalg.norm(value_np), 1e-300))
            left = eigenvectors[:, order[:top_k]].T
            left = left * np.where(left @ value_np < 0, -1.0, 1.0)[:, None]
            results.append(LayerSpectrum(layer, kind, local, sigma, left, value_np, error))
            if progress is not None and layer == config.num_layers - 1:
                progress(f"layer sweep: {kind} ({'local' if local else 'cumulative'}) done")
    return results
