"""What every family shares: the registry, HF-config reading helpers and the tensor
name table of the llama-like block."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxlin._config import ROPE_TYPES, Activation, ModelConfig, RopeConfig
from jaxlin.errors import JaxlinError


class UnsupportedArchitectureError(JaxlinError):
    pass


class ConfigFieldError(JaxlinError):
    pass


Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]
# One checkpoint tensor feeds one or more params (fused projections feed several).
Targets = tuple[tuple[tuple[str, ...], Transform], ...]


def linear(array: np.ndarray, config: ModelConfig) -> np.ndarray:
    """HF nn.Linear stores (out, in); Flax kernels are (in, out)."""
    return array.T


def as_is(array: np.ndarray, config: ModelConfig) -> np.ndarray:
    return array


def part(
    index: int, sizes: Callable[[ModelConfig], tuple[int, ...]], axis: int, then: Transform
) -> Transform:
    """The index-th slice along `axis` of a fused tensor whose parts have `sizes(config)`."""

    def transform(array: np.ndarray, config: ModelConfig) -> np.ndarray:
        bounds = np.cumsum((0, *sizes(config)))
        if bounds[-1] != array.shape[axis]:
            return array  # let the shape check name the tensor and both shapes
        sliced = np.take(array, np.arange(bounds[index], bounds[index + 1]), axis=axis)
        return then(sliced, config)

    return transform


def qkv_sizes(config: ModelConfig) -> tuple[int, int, int]:
    kv = config.num_kv_heads * config.head_dim
    return (config.num_heads * config.head_dim, kv, kv)


def linear_params(name: str, *path: str) -> dict[str, Targets]:
    return {f"{name}.weight": (((*path, "kernel"), linear),)}


SHARED_LAYER_TENSORS: dict[str, Targets] = {
    **linear_params("self_attn.q_proj", "attn", "q_proj"),
    **linear_params("self_attn.k_proj", "attn", "k_proj"),
    **linear_params("self_attn.v_proj", "attn", "v_proj"),
    **linear_params("self_attn.o_proj", "attn", "o_proj"),
    "self_attn.q_norm.weight": ((("attn", "q_norm", "scale"), as_is),),
    "self_attn.k_norm.weight": ((("attn", "k_norm", "scale"), as_is),),
    **linear_params("mlp.gate_proj", "mlp", "gate_proj"),
    **linear_params("mlp.up_proj", "mlp", "up_proj"),
    **linear_params("mlp.down_proj", "mlp", "down_proj"),
}

QKV_BIASES: dict[str, Targets] = {
    f"self_attn.{p}_proj.bias": ((("attn", f"{p}_proj", "bias"), as_is),) for p in "qkv"
}

# Optional biases of the llama-like block (only read when the config enables them).
LINEAR_BIASES: dict[str, Targets] = {
    **QKV_BIASES,
    "self_attn.o_proj.bias": ((("attn", "o_proj", "bias"), as_is),),
    **{f"mlp.{p}_proj.bias": ((("mlp", f"{p}_proj", "bias"), as_is),) for p in ("gate", "up", "down")},
}

# Llama-style blocks: HF's "post_attention_layernorm" is the norm *before* the MLP.
PRE_NORM_LAYER_TENSORS: dict[str, Targets] = {
    "input_layernorm.weight": ((("input_norm", "scale"), as_is),),
    "post_attention_layernorm.weight": ((("pre_mlp_norm", "scale"), as_is),),
}

# Gemma 2/3: four norms per layer.
SANDWICH_NORM_LAYER_TENSORS: dict[str, Targets] = {
    "input_layernorm.weight": ((("input_norm", "scale"), as_is),),
    "post_attention_layernorm.weight": ((("post_attn_norm", "scale"), as_is),),
    "pre_feedforward_layernorm.weight": ((("pre_mlp_norm", "scale"), as_is),),
    "post_feedforward_layernorm.weight": ((("post_mlp_norm", "scale"), as_is),),
}

GLOBAL_TENSORS: dict[str, Targets] = {
    "model.embed_tokens.weight": ((("embedder", "embedding"), as_is),),
    "model.norm.weight": ((("final_norm", "scale"), as_is),),
    "lm_head.weight": ((("lm_head", "kernel"), linear),),
}


# --------------------------------------------------------------------------- GGUF names
#
# How llama.cpp's converter (convert_hf_to_gguf.py) writes a family, as data that
# `converters.gguf` reads. Names are checked against gguf's own HF → GGUF TensorNameMap in
# tests/test_gguf.py.

# llama.cpp's names outside the layers (before `.weight`/`.bias`) → HF's, llama-like block.
GGUF_GLOBAL_TENSORS: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    # Absent when llama.cpp tied it to token_embd (then no lm_head, like a tied HF checkpoint).
    "output": "lm_head",
}

# llama.cpp's per-layer leaf (between `blk.{i}.` and `.weight`/`.bias`) → HF's (inside the
# family's layer_prefix): the llama-like block.
GGUF_DECODER_LAYER_TENSORS: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Llama-style blocks: HF's post_attention_layernorm is the norm *before* the MLP: llama.cpp's ffn_norm.
GGUF_PRE_NORM_LAYER_TENSORS: dict[str, str] = {
    **GGUF_DECODER_LAYER_TENSORS,
    "ffn_norm": "post_attention_layernorm",
}
GGUF_QK_NORM_TENSORS: dict[str, str] = {
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
# Gemma 2/3: four norms per layer. llama.cpp's ffn_norm is HF's pre_feedforward_layernorm
# here, not post_attention_layernorm as for Llama.
GGUF_SANDWICH_LAYER_TENSORS: dict[str, str] = {
    **GGUF_DECODER_LAYER_TENSORS,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


@dataclasses.dataclass(frozen=True)
class GGUFRopeTensors:
    """RoPE scaling llama.cpp's converter writes as tensors (gguf's MODEL_TENSOR.ROPE_FREQS,
    ROPE_FACTORS_LONG/SHORT), not metadata: rebuilt into HF's rope_parameters. No HF
    parameter holds them, so they are not in the state dict."""

    rope_type: str
    # GGUF tensor name → the rope parameter its values become (one per rotated pair).
    tensors: Mapping[str, str]
    # Metadata key (after `{arch}.`) with the attention factor, where the converter writes one.
    attention_factor_key: str | None = None
    # A rope_type transformers does not know is set after the HF config is built (building
    # with it would warn), so transformers refuses to build a model from it rather than
    # silently using plain RoPE.
    known_to_transformers: bool = True


@dataclasses.dataclass(frozen=True)
class GGUFNames:
    """Everything llama.cpp's converter does differently from HF for one family."""

    architecture: str  # general.architecture
    layer_tensors: Mapping[str, str]  # llama.cpp leaf → HF name inside the family's layer_prefix
    global_tensors: Mapping[str, str] = dataclasses.field(default_factory=lambda: GGUF_GLOBAL_TENSORS)
    # llama.cpp stores every `*norm.weight` as `w + norm_offset` (Gemma's RMSNorm scales
    # by `1 + w`; llama.cpp's kernel scales by the stored value).
    norm_offset: float = 0.0
    # llama.cpp's LlamaModel.permute reorders q/k rows per head from HF's rotate-half
    # pairing (i, i + d/2) to its interleaved pairing (2i, 2i + 1).
    unpermute_qk: bool = False
    # Leaves whose `.weight` llama.cpp stores transposed: GPT-2's Conv1D keeps (in, out),
    # llama.cpp writes every matrix as nn.Linear's (out, in).
    transposed: frozenset[str] = frozenset()
    rope_tensors: GGUFRopeTensors | None = None
    # Metadata keys (after `{arch}.`) transformers' GGUF_CONFIG_MAPPING misses although the
    # HF config has the field: applied on top of transformers' mapping.
    extra_config_keys: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Our own metadata mapping, for an architecture transformers' GGUF_CONFIG_MAPPING lacks.
    config_mapping: Mapping[str, str | None] | None = None
    # HF model_type when it is not the architecture's name.
    model_type: str | None = None
    # transformers' model_type by exact general.name (its quirk, kept for parity).
    model_type_by_general_name: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # HF config field → the mapped field whose value it takes.
    copied_config_fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Config fields where llama.cpp writes 0 for HF's None.
    zero_means_none: tuple[str, ...] = ()
    # partial_rotary_factor from rope.dimension_count, which transformers' mapping drops.
    rotary_fraction_from_rope_dims: bool = False
    # Gemma: the layer count by which llama.cpp recognizes the 27B model, which scales
    # attention by hidden/heads (the others by head_dim); the file does not say.
    full_width_attention_scale_layers: int | None = None


@dataclasses.dataclass(frozen=True)
class Family:
    """A family: which HF model types it reads, how their config maps onto ModelConfig,
    which checkpoint tensors feed which params (names inside `layer_prefix`), and how
    llama.cpp names it in a GGUF file (None: no GGUF architecture of its own)."""

    name: str
    model_types: tuple[str, ...]
    config_from_hf: Callable[[Any], ModelConfig]
    layer_tensors: Mapping[str, Targets]
    global_tensors: Mapping[str, Targets] = dataclasses.field(default_factory=lambda: GLOBAL_TENSORS)
    layer_prefix: str = "model.layers.{layer}."
    gguf: GGUFNames | None = None


def family_for_hf_config(hf_config: Any) -> Family:
    from jaxlin.families import FAMILIES

    model_type = getattr(hf_config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} is not supported; supported model types: {supported}"
    )


def field(hf_config: Any, name: str, default: Any = ...) -> Any:
    value = getattr(hf_config, name, default)
    if value is ...:
        raise ConfigFieldError(f"config field {name!r} is missing ({type(hf_config).__name__})")
    return value


def reject_if_set(hf_config: Any, *names: str) -> None:
    """Fail loudly on features this family file does not implement (yet)."""
    for name in names:
        if getattr(hf_config, name, None):
            raise ConfigFieldError(
                f"config field {name!r}={getattr(hf_config, name)!r} is not supported for "
                f"model_type {hf_config.model_type!r}"
            )


_ACTIVATIONS = {
    "silu": Activation.SILU,
    "swish": Activation.SILU,
    "gelu_pytorch_tanh": Activation.GELU_TANH,
    "gelu_tanh": Activation.GELU_TANH,
}


def activation(hf_config: Any) -> Activation:
    name = getattr(hf_config, "hidden_activation", None) or field(hf_config, "hidden_act")
    if name not in _ACTIVATIONS:
        raise ConfigFieldError(
            f"config field 'hidden_act'={name!r} is not supported; supported: {sorted(_ACTIVATIONS)}"
        )
    return _ACTIVATIONS[name]


def rope(
    parameters: Mapping[str, Any] | None, field_name: str = "rope_parameters", hf_config: Any = None
) -> RopeConfig:
    """The RoPE variant HF's (standardized) rope parameters dict names, or the
    "frequency_factors" dict `converters.gguf` builds from llama.cpp's `rope_freqs`."""
    if not parameters or "rope_theta" not in parameters:
        raise ConfigFieldError(f"config field {field_name!r} has no rope_theta: {parameters!r}")
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigFieldError(
            f"config field {field_name!r}: rope_type {rope_type!r} is not supported "
            f"(supported: {', '.join(ROPE_TYPES)})"
        )
    try:
        return ROPE_TYPES[rope_type].from_hf(
            float(parameters["rope_theta"]),
            parameters,
            context=lambda: field(hf_config, "max_position_embeddings"),
        )
    except KeyError as missing:
        raise ConfigFieldError(f"config field {field_name!r} ({rope_type}) lacks {missing}") from None


def config_rope(hf_config: Any) -> RopeConfig:
    """The RoPE of a config with one `rope_parameters` dict for every layer."""
    return rope(field(hf_config, "rope_parameters"), hf_config=hf_config)


def rotary_fraction(parameters: Mapping[str, Any] | None, hf_config: Any) -> float:
    """Partial rotary: in rope_parameters (transformers 5) or on the config itself."""
    value = (parameters or {}).get("partial_rotary_factor") or getattr(
        hf_config, "partial_rotary_factor", None
    )
    return float(value or 1.0)


def head_dim(hf_config: Any) -> int:
    explicit = getattr(hf_config, "head_dim", None)
    return (
        int(explicit)
        if explicit
        else field(hf_config, "hidden_size") // field(hf_config, "num_attention_heads")
    )


def common_fields(hf_config: Any) -> dict[str, Any]:
    """The ModelConfig fields every llama-like HF config spells the same way."""
    return dict(
        vocab_size=int(field(hf_config, "vocab_size")),
        hidden_size=int(field(hf_config, "hidden_size")),
        num_layers=int(field(hf_config, "num_hidden_layers")),
        num_heads=int(field(hf_config, "num_attention_heads")),
        num_kv_heads=int(field(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads),
        head_dim=head_dim(hf_config),
        intermediate_size=int(field(hf_config, "intermediate_size")),
        norm_eps=float(field(hf_config, "rms_norm_eps")),
        activation=activation(hf_config),
        tie_word_embeddings=bool(field(hf_config, "tie_word_embeddings", False)),
    )


def linear_biases(hf_config: Any) -> dict[str, bool]:
    """The ModelConfig bias flags of a Llama-architecture config: some checkpoints carry
    biases, `attention_bias` on q/k/v/o and `mlp_bias` on the MLP."""
    attention = bool(getattr(hf_config, "attention_bias", False))
    return dict(qkv_bias=attention, out_bias=attention, mlp_bias=bool(getattr(hf_config, "mlp_bias", False)))


def sliding(hf_config: Any, every_layer_if_windowed: bool = False) -> dict[str, Any]:
    """The ModelConfig fields `sliding_layers` and `sliding_window` (None without sliding layers)."""
    layers = sliding_layers(hf_config, every_layer_if_windowed)
    window = int(field(hf_config, "sliding_window")) if layers else None
    return dict(sliding_layers=layers, sliding_window=window)


def sliding_layers(hf_config: Any, every_layer_if_windowed: bool = False) -> tuple[bool, ...]:
    """Per-layer sliding flags from HF's `layer_types` (absent or all global → ()).
    Mistral and Phi-3 configs without `layer_types` slide on every layer when
    `sliding_window` is set (`every_layer_if_windowed`), as HF does."""
    layer_types = getattr(hf_config, "layer_types", None) or ()
    if not layer_types and every_layer_if_windowed and getattr(hf_config, "sliding_window", None):
        return (True,) * int(field(hf_config, "num_hidden_layers"))
    unknown = set(layer_types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ConfigFieldError(f"config field 'layer_types' has unsupported entries {sorted(unknown)}")
    flags = tuple(t == "sliding_attention" for t in layer_types)
    return flags if any(flags) else ()
