"""Qwen 3: Llama's block plus per-head QK-norm, and optional sliding layers."""

from __future__ import annotations

from typing import Any

from jaxlin._config import ModelConfig
from jaxlin.families import _base


def config_from_hf(hf_config: Any) -> ModelConfig:
    _base.reject_if_set(hf_config, "attention_bias")
    return ModelConfig(
        family="qwen3",
        **_base.common_fields(hf_config),
        rope=_base.config_rope(hf_config),
        qk_norm=True,
        **_base.sliding(hf_config),
    )


FAMILY = _base.Family(
    name="qwen3",
    model_types=("qwen3",),
    config_from_hf=config_from_hf,
    layer_tensors={**_base.SHARED_LAYER_TENSORS, **_base.PRE_NORM_LAYER_TENSORS},
    gguf=_base.GGUFNames(
        architecture="qwen3",
        layer_tensors={**_base.GGUF_PRE_NORM_LAYER_TENSORS, **_base.GGUF_QK_NORM_TENSORS},
        # llama.cpp writes Qwen3's explicit head_dim (128 ≠ hidden/heads for Qwen3-0.6B)
        # as key_length; transformers' qwen3 mapping drops it and falls back on
        # Qwen3Config's default 128, right for every released Qwen3 but no other file.
        extra_config_keys={"attention.key_length": "head_dim"},
    ),
)
