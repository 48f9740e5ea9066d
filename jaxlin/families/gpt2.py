"""GPT-2: LayerNorm with bias, plain GELU MLP, learned absolute positions, biases
everywhere (an affine detached map), fused c_attn and Conv1D weights stored (in, out).

J is taken w.r.t. the first block's input, token + position embedding (see
`Transformer.embed`), so Σ_t J_t·x_t + c_bias reconstructs y exactly."""

from __future__ import annotations

from typing import Any

from jaxlin._config import Activation, MLPKind, ModelConfig, NormKind, Positions, RopeConfig
from jaxlin.families import _base

_ACTIVATIONS = {
    "gelu_new": Activation.GELU_TANH,
    "gelu_pytorch_tanh": Activation.GELU_TANH,
    "gelu": Activation.GELU,
}


def config_from_hf(hf_config: Any) -> ModelConfig:
    _base.reject_if_set(
        hf_config, "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"
    )
    if not getattr(hf_config, "scale_attn_weights", True):
        raise _base.ConfigFieldError("config field 'scale_attn_weights'=False is not supported for gpt2")
    activation = _base.field(hf_config, "activation_function")
    if activation not in _ACTIVATIONS:
        raise _base.ConfigFieldError(
            f"config field 'activation_function'={activation!r} is not supported; "
            f"supported: {sorted(_ACTIVATIONS)}"
        )
    d, heads = int(_base.field(hf_config, "n_embd")), int(_base.field(hf_config, "n_head"))
    return ModelConfig(
        family="gpt2",
        vocab_size=int(_base.field(hf_config, "vocab_size")),
        hidden_size=d,
        num_layers=int(_base.field(hf_config, "n_layer")),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d // heads,
        intermediate_size=int(getattr(hf_config, "n_inner", None) or 4 * d),
        norm_eps=float(_base.field(hf_config, "layer_norm_epsilon")),
        activation=_ACTIVATIONS[activation],
        rope=RopeConfig(theta=1.0),  # unused: positions are learned
        positions=Positions.LEARNED,
        max_positions=int(_base.field(hf_config, "n_positions")),
        norm_kind=NormKind.LAYER,
        mlp_kind=MLPKind.PLAIN,
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
    )


def _conv1d_qkv(config: ModelConfig) -> tuple[int, int, int]:
    return (config.hidden_size,) * 3


def _layer_norm(name: str, target: str) -> dict[str, _base.Targets]:
    return {
        f"{name}.weight": (((target, "scale"), _base.as_is),),
        f"{name}.bias": (((target, "bias"), _base.as_is),),
    }


FAMILY = _base.Family(
    name="gpt2",
    model_types=("gpt2",),
    config_from_hf=config_from_hf,
    layer_prefix="transformer.h.{layer}.",
    layer_tensors={
        **_layer_norm("ln_1", "input_norm"),
        **_layer_norm("ln_2", "pre_mlp_norm"),
        # Conv1D: (in, out) already, the fused q|k|v are column blocks.
        "attn.c_attn.weight": tuple(
            (("attn", f"{name}_proj", "kernel"), _base.part(i, _conv1d_qkv, 1, _base.as_is))
            for i, name in enumerate("qkv")
        ),
        "attn.c_attn.bias": tuple(
            (("attn", f"{name}_proj", "bias"), _base.part(i, _conv1d_qkv, 0, _base.as_is))
            for i, name in enumerate("qkv")
        ),
        "attn.c_proj.weight": ((("attn", "o_proj", "kernel"), _base.as_is),),
        "attn.c_proj.bias": ((("attn", "o_proj", "bias"), _base.as_is),),
        "mlp.c_fc.weight": ((("mlp", "up_proj", "kernel"), _base.as_is),),
        "mlp.c_fc.bias": ((("mlp", "up_proj", "bias"), _base.as_is),),
        "mlp.c_proj.weight": ((("mlp", "down_proj", "kernel"), _base.as_is),),
        "mlp.c_proj.bias": ((("mlp", "down_proj", "bias"), _base.as_is),),
    },
    global_tensors={
        "transformer.wte.weight": ((("embedder", "embedding"), _base.as_is),),
        "transformer.wpe.weight": ((("position_embedder", "embedding"), _base.as_is),),
        **_layer_norm("transformer.ln_f", "final_norm"),
        "lm_head.weight": ((("lm_head", "kernel"), _base.linear),),
    },
    gguf=_base.GGUFNames(
        architecture="gpt2",
        layer_tensors={
            "attn_norm": "ln_1",
            "attn_qkv": "attn.c_attn",
            "attn_output": "attn.c_proj",
            "ffn_norm": "ln_2",
            "ffn_up": "mlp.c_fc",
            "ffn_down": "mlp.c_proj",
        },
        global_tensors={
            "token_embd": "transformer.wte",
            "position_embd": "transformer.wpe",
            "output_norm": "transformer.ln_f",
            "output": "lm_head",
        },
        # llama.cpp's GPT2Model transposes the c_attn, c_proj and c_fc weights (Conv1D).
        transposed=frozenset({"attn_qkv", "attn_output", "ffn_up", "ffn_down"}),
        # transformers maps context_length to `n_ctx`, which GPT2Config keeps but does not
        # use; the position table's length (wpe rows) is n_positions.
        copied_config_fields={"n_positions": "n_ctx"},
    ),
)
