"""The one configuration type for every supported decoder.

Families differ in fields (norm placement, (1+w) norms, QK-norm, activation, sliding
windows, RoPE variant, softcaps, embedding scale), not in code: a family file maps a
Hugging Face config onto `ModelConfig` and nothing else.
"""

from __future__ import annotations

import dataclasses
import enum
import math

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


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type, as Hugging Face's `rope_parameters` define it,
    plus "frequency_factors": llama.cpp's explicit per-frequency divisors (its `rope_freqs`
    tensor, how a Llama 3.1/3.2 GGUF stores the llama3 scaling), a type HF does not have."""

    theta: float
    # default | linear | llama3 | dynamic | yarn | longrope | frequency_factors
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # The pretraining context. For "dynamic" it is HF's max_position_embeddings, the
    # length past which dynamic NTK starts growing the base.
    original_max_position_embeddings: int = 8192
    # cos and sin are multiplied by this (YaRN's mscale, LongRoPE's scaling).
    attention_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    # One divisor per inverse frequency (rotary_dim / 2 of them), for "frequency_factors".
    frequency_factors: tuple[float, ...] = ()

    def inverse_frequencies(self, rotary_dim: int, num_tokens: int) -> np.ndarray:
        """Inverse frequencies in float64, computed on the host so that every dtype
        of the model sees the same (correctly rounded) rotation angles. Two variants
        depend on the input's length, as in HF: LongRoPE picks its long factors only for
        inputs longer than the original context, dynamic NTK grows its base with it."""
        exponents = np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim
        if self.rope_type == "dynamic":
            return 1.0 / (_dynamic_ntk_base(rotary_dim, num_tokens, self) ** exponents)
        inv_freq = 1.0 / (self.theta**exponents)
        if self.rope_type == "default":
            return inv_freq
        if self.rope_type == "linear":
            return inv_freq / self.factor
        if self.rope_type == "llama3":
            return _llama3_scaled(inv_freq, self)
        if self.rope_type == "yarn":
            return _yarn_scaled(inv_freq, rotary_dim, self)
        if self.rope_type == "longrope":
            long = num_tokens > self.original_max_position_embeddings
            return inv_freq / np.asarray(self.long_factor if long else self.short_factor, dtype=np.float64)
        if self.rope_type == "frequency_factors":
            if len(self.frequency_factors) != len(inv_freq):
                raise ValueError(
                    f"{len(self.frequency_factors)} RoPE frequency factors for {len(inv_freq)} "
                    f"frequencies (rotary dim {rotary_dim})"
                )
            return inv_freq / np.asarray(self.frequency_factors, dtype=np.float64)
        raise ValueError(f"unsupported rope_type {self.rope_type!r}")


def _dynamic_ntk_base(rotary_dim: int, num_tokens: int, rope: RopeConfig) -> float:
    """Dynamic NTK's base for an input of `num_tokens` tokens at positions 0..N-1, as HF
    computes it (`_compute_dynamic_ntk_parameters`, called by `dynamic_rope_update` with
    seq_len = max(position_ids) + 1 = N): the sequence length is clamped from below to
    max_position_embeddings, so inputs that fit keep the base (the scale below is then 1)
    and longer ones scale it by (factor·N/max − (factor − 1))^(d/(d−2)). The same
    operations in the same order as HF, so float64 agrees with it to rounding.

    HF's rotary module is stateful: it keeps the grown frequencies until an input
    *shorter than max_position_embeddings* resets them, so an HF model that has already
    seen a longer input uses that input's base for one of intermediate length. jaxlin is
    stateless and always gives what a freshly loaded HF model gives."""
    context = rope.original_max_position_embeddings
    seq_len = max(num_tokens, context)
    return rope.theta * ((rope.factor * seq_len / context) - (rope.factor - 1)) ** (
        rotary_dim / (rotary_dim - 2)
    )


def _yarn_scaled(inv_freq: np.ndarray, rotary_dim: int, rope: RopeConfig) -> np.ndarray:
    """YaRN: interpolate (÷ factor) the low frequencies, keep the high ones, with a linear
    ramp between the dims that complete beta_slow and beta_fast rotations over the
    original context."""

    def correction_dim(rotations: float) -> float:
        return (rotary_dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
            2 * math.log(rope.theta)
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # as HF: avoid a zero-width ramp
    ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    return (inv_freq / rope.factor) * (1 - extrapolation) + inv_freq * extrapolation


def _llama3_scaled(inv_freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
    """Llama 3.1's frequency-dependent interpolation (long wavelengths slowed by
    `factor`, short ones kept, a smooth blend between)."""
    low_freq_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_freq_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, blended, scaled)


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

        def rope(data: dict) -> RopeConfig:
            data = dict(data)
            data["short_factor"] = tuple(data.get("short_factor", ()))
            data["long_factor"] = tuple(data.get("long_factor", ()))
            data["frequency_factors"] = tuple(data.get("frequency_factors", ()))
            return RopeConfig(**data)

        fields["rope"] = rope(fields["rope"])
        if fields.get("rope_sliding") is not None:
            fields["rope_sliding"] = rope(fields["rope_sliding"])
        fields["sliding_layers"] = tuple(fields.get("sliding_layers", ()))
        return cls(**fields)
