"""Gemma 3 (text): (1+w) RMSNorms, four norms per layer (sandwich), sqrt(d) embedding
scale, gelu-tanh GeGLU, query_pre_attn_scalar, QK-norm, sliding-window layers with
their own RoPE base, optional final-logit softcap."""

from __future__ import annotations

import math
from typing import Any

from jaxlin._config import ModelConfig, NormPlacement
from jaxlin.families import _base


def config_from_hf(hf_config: Any) -> ModelConfig:
    # The multimodal Gemma 3 config wraps the text model's config.
    hf_config = getattr(hf_config, "text_config", None) or hf_config
    _base.reject_if_set(hf_config, "attention_bias", "use_bidirectional_attention")
    rope_parameters = _base.field(hf_config, "rope_parameters")
    sliding = _base.sliding(hf_config)
    return ModelConfig(
        family="gemma3",
        **_base.common_fields(hf_config),
        rope=_base.rope(rope_parameters["full_attention"], "rope_parameters.full_attention", hf_config),
        rope_sliding=(
            _base.rope(rope_parameters["sliding_attention"], "rope_parameters.sliding_attention", hf_config)
            if sliding["sliding_layers"]
            else None
        ),
        norm_placement=NormPlacement.SANDWICH,
        norm_weight_offset=1.0,
        qk_norm=True,
        embedding_scale=math.sqrt(hf_config.hidden_size),
        attention_scale=float(_base.field(hf_config, "query_pre_attn_scalar")) ** -0.5,
        # HF's Gemma 3 attention accepts attn_logit_softcapping but never applies it (and
        # released Gemma 3 configs set it to None); follow the reference. Gemma 2 applies it.
        attn_logit_softcap=None,
        final_logit_softcap=getattr(hf_config, "final_logit_softcapping", None),
        **sliding,
    )


FAMILY = _base.Family(
    name="gemma3",
    model_types=("gemma3_text", "gemma3"),
    config_from_hf=config_from_hf,
    layer_tensors={**_base.SHARED_LAYER_TENSORS, **_base.SANDWICH_NORM_LAYER_TENSORS},
    gguf=_base.GGUFNames(
        architecture="gemma3",
        layer_tensors={**_base.GGUF_SANDWICH_LAYER_TENSORS, **_base.GGUF_QK_NORM_TENSORS},
        norm_offset=1.0,
        # GGUF's gemma3 is the text model only: HF's text-only config class.
        model_type="gemma3_text",
        # HF's 27B config: query_pre_attn_scalar 168 = hidden/heads.
        full_width_attention_scale_layers=62,
    ),
)
