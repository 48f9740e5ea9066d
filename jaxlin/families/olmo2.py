"""OLMo 2: post-norm blocks (x + norm(f(x)), no input norm) and QK-norm over the whole
q/k projection width rather than per head."""

from __future__ import annotations

from typing import Any

from jaxlin._config import ModelConfig, NormPlacement
from jaxlin.families import _base


def config_from_hf(hf_config: Any) -> ModelConfig:
    _base.reject_if_set(hf_config, "attention_bias")
    return ModelConfig(
        family="olmo2",
        **_base.common_fields(hf_config),
        rope=_base.rope(_base.field(hf_config, "rope_parameters"), hf_config=hf_config),
        norm_placement=NormPlacement.POST,
        qk_norm=True,
        qk_norm_per_head=False,
    )


FAMILY = _base.Family(
    name="olmo2",
    model_types=("olmo2",),
    config_from_hf=config_from_hf,
    layer_tensors={
        **_base.SHARED_LAYER_TENSORS,
        "post_attention_layernorm.weight": ((("post_attn_norm", "scale"), _base.as_is),),
        "post_feedforward_layernorm.weight": ((("post_mlp_norm", "scale"), _base.as_is),),
    },
)
