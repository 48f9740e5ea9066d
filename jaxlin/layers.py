"""Layer dynamics: the detached Jacobian of every layer's taps, swept over depth.

One compiled program serves every layer: the layer index is data. Cumulative taps
(w.r.t. the input embeddings) read layer ℓ's output from the stacked per-layer taps of
one forward in which only layers 0 … ℓ run (the rest pass the stream through under a
`lax.cond`, so the sweep's products cost about half of full-depth ones); local taps
(w.r.t. the layer's own input) run the single layer ℓ, its params picked with a dynamic
slice. For each (layer, tap) the Gram matrix J·Jᵀ (d × d) is formed exactly and
eigen-decomposed in the same program, so every singular value is exact and the
effective dimensionalities need no truncation. Two ways to form it:

- rows in memory (short inputs): the d transposed products Jᵀ·e_i are the rows of J
  (d × N·d); J·Jᵀ, the right vectors Jᵀu and the per-token contributions J_t·x_t are then
  contractions of those rows — d passes per tap in all;
- streamed (long inputs, when the rows would not fit): d products J·(Jᵀ·e_i), then one
  batched transposed pass for the right vectors and N forward products for J_t·x_t —
  about twice the passes, memory O(chunk · N · d).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlin._config import ModelConfig
from jaxlin._modules import Transformer
from jaxlin._policy import FreezePolicy
from jaxlin.decoding import dominant_rows
from jaxlin.devices import map_in_batches
from jaxlin.distributed import to_host
from jaxlin.jacobian import DEFAULT_ATTENTION_BLOCK, on_token, scale_biases
from jaxlin.memory import available_bytes
from jaxlin.model import Params, module

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
            # Layers above the tap's do not run: they cannot change it.
            _, taps = transformer.apply(variables, h0, None, layer, method=Transformer.blocks)
            value = jax.lax.dynamic_index_in_dim(taps[kind], layer, keepdims=False)
        if final_norm:
            value = transformer.apply(variables, value, method=Transformer.normalize)
        return value[-1]

    return target


class TapProducts(NamedTuple):
    value: jax.Array  # the tap at the last token (d,)
    eigenvalues: jax.Array  # of J·Jᵀ, all d, descending: σ_i²
    left: jax.Array  # (k, d) top left singular vectors, oriented so that u·value ≥ 0
    right: jax.Array  # (k, N, d) v_i = Jᵀu_i / σ_i
    sigma: jax.Array  # (k,) σ_i = ‖Jᵀu_i‖
    residuals: jax.Array  # (k,) relative residual bounds ‖J·v_i − σ_i·u_i‖ / (√2·σ_i), as spectral.top_k's
    reconstruction: jax.Array  # Σ_t J_t·x_t
    bias: jax.Array  # c_bias (zero for bias-free models)


@functools.partial(
    jax.jit,
    static_argnames=(
        "config",
        "kind",
        "final_norm",
        "local",
        "top_k",
        "chunk",
        "attention_block",
        "rows_in_memory",
    ),
)
def layer_gram(
    params: Params,
    inputs: jax.Array,
    layer: jax.Array,
    config: ModelConfig,
    kind: str,
    final_norm: bool,
    local: bool,
    top_k: int = 3,
    chunk: int = 64,
    attention_block: int | None = DEFAULT_ATTENTION_BLOCK,
    rows_in_memory: bool = False,
) -> TapProducts:
    """For one layer's tap: the eigen-decomposition of J·Jᵀ (d × d), the top-k singular
    triplets, and the sum of the per-token products J_t·x_t (so the certificate checks the
    per-token decomposition, not just J·X), all inside one program: no second forward, no
    per-tap Lanczos. `rows_in_memory` keeps J's d rows (d·N·d numbers) and derives
    everything from them; otherwise the products are streamed (see the module docstring)."""
    target = sweep_target(config, params, kind, final_norm, local, attention_block)
    beta = jnp.ones((), inputs.dtype)
    value, joint = jax.linearize(lambda x, b: target(x, b, layer), inputs, beta)
    transpose = jax.linear_transpose(joint, inputs, beta)
    zero = jnp.zeros((), inputs.dtype)
    wide = jnp.promote_types(value.dtype, jnp.float32)

    def pullback(u: jax.Array) -> jax.Array:
        return transpose(u.astype(value.dtype))[0].astype(wide)

    def push(v: jax.Array) -> jax.Array:
        return joint(v.astype(inputs.dtype), zero).astype(wide)

    d, n = value.shape[0], inputs.shape[0]
    units = jnp.eye(d, dtype=wide)
    if rows_in_memory:
        rows = map_in_batches(pullback, units, min(chunk, d))  # (d, N, d): rows[i] = Jᵀe_i
        exact = jax.lax.Precision.HIGHEST
        gram = jnp.einsum("ind,jnd->ij", rows, rows, precision=exact)
        pull_many = lambda u: jnp.einsum("ki,ind->knd", u, rows, precision=exact)
        push_many = lambda v: jnp.einsum("ind,knd->ki", rows, v, precision=exact)
        # Σ_t J_t·x_t, each token's block J_t read from the rows.
        reconstruction = jnp.einsum("ind,nd->i", rows, inputs.astype(wide), precision=exact)
    else:
        gram = map_in_batches(lambda unit: push(pullback(unit)), units, min(chunk, d))
        pull_many = lambda u: map_in_batches(pullback, u, min(chunk, top_k))
        push_many = lambda v: map_in_batches(push, v, min(chunk, top_k))

        def token_contribution(t: jax.Array) -> jax.Array:
            return joint(on_token(inputs, t), zero).astype(wide)

        contributions = map_in_batches(token_contribution, jnp.arange(n), min(chunk, n))
        reconstruction = jnp.sum(contributions, axis=0)
    # eigh symmetrizes its input: rounding leaves the Gram symmetric only to working precision.
    eigenvalues, eigenvectors = jnp.linalg.eigh(gram)
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    left = eigenvectors[:, :top_k].T
    left = left * jnp.where(left @ value.astype(wide) < 0, -1.0, 1.0).astype(wide)[:, None]
    pulled = pull_many(left)  # (k, N, d) = Jᵀu_i
    # σ_i = ‖Jᵀu_i‖ (= √λ_i, and the Rayleigh quotient of u_i): v_i is a unit vector by construction.
    sigma = jnp.sqrt(jnp.sum(jnp.square(pulled), axis=(1, 2)))
    safe_sigma = jnp.maximum(sigma, jnp.finfo(wide).tiny)
    right = pulled / safe_sigma[:, None, None]
    pushed = push_many(right)  # (k, d) = J·v_i
    # The same rigorous bound as `spectral._triplet_bounds` (Jᵀu = σv holds by construction), relative.
    residuals = jnp.linalg.norm(pushed - sigma[:, None] * left, axis=1) / (math.sqrt(2.0) * safe_sigma)
    bias = joint(jnp.zeros_like(inputs), beta) if config.has_biases else jnp.zeros_like(value)
    return TapProducts(value, eigenvalues, left, right, sigma, residuals, reconstruction, bias)


# J's rows for one tap are d·N·d numbers: 15 MB for Gemma 3 270M at N = 9, 1.6 GB at N = 1000.
ROWS_BUDGET_BYTES = 2**30


def _rows_fit(config: ModelConfig, embeddings: jax.Array) -> bool:
    wide = jnp.dtype(jnp.promote_types(embeddings.dtype, jnp.float32)).itemsize
    rows_bytes = config.hidden_size * embeddings.size * wide
    free = available_bytes()
    return rows_bytes <= ROWS_BUDGET_BYTES and (free is None or rows_bytes <= free // 4)


@dataclasses.dataclass
class LayerSpectrum:
    layer: int
    kind: str
    local: bool
    singular_values: np.ndarray  # all d, descending
    left_vectors: np.ndarray  # (k, d), top-k, oriented so that u·value ≥ 0
    value: np.ndarray  # the tap at the last token
    reconstruction_error: float
    # The top-k right vectors v_i = Jᵀu_i/σ_i live in the tap's input space: the input
    # embeddings (cumulative) or the residual stream entering the layer (local). Each is
    # kept as the row at its dominant token position; the full (k, N, d) vectors only on
    # request, since for every tap of a long input they would not fit in memory.
    right_sigmas: np.ndarray  # (k,) ‖Jᵀu_i‖
    right_residuals: np.ndarray  # (k,) relative residual bounds ‖J·v_i − σ_i·u_i‖ / (√2·σ_i)
    right_positions: np.ndarray  # (k,) token position carrying most of ‖v_i‖²
    right_shares: np.ndarray  # (k,) that position's share of ‖v_i‖²
    right_rows: np.ndarray  # (k, d) v_i at that position
    right_vectors: np.ndarray | None = None  # (k, N, d), with sweep(keep_right_vectors=True)

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
    keep_right_vectors: bool = False,
    rows_in_memory: bool | None = None,
) -> list[LayerSpectrum]:
    """Every layer × tap kind: full spectrum (from the exact Gram matrix), top-k left and
    right singular vectors, and the tap's reconstruction certificate. `rows_in_memory`:
    see `layer_gram`; by default, whenever J's rows take at most `ROWS_BUDGET_BYTES` and a
    quarter of the free memory."""
    if rows_in_memory is None:
        rows_in_memory = _rows_fit(config, embeddings)
    inputs_per_layer = layer_inputs(config, params, embeddings) if local else None
    results = []
    for kind in kinds:
        for layer in range(config.num_layers):
            inputs = inputs_per_layer[layer] if local else embeddings
            products = layer_gram(
                params,
                inputs,
                jnp.asarray(layer),
                config,
                kind,
                final_norm,
                local,
                top_k,
                chunk,
                attention_block,
                rows_in_memory,
            )
            products = to_host(products, np.float64)
            sigma = np.sqrt(np.clip(products.eigenvalues, 0, None))
            value = products.value
            total = products.reconstruction + products.bias
            error = float(np.linalg.norm(total - value) / max(np.linalg.norm(value), 1e-300))
            right = products.right
            positions, shares, rows = dominant_rows(right)
            results.append(
                LayerSpectrum(
                    layer,
                    kind,
                    local,
                    sigma,
                    products.left,
                    value,
                    error,
                    right_sigmas=products.sigma,
                    right_residuals=products.residuals,
                    right_positions=positions,
                    right_shares=shares,
                    right_rows=rows,
                    right_vectors=right if keep_right_vectors else None,
                )
            )
            if progress is not None and layer == config.num_layers - 1:
                progress(f"layer sweep: {kind} ({'local' if local else 'cumulative'}) done")
    return results
