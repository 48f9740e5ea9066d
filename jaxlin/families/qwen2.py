"""Qwen 2 / 2.5 and the DeepSeek-R1-Distill-Qwen models: Llama's block with q/k/v
biases (so the detached map is affine), optional sliding layers, YaRN where configured."""

from __future__ import annotations

from typing import Any

from jaxlin._config import ModelConfig
from jaxlin.families import _base


def config_from_hf(hf_config: Any) -> ModelConfig:
    return ModelConfig(
        family="qwen2",
        **_base.common_fields(hf_config),
        rope=_base.config_rope(hf_config),
        qkv_bias=True,  # HF's Qwen2Attention always has q/k/v biases, never an o_proj bias
        **_base.sliding(hf_config),
    )


FAMILY = _base.Family(
    name="qwen2",
    model_types=("qwen2",),
    config_from_hf=config_from_hf,
    layer_tensors={**_base.SHARED_LAYER_TENSORS, **_base.QKV_BIASES, **_base.PRE_NORM_LAYER_TENSORS},
    # Llama's names; the q/k/v biases' `.bias` suffix carries over unchanged.
    gguf=_base.GGUFNames(architecture="qwen2", layer_tensors=_base.GGUF_PRE_NORM_LAYER_TENSORS),
)
