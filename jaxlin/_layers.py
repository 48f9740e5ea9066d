"""Shared building blocks (Flax linen), each consulting the freezing policy for the
coefficients it owns. Shapes: one sequence, (N, d); batch with `jax.vmap`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlin._attention import chunked_frozen_attention, dense_attention
from jaxlin._config import Activation, MLPKind, ModelConfig, NormKind, NormPlacement, RopeConfig
from jaxlin._policy import FreezePolicy
from jaxlin.mesh import split_tokens
from jaxlin.quantized import QuantizedArray
from jaxlin.quantized import attend as quantized_attend
from jaxlin.quantized import dense as quantized_dense
from jaxlin.quantized import embedding_rows as quantized_embedding_rows

# Exactness is the product: never let an accelerator's default (bf16/tf32) matmul
# precision change the numbers.
PRECISION = jax.lax.Precision.HIGHEST


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Reductions and nonlinearities run in at least float32 (bf16 params included)."""
    return jnp.promote_types(dtype, jnp.float32)


def rms_norm(
    x: jax.Array, weight: jax.Array, eps: float, weight_offset: float, policy: FreezePolicy
) -> jax.Array:
    """x · rsqrt(mean(x²) + eps) · (offset + w); the inverse RMS is the frozen coefficient."""
    wide = x.astype(compute_dtype(x.dtype))
    inv_rms = jax.lax.rsqrt(jnp.mean(wide * wide, axis=-1, keepdims=True) + eps)
    normed = wide * policy.freeze(inv_rms) * (weight_offset + weight.astype(wide.dtype))
    return normed.astype(x.dtype)


def activation_gate(h: jax.Array, activation: Activation) -> jax.Array:
    """act(h) for a gated MLP (the whole branch is the frozen coefficient)."""
    wide = h.astype(compute_dtype(h.dtype))
    return (wide * activation_ratio(wide, activation)).astype(h.dtype)


def activation_ratio(h: jax.Array, activation: Activation) -> jax.Array:
    """φ(h) with act(h) = h·φ(h): the coefficient a plain (non-gated) MLP freezes, so
    that h itself stays on the linear path (GPT-2's GELU)."""
    if activation is Activation.SILU:
        return jax.nn.sigmoid(h)
    if activation is Activation.GELU_TANH:
        return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (h + 0.044715 * h**3)))
    if activation is Activation.GELU:
        return 0.5 * (1.0 + jax.lax.erf(h / np.sqrt(2.0)))
    raise ValueError(activation)  # pragma: no cover - the enum is closed


def softcap(z: jax.Array, cap: float | None, policy: FreezePolicy) -> jax.Array:
    """c·tanh(z/c) written as z · [tanh(z/c)/(z/c)], the bracket frozen (it is 1 at z = 0)."""
    if cap is None:
        return z
    ratio = z / cap
    safe = jnp.where(ratio == 0, 1.0, ratio)
    factor = jnp.where(ratio == 0, 1.0, jnp.tanh(safe) / safe)
    return z * policy.freeze(factor)


def rotate_half(x: jax.Array) -> jax.Array:
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-second, first], axis=-1)


def rope_tables(
    rope: RopeConfig, rotary_dim: int, num_tokens: int, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape (N, rotary_dim), Hugging Face's half-split layout, scaled by the
    RoPE variant's attention factor. Angles are formed in the compute dtype (float32 for
    float32/bf16 models, as HF does; float64 in x64)."""
    wide = compute_dtype(dtype)
    inv_freq = jnp.asarray(rope.inverse_frequencies(rotary_dim, num_tokens), dtype=wide)
    angles = jnp.arange(num_tokens, dtype=wide)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    scale = rope.attention_factor
    return (jnp.cos(angles) * scale).astype(dtype), (jnp.sin(angles) * scale).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: (N, heads, head_dim); cos/sin: (N, rotary_dim). Dims past rotary_dim pass
    unrotated (partial rotary, Phi-4-mini)."""
    rotary_dim = cos.shape[-1]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated = rotated * cos[:, None, :] + rotate_half(rotated) * sin[:, None, :]
    return jnp.concatenate([rotated, passed], axis=-1) if passed.shape[-1] else rotated


def dense(features: int, name: str, dtype: jnp.dtype, use_bias: bool = False) -> nn.Dense:
    return Dense(features, use_bias=use_bias, precision=PRECISION, dtype=dtype, param_dtype=dtype, name=name)


# Quantized params (jaxlin/quantized.py): a `QuantizedArray` in place of a float kernel or
# embedding is dequantized where it is used, inside `jax.checkpoint`, so each scanned
# layer's float weights exist only while that layer runs and a linearization holds the
# quantized leaves instead. Float params take flax's own path unchanged.


def _quantized_param(module: nn.Module, name: str) -> QuantizedArray | None:
    if module.is_initializing() or not module.has_variable("params", name):
        return None
    value = module.get_variable("params", name)
    return value if isinstance(value, QuantizedArray) else None


class Dense(nn.Dense):
    """flax's Dense, also for a quantized kernel."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel = _quantized_param(self, "kernel")
        if kernel is None:
            return super().__call__(inputs)
        y = quantized_dense(inputs, kernel, self.precision)
        if self.use_bias:
            bias = jnp.asarray(self.get_variable("params", "bias"), self.dtype)
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


class Embed(nn.Embed):
    """flax's Embed, also for a quantized embedding (only the looked-up rows are dequantized)."""

    def setup(self) -> None:
        quantized = _quantized_param(self, "embedding")
        if quantized is None:
            super().setup()
        else:
            self.embedding = quantized

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if not isinstance(self.embedding, QuantizedArray):
            return super().__call__(inputs)
        return quantized_embedding_rows(self.embedding, inputs)

    def attend(self, query: jax.Array) -> jax.Array:
        if not isinstance(self.embedding, QuantizedArray):
            return super().attend(query)
        return quantized_attend(query, self.embedding)


class RMSNorm(nn.Module):
    eps: float
    weight_offset: float
    policy: FreezePolicy
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],), self.dtype)
        return rms_norm(x, weight, self.eps, self.weight_offset, self.policy)


def layer_norm(
    x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float, policy: FreezePolicy
) -> jax.Array:
    """(x − mean x)·rsqrt(var x + eps)·w + b; centring is linear, the inverse std frozen."""
    wide = x.astype(compute_dtype(x.dtype))
    centred = wide - jnp.mean(wide, axis=-1, keepdims=True)
    inv_std = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    normed = centred * policy.freeze(inv_std) * weight.astype(wide.dtype) + bias.astype(wide.dtype)
    return normed.astype(x.dtype)


class LayerNorm(nn.Module):
    eps: float
    policy: FreezePolicy
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("scale", nn.initializers.ones_init(), (x.shape[-1],), self.dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (x.shape[-1],), self.dtype)
        return layer_norm(x, weight, bias, self.eps, self.policy)


def make_norm(config: ModelConfig, policy: FreezePolicy, dtype: jnp.dtype, name: str) -> nn.Module:
    if config.norm_kind is NormKind.LAYER:
        return LayerNorm(config.norm_eps, policy, dtype, name=name)
    return RMSNorm(config.norm_eps, config.norm_weight_offset, policy, dtype, name=name)


class PlainMLP(nn.Module):
    """down(act(up(x))) with act(h) = h·φ(h): φ(h) is the frozen coefficient (GPT-2)."""

    config: ModelConfig
    policy: FreezePolicy
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = dense(cfg.intermediate_size, "up_proj", self.dtype, cfg.mlp_bias)(x)
        wide = h.astype(compute_dtype(h.dtype))
        coefficient = self.policy.freeze(activation_ratio(wide, cfg.activation)).astype(h.dtype)
        return dense(cfg.hidden_size, "down_proj", self.dtype, cfg.mlp_bias)(h * coefficient)


class GatedMLP(nn.Module):
    """down(act(gate(x)) ⊙ up(x)); the whole act(gate(x)) branch is the frozen coefficient
    (freezing only a sigmoid inside it would leave a quadratic term)."""

    config: ModelConfig
    policy: FreezePolicy
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        gate = dense(cfg.intermediate_size, "gate_proj", self.dtype, cfg.mlp_bias)(x)
        up = dense(cfg.intermediate_size, "up_proj", self.dtype, cfg.mlp_bias)(x)
        coefficient = self.policy.freeze(activation_gate(gate, cfg.activation))
        return dense(cfg.hidden_size, "down_proj", self.dtype, cfg.mlp_bias)(coefficient * up)


class Attention(nn.Module):
    """Grouped-query attention with RoPE and optional QK-norm. The attention
    probabilities are the frozen coefficient: only V → o_proj stays on the linear path.
    `chunk` selects the O(N)-memory chunked implementation (detached policy only)."""

    config: ModelConfig
    policy: FreezePolicy
    dtype: jnp.dtype = jnp.float32
    chunk: int | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, cos: jax.Array | None, sin: jax.Array | None, is_sliding: jax.Array
    ) -> jax.Array:
        cfg = self.config
        n = x.shape[0]
        groups = cfg.num_heads // cfg.num_kv_heads
        q = dense(cfg.num_heads * cfg.head_dim, "q_proj", self.dtype, cfg.qkv_bias)(x)
        k = dense(cfg.num_kv_heads * cfg.head_dim, "k_proj", self.dtype, cfg.qkv_bias)(x)
        v = dense(cfg.num_kv_heads * cfg.head_dim, "v_proj", self.dtype, cfg.qkv_bias)(x)
        if cfg.qk_norm and not cfg.qk_norm_per_head:  # OLMo 2: over the whole projection
            q = make_norm(cfg, self.policy, self.dtype, "q_norm")(q)
            k = make_norm(cfg, self.policy, self.dtype, "k_norm")(k)
        q = q.reshape(n, cfg.num_heads, cfg.head_dim)
        k = k.reshape(n, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(n, cfg.num_kv_heads, cfg.head_dim)
        # Queries, keys and values stay split by token (a sequence axis's devices gather
        # the keys and values they attend to where they use them).
        q, k, v = split_tokens(q), split_tokens(k), split_tokens(v)
        if cfg.qk_norm and cfg.qk_norm_per_head:
            q = make_norm(cfg, self.policy, self.dtype, "q_norm")(q)
            k = make_norm(cfg, self.policy, self.dtype, "k_norm")(k)
        wide = compute_dtype(q.dtype)  # scores and softmax in at least float32
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = q.reshape(n, cfg.num_kv_heads, groups, cfg.head_dim).astype(wide)
        k = k.astype(wide)
        common = dict(
            is_sliding=is_sliding,
            window=cfg.sliding_window,
            scale=cfg.score_scale,
            softcap=cfg.attn_logit_softcap,
        )
        if self.chunk is not None and n > self.chunk:
            if self.policy is not FreezePolicy.DETACHED:
                raise ValueError("chunked attention is exact only under the detached policy")
            out = chunked_frozen_attention(q, k, v, **common, chunk=self.chunk)
        else:
            out = dense_attention(q, k, v, **common, policy=self.policy)
        out = out.reshape(n, cfg.num_heads * cfg.head_dim)
        return dense(cfg.hidden_size, "o_proj", self.dtype, cfg.out_bias)(out)


class DecoderBlock(nn.Module):
    """One layer. `is_sliding` rides along the layer scan as data, so one compiled block
    serves global and sliding-window layers alike. With `active` (also data) the layer
    runs only where it is true and passes the stream through untouched elsewhere: a
    tap at layer ℓ then costs ℓ + 1 layers in every product, not all of them."""

    config: ModelConfig
    policy: FreezePolicy
    dtype: jnp.dtype = jnp.float32
    attention_chunk: int | None = None

    @nn.compact
    def __call__(
        self,
        h: jax.Array,
        is_sliding: jax.Array,
        rope: dict[str, tuple[jax.Array, jax.Array]],
        active: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        if active is None:
            return _layer(self, h, is_sliding, rope)
        return nn.cond(active, _layer, _passed_through, self, h, is_sliding, rope)


def _passed_through(
    block: DecoderBlock, h: jax.Array, is_sliding: jax.Array, rope: dict[str, tuple[jax.Array, jax.Array]]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    zero = jnp.zeros_like(h)
    return h, {"residual": h, "attention": zero, "mlp": zero}


def _layer(
    block: DecoderBlock, h: jax.Array, is_sliding: jax.Array, rope: dict[str, tuple[jax.Array, jax.Array]]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The layer's computation; its submodules are created on (and named under) `block`."""
    cfg, policy, dtype = block.config, block.policy, block.dtype
    cos = sin = None
    if "global" in rope:
        cos, sin = rope["global"]
    if "sliding" in rope:
        cos = jnp.where(is_sliding, rope["sliding"][0], cos)
        sin = jnp.where(is_sliding, rope["sliding"][1], sin)
    placement = cfg.norm_placement
    pre_norms = placement is not NormPlacement.POST
    post_norms = placement is not NormPlacement.PRE

    # The residual stream, and so every per-token activation and frozen coefficient of
    # the layer, split by token along a sequence axis (jaxlin.mesh).
    h = split_tokens(h)
    attn_in = make_norm(cfg, policy, dtype, "input_norm")(h) if pre_norms else h
    attention = Attention(cfg, policy, dtype, block.attention_chunk, name="attn")
    attn_out = attention(attn_in, cos, sin, is_sliding)
    if post_norms:
        attn_out = make_norm(cfg, policy, dtype, "post_attn_norm")(attn_out)
    h = split_tokens(h + attn_out)

    mlp_in = make_norm(cfg, policy, dtype, "pre_mlp_norm")(h) if pre_norms else h
    mlp = GatedMLP if cfg.mlp_kind is MLPKind.GATED else PlainMLP
    mlp_out = mlp(cfg, policy, dtype, name="mlp")(mlp_in)
    if post_norms:
        mlp_out = make_norm(cfg, policy, dtype, "post_mlp_norm")(mlp_out)
    # Per-layer outputs ride out of the layer scan as taps; jit drops them when unused.
    h = split_tokens(h + mlp_out)
    return h, {"residual": h, "attention": attn_out, "mlp": mlp_out}
