"""Llama 2/3/3.1/3.2: pre-norm blocks, SwiGLU, RoPE (incl. the "llama3" scaling, dynamic
NTK, and a GGUF's llama3 scaling as llama.cpp's per-frequency factors)."""

from __future__ import annotations

from typing import Any

from jaxlin._config import ModelConfig
from jaxlin.families import _base


def config_from_hf(hf_config: Any) -> ModelConfig:
    return ModelConfig(
        family="llama",
        **_base.common_fields(hf_config),
        # Some Llama-architecture checkpoints carry biases: attention_bias on q/k/v/o.
        qkv_bias=bool(getattr(hf_config, "attention_bias", False)),
        out_bias=bool(getattr(hf_config, "attention_bias", False)),
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        rope=_base.rope(_base.field(hf_config, "rope_parameters"), hf_config=hf_config),
    )


FAMILY = _base.Family(
    name="llama",
    model_types=("llama",),
    config_from_hf=config_from_hf,
    layer_tensors={**_base.SHARED_LAYER_TENSORS, **_base.LINEAR_BIASES, **_base.PRE_NORM_LAYER_TENSORS},
)
