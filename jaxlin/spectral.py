"""Singular triplets of the detached Jacobian J (d × N·d) without materializing it.

Whole J — symmetric Lanczos (matfree `tridiag_sym`, full reorthogonalization) on the
d-sized side J·Jᵀ. Each step is one Jᵀ·u and one J·v of the linearized network; the
Krylov basis is depth × d (tiny), not depth × N·d as Golub–Kahan on J would need, which
is what keeps long inputs in memory. Measured (benchmarks/krylov_choice.py): at equal
products it matches Golub–Kahan in time and accuracy, and block Lanczos with batched
products is ~10⁵× less accurate for ~10 % less time per product on CPU. Right vectors
come from one batched transposed pass, V = JᵀU/σ, and each triplet gets a rigorous
residual bound from one batched forward pass (see `_triplet_bounds`). matfree has no
convergence test: `top_k` grows the Krylov depth until the bounds meet the tolerance,
or stops (not converged) when they no longer improve: the operator's rounding has a floor.

Every token Jacobian J_t at once — one transposed pass of a batch of output-space vectors B
(b × d) gives B·J_t for *all* tokens t together (the transpose separates tokens, the
forward pass would mix them). With B = I (b = d) that is every token Jacobian exactly; with B
an orthonormal basis of the whole-J Krylov space (b < d) it is a projection that keeps
each token Jacobian's dominant directions at a fraction of the cost (`per_token_top_k`).

Krylov vectors and reductions are kept in at least float32 (bf16 params included).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from matfree import decomp

from jaxlin.devices import map_in_batches, map_matrices
from jaxlin.distributed import to_host
from jaxlin.errors import JaxlinError
from jaxlin.jacobian import DetachedJacobian, Products
from jaxlin.mesh import split_tokens, token_devices
from jaxlin.operator import chunk_size, rows


class SpectralError(JaxlinError):
    pass


@dataclasses.dataclass(frozen=True)
class Triplets:
    """Top-k singular triplets of J (d × N·d): J ≈ U diag(S) Vᵀ.
    U: (d, k); S: (k,); V: (k, N, d), each right vector shaped like the input X.
    `bounds[i]` ≥ |σ_i − σ| for some singular value σ of J (residual bound)."""

    U: np.ndarray
    S: np.ndarray
    V: np.ndarray
    bounds: np.ndarray | None = None
    depth: int | None = None
    converged: bool = True
    tolerance: float | None = None
    stop_reason: str = "exact"  # see STOP_REASONS
    spectrum: np.ndarray | None = None  # all d singular values, descending, when J·Jᵀ was decomposed


# Why `top_k` stopped growing the Krylov depth ("exact": a dense SVD, no iteration).
STOP_REASONS = {
    "converged": "every relative residual bound met the tolerance",
    "stalled": "the bounds stopped improving (the operator's rounding floor) before meeting the tolerance",
    "full_depth": "the Krylov depth reached d, where Lanczos is exact up to rounding",
    "exact": "exact decomposition of J·Jᵀ from J's rows (no iteration)",
}

# A depth step (×1.5) that does not improve the worst relative bound by at least this
# factor, with that bound already within ROUNDING_MARGIN·eps·σ₁ (absolute) of zero, is a
# stall. Lanczos bounds shrink by orders of magnitude per step until rounding stops them,
# and there they move by a few percent. Rounding in an operator of norm σ₁ leaves every
# triplet an absolute residual of order eps·σ₁ (measured: 1-4 eps·σ₁ in bf16 and float32),
# so a bound far above that is not at the floor: an early plateau (a float64 run went
# 0.32 → 0.16 from depth 8 to 12, then converged) keeps growing the depth.
STALL_FACTOR = 2.0
ROUNDING_MARGIN = 100.0


def default_tolerance(dtype: jnp.dtype) -> float:
    """Relative residual-bound target: what the operator's own rounding allows.

    float64 and float32 keep the targets every earlier result was computed with (their
    operators round far below them). A narrower dtype — bfloat16 — applies J in its own
    precision: each product carries a relative error of order eps, so even an exact
    triplet has ‖Jv − σu‖ ≈ eps·σ (Gemma 3 270M in bf16 stalls near 9e-3 ≈ 1.2·eps with
    eps = 2⁻⁷ ≈ 7.8e-3). 4·eps (3.1e-2 for bf16) is the smallest target such an operator
    meets with margin; anything tighter can only stall."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64:
        return 1e-10
    if dtype == jnp.float32:
        return 1e-4
    return 4 * float(jnp.finfo(dtype).eps)


def check_request(k: int, tolerance: float | None, d: int, field: str = "top_k") -> None:
    """`field` names k in the message (a run config's key, or the argument)."""
    if k < 1 or k > d:
        raise SpectralError(f"{field}={k} must be between 1 and the rank bound min(d, N·d) = {d}")
    if tolerance is not None and not tolerance > 0:
        raise SpectralError(f"tolerance={tolerance} must be > 0")


def dense_top_k(jacobian: np.ndarray, k: int) -> Triplets:
    """Top-k SVD of a materialized J of shape (d, N, d), computed in float64."""
    d, n, d_in = jacobian.shape
    check_request(k, None, min(d, n * d_in))
    u, s, vt = np.linalg.svd(to_host(jacobian, np.float64).reshape(d, n * d_in), full_matrices=False)
    return Triplets(U=u[:, :k], S=s[:k], V=vt[:k].reshape(k, n, d_in), bounds=np.zeros(k))


def widened(op: DetachedJacobian) -> tuple[Callable, Callable, jnp.dtype]:
    """J·v and Jᵀ·u taking and returning at-least-float32 vectors (a bf16 operator is
    applied in its own dtype; the Krylov arithmetic around it is not)."""
    wide = jnp.promote_types(op.output.dtype, jnp.float32)
    inner = op.output.dtype

    def matvec(v: jax.Array) -> jax.Array:
        return op.matvec(v.astype(inner)).astype(wide)

    def rmatvec(u: jax.Array) -> jax.Array:
        return op.rmatvec(u.astype(inner)).astype(wide)

    return matvec, rmatvec, wide


def _triplet_bounds(matvec: Callable, rmatvec: Callable, left: jax.Array, chunk: int | None):
    """From unit left vectors (k, d): σ = ‖Jᵀu‖, v = Jᵀu/σ, and the bound ‖Jv − σu‖/√2.

    Why a bound: with s = Jᵀu − σv = 0 by construction, the unit vector [u; v]/√2 has
    residual ‖Jv − σu‖/√2 for the symmetric matrix [[0, J], [Jᵀ, 0]], whose eigenvalues
    are ±σ_i(J); so some singular value lies within that distance of σ."""
    pulled = map_in_batches(rmatvec, left, chunk)  # (k, N, d): one batched Jᵀ pass
    sigma = jnp.sqrt(jnp.sum(pulled**2, axis=(1, 2)))
    right = pulled / sigma[:, None, None]
    pushed = map_in_batches(matvec, right, chunk)  # (k, d): one batched J pass
    bounds = jnp.linalg.norm(pushed - sigma[:, None] * left, axis=1) / math.sqrt(2.0)
    return sigma, right, bounds


@functools.partial(jax.jit, static_argnames=("k", "depth", "chunk"))
def lanczos_top_k(
    op: DetachedJacobian, key: jax.Array, k: int, depth: int, chunk: int | None = 16
) -> tuple[jax.Array, ...]:
    """One Lanczos run of `depth` steps on J·Jᵀ.
    Returns (U (k, d), S (k,), V (k, N, d), bounds (k,), lanczos_bounds (k,))."""
    matvec, rmatvec, wide = widened(op)
    start = jax.random.normal(key, op.output.shape, wide)
    gram = lambda u: matvec(rmatvec(u))  # noqa: E731  J·Jᵀ·u
    basis, tridiagonal, residual, _ = decomp.tridiag_sym(depth, reortho="full", custom_vjp=False)(gram, start)
    eigenvalues, eigenvectors = jnp.linalg.eigh(tridiagonal)
    top = jnp.argsort(eigenvalues)[::-1][:k]
    left = (eigenvectors[:, top].T @ basis).astype(wide)  # (k, d) Ritz vectors
    left = left / jnp.linalg.norm(left, axis=1, keepdims=True)
    # The classic Lanczos estimate for the eigenvalue λ = σ² of J·Jᵀ (cheap, not rigorous).
    lanczos_bounds = jnp.linalg.norm(residual) * jnp.abs(eigenvectors[-1, top])
    sigma, right, bounds = _triplet_bounds(matvec, rmatvec, left, chunk)
    order = jnp.argsort(sigma)[::-1]
    return left[order], sigma[order], right[order], bounds[order], lanczos_bounds[order]


def top_k(
    op: DetachedJacobian,
    k: int,
    tolerance: float | None = None,
    depth: int | None = None,
    seed: int = 0,
    chunk: int | None = 16,
    progress: Callable[[str], None] | None = None,
    products: Products | None = None,
) -> Triplets:
    """Top-k singular triplets of the whole J with residual bounds ≤ tolerance·σ_i,
    growing the Krylov depth (×1.5, up to d, where Lanczos is exact) until they are met —
    or until a step improves the worst bound by less than `STALL_FACTOR` (then the result
    is the last depth's, `converged=False`, `stop_reason="stalled"`). Deterministic for a
    given seed."""
    d = op.output.shape[0]
    tolerance = default_tolerance(op.dtype) if tolerance is None else tolerance
    check_request(k, tolerance, d)
    # Start deep enough that typical top-k converge in one run (each restart recomputes
    # from scratch: matfree's Lanczos cannot be continued), then grow by half.
    depth = min(d, depth or max(3 * k + 24, 48))
    key = jax.random.key(seed)
    previous = math.inf
    while True:
        u, s, v, bounds, _ = lanczos_top_k(op, key, k, depth, chunk)
        if products is not None:  # depth J·Jᵀ steps, then one Jᵀ and one J pass of k vectors
            products.matvecs += depth + k
            products.rmatvecs += depth + k
        s_np, bounds_np = to_host((s, bounds), np.float64)
        worst = float(np.max(bounds_np / np.maximum(s_np, np.finfo(np.float64).tiny)))
        if progress is not None:
            progress(
                f"Lanczos depth {depth}: worst relative residual bound {worst:.2e} (target {tolerance:.1e})"
            )
        # The largest absolute bound, in units of the operator's rounding eps·σ₁.
        in_eps = float(np.max(bounds_np)) / (float(jnp.finfo(op.dtype).eps) * float(s_np[0]))
        reason = _stop_reason(worst, previous, in_eps, tolerance, depth, d)
        if reason is not None:
            converged = reason == "converged"
            u, v = to_host((u, v))
            return Triplets(u.T, s_np, v, bounds_np, depth, converged, tolerance, reason)
        previous = worst
        depth = min(d, depth + max(depth // 2, 1))


def _stop_reason(
    worst: float, previous: float, in_eps: float, tolerance: float, depth: int, d: int
) -> str | None:
    """Why to stop at this depth (a key of `STOP_REASONS`), or None to grow it. `worst`
    and `previous`: the worst relative bound now and one depth before; `in_eps`: the
    largest absolute bound in units of eps·σ₁."""
    if worst <= tolerance:
        return "converged"
    if depth >= d:
        return "full_depth"
    if worst * STALL_FACTOR > previous and in_eps <= ROUNDING_MARGIN:
        return "stalled"
    return None


# Working memory of the per-token stage: a group of tokens is decomposed at a time, so
# the Gram matrices and eigenvectors (b × b per token) never exist for all N tokens.
TOKEN_GROUP_BYTES = 256 * 2**20


def token_group_size(n: int, b: int, d: int, itemsize: int) -> int:
    """Tokens decomposed together: their Jacobians, Gram matrices and eigenvectors (about
    3·b·max(b, d) numbers each) within `TOKEN_GROUP_BYTES`, in groups of equal size (so
    that the last group overlaps the others by fewer tokens than there are groups)."""
    largest = max(1, min(n, TOKEN_GROUP_BYTES // (3 * b * max(b, d) * itemsize)))
    groups = -(-n // largest)
    return -(-n // groups)


def per_token_top_k(
    op: DetachedJacobian,
    basis: jax.Array,
    k: int,
    chunk: int | None = 64,
    token_group: int | None = None,
    products: Products | None = None,
) -> tuple[jax.Array, ...]:
    """Top-k triplets of every token Jacobian B·J_t (t = 1..N) from one batched transposed pass
    (`rows`), decomposed by `per_token_from_rows`."""
    return per_token_from_rows(rows(op, basis, chunk, products), basis, k, token_group)


@functools.partial(jax.jit, static_argnames=("k", "token_group"))
def per_token_from_rows(
    projected: jax.Array, basis: jax.Array, k: int, token_group: int | None = None
) -> tuple[jax.Array, ...]:
    """Top-k triplets of every token Jacobian B·J_t from the rows B·J (b, N, d).

    `basis` (b, d) has orthonormal rows. With the identity (b = d) the token Jacobians are the
    exact J_t. Returns U (N, k, d) left vectors in output space, S (N, k), V (N, k, d),
    bounds (N, k) (residual bounds w.r.t. the projected token Jacobians B·J_t, see
    `_triplet_bounds`), and the squared Frobenius norms ‖B·J_t‖² (N,). Memory: the
    b·N·d rows, plus one group of tokens' Gram matrices at a time (`token_group` tokens;
    default `token_group_size`)."""
    wide = jnp.promote_types(projected.dtype, jnp.float32)
    rows = projected.astype(wide)  # rows[i, t] = J_tᵀ b_i
    basis = basis.astype(wide)
    b, n, d = rows.shape
    group = min(n, token_group or token_group_size(n, b, d, jnp.dtype(wide).itemsize))
    # Split by token along a sequence axis (jaxlin.mesh), each device's block of N / devices
    # tokens is grouped on its own and a step takes one group from every block: a scan
    # over groups of the split axis itself would gather all the rows on every device.
    devices = token_devices() if n % token_devices() == 0 else 1
    block = n // devices
    group = min(group, block)
    # Group starts in a block; the last group is moved back to end at the block's end (it
    # overlaps the one before).
    starts = np.minimum(np.arange(-(-block // group)) * group, block - group)
    blocks_of_rows = split_tokens(rows.reshape(b, devices, block, d), axis=1)

    def group_triplets(start: jax.Array) -> tuple[jax.Array, ...]:
        taken = jax.lax.dynamic_slice_in_dim(blocks_of_rows, start, group, axis=2)  # (b, devices, g, d)
        blocks = jnp.moveaxis(taken.reshape(b, devices * group, d), 1, 0)  # (devices·g, b, d)
        gram = jnp.einsum("tid,tjd->tij", blocks, blocks, precision=jax.lax.Precision.HIGHEST)
        _, eigenvectors = map_matrices(jnp.linalg.eigh, gram)  # ascending, per token
        w = eigenvectors[:, :, ::-1][:, :, :k]  # (g, b, k)
        pulled = jnp.einsum("tbk,tbd->tkd", w, blocks)  # (B J_t)ᵀ w
        sigma = jnp.linalg.norm(pulled, axis=-1)
        right = pulled / jnp.where(sigma > 0, sigma, 1.0)[..., None]
        pushed = jnp.einsum("tbd,tkd->tkb", blocks, right)
        bounds = jnp.linalg.norm(pushed - sigma[..., None] * jnp.moveaxis(w, 1, 2), axis=-1) / math.sqrt(2.0)
        left = jnp.einsum("tbk,bd->tkd", w, basis)
        return left, sigma, right, bounds, jnp.sum(blocks**2, axis=(1, 2))

    grouped = jax.lax.map(group_triplets, jnp.asarray(starts))  # each (steps, devices·g, …)
    # Token t (position `local` of block j) sits in the group covering it (the later one
    # where two overlap).
    local = np.arange(n) % block
    owner = np.minimum(local // group, len(starts) - 1)
    flat_index = jnp.asarray((owner * devices + np.arange(n) // block) * group + local - starts[owner])
    return tuple(out.reshape(-1, *out.shape[2:])[flat_index] for out in grouped)


def frobenius_estimate(
    op: DetachedJacobian,
    key: jax.Array,
    samples: int,
    products: Products | None = None,
    chunk: int | None = 64,
) -> jax.Array:
    """Hutchinson estimate of ‖J_t‖_F² for every token at once (N,): with Rademacher ω in
    output space, E‖J_tᵀω‖² = ‖J_t‖_F² (matfree's sign sampler). The samples' transposed
    products run `chunk` at a time: each is an (N, d) vector, so all at once would hold
    samples·N·d numbers (32 GiB for 64 samples of an 8B model at 32k tokens)."""
    if products is not None:
        products.rmatvecs += samples
    return _frobenius_estimate(op, key, samples, chunk)


@functools.partial(jax.jit, static_argnames=("samples", "chunk"))
def _frobenius_estimate(op: DetachedJacobian, key: jax.Array, samples: int, chunk: int | None) -> jax.Array:
    from matfree import stochtrace

    _, rmatvec, wide = widened(op)
    omegas = stochtrace.sampler_signs(jnp.zeros(op.output.shape, wide), num=samples)(key)

    def per_token_energy(omega: jax.Array) -> jax.Array:
        return jnp.sum(rmatvec(omega) ** 2, axis=-1)

    return jnp.mean(map_in_batches(per_token_energy, omegas, chunk_size(samples, chunk)), axis=0)


def krylov_basis(
    op: DetachedJacobian, rank: int, seed: int = 0, products: Products | None = None
) -> jax.Array:
    """An orthonormal (rank, d) basis of J's dominant left subspace: the top Ritz vectors
    of one Lanczos run (depth rank + 16, capped at d). Used to project every J_t."""
    depth = min(op.output.shape[0], rank + 16)
    if products is not None:
        products.matvecs += depth + rank
        products.rmatvecs += depth + rank
    left, *_ = lanczos_top_k(op, jax.random.key(seed), rank, depth, 16)
    # Ritz vectors are orthonormal up to rounding; re-orthonormalize for a clean projector.
    q, _ = jnp.linalg.qr(left.T)
    return q.T


def _gram_triplets(
    gram: jax.Array, matvec: Callable, rmatvec: Callable, k: int, chunk: int | None
) -> tuple[jax.Array, ...]:
    """Every eigenvalue of J·Jᵀ (d × d) and the top-k triplets from its eigenvectors, with
    the rigorous bounds of `_triplet_bounds`: the one exact spectral routine, whether the
    Gram matrix came from J's rows or from d products J·(Jᵀ·e_i)."""
    # eigh symmetrizes its input: rounding leaves the Gram symmetric only to working precision.
    eigenvalues, eigenvectors = jnp.linalg.eigh(gram)
    left = eigenvectors[:, ::-1][:, :k].T  # (k, d) unit vectors
    sigma, right, bounds = _triplet_bounds(matvec, rmatvec, left, chunk)
    order = jnp.argsort(sigma)[::-1]
    spectrum = jnp.sqrt(jnp.maximum(eigenvalues[::-1], 0.0))
    return spectrum, left[order], sigma[order], right[order], bounds[order]


@functools.partial(jax.jit, static_argnames=("k",))
def _rows_top_k(dense: jax.Array, k: int) -> tuple[jax.Array, ...]:
    wide = jnp.promote_types(dense.dtype, jnp.float32)
    d, n, d_in = dense.shape
    flat = dense.astype(wide).reshape(d, n * d_in)
    gram = jnp.matmul(flat, flat.T, precision=jax.lax.Precision.HIGHEST)  # J·Jᵀ, exact up to rounding
    exact = jax.lax.Precision.HIGHEST
    matvec = lambda v: jnp.matmul(flat, v.reshape(-1), precision=exact)  # noqa: E731
    rmatvec = lambda u: jnp.matmul(u, flat, precision=exact).reshape(n, d_in)  # noqa: E731
    return _gram_triplets(gram, matvec, rmatvec, k, k)  # one vectorized batch


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def _streamed_top_k(op: DetachedJacobian, k: int, chunk: int | None) -> tuple[jax.Array, ...]:
    matvec, rmatvec, wide = widened(op)
    d = op.output.shape[0]
    units = jnp.eye(d, dtype=wide)
    gram = map_in_batches(lambda unit: matvec(rmatvec(unit)), units, chunk_size(d, chunk))
    return _gram_triplets(gram, matvec, rmatvec, k, chunk_size(k, chunk))


def _exact_triplets(outputs: tuple[jax.Array, ...]) -> Triplets:
    spectrum, u, s, v, bounds = to_host(outputs)
    return Triplets(
        u.T,
        s.astype(np.float64),
        v,
        bounds.astype(np.float64),
        spectrum=spectrum.astype(np.float64),
    )


def rows_top_k(dense: jax.Array, k: int) -> Triplets:
    """Top-k singular triplets of J from its rows (d, N, d), and every singular value
    (`spectrum`): the eigendecomposition of the d × d Gram matrix J·Jᵀ (no product through
    the network), with the same rigorous residual bounds as `top_k` (exact up to rounding,
    like Lanczos at full depth)."""
    check_request(k, None, dense.shape[0])
    return _exact_triplets(_rows_top_k(dense, k))


def streamed_top_k(
    op: DetachedJacobian, k: int, chunk: int | None = 64, products: Products | None = None
) -> Triplets:
    """`rows_top_k` without holding J's rows (d·N·d numbers): J·Jᵀ from d products
    J·(Jᵀ·e_i), `chunk` at a time, then one batched pass each way for the triplets' right
    vectors and bounds. Twice the products of the rows, memory O(chunk · N · d)."""
    d = op.output.shape[0]
    check_request(k, None, d)
    if products is not None:
        products.matvecs += d + k
        products.rmatvecs += d + k
    return _exact_triplets(_streamed_top_k(op, k, chunk))
