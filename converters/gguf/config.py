"""GGUF metadata → the Hugging Face config, without torch.

The config is transformers' own GGUF metadata mapping (`GGUF_CONFIG_MAPPING`), rebuilt
here because transformers 5.x reaches it only through modules that import torch
(`integrations/gguf/reader.py`, `modeling_gguf_pytorch_utils.load_gguf_checkpoint`), and
jaxlin's runtime must not need torch. What a family's llama.cpp converter does
differently is data on the family (`Family.gguf`, a `GGUFNames`): keys transformers
misses, its own mapping where transformers has none, and the config fields to fix up.

RoPE scaling that llama.cpp's converter turns into tensors (and transformers' mapping
ignores, leaving plain RoPE) is rebuilt into the config from those tensors
(`GGUFNames.rope_tensors`: Llama 3.1/3.2's `rope_freqs`, long-context Phi-3's
`rope_factors_long/short`). What llama.cpp writes as plain metadata that transformers'
mapping drops and that is not rebuilt (linear/YaRN `rope.scaling.*`, OLMo 3's sliding
window) is warned about.

What cannot be undone, and is therefore only documented:
- llama.cpp drops a tied `lm_head.weight` (the file has no `output.weight`); the config
  then says `tie_word_embeddings=True`, exactly like an HF checkpoint of a tied model.
- Gemma 3: llama.cpp cuts the embedding to the tokenizer's length (262208 → 262144 rows
  for the 1B+ models); the config's `vocab_size` is that length, so both agree.
- Gemma 2: llama.cpp never writes `lm_head.weight` (Gemma 2 always ties it).
- The RoPE factor tensors are float32: the rebuilt factors are the HF config's rounded
  to float32 (~1e-7 relative), as in llama.cpp itself.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from converters.gguf.architectures import gguf_names
from converters.gguf.reader import GGUFError, GGUFFile, GGUFSource, parsed
from converters.gguf.tensors import check_dequantizable

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from jaxlin.families._base import GGUFNames

# Metadata llama.cpp writes that changes the forward pass but that transformers' GGUF
# config mapping ignores: the config built from the file would silently be another model.
_SEMANTIC_KEYS_HF_IGNORES: tuple[str, ...] = (
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scaling.original_context_length",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    # OLMo 3 files are "olmo2" with sliding-window layers.
    "attention.sliding_window",
)


def _config_value(value: Any) -> Any:
    # transformers' parser collapses a one-element array to its element; so must we.
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def _hf_architecture(file: GGUFFile, names: GGUFNames) -> str:
    """The architecture transformers reads the file as (its mapping's key)."""
    general_name = file.value("general.name", default=None)
    return names.model_type_by_general_name.get(general_name, names.architecture)


def _config_mapping(names: GGUFNames, hf_architecture: str) -> dict[str, Any]:
    """`{arch}.` metadata key → HF config field: transformers' mapping (or the family's
    where it has none) plus the keys it misses."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    base = names.config_mapping if names.config_mapping is not None else GGUF_CONFIG_MAPPING[hf_architecture]
    return {**base, **names.extra_config_keys}


def _fix_up(config: dict[str, Any], file: GGUFFile, names: GGUFNames) -> None:
    """The fields llama.cpp writes (or infers) that transformers' mapping drops or reads
    otherwise, as the family's GGUF names say."""
    # Gemma 2/3 27B scale attention by hidden/heads (their HF configs: query_pre_attn_scalar
    # 144 and 168), the others by head_dim (256 for every released size, transformers'
    # default). The file does not say; llama.cpp (llama-model.cpp, LLM_ARCH_GEMMA2/3)
    # recognizes 27B by its layer count and uses head_dim otherwise. So do we.
    if names.full_width_attention_scale_layers is not None:
        if config.get("num_hidden_layers") == names.full_width_attention_scale_layers:
            config["query_pre_attn_scalar"] = config["hidden_size"] // config["num_attention_heads"]
        elif "head_dim" in config:
            config["query_pre_attn_scalar"] = config["head_dim"]
    for target, source in names.copied_config_fields.items():
        if source in config:
            config[target] = config[source]
    if names.model_type is not None:
        config["model_type"] = names.model_type
    for key in names.zero_means_none:
        if config.get(key) == 0:
            config[key] = None
    if names.rotary_fraction_from_rope_dims:
        rope_dims = file.metadata.get(f"{names.architecture}.rope.dimension_count")
        if isinstance(rope_dims, int) and "hidden_size" in config and "num_attention_heads" in config:
            head_dim = config["hidden_size"] // config["num_attention_heads"]
            if rope_dims != head_dim:
                config["partial_rotary_factor"] = rope_dims / head_dim


def _config_dict(file: GGUFFile, names: GGUFNames) -> dict[str, Any]:
    """The dict transformers' legacy `load_gguf_checkpoint(..., return_tensors=False)`
    returns as "config", for the supported architectures, without torch."""
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    hf_architecture = _hf_architecture(file, names)
    tensor_names = {tensor.name for tensor in file.tensors}
    config: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in tensor_names}
    for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(hf_architecture, {}).items():
        config.setdefault(key, value)

    mapping: dict[str, Mapping[str, Any]] = {
        "general": GGUF_CONFIG_MAPPING["general"],
        "tokenizer": GGUF_CONFIG_MAPPING["tokenizer"],
        names.architecture: _config_mapping(names, hf_architecture),
    }
    for key, value in file.metadata.items():
        prefix, _, rest = key.partition(".")
        hf_key = mapping.get(prefix, {}).get(rest)
        # None and -1 are transformers' "known, deliberately not mapped".
        if hf_key is None or hf_key == -1:
            continue
        config[hf_key] = hf_architecture if key == "general.architecture" else _config_value(value)
    _fix_up(config, file, names)
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in file.metadata:
        config["vocab_size"] = len(file.metadata["tokenizer.ggml.tokens"])
    return config


def _rope_factors(file: GGUFFile, names: GGUFNames, name: str) -> list[float] | None:
    """The values of a RoPE factor tensor llama.cpp generated (None if the file has none),
    checked against the RoPE dimension count: one factor per rotated pair."""
    import gguf

    tensor = file.tensor(name)
    if tensor is None:
        return None
    check_dequantizable(tensor, file.path)
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(-1)
    rope_dims = file.metadata.get(f"{names.architecture}.rope.dimension_count")
    if isinstance(rope_dims, int) and len(values) != rope_dims // 2:
        raise GGUFError(
            f"{file.path}: tensor {name!r} has {len(values)} values, expected {rope_dims // 2} "
            f"(half the RoPE dimension count {rope_dims})"
        )
    return [float(value) for value in values]


def _rope_from_tensors(file: GGUFFile, names: GGUFNames) -> dict[str, Any] | None:
    """The rope parameters llama.cpp's converter stored as tensors (and the attention
    factor it wrote beside them); None for a file without them. rope_theta and the fields
    mapped beside them are merged in by the HF config class."""
    spec = names.rope_tensors
    if spec is None:
        return None
    factors = {tensor: _rope_factors(file, names, tensor) for tensor in spec.tensors}
    present = [tensor for tensor, values in factors.items() if values is not None]
    if not present:
        return None
    missing = [tensor for tensor in spec.tensors if tensor not in present]
    if missing:
        raise GGUFError(
            f"{file.path}: tensor {present[0]!r} without {missing[0]!r}: {spec.rope_type} needs "
            f"{' and '.join(repr(tensor) for tensor in spec.tensors)}"
        )
    parameters: dict[str, Any] = {
        "rope_type": spec.rope_type,
        **{spec.tensors[tensor]: values for tensor, values in factors.items()},
    }
    if spec.attention_factor_key is not None:
        attention_factor = file.metadata.get(f"{names.architecture}.{spec.attention_factor_key}")
        if attention_factor is not None:
            parameters["attention_factor"] = float(attention_factor)
    return parameters


def _warn_about_what_the_config_drops(file: GGUFFile, names: GGUFNames, config: PretrainedConfig) -> None:
    """One warning naming what in the file changes the model but not its HF config. The
    generated RoPE tensors are not among them: `hf_config` rebuilds the RoPE from them (and a
    `rope.scaling.type` naming the type rebuilt is then no loss either)."""
    architecture = names.architecture
    mapped = _config_mapping(names, _hf_architecture(file, names))
    rebuilt_rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type")
    keys = [
        f"{key} = {file.metadata[key]!r}"
        for rest in _SEMANTIC_KEYS_HF_IGNORES
        if (key := f"{architecture}.{rest}") in file.metadata
        and mapped.get(rest) in (None, -1)
        and not (rest == "rope.scaling.type" and file.metadata[key] == rebuilt_rope_type)
    ]
    if keys:
        warnings.warn(
            f"{file.path}: {'; '.join(keys)}: changes the model, but transformers' GGUF config mapping "
            "ignores it, so the config describes the model without it",
            stacklevel=3,
        )


def hf_config(file: GGUFFile) -> PretrainedConfig:
    """The HF config of a parsed file, without the warnings of `read_gguf_config`."""
    from transformers import AutoConfig

    names = gguf_names(file)
    config_dict = _config_dict(file, names)
    rope = _rope_from_tensors(file, names)
    if rope is not None and names.rope_tensors.known_to_transformers:
        config_dict["rope_parameters"] = rope
    model_type = config_dict.pop("model_type")
    # AutoConfig.from_pretrained(dirname, gguf_file=...) names the directory.
    config = AutoConfig.for_model(model_type, name_or_path=os.fspath(Path(file.path).parent), **config_dict)
    if rope is not None and not names.rope_tensors.known_to_transformers:
        # Set after construction: transformers would warn about a rope_type it does not know.
        config.rope_parameters = {**config.rope_parameters, **rope}
    return config


def read_gguf_config(source: GGUFSource) -> PretrainedConfig:
    """HF config for the GGUF file (a parsed `GGUFFile` or a path): what
    `AutoConfig.from_pretrained(dirname, gguf_file=basename)` builds (transformers'
    GGUF_CONFIG_MAPPING), rebuilt without torch.

    Raises GGUFError naming the architecture found and the supported ones when
    general.architecture is not in SUPPORTED_GGUF_ARCHITECTURES. Warns when the file holds
    settings that mapping drops and that are not rebuilt (linear/YaRN RoPE scaling
    metadata, OLMo 3's sliding window).
    Deliberate differences from transformers, each a field llama.cpp writes (or infers)
    and transformers drops, each data on the family (`GGUFNames`): qwen3's
    attention.key_length sets head_dim; Gemma 2/3 get query_pre_attn_scalar as llama.cpp
    computes it (hidden/heads for 27B, else head_dim); gemma2's logit soft-capping values;
    phi3's sliding_window (0 → None), original_max_position_embeddings and
    partial_rotary_factor (from rope.dimension_count); gpt2's context_length sets
    n_positions. olmo2 has no transformers mapping: ours.
    And the RoPE scaling llama.cpp stores as tensors (see the module docstring): llama's
    `rope_freqs` gives rope_parameters {"rope_type": "frequency_factors",
    "frequency_factors": [...]}, phi3's `rope_factors_long/short` and
    rope.scaling.attn_factor give HF's longrope rope_parameters.
    """
    file = parsed(source)
    config = hf_config(file)
    _warn_about_what_the_config_drops(file, gguf_names(file), config)
    return config
