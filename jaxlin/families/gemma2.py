"""Gemma 2: Gemma's (1+w) sandwich norms and √d embedding scale, alternating sliding and
global layers (one RoPE base), and both softcaps — on the attention scores (inside the
frozen softmax) and on the final logits (outside the map)."""

from __future__ import annotations

import math
from typing import Any

from jaxlin._config import ModelConfig, NormPlacement
from jaxlin.families import _base


def config_from_hf(hf_config: Any) -> ModelConfig:
    _base.reject_if_set(hf_config, "attention_bias")
    return ModelConfig(
        family="gemma2",
        **_base.common_fields(hf_config),
        rope=_base.config_rope(hf_config),
        norm_placement=NormPlacement.SANDWICH,
        norm_weight_offset=1.0,
        embedding_scale=math.sqrt(hf_config.hidden_size),
        attention_scale=float(_base.field(hf_config, "query_pre_attn_scalar")) ** -0.5,
        attn_logit_softcap=getattr(hf_config, "attn_logit_softcapping", None),
        final_logit_softcap=getattr(hf_config, "final_logit_softcapping", None),
        **_base.sliding(hf_config),
    )


FAMILY = _base.Family(
    name="gemma2",
    model_types=("gemma2",),
    config_from_hf=config_from_hf,
    layer_tensors={**_base.SHARED_LAYER_TENSORS, **_base.SANDWICH_NORM_LAYER_TENSORS},
    gguf=_base.GGUFNames(
        architecture="gemma2",
        layer_tensors=_base.GGUF_SANDWICH_LAYER_TENSORS,
        # llama.cpp's Gemma2Model skips lm_head.weight: the output is always the embedding.
        global_tensors={k: v for k, v in _base.GGUF_GLOBAL_TENSORS.items() if k != "output"},
        norm_offset=1.0,
        # Written by llama.cpp's Gemma2Model, used by its graph; transformers' gemma2
        # mapping drops them and keeps Gemma2Config's defaults (50, 30).
        extra_config_keys={
            "attn_logit_softcapping": "attn_logit_softcapping",
            "final_logit_softcapping": "final_logit_softcapping",
        },
        # HF's 27B config: query_pre_attn_scalar 144 = hidden/heads.
        full_width_attention_scale_layers=46,
    ),
)
