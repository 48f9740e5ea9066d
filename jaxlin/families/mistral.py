"""Mistral / Ministral: Llama's block with a sliding window — on every layer when
`sliding_window` is set (Mistral), or per `layer_types` (Ministral)."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxlin._config import ModelConfig
from jaxlin.families import _base, llama


def config_from_hf(hf_config: Any) -> ModelConfig:
    return dataclasses.replace(
        llama.config_from_hf(hf_config),
        family="mistral",
        **_base.sliding(hf_config, every_layer_if_windowed=True),
    )


# Llama's tensor table. No GGUF names of its own: llama.cpp writes Mistral as "llama".
FAMILY = dataclasses.replace(
    llama.FAMILY,
    name="mistral",
    model_types=("mistral", "ministral"),
    config_from_hf=config_from_hf,
    gguf=None,
)
