"""Attention with frozen probabilities, in two exact implementations.

`dense`: materializes the (heads, N, N) probabilities. Linearizing it stores them as
residuals: memory quadratic in N.

`chunked` (detached policy only): the probabilities are never stored. A first pass
computes each query's log-sum-exp (frozen); the linear part then recomputes each
chunk of queries' probabilities from the frozen q, k and log-sum-exp under `jax.checkpoint`,
so `jax.linearize` keeps only q, k, lse (O(N)) and every J·v / Jᵀ·u recomputes
exp(q·k − lse) chunk by chunk: memory O(chunk · N), the same values to rounding.

Under a mesh with a sequence axis (jaxlin.mesh) both keep the queries' token axis split:
the dense probabilities by query row, the chunked form's chunks in a (steps, devices)
grid whose devices' axis is split, each scan step running one chunk per device.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxlin._policy import FreezePolicy
from jaxlin.mesh import split_tokens, token_devices

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
    key_pos: jax.Array,
    is_sliding: jax.Array,
    window: int | None,
    scale: float,
    softcap: float | None,
) -> jax.Array:
    """Masked scores (kv_heads, groups, Nq, Nk) in q's dtype. q: (Nq, K, G, h); k: (Nk, K, h).
    Keys at negative positions (padding) are masked out."""
    scores = jnp.einsum("qkgh,skh->kgqs", q, k, precision=PRECISION) * scale
    if softcap is not None:  # inside the frozen softmax: an ordinary function of q, k
        scores = softcap * jnp.tanh(scores / softcap)
    visible = _visible(query_pos, key_pos, is_sliding, window) & (key_pos[None, :] >= 0)
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
    positions = jnp.arange(q.shape[0])
    # Queries' rows split by token (the probabilities J keeps with them); keys whole.
    scores = split_tokens(_scores(q, k, positions, positions, is_sliding, window, scale, softcap), axis=2)
    probs = policy.freeze(jax.nn.softmax(scores, axis=-1))
    return jnp.einsum("kgqs,skh->qkgh", probs.astype(v.dtype), v, precision=PRECISION)


def chunked_frozen_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    is_sliding: jax.Array,
    window: int | None,
    scale: float,
    softcap: float | None,
    chunk: int,
) -> jax.Array:
    """Same values as `dense_attention` under the detached policy, O(chunk · N) memory
    in the linearization. q, k are frozen here (they only feed the probabilities)."""
    frozen = FreezePolicy.DETACHED.freeze
    q, k = frozen(q), frozen(k)
    n = q.shape[0]
    # Chunks in a (steps, devices) grid, device-major: the sequence axis's device j holds
    # the queries of chunks j·steps … (j+1)·steps − 1, and step i of the scans below runs
    # chunk i of every device's block at once (a batch split along the sequence axis). A
    # scan over the split axis itself would gather every query on every device.
    devices = token_devices()
    steps = -(-n // (chunk * devices))
    num_chunks = steps * devices
    padded = num_chunks * chunk

    def grid(chunks: jax.Array) -> jax.Array:
        """(num_chunks, …) → (steps, devices, …), the devices' axis split by token."""
        return split_tokens(jnp.swapaxes(chunks.reshape(devices, steps, *chunks.shape[1:]), 0, 1), axis=1)

    # Padded query rows see key 0 at least (causal from a position ≥ 0), so no row is
    # fully masked; their outputs are dropped below.
    q_chunks = grid(jnp.pad(q, ((0, padded - n),) + ((0, 0),) * 3).reshape(num_chunks, chunk, *q.shape[1:]))
    starts = grid(jnp.arange(num_chunks) * chunk)
    # A sliding layer's query chunk [s, s+B) only sees keys [s−W+1, s+B): slice that span
    # (front-padded with W−1 masked keys) instead of scoring all N keys. Which span a
    # layer uses is data (`is_sliding` rides along the layer scan), hence `lax.cond`.
    local = window is not None and window + chunk - 1 < n
    pad_front = (window - 1) if local else 0
    span = chunk + pad_front

    def local_slice(array: jax.Array, start: jax.Array) -> jax.Array:
        padded_array = jnp.pad(array, ((pad_front, padded - n),) + ((0, 0),) * (array.ndim - 1))
        return jax.lax.dynamic_slice_in_dim(padded_array, start, span, axis=0)

    def global_terms(q_chunk: jax.Array, start: jax.Array, values: jax.Array) -> tuple[jax.Array, jax.Array]:
        query_pos = start + jnp.arange(chunk)
        # The key positions made here, not closed over: J keeps no (N,) array of them.
        return _scores(q_chunk, k, query_pos, jnp.arange(n), is_sliding, window, scale, softcap), values

    def local_terms(q_chunk: jax.Array, start: jax.Array, values: jax.Array) -> tuple[jax.Array, jax.Array]:
        query_pos = start + jnp.arange(chunk)
        key_pos = start - pad_front + jnp.arange(span)
        key_pos = jnp.where(key_pos < n, key_pos, -1)  # back padding is masked too
        scores = _scores(
            q_chunk, local_slice(k, start), query_pos, key_pos, is_sliding, window, scale, softcap
        )
        return scores, local_slice(values, start)

    def per_span(reduce: Callable, *args: jax.Array) -> jax.Array:
        """`reduce(scores, values)` on the key span of this layer kind (same output shape)."""
        if not local:
            return reduce(*global_terms(*args))
        return jax.lax.cond(
            is_sliding, lambda: reduce(*local_terms(*args)), lambda: reduce(*global_terms(*args))
        )

    def chunk_lse(q_chunk: jax.Array, start: jax.Array) -> jax.Array:
        return per_span(lambda scores, _: jax.nn.logsumexp(scores, axis=-1), q_chunk, start, v)

    # The scans' outputs stay in the grid's split too (the partitioner may pick another).
    lse = frozen(
        split_tokens(jax.lax.map(lambda args: jax.vmap(chunk_lse)(*args), (q_chunks, starts)), axis=1)
    )

    @jax.checkpoint
    def chunk_output(
        q_chunk: jax.Array, start: jax.Array, lse_chunk: jax.Array, values: jax.Array
    ) -> jax.Array:
        def weighted_sum(scores: jax.Array, vals: jax.Array) -> jax.Array:
            probs = jnp.exp(scores - lse_chunk[..., None])
            return jnp.einsum("kgqs,skh->qkgh", probs.astype(vals.dtype), vals, precision=PRECISION)

        return per_span(weighted_sum, q_chunk, start, values)

    each_device = jax.vmap(chunk_output, in_axes=(0, 0, 0, None))
    out = split_tokens(jax.lax.map(lambda args: each_device(*args, v), (q_chunks, starts, lse)), axis=1)
    return jnp.swapaxes(out, 0, 1).reshape(padded, *out.shape[3:])[:n]
