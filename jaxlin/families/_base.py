"""What every family shares: the registry, HF-config reading helpers and the tensor
name table of the llama-like block."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxlin._config import Activation, ModelConfig, RopeConfig
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


@dataclasses.dataclass(frozen=True)
class Family:
    """A family: which HF model types it reads, how their config maps onto ModelConfig,
    and which checkpoint tensors feed which params (names inside `layer_prefix`)."""

    name: str
    model_types: tuple[str, ...]
    config_from_hf: Callable[[Any], ModelConfig]
    layer_tensors: Mapping[str, Targets]
    global_tensors: Mapping[str, Targets] = dataclasses.field(default_factory=lambda: GLOBAL_TENSORS)
    layer_prefix: str = "model.layers.{layer}."


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
    """One RopeConfig from HF's (standardized) rope parameters dict, or from the
    "frequency_factors" dict `converters.gguf` builds from llama.cpp's `rope_freqs`."""
    if not parameters or "rope_theta" not in parameters:
        raise ConfigFieldError(f"config field {field_name!r} has no rope_theta: {parameters!r}")
    theta = float(parameters["rope_theta"])
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    try:
        if rope_type == "default":
            return RopeConfig(theta)
        if rope_type == "linear":
            return RopeConfig(theta, "linear", factor=float(parameters["factor"]))
        if rope_type == "llama3":
            return RopeConfig(
                theta,
                "llama3",
                factor=float(parameters["factor"]),
                low_freq_factor=float(parameters["low_freq_factor"]),
                high_freq_factor=float(parameters["high_freq_factor"]),
                original_max_position_embeddings=int(parameters["original_max_position_embeddings"]),
            )
        if rope_type == "dynamic":
            # HF's dynamic NTK grows the base past config.max_position_embeddings (it
            # ignores any original_max_position_embeddings): that is the context kept here.
            return RopeConfig(
                theta,
                "dynamic",
                factor=float(parameters["factor"]),
                original_max_position_embeddings=int(field(hf_config, "max_position_embeddings")),
            )
        if rope_type == "frequency_factors":
            return RopeConfig(
                theta,
                "frequency_factors",
                frequency_factors=tuple(float(x) for x in parameters["frequency_factors"]),
            )
        original = int(parameters["original_max_position_embeddings"])
        factor = parameters.get("factor") or field(hf_config, "max_position_embeddings") / original
        if rope_type == "yarn":
            return RopeConfig(
                theta,
                "yarn",
                factor=float(factor),
                original_max_position_embeddings=original,
                attention_factor=_yarn_attention_factor(parameters, float(factor)),
                beta_fast=float(parameters.get("beta_fast") or 32),
                beta_slow=float(parameters.get("beta_slow") or 1),
                truncate=bool(parameters.get("truncate", True)),
            )
        if rope_type == "longrope":
            attention_factor = parameters.get("attention_factor")
            if attention_factor is None:
                attention_factor = (
                    1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
                )
            return RopeConfig(
                theta,
                "longrope",
                factor=float(factor),
                original_max_position_embeddings=original,
                attention_factor=float(attention_factor),
                short_factor=tuple(float(x) for x in parameters["short_factor"]),
                long_factor=tuple(float(x) for x in parameters["long_factor"]),
            )
    except KeyError as missing:
        raise ConfigFieldError(f"config field {field_name!r} ({rope_type}) lacks {missing}") from None
    raise ConfigFieldError(
        f"config field {field_name!r}: rope_type {rope_type!r} is not supported "
        "(supported: default, linear, llama3, dynamic, yarn, longrope, frequency_factors)"
    )


def _yarn_attention_factor(parameters: Mapping[str, Any], factor: float) -> float:
    """YaRN's mscale, as HF computes it when the config does not give it."""
    if parameters.get("attention_factor") is not None:
        return float(parameters["attention_factor"])

    def mscale(scale: float, weight: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

    if parameters.get("mscale") and parameters.get("mscale_all_dim"):
        return mscale(factor, parameters["mscale"]) / mscale(factor, parameters["mscale_all_dim"])
    return mscale(factor)


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
