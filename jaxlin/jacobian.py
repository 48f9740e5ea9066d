"""The detached Jacobian of one input as a value.

`linearize` runs the nonlinear forward once (`jax.linearize`) inside one jitted program
and returns a `DetachedJacobian`: a pytree holding the input X (N, d), the target y (d,),
the bias term c_bias (d,), and the linear map J·v as a `jax.tree_util.Partial` whose
leaves are the linearization's residuals; Jᵀ·u is its transpose, taken where it is used
(`jax.linear_transpose` of the same residuals, so they are held once). It crosses jit
boundaries like any array pytree, so every analysis is a jitted function of J and the
forward is never recomputed: one linearization per input (and tap), however many
analyses use it.

Residuals that are parameters (the weight matrices the tangent passes through) are not
returned by the linearizing program: a jitted program's outputs are fresh buffers, so
they would be a second copy of the layer weights (≈0.5 GB for Gemma 3 270M in float32,
whatever N). The program returns a `ParamRef` placeholder instead and `linearize` puts
the caller's own parameter arrays back in its place — the value refers to the weights,
it does not copy them.

Biases make the detached map affine, y = Σ_t J_t·x_t + c_bias. With every bias scaled by
a scalar β, the frozen network is jointly linear in (X, β), so linearizing in both at
β = 1 gives J (the X part) and c_bias = ∂y/∂β exactly.

`Products` counts what was pushed through J on the host (the jitted programs cannot):
each analysis records the J·v and Jᵀ·u products it makes from the shapes it uses.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxlin._config import ModelConfig
from jaxlin._policy import FreezePolicy
from jaxlin.mesh import pad_tokens
from jaxlin.model import Params, Tap, final_hidden, tap_values

# Query chunk of the O(N)-memory attention used by the detached operator. Inputs up to
# this length use dense attention (the same numbers; the chunk only bounds memory).
DEFAULT_ATTENTION_CHUNK = 256


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
    attention_chunk: int | None = DEFAULT_ATTENTION_CHUNK,
    tap: Tap | None = None,
) -> Callable[..., jax.Array]:
    """(X (N, d), β = 1) → y (d,): the last token's final-normed hidden state, with
    every bias scaled by β. With a `tap`, the tap's value at the last token instead, as a
    function of the tap's input (X, or the residual stream entering a local tap's layer)."""
    # Chunked attention relies on frozen probabilities; the ordinary Jacobian (a
    # comparison for short inputs) always uses dense attention.
    chunk = attention_chunk if policy is FreezePolicy.DETACHED else None

    def target(embeddings: jax.Array, beta: jax.Array | float = 1.0) -> jax.Array:
        scaled = scale_biases(params, jnp.asarray(beta)) if config.has_biases else params
        # On a sequence axis the tokens are padded to split evenly (`jaxlin.mesh.pad_tokens`).
        last, padded = embeddings.shape[0] - 1, pad_tokens(embeddings)
        if tap is not None:
            return tap_values(config, scaled, padded, tap, policy, chunk)[last]
        return final_hidden(config, scaled, padded, policy, chunk)[last]

    return target


def on_token(vectors: jax.Array, token: jax.Array) -> jax.Array:
    """`vectors` (N, d) with every row but `token`'s zeroed: J applied to it is J_t·v_t."""
    keep = (jnp.arange(vectors.shape[0]) == token)[:, None]
    return vectors * keep.astype(vectors.dtype)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ParamRef:
    """Placeholder (no leaves) for the parameter leaf at `index` of the flattened params."""

    index: int


def _refer_to_params(linear: jax.tree_util.Partial, params: Params) -> jax.tree_util.Partial:
    """`linear` with every residual that IS a parameter (the same traced value) replaced by
    a `ParamRef`; called inside the linearizing program, where identity is exact."""
    positions = {id(leaf): index for index, leaf in enumerate(jax.tree_util.tree_leaves(params))}

    def refer(leaf: jax.Array) -> jax.Array | ParamRef:
        index = positions.get(id(leaf))
        return leaf if index is None else ParamRef(index)

    return jax.tree_util.tree_map(refer, linear)


def _resolve_params(linear: jax.tree_util.Partial, params: Params) -> jax.tree_util.Partial:
    """The inverse of `_refer_to_params`, outside the program: the caller's arrays back in."""
    leaves = jax.tree_util.tree_leaves(params)

    def resolve(leaf: jax.Array | ParamRef) -> jax.Array:
        return leaves[leaf.index] if isinstance(leaf, ParamRef) else leaf

    return jax.tree_util.tree_map(resolve, linear, is_leaf=lambda leaf: isinstance(leaf, ParamRef))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DetachedJacobian:
    """J (d × N·d) at one input X: `matvec(v)` (N, d) → (d,), `rmatvec(u)` (d,) → (N, d);
    `output` is y, `bias` the affine part c_bias (zero for bias-free models)."""

    inputs: jax.Array
    output: jax.Array
    bias: jax.Array
    linear: jax.tree_util.Partial  # (tangent of X, tangent of β) → tangent of y

    def matvec(self, v: jax.Array) -> jax.Array:
        """J·v for v shaped like X."""
        return self.linear(v, jnp.zeros((), v.dtype))

    def rmatvec(self, u: jax.Array) -> jax.Array:
        """Jᵀ·u for u shaped like y."""
        beta = jnp.zeros((), self.inputs.dtype)
        return jax.linear_transpose(self.linear, self.inputs, beta)(u)[0]

    @property
    def dtype(self) -> jnp.dtype:
        return self.output.dtype

    @property
    def shape(self) -> tuple[int, int, int]:
        """(d_out, N, d_in)."""
        return (self.output.shape[0], *self.inputs.shape)


# The tap is an argument, not static: its layer is data, so one program serves every layer.
@functools.partial(jax.jit, static_argnames=("config", "policy", "attention_chunk"))
def _linearize(
    params: Params,
    inputs: jax.Array,
    config: ModelConfig,
    policy: FreezePolicy,
    attention_chunk: int | None,
    tap: Tap | None,
) -> DetachedJacobian:
    target = target_function(config, params, policy, attention_chunk, tap)
    beta = jnp.ones((), inputs.dtype)
    output, linear = jax.linearize(target, inputs, beta)
    # A bias-free network ignores β: its bias term is exactly zero, no product needed.
    bias = linear(jnp.zeros_like(inputs), beta) if config.has_biases else jnp.zeros_like(output)
    return DetachedJacobian(inputs, output, bias, _refer_to_params(linear, params))


@dataclasses.dataclass
class Products:
    """How much work went through the operator: linearizations (forwards), J·v and Jᵀ·u."""

    linearizations: int = 0
    matvecs: int = 0
    rmatvecs: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def linearize(
    params: Params,
    inputs: jax.Array,
    config: ModelConfig,
    policy: FreezePolicy = FreezePolicy.DETACHED,
    attention_chunk: int | None = DEFAULT_ATTENTION_CHUNK,
    tap: Tap | None = None,
    products: Products | None = None,
) -> DetachedJacobian:
    """J of `config`'s target (the last token's final hidden state, or a tap's value) at X."""
    if products is not None:
        products.linearizations += 1
        products.matvecs += int(config.has_biases)
    jacobian = _linearize(params, inputs, config, policy, attention_chunk, tap)
    return dataclasses.replace(jacobian, linear=_resolve_params(jacobian.linear, params))
