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
        **_base.linear_biases(hf_config),
        rope=_base.config_rope(hf_config),
    )


FAMILY = _base.Family(
    name="llama",
    model_types=("llama",),
    config_from_hf=config_from_hf,
    layer_tensors={**_base.SHARED_LAYER_TENSORS, **_base.LINEAR_BIASES, **_base.PRE_NORM_LAYER_TENSORS},
    gguf=_base.GGUFNames(
        architecture="llama",
        layer_tensors=_base.GGUF_PRE_NORM_LAYER_TENSORS,
        # Only LlamaModel (of the supported ones) permutes q/k for llama.cpp's interleaved
        # RoPE; every other family uses NEOX-style RoPE there, HF's layout, stored unchanged.
        unpermute_qk=True,
        # Llama 3.1/3.2: `rope_scaling` rope_type "llama3" becomes `rope_freqs`, one divisor per
        # inverse frequency (LlamaModel.generate_extra_tensors); llama.cpp rotates by
        # inv_freq / factor, exactly HF's llama3 scaling. No metadata says how the factors were
        # made and transformers has no RoPE type taking them as they are: jaxlin's own type.
        rope_tensors=_base.GGUFRopeTensors(
            "frequency_factors", {"rope_freqs.weight": "frequency_factors"}, known_to_transformers=False
        ),
        # llama.cpp writes Mistral models as "llama" (gguf knows only "mistral3"/"mistral4");
        # transformers loads one as Mistral when general.name is exactly "mistral".
        model_type_by_general_name={"mistral": "mistral"},
    ),
)
