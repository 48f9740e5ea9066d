"""Phi-3 / Phi-4 / Phi-4-mini: Llama's block with fused qkv_proj and gate_up_proj
(split on conversion: gate is the first half, the frozen branch), partial rotary
(Phi-4-mini) and LongRoPE scaling (short or long factors by input length, as HF)."""

from __future__ import annotations

from typing import Any

from jaxlin._config import ModelConfig
from jaxlin.families import _base


def config_from_hf(hf_config: Any) -> ModelConfig:
    _base.reject_if_set(hf_config, "attention_bias")
    parameters = _base.field(hf_config, "rope_parameters")
    return ModelConfig(
        family="phi3",
        **_base.common_fields(hf_config),
        rope=_base.rope(parameters, hf_config=hf_config),
        rotary_fraction=_base.rotary_fraction(parameters, hf_config),
        **_base.sliding(hf_config, every_layer_if_windowed=True),
    )


def _gate_up_sizes(config: ModelConfig) -> tuple[int, int]:
    return (config.intermediate_size, config.intermediate_size)


_QKV = "self_attn.qkv_proj.weight"
_GATE_UP = "mlp.gate_up_proj.weight"

FAMILY = _base.Family(
    name="phi3",
    model_types=("phi3",),
    config_from_hf=config_from_hf,
    layer_tensors={
        _QKV: tuple(
            (("attn", f"{name}_proj", "kernel"), _base.part(i, _base.qkv_sizes, 0, _base.linear))
            for i, name in enumerate("qkv")
        ),
        **_base.linear_params("self_attn.o_proj", "attn", "o_proj"),
        _GATE_UP: (
            (("mlp", "gate_proj", "kernel"), _base.part(0, _gate_up_sizes, 0, _base.linear)),
            (("mlp", "up_proj", "kernel"), _base.part(1, _gate_up_sizes, 0, _base.linear)),
        ),
        **_base.linear_params("mlp.down_proj", "mlp", "down_proj"),
        **_base.PRE_NORM_LAYER_TENSORS,
    },
    gguf=_base.GGUFNames(
        architecture="phi3",
        # Llama's names, but HF's fused tensors stay fused: qkv_proj (rows q, k, v) as attn_qkv
        # and gate_up_proj (rows gate, up) as ffn_up; llama.cpp splits both at run time in the
        # same order.
        layer_tensors={
            **{
                leaf: hf_name
                for leaf, hf_name in _base.GGUF_PRE_NORM_LAYER_TENSORS.items()
                if leaf not in ("attn_q", "attn_k", "attn_v", "ffn_gate")
            },
            "attn_qkv": "self_attn.qkv_proj",
            "ffn_up": "mlp.gate_up_proj",
        },
        # Long-context Phi-3: longrope's factors become tensors and its attention factor
        # `rope.scaling.attn_factor` (Phi3MiniModel.generate_extra_tensors): HF's own longrope
        # parameters come back, so transformers builds the same model.
        rope_tensors=_base.GGUFRopeTensors(
            "longrope",
            {"rope_factors_long.weight": "long_factor", "rope_factors_short.weight": "short_factor"},
            attention_factor_key="rope.scaling.attn_factor",
        ),
        # Both written by llama.cpp's Phi3MiniModel, both Phi3Config fields, both dropped by
        # transformers' phi3 mapping.
        extra_config_keys={
            "attention.sliding_window": "sliding_window",
            "rope.scaling.original_context_length": "original_max_position_embeddings",
        },
        zero_means_none=("sliding_window",),  # Phi-4: no window
        # llama.cpp writes int(partial_rotary_factor * hidden) // heads (Phi-4-mini: 0.75).
        rotary_fraction_from_rope_dims=True,
    ),
)
