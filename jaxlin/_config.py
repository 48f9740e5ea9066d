"""The one configuration type for every supported decoder.

Families differ in fields (norm placement, (1+w) norms, QK-norm, activation, sliding
windows, RoPE variant, softcaps, embedding scale), not in code: a family file maps a
Hugging Face config onto `ModelConfig` and nothing else.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np


class NormPlacement(enum.Enum):
    """Where a block's norms sit relative to its residual branches."""

    PRE = "pre"  # Llama/Qwen/Mistral/Phi/GPT-2: x + f(norm(x))
    SANDWICH = "sandwich"  # Gemma 2/3: x + post_norm(f(pre_norm(x)))
    POST = "post"  # OLMo 2: x + post_norm(f(x))


class NormKind(enum.Enum):
    RMS = "rms"  # x · rsqrt(mean(x²)+eps) · (offset + w)
    LAYER = "layer"  # (x − mean x) · rsqrt(var x + eps) · w + b


class Activation(enum.Enum):
    SILU = "silu"
    GELU_TANH = "gelu_tanh"
    GELU = "gelu"  # exact (erf) GELU


class MLPKind(enum.Enum):
    GATED = "gated"  # down(act(gate(x)) ⊙ up(x))
    PLAIN = "plain"  # down(act(up(x))), GPT-2


class Positions(enum.Enum):
    ROPE = "rope"
    LEARNED = "learned"  # absolute position embeddings added to the input (GPT-2)


# A lazily read context length: HF's max_position_embeddings, which only some RoPE
# variants need (and only sometimes), so a config without it fails only where it matters.
ContextLength = Callable[[], int]


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding with base `theta`, unscaled: Hugging Face's rope_type "default".

    Each scaled variant below is a subclass owning its fields, how it reads them from HF's
    (standardized) `rope_parameters` (`from_hf`) and its inverse frequencies; `ROPE_TYPES`
    names them by HF's rope_type. Inverse frequencies are float64, computed on the host so
    that every dtype of the model sees the same (correctly rounded) rotation angles."""

    theta: float
    rope_type: ClassVar[str] = "default"
    # cos and sin are multiplied by this (YaRN's mscale, LongRoPE's scaling).
    attention_factor: ClassVar[float] = 1.0

    @classmethod
    def from_hf(cls, theta: float, parameters: Mapping[str, Any], context: ContextLength) -> RopeConfig:
        """The variant from HF's rope parameters (a missing one raises KeyError)."""
        return cls(theta)

    def inverse_frequencies(self, rotary_dim: int, num_tokens: int) -> np.ndarray:
        """One per rotated pair (rotary_dim / 2). `num_tokens` matters to the variants that
        depend on the input's length, as in HF (LongRoPE, dynamic NTK)."""
        return self._unscaled(rotary_dim)

    def _unscaled(self, rotary_dim: int) -> np.ndarray:
        return 1.0 / (self.theta ** _exponents(rotary_dim))


def _exponents(rotary_dim: int) -> np.ndarray:
    return np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearRope(RopeConfig):
    """Position interpolation: every frequency ÷ factor."""

    rope_type: ClassVar[str] = "linear"
    factor: float

    @classmethod
    def from_hf(cls, theta: float, parameters: Mapping[str, Any], context: ContextLength) -> RopeConfig:
        return cls(theta, factor=float(parameters["factor"]))

    def inverse_frequencies(self, rotary_dim: int, num_tokens: int) -> np.ndarray:
        return self._unscaled(rotary_dim) / self.factor


@dataclasses.dataclass(frozen=True, kw_only=True)
class Llama3Rope(RopeConfig):
    """Llama 3.1's frequency-dependent interpolation (long wavelengths slowed by `factor`,
    short ones kept, a smooth blend between)."""

    rope_type: ClassVar[str] = "llama3"
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    @classmethod
    def from_hf(cls, theta: float, parameters: Mapping[str, Any], context: ContextLength) -> RopeConfig:
        return cls(
            theta,
            factor=float(parameters["factor"]),
            low_freq_factor=float(parameters["low_freq_factor"]),
            high_freq_factor=float(parameters["high_freq_factor"]),
            original_max_position_embeddings=int(parameters["original_max_position_embeddings"]),
        )

    def inverse_frequencies(self, rotary_dim: int, num_tokens: int) -> np.ndarray:
        inv_freq = self._unscaled(rotary_dim)
        low_freq_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_freq_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        blended = (1 - smooth) * scaled / self.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(is_medium, blended, scaled)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DynamicRope(RopeConfig):
    """Dynamic NTK: the base grows with inputs longer than the context."""

    rope_type: ClassVar[str] = "dynamic"
    factor: float
    # HF's max_position_embeddings (it ignores any original_max_position_embeddings): the
    # length past which dynamic NTK starts growing the base.
    original_max_position_embeddings: int

    @classmethod
    def from_hf(cls, theta: float, parameters: Mapping[str, Any], context: ContextLength) -> RopeConfig:
        return cls(theta, factor=float(parameters["factor"]), original_max_position_embeddings=int(context()))

    def inverse_frequencies(self, rotary_dim: int, num_tokens: int) -> np.ndarray:
        return 1.0 / (self._base(rotary_dim, num_tokens) ** _exponents(rotary_dim))

    def _base(self, rotary_dim: int, num_tokens: int) -> float:
        """The base for an input of `num_tokens` tokens at positions 0..N-1, as HF computes
        it (`_compute_dynamic_ntk_parameters`, called by `dynamic_rope_update` with
        seq_len = max(position_ids) + 1 = N): the sequence length is clamped from below to
        max_position_embeddings, so inputs that fit keep the base (the scale below is then 1)
        and longer ones scale it by (factor·N/max − (factor − 1))^(d/(d−2)). The same
        operations in the same order as HF, so float64 agrees with it to rounding.

        HF's rotary module is stateful: it keeps the grown frequencies until an input
        *shorter than max_position_embeddings* resets them, so an HF model that has already
        seen a longer input uses that input's base for one of intermediate length. jaxlin is
        stateless and always gives what a freshly loaded HF model gives."""
        context = self.original_max_position_embeddings
        seq_len = max(num_tokens, context)
        return self.theta * ((self.factor * seq_len / context) - (self.factor - 1)) ** (
            rotary_dim / (rotary_dim - 2)
        )


def _factor_or_context_ratio(parameters: Mapping[str, Any], original: int, context: ContextLength) -> float:
    """YaRN's and LongRoPE's factor; HF derives a missing one from the context lengths."""
    return parameters.get("factor") or context() / original


@dataclasses.dataclass(frozen=True, kw_only=True)
class YarnRope(RopeConfig):
    """YaRN: interpolate (÷ factor) the low frequencies, keep the high ones, with a linear
    ramp between the dims that complete beta_slow and beta_fast rotations over the
    original context."""

    rope_type: ClassVar[str] = "yarn"
    factor: float
    original_max_position_embeddings: int
    attention_factor: float
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True

    @classmethod
    def from_hf(cls, theta: float, parameters: Mapping[str, Any], context: ContextLength) -> RopeConfig:
        original = int(parameters["original_max_position_embeddings"])
        factor = float(_factor_or_context_ratio(parameters, original, context))
        return cls(
            theta,
            factor=factor,
            original_max_position_embeddings=original,
            attention_factor=_yarn_attention_factor(parameters, factor),
            beta_fast=float(parameters.get("beta_fast") or 32),
            beta_slow=float(parameters.get("beta_slow") or 1),
            truncate=bool(parameters.get("truncate", True)),
        )

    def inverse_frequencies(self, rotary_dim: int, num_tokens: int) -> np.ndarray:
        inv_freq = self._unscaled(rotary_dim)

        def correction_dim(rotations: float) -> float:
            return (
                rotary_dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi))
            ) / (2 * math.log(self.theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rotary_dim - 1)
        if low == high:
            high += 0.001  # as HF: avoid a zero-width ramp
        ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        return (inv_freq / self.factor) * (1 - extrapolation) + inv_freq * extrapolation


def _yarn_attention_factor(parameters: Mapping[str, Any], factor: float) -> float:
    """YaRN's mscale, as HF computes it when the config does not give it."""
    if parameters.get("attention_factor") is not None:
        return float(parameters["attention_factor"])

    def mscale(scale: float, weight: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

    if parameters.get("mscale") and parameters.get("mscale_all_dim"):
        return mscale(factor, parameters["mscale"]) / mscale(factor, parameters["mscale_all_dim"])
    return mscale(factor)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LongRope(RopeConfig):
    """LongRoPE (Phi-3): per-frequency divisors, the long ones only for inputs longer than
    the original context (as HF picks them, by the input's length)."""

    rope_type: ClassVar[str] = "longrope"
    factor: float
    original_max_position_embeddings: int
    attention_factor: float
    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]

    @classmethod
    def from_hf(cls, theta: float, parameters: Mapping[str, Any], context: ContextLength) -> RopeConfig:
        original = int(parameters["original_max_position_embeddings"])
        factor = _factor_or_context_ratio(parameters, original, context)
        attention_factor = parameters.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return cls(
            theta,
            factor=float(factor),
            original_max_position_embeddings=original,
            attention_factor=float(attention_factor),
            short_factor=tuple(float(x) for x in parameters["short_factor"]),
            long_factor=tuple(float(x) for x in parameters["long_factor"]),
        )

    def inverse_frequencies(self, rotary_dim: int, num_tokens: int) -> np.ndarray:
        long = num_tokens > self.original_max_position_embeddings
        factors = np.asarray(self.long_factor if long else self.short_factor, dtype=np.float64)
        return self._unscaled(rotary_dim) / factors


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrequencyFactorsRope(RopeConfig):
    """llama.cpp's explicit per-frequency divisors (its `rope_freqs` tensor, how a Llama
    3.1/3.2 GGUF stores the llama3 scaling): a type HF does not have."""

    rope_type: ClassVar[str] = "frequency_factors"
    # One divisor per inverse frequency (rotary_dim / 2 of them).
    frequency_factors: tuple[float, ...]

    @classmethod
    def from_hf(cls, theta: float, parameters: Mapping[str, Any], context: ContextLength) -> RopeConfig:
        return cls(theta, frequency_factors=tuple(float(x) for x in parameters["frequency_factors"]))

    def inverse_frequencies(self, rotary_dim: int, num_tokens: int) -> np.ndarray:
        inv_freq = self._unscaled(rotary_dim)
        if len(self.frequency_factors) != len(inv_freq):
            raise ValueError(
                f"{len(self.frequency_factors)} RoPE frequency factors for {len(inv_freq)} "
                f"frequencies (rotary dim {rotary_dim})"
            )
        return inv_freq / np.asarray(self.frequency_factors, dtype=np.float64)


ROPE_TYPES: dict[str, type[RopeConfig]] = {
    variant.rope_type: variant
    for variant in (
        RopeConfig,
        LinearRope,
        Llama3Rope,
        DynamicRope,
        YarnRope,
        LongRope,
        FrequencyFactorsRope,
    )
}


def rope_to_json(rope: RopeConfig) -> dict[str, Any]:
    return {"rope_type": rope.rope_type, **{f.name: getattr(rope, f.name) for f in dataclasses.fields(rope)}}


def rope_from_json(data: Mapping[str, Any]) -> RopeConfig:
    """Inverse of `rope_to_json`; also reads entries written when every variant's fields
    were on one type (fields the variant lacks are dropped)."""
    variant = ROPE_TYPES[data.get("rope_type", "default")]
    fields = {f.name: data[f.name] for f in dataclasses.fields(variant) if f.name in data}
    return variant(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and behaviour of a decoder-only transformer (hashable: a static jit argument)."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    activation: Activation
    rope: RopeConfig
    norm_placement: NormPlacement = NormPlacement.PRE
    # Gemma's RMSNorm multiplies by (1 + w): the offset is 1 there, 0 elsewhere.
    norm_weight_offset: float = 0.0
    qk_norm: bool = False
    # QK-norm over each head (Qwen 3, Gemma 3) or over the whole projection (OLMo 2).
    qk_norm_per_head: bool = True
    norm_kind: NormKind = NormKind.RMS
    mlp_kind: MLPKind = MLPKind.GATED
    positions: Positions = Positions.ROPE
    max_positions: int | None = None  # size of the learned position table
    # Fraction of each head's dims that RoPE rotates (Phi-4-mini: 0.75); the rest pass.
    rotary_fraction: float = 1.0
    # Biases make the detached map affine; their contribution is reported separately.
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    # Gemma multiplies the looked-up embedding rows by sqrt(d); None means no scale.
    embedding_scale: float | None = None
    # Scores are q·k * attention_scale (head_dim**-0.5 unless the family says otherwise).
    attention_scale: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    tie_word_embeddings: bool = True
    # One flag per layer; sliding layers see keys with query_pos - key_pos < sliding_window.
    sliding_layers: tuple[bool, ...] = ()
    sliding_window: int | None = None
    # RoPE of the sliding layers when it differs from the global one (Gemma 3).
    rope_sliding: RopeConfig | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
            raise ValueError(
                f"sliding_layers has {len(self.sliding_layers)} entries for {self.num_layers} layers"
            )
        if any(self.sliding_layers) and not self.sliding_window:
            raise ValueError("sliding layers are configured but sliding_window is not set")

    @property
    def layer_is_sliding(self) -> tuple[bool, ...]:
        return self.sliding_layers or (False,) * self.num_layers

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction)

    @property
    def has_biases(self) -> bool:
        return self.qkv_bias or self.out_bias or self.mlp_bias or self.norm_kind is NormKind.LAYER

    @property
    def score_scale(self) -> float:
        return self.attention_scale if self.attention_scale is not None else self.head_dim**-0.5

    def to_json(self) -> dict:
        """A JSON-ready dict (enums as values, nested dataclasses as dicts)."""

        def encode(value: object) -> object:
            if isinstance(value, enum.Enum):
                return value.value
            if isinstance(value, RopeConfig):
                return encode(rope_to_json(value))
            if isinstance(value, dict):
                return {key: encode(v) for key, v in value.items()}
            if dataclasses.is_dataclass(value):
                return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
            if isinstance(value, tuple):
                return [encode(v) for v in value]
            return value

        return encode(self)  # type: ignore[return-value]

    @classmethod
    def from_json(cls, data: dict) -> ModelConfig:
        fields = dict(data)
        fields["activation"] = Activation(fields["activation"])
        fields["norm_placement"] = NormPlacement(fields["norm_placement"])
        fields["norm_kind"] = NormKind(fields.get("norm_kind", "rms"))
        fields["mlp_kind"] = MLPKind(fields.get("mlp_kind", "gated"))
        fields["positions"] = Positions(fields.get("positions", "rope"))
        fields["rope"] = rope_from_json(fields["rope"])
        if fields.get("rope_sliding") is not None:
            fields["rope_sliding"] = rope_from_json(fields["rope_sliding"])
        fields["sliding_layers"] = tuple(fields.get("sliding_layers", ()))
        return cls(**fields)
