"""Qwen 3: Llama's block plus per-head QK-norm, and optional sliding layers."""

from __future__ import annotations

from typing import Any

from jaxlin._config import ModelConfig
from jaxlin.families import _base


def config_from_hf(hf_config: Any) -> ModelConfig:
    _base.reject_if_set(hf_config, "attention_bias")
    sliding = _base.sliding_layers(hf_config)
    return ModelConfig(
        family="qwen3",
        **_base.common_fields(hf_config),
        rope=_base.rope(_base.field(hf_config, "rope_parameters"), hf_config=hf_config),
        qk_norm=True,
        sliding_layers=sliding,
        sliding_window=int(hf_config.sliding_window) if sliding else None,
    )


FAMILY = _base.Family(
    name="qwen3",
    model_types=("qwen3",),
    config_from_hf=config_from_hf,
    layer_tensors={**_base.SHARED_LAYER_TENSORS, **_base.PRE_NORM_LAYER_TENSORS},
)
