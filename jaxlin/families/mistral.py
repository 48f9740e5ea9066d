"""Mistral / Ministral: Llama's block with a sliding window — on every layer when
`sliding_window` is set (Mistral), or per `layer_types` (Ministral)."""

from __future__ import annotations

from typing import Any

from jaxlin._config import ModelConfig
from jaxlin.families import _base


def config_from_hf(hf_config: Any) -> ModelConfig:
    return ModelConfig(
        family="mistral",
        **_base.common_fields(hf_config),
        **_base.linear_biases(hf_config),
        rope=_base.config_rope(hf_config),
        **_base.sliding(hf_config, every_layer_if_windowed=True),
    )


FAMILY = _base.Family(
    name="mistral",
    model_types=("mistral", "ministral"),
    config_from_hf=config_from_hf,
    layer_tensors={**_base.SHARED_LAYER_TENSORS, **_base.LINEAR_BIASES, **_base.PRE_NORM_LAYER_TENSORS},
)
