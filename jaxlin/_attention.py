"""Attention with frozen probabilities, in two exact implementations.

`dense`: materializes the (heads, N, N) probabilities. Linearizing it stores them as
residuals: memory quadratic in N.

`blockwise` (detached policy only): the probabilities are never stored. A first pass
computes each query's log-sum-exp (frozen); the linear part then recomputes each
block of probabilities from the frozen q, k and log-sum-exp under `jax.checkpoint`,
so `jax.linearize` keeps only q, k, lse (O(N)) and every J·v / Jᵀ·u recomputes
exp(q·k − lse) block by block: memory O(block · N), the same values to rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlin._policy import FreezePolicy

PRECISION = jax.lax.Precision.HIGHEST


def _visible(
    query_pos: jax.Array, key_pos: jax.Array, is_sliding: jax.Array, window: int | None
) -> jax.Array:
    """Causal, and within the window on sliding layers (HF: query − key < window)."""
    allowed = key_pos[None, :] <= query_pos[:, None]
    if window is not None:
        allowed &= jnp.logical_not(is_sliding) | (query_pos[:, None] - key_pos[None, :] < window)
    return allowed


def _scores(
    q: jax.Array,
    k: jax.Array,
    query_pos: jax.Array,
    is_sliding: jax.Array,
    window: int | None,
    scale: float,
    softcap: float | None,
) -> jax.Array:
    """Masked scores (kv_heads, groups, Nq, Nk) in q's dtype. q: (Nq, K, G, h); k: (Nk, K, h)."""
    scores = jnp.einsum("qkgh,skh->kgqs", q, k, precision=PRECISION) * scale
    if softcap is not None:  # inside the frozen softmax: an ordinary function of q, k
        scores = softcap * jnp.tanh(scores / softcap)
    key_pos = jnp.arange(k.shape[0])
    visible = _visible(query_pos, key_pos, is_sliding, window)
    return jnp.where(visible, scores, jnp.finfo(scores.dtype).min)


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    is_sliding: jax.Array,
    window: int | None,
    scale: float,
    softcap: float | None,
    policy: FreezePolicy,
) -> jax.Array:
    """q: (N, K, G, h) in the compute dtype; k: (N, K, h); v: (N, K, h). → (N, K, G, h)."""
    scores = _scores(q, k, jnp.arange(q.shape[0]), is_sliding, window, scale, softcap)
    probs = policy.freeze(jax.nn.softmax(scores, axis=-1))
    return jnp.einsum("kgqs,skh->qkgh", probs.astype(v.dtype), v, precision=PRECISION)


def blockwise_frozen_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    is_sliding: jax.Array,
    window: int | None,
    scale: float,
    softcap: float | None,
    block: int,
) -> jax.Array:
    """Same values as `dense_attention` under the detached policy, O(block · N) memory
    in the linearization. q, k are frozen here (they only feed the probabilities)."""
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    n = q.shape[0]
    num_blocks = -(-n // block)
    padded = num_blocks * block
    # Padded query rows see key 0 at least (causal from a position ≥ 0), so no row is
    # fully masked; their outputs are dropped below.
    q_blocks = jnp.pad(q, ((0, padded - n),) + ((0, 0),) * 3).reshape(num_blocks, block, *q.shape[1:])
    starts = jnp.arange(num_blocks) * block

    def block_scores(q_block: jax.Array, start: jax.Array) -> jax.Array:
        return _scores(q_block, k, start + jnp.arange(block), is_sliding, window, scale, softcap)

    def block_lse(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        return jax.nn.logsumexp(block_scores(*args), axis=-1)

    lse = jax.lax.stop_gradient(jax.lax.map(block_lse, (q_blocks, starts)))

    @jax.checkpoint
    def block_output(
        q_block: jax.Array, start: jax.Array, lse_block: jax.Array, values: jax.Array
    ) -> jax.Array:
        probs = jnp.exp(block_scores(q_block, start) - lse_block[..., None])
        return jnp.einsum("kgqs,skh->qkgh", probs.astype(values.dtype), values, precision=PRECISION)

    out = jax.lax.map(lambda args: block_output(*args, v), (q_blocks, starts, lse))
    return out.reshape(padded, *out.shape[2:])[:n]
