"""The detached Jacobian J of y = last token's final hidden state w.r.t. the input
embeddings X (N, d), as a linear operator.

`linearize_target` runs the nonlinear forward once (`jax.linearize`) and gives J·v and,
by `jax.linear_transpose`, Jᵀ·u without recomputing it. Call it *inside* the jit that
uses the products (all functions below do), so the linearization residuals are
intermediate values of one program rather than baked-in constants.

Biases make the detached map affine, y = Σ_t J_t·x_t + c_bias. With every bias scaled by
a scalar β, the frozen network is jointly linear in (X, β), so linearizing in both at
β = 1 gives J (the X part) and the bias contribution c_bias = ∂y/∂β exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxlin._config import ModelConfig
from jaxlin._policy import FreezePolicy
from jaxlin.devices import map_in_batches
from jaxlin.model import Params, Tap, final_hidden, tap_values

# Query block of the O(N)-memory attention used by the detached operator. Inputs up to
# this length use dense attention (the same numbers; the block only bounds memory).
DEFAULT_ATTENTION_BLOCK = 256


def scale_biases(params: Params, beta: jax.Array) -> Params:
    """Every bias leaf (dense and LayerNorm biases) multiplied by β."""

    def scale(path: tuple, leaf: jax.Array) -> jax.Array:
        name = getattr(path[-1], "key", None)
        return leaf * beta.astype(leaf.dtype) if name == "bias" else leaf

    return jax.tree_util.tree_map_with_path(scale, params)


def target_function(
    config: ModelConfig,
    params: Params,
    policy: FreezePolicy,
    attention_block: int | None = DEFAULT_ATTENTION_BLOCK,
    tap: Tap | None = None,
) -> Callable[..., jax.Array]:
    """(X (N, d), β = 1) → y (d,): the last token's final-normed hidden state, with
    every bias scaled by β. With a `tap`, the tap's value at the last token instead, as a
    function of the tap's input (X, or the residual stream entering a local tap's layer)."""
    # Blockwise attention relies on frozen probabilities; the ordinary Jacobian (a
    # comparison for short inputs) always uses dense attention.
    block = attention_block if policy is FreezePolicy.DETACHED else None

    def target(embeddings: jax.Array, beta: jax.Array | float = 1.0) -> jax.Array:
        scaled = scale_biases(params, jnp.asarray(beta)) if config.has_biases else params
        if tap is not None:
            return tap_values(config, scaled, embeddings, tap, policy, block)[-1]
        return final_hidden(config, scaled, embeddings, policy, block)[-1]

    return target


@dataclasses.dataclass(frozen=True)
class LinearizedTarget:
    """J at one input X*. `matvec`: (N, d) → (d,); `rmatvec`: (d,) → (N, d);
    `bias_contribution()`: the affine part c_bias (zero for bias-free models)."""

    inputs: jax.Array
    output: jax.Array
    matvec: Callable[[jax.Array], jax.Array]
    rmatvec: Callable[[jax.Array], jax.Array]
    bias_contribution: Callable[[], jax.Array]


def linearize_target(
    config: ModelConfig,
    params: Params,
    inputs: jax.Array,
    policy: FreezePolicy = FreezePolicy.DETACHED,
    attention_block: int | None = DEFAULT_ATTENTION_BLOCK,
    tap: Tap | None = None,
) -> LinearizedTarget:
    target = target_function(config, params, policy, attention_block, tap)
    if not config.has_biases:
        output, matvec = jax.linearize(target, inputs)
        transpose = jax.linear_transpose(matvec, inputs)
        return LinearizedTarget(
            inputs, output, matvec, lambda u: transpose(u)[0], lambda: jnp.zeros_like(output)
        )
    beta = jnp.ones((), inputs.dtype)
    output, joint = jax.linearize(target, inputs, beta)
    transpose = jax.linear_transpose(joint, inputs, beta)
    no_beta = jnp.zeros((), inputs.dtype)
    return LinearizedTarget(
        inputs,
        output,
        lambda v: joint(v, no_beta),
        lambda u: transpose(u)[0],
        lambda: joint(jnp.zeros_like(inputs), jnp.ones((), inputs.dtype)),
    )


def on_token(vectors: jax.Array, token: jax.Array) -> jax.Array:
    """`vectors` (N, d) with every row but `token`'s zeroed: J applied to it is J_t·v_t."""
    keep = (jnp.arange(vectors.shape[0]) == token)[:, None]
    return vectors * keep.astype(vectors.dtype)


def _chunk_size(total: int, chunk: int | None) -> int | None:
    return None if chunk is None or chunk >= total else chunk


@functools.partial(jax.jit, static_argnames=("config", "policy", "chunk", "attention_block", "tap"))
def contributions(
    params: Params,
    inputs: jax.Array,
    config: ModelConfig,
    policy: FreezePolicy = FreezePolicy.DETACHED,
    chunk: int | None = 64,
    attention_block: int | None = DEFAULT_ATTENTION_BLOCK,
    tap: Tap | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(y, c, c_bias) with c_t = J_t·x_t, shape (N, d). Under DETACHED, Σ_t c_t + c_bias = y
    (c_bias = 0 for bias-free models).

    Picks the cheaper side: N forward-mode products (one per token) when N ≤ d,
    otherwise d transposed products (one per output coordinate), each reduced against
    X on the fly so memory stays O(chunk · N · d)."""
    op = linearize_target(config, params, inputs, policy, attention_block, tap)
    n, d = inputs.shape
    if n <= d:

        def one_token(t: jax.Array) -> jax.Array:
            return op.matvec(on_token(inputs, t))

        c = map_in_batches(one_token, jnp.arange(n), _chunk_size(n, chunk))
    else:

        def one_row(i: jax.Array) -> jax.Array:
            rows = op.rmatvec(jax.nn.one_hot(i, d, dtype=op.output.dtype))  # (N, d) = J[i]
            return jnp.sum(rows * inputs, axis=-1)  # (N,)

        c = map_in_batches(one_row, jnp.arange(d), _chunk_size(d, chunk)).T
    return op.output, c, op.bias_contribution()


@functools.partial(jax.jit, static_argnames=("config", "policy", "chunk", "attention_block", "tap"))
def materialize(
    params: Params,
    inputs: jax.Array,
    config: ModelConfig,
    policy: FreezePolicy = FreezePolicy.DETACHED,
    chunk: int | None = 64,
    attention_block: int | None = DEFAULT_ATTENTION_BLOCK,
    tap: Tap | None = None,
) -> jax.Array:
    """The dense J, shape (d, N, d) with J[i, t, j] = ∂y_i/∂X_tj (small inputs only)."""
    op = linearize_target(config, params, inputs, policy, attention_block, tap)
    d = op.output.shape[0]
    basis = jnp.eye(d, dtype=op.output.dtype)
    return map_in_batches(op.rmatvec, basis, _chunk_size(d, chunk))


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


@functools.partial(jax.jit, static_argnames=("config", "policy", "chunk", "attention_block"))
def token_block(
    params: Params,
    inputs: jax.Array,
    token: jax.Array,
    config: ModelConfig,
    policy: FreezePolicy = FreezePolicy.DETACHED,
    chunk: int | None = 64,
    attention_block: int | None = DEFAULT_ATTENTION_BLOCK,
) -> jax.Array:
    """One block J_t (d × d) from d forward products whose tangent lives on token t."""
    op = linearize_target(config, params, inputs, policy, attention_block)
    d = inputs.shape[1]

    def column(unit: jax.Array) -> jax.Array:
        return op.matvec(on_token(jnp.broadcast_to(unit, inputs.shape), token))

    columns = map_in_batches(column, jnp.eye(d, dtype=inputs.dtype), _chunk_size(d, chunk))
    return columns.T
