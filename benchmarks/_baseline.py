"""The published JAX algorithm, re-implemented from its description (no published code
used), as the honest baseline: matfree `tridiag_sym(K, reortho="full")` where every
product calls `jax.vjp` and `jax.jvp` of the full detached forward afresh (dense
attention, `attention_chunk=None`), `eigh` of the tridiagonal, σ = sqrt(λ).

- whole J: Lanczos on the d-sized side J·Jᵀ; right vectors V = Jᵀ·U/σ (one fresh vjp,
  vmapped over the k vectors).
- per token t: Lanczos on J_tᵀJ_t (d × d); a product is u = J·e_t(v) by a fresh jvp with a
  tangent nonzero only in row t, then row t of a fresh vjp of u; vmapped over tokens;
  left vectors U = J_t·V/σ.

"Afresh" has to be enforced under `jit`: the forward inside `jax.vjp(f, x)` does not
depend on the Krylov vector, so XLA hoists it out of the Lanczos loop (loop-invariant
code motion), and it may merge the forwards of a step's vjp and jvp (measured at N = 256:
a fresh vjp inside the loop cost the same as jaxlin's linearized Jᵀ·u, 0.18 s, while a
forward costs 0.33 s). With `recompute=True` (the default: the algorithm as described)
every product's primal input passes through an optimization barrier tied to that
product's vector, so each jvp and each vjp recomputes the forward. `recompute=False` is
the same code as XLA optimizes it — a stronger baseline than the published one, also
reported.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from matfree import decomp

from jaxlin._policy import FreezePolicy
from jaxlin.jacobian import target_function


def _forward(config: Any, params: Any) -> Any:
    return target_function(config, params, FreezePolicy.DETACHED, None)


def _afresh(x: jax.Array, vector: jax.Array, recompute: bool) -> jax.Array:
    """`x`, made to depend on this product's `vector` (see the module docstring)."""
    if not recompute:
        return x
    x, _ = jax.lax.optimization_barrier((x, vector))
    return x


def gram_product(config: Any, params: Any, x: jax.Array, recompute: bool = True) -> Any:
    """u ↦ J·Jᵀ·u by a fresh `jax.vjp` then a fresh `jax.jvp` of the full forward."""
    f = _forward(config, params)

    def gram(u: jax.Array) -> jax.Array:
        _, pull = jax.vjp(f, _afresh(x, u, recompute))
        (w,) = pull(u)
        _, out = jax.jvp(f, (_afresh(x, w, recompute),), (w,))
        return out

    return gram


@functools.partial(jax.jit, static_argnames=("config", "num_matvecs", "k", "recompute"))
def whole_j(
    params: Any, x: jax.Array, key: jax.Array, config: Any, num_matvecs: int, k: int, recompute: bool = True
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k of the whole J. Returns U (k, d), S (k,), V (k, N, d)."""
    gram = gram_product(config, params, x, recompute)
    f = _forward(config, params)
    start = jax.random.normal(key, (config.hidden_size,), x.dtype)
    basis, tridiagonal, _, _ = decomp.tridiag_sym(num_matvecs, reortho="full", custom_vjp=False)(gram, start)
    eigenvalues, eigenvectors = jnp.linalg.eigh(tridiagonal)
    top = jnp.argsort(eigenvalues)[::-1][:k]
    sigma = jnp.sqrt(jnp.maximum(eigenvalues[top], 0.0))
    left = eigenvectors[:, top].T @ basis
    left = left / jnp.linalg.norm(left, axis=1, keepdims=True)
    _, pull = jax.vjp(f, x)
    right = jax.vmap(lambda u: pull(u)[0])(left) / sigma[:, None, None]
    return left, sigma, right


@functools.partial(jax.jit, static_argnames=("config", "num_matvecs", "k", "recompute"))
def per_token(
    params: Any,
    x: jax.Array,
    tokens: jax.Array,
    key: jax.Array,
    config: Any,
    num_matvecs: int,
    k: int,
    recompute: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k of J_t for each t in `tokens` (vmapped). Returns U (T, k, d), S (T, k), V (T, k, d)."""
    f = _forward(config, params)
    n, d = x.shape

    def one_token(t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        row = (jnp.arange(n) == t)[:, None].astype(x.dtype)

        def push(v: jax.Array) -> jax.Array:  # J_t·v (fresh jvp)
            _, out = jax.jvp(f, (_afresh(x, v, recompute),), (row * v[None, :],))
            return out

        def pull(u: jax.Array) -> jax.Array:  # J_tᵀ·u (fresh vjp, row t)
            _, vjp = jax.vjp(f, _afresh(x, u, recompute))
            return vjp(u)[0][t]

        start = jax.random.normal(key, (d,), x.dtype)
        basis, tridiagonal, _, _ = decomp.tridiag_sym(num_matvecs, reortho="full", custom_vjp=False)(
            lambda v: pull(push(v)), start
        )
        eigenvalues, eigenvectors = jnp.linalg.eigh(tridiagonal)
        top = jnp.argsort(eigenvalues)[::-1][:k]
        sigma = jnp.sqrt(jnp.maximum(eigenvalues[top], 0.0))
        right = eigenvectors[:, top].T @ basis
        right = right / jnp.linalg.norm(right, axis=1, keepdims=True)
        left = jax.vmap(push)(right) / sigma[:, None]
        return left, sigma, right

    return jax.vmap(one_token)(tokens)


@functools.partial(jax.jit, static_argnames=("config", "num_matvecs"))
def per_token_tridiagonals(
    params: Any, x: jax.Array, tokens: jax.Array, key: jax.Array, config: Any, num_matvecs: int
) -> jax.Array:
    """The Lanczos tridiagonals (T, K, K) of `per_token` (same start vector, same
    products). Lanczos with full reorthogonalization is a prefix recursion: the leading
    K'×K' block of the depth-K tridiagonal is the depth-K' tridiagonal, so one run gives
    the Ritz values of every K' ≤ K (used to pick K; timings use `per_token` itself)."""
    f = _forward(config, params)
    n, d = x.shape

    def one_token(t: jax.Array) -> jax.Array:
        row = (jnp.arange(n) == t)[:, None].astype(x.dtype)

        def gram(v: jax.Array) -> jax.Array:  # the same products as `per_token`
            _, u = jax.jvp(f, (_afresh(x, v, True),), (row * v[None, :],))
            _, vjp = jax.vjp(f, _afresh(x, u, True))
            return vjp(u)[0][t]

        start = jax.random.normal(key, (d,), x.dtype)
        _, tridiagonal, _, _ = decomp.tridiag_sym(num_matvecs, reortho="full", custom_vjp=False)(gram, start)
        return tridiagonal

    return jax.vmap(one_token)(tokens)
