"""Products through a detached Jacobian J (see `jaxlin.jacobian`): J's rows, the
per-token contributions c_t = J_t·x_t (and c_g of groups of tokens), one token Jacobian
J_t, and the certificate of exactness Σ_t c_t + c_bias = y. Each function takes the
linearized value J, so none of them runs the forward again; batches of products are split
across devices by `map_in_batches`. When J's rows are at hand, `contributions_from_rows`
and `token_jacobian_from_rows` read the same numbers off them without another product."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxlin.devices import map_in_batches
from jaxlin.jacobian import DetachedJacobian, Products, on_token


def chunk_size(total: int, chunk: int | None) -> int | None:
    """The batch of `map_in_batches`: None (all at once) when the chunk covers everything."""
    return None if chunk is None or chunk >= total else chunk


@functools.partial(jax.jit, static_argnames=("chunk",))
def _contributions(jacobian: DetachedJacobian, chunk: int | None) -> jax.Array:
    inputs = jacobian.inputs
    n, d = inputs.shape
    if n <= d:

        def one_token(t: jax.Array) -> jax.Array:
            return jacobian.matvec(on_token(inputs, t))

        return map_in_batches(one_token, jnp.arange(n), chunk_size(n, chunk))

    def one_row(i: jax.Array) -> jax.Array:
        rows = jacobian.rmatvec(jax.nn.one_hot(i, d, dtype=jacobian.dtype))  # (N, d) = J[i]
        return jnp.sum(rows * inputs, axis=-1)  # (N,)

    return map_in_batches(one_row, jnp.arange(d), chunk_size(d, chunk)).T


def contributions(
    jacobian: DetachedJacobian, chunk: int | None = 64, products: Products | None = None
) -> jax.Array:
    """c (N, d) with c_t = J_t·x_t; under DETACHED, Σ_t c_t + c_bias = y.

    Picks the cheaper side: N forward-mode products (one per token) when N ≤ d,
    otherwise d transposed products (one per output coordinate), each reduced against
    X on the fly so memory stays O(chunk · N · d)."""
    n, d = jacobian.inputs.shape
    if products is not None:
        if n <= d:
            products.matvecs += n
        else:
            products.rmatvecs += d
    return _contributions(jacobian, chunk)


@functools.partial(jax.jit, static_argnames=("chunk",))
def _group_contributions(jacobian: DetachedJacobian, masks: jax.Array, chunk: int | None) -> jax.Array:
    inputs = jacobian.inputs

    def one_group(mask: jax.Array) -> jax.Array:
        return jacobian.matvec(inputs * mask[:, None].astype(inputs.dtype))

    return map_in_batches(one_group, masks, chunk_size(masks.shape[0], chunk))


def group_contributions(
    jacobian: DetachedJacobian, masks: jax.Array, chunk: int | None = 64, products: Products | None = None
) -> jax.Array:
    """c_g = J·X_g (G, d) for token groups given as 0/1 masks (G, N), X_g being X with
    every row outside group g zeroed: one forward product per group. For groups that
    partition the tokens, Σ_g c_g = Σ_t c_t, so with c_bias they certify y like the
    per-token contributions, at G products instead of min(N, d)."""
    if products is not None:
        products.matvecs += masks.shape[0]
    return _group_contributions(jacobian, masks, chunk)


def group_sums(c: jax.Array, masks: jax.Array) -> jax.Array:
    """c_g = Σ_{t ∈ g} c_t (G, d) from the per-token contributions c (N, d): no product needed."""
    return jnp.einsum("gt,ti->gi", masks.astype(c.dtype), c, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("chunk",))
def _rows(jacobian: DetachedJacobian, basis: jax.Array, chunk: int | None) -> jax.Array:
    return map_in_batches(jacobian.rmatvec, basis.astype(jacobian.dtype), chunk_size(basis.shape[0], chunk))


def rows(
    jacobian: DetachedJacobian,
    basis: jax.Array | None = None,
    chunk: int | None = 64,
    products: Products | None = None,
) -> jax.Array:
    """B·J as (b, N, d): rows[i, t] = J_tᵀ b_i, one transposed product per row of the
    basis B (b, d); the identity (default) gives the dense J, rows[i, t, j] = ∂y_i/∂X_tj."""
    if basis is None:
        basis = jnp.eye(jacobian.output.shape[0], dtype=jacobian.dtype)
    if products is not None:
        products.rmatvecs += basis.shape[0]
    return _rows(jacobian, basis, chunk)


def contributions_from_rows(dense: jax.Array, inputs: jax.Array) -> jax.Array:
    """c_t = J_t·x_t (N, d) from J's rows (d, N, d): no product needed."""
    return jnp.einsum("itj,tj->ti", dense, inputs.astype(dense.dtype), precision=jax.lax.Precision.HIGHEST)


def token_jacobian_from_rows(dense: jax.Array, token: int) -> jax.Array:
    """J_t (d_out × d_in) from J's rows (d, N, d)."""
    return dense[:, token, :]


@functools.partial(jax.jit, static_argnames=("chunk",))
def _token_jacobian(jacobian: DetachedJacobian, token: jax.Array, chunk: int | None) -> jax.Array:
    inputs = jacobian.inputs
    d = inputs.shape[1]

    def column(unit: jax.Array) -> jax.Array:
        return jacobian.matvec(on_token(jnp.broadcast_to(unit, inputs.shape), token))

    return map_in_batches(column, jnp.eye(d, dtype=inputs.dtype), chunk_size(d, chunk)).T


def token_jacobian(
    jacobian: DetachedJacobian, token: int, chunk: int | None = 64, products: Products | None = None
) -> jax.Array:
    """One token Jacobian J_t (d × d) from d forward products whose tangent lives on token t
    (for when J's rows are not at hand: see `token_jacobian_from_rows`)."""
    if products is not None:
        products.matvecs += jacobian.inputs.shape[1]
    return _token_jacobian(jacobian, jnp.asarray(token), chunk)


@dataclasses.dataclass(frozen=True)
class Certificate:
    """Exactness of the reconstruction y ≈ Σ_t c_t (+ its next-token agreement)."""

    relative_error: float
    argmax_matches: bool
    predicted_token_id: int
    reconstructed_token_id: int


def certify(
    y: jax.Array, c: jax.Array, logits_of: Callable[[jax.Array], jax.Array], c_bias: jax.Array | None = None
) -> Certificate:
    """Relative error of y ≈ Σ_t c_t (+ c_bias) and whether both give the same next token."""
    wide = jnp.promote_types(y.dtype, jnp.float32)
    y = y.astype(wide)
    total = jnp.sum(c.astype(wide), axis=0)
    if c_bias is not None:
        total = total + c_bias.astype(wide)
    error = jnp.linalg.norm(total - y) / jnp.linalg.norm(y)
    predicted = int(jnp.argmax(logits_of(y)))
    reconstructed = int(jnp.argmax(logits_of(total)))
    return Certificate(float(error), predicted == reconstructed, predicted, reconstructed)
