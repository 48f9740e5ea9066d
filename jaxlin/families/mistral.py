"""Mistral / Ministral: Llama's block with a sliding window — on every layer when
`sliding_window` is set (Mistral), or per `layer_types` (Ministral)."""

from __future__ import annotations

from typing import Any

from jaxlin._config import ModelConfig
from jaxlin.families import _base


def config_from_hf(hf_config: Any) -> ModelConfig:
    window = getattr(hf_config, "sliding_window", None)
    sliding = _base.sliding_layers(hf_config, every_layer_if_windowed=True)
    return ModelConfig(
        family="mistral",
        **_base.common_fields(hf_config),
        # Some Llama-architecture checkpoints carry biases: attention_bias on q/k/v/o.
        qkv_bias=bool(getattr(hf_config, "attention_bias", False)),
        out_bias=bool(getattr(hf_config, "attention_bias", False)),
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        rope=_base.rope(_base.field(hf_config, "rope_parameters"), hf_config=hf_config),
        sliding_layers=sliding,
        sliding_window=int(window) if sliding else None,
    )


FAMILY = _base.Family(
    name="mistral",
    model_types=("mistral", "ministral"),
    config_from_hf=config_from_hf,
    layer_tensors={**_base.SHARED_LAYER_TENSORS, **_base.LINEAR_BIASES, **_base.PRE_NORM_LAYER_TENSORS},
)
