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
        rope=_base.config_rope(hf_config),
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
    gguf=_base.GGUFNames(
        architecture="olmo2",
        layer_tensors={
            **{k: v for k, v in _base.GGUF_DECODER_LAYER_TENSORS.items() if k != "attn_norm"},
            **_base.GGUF_QK_NORM_TENSORS,
            # OLMo 2 normalizes after attention and MLP only (no pre-norms).
            "post_attention_norm": "post_attention_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        },
        # transformers has no GGUF config mapping for olmo2 (it cannot load such a file).
        # What llama.cpp's Olmo2Model writes (TextModel.set_gguf_parameters) → Olmo2Config.
        config_mapping={
            "context_length": "max_position_embeddings",
            "block_count": "num_hidden_layers",
            "feed_forward_length": "intermediate_size",
            "embedding_length": "hidden_size",
            "rope.dimension_count": None,
            "rope.freq_base": "rope_theta",
            "attention.head_count": "num_attention_heads",
            "attention.head_count_kv": "num_key_value_heads",
            "attention.layer_norm_rms_epsilon": "rms_norm_eps",
            "vocab_size": "vocab_size",
        },
    ),
)
