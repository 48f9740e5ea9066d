"""Model families: each a small file mapping a Hugging Face config onto `ModelConfig`
and naming the checkpoint tensors that differ from the shared table."""

from __future__ import annotations

from jaxlin.families import gemma2, gemma3, gpt2, llama, mistral, olmo2, phi3, qwen2, qwen3
from jaxlin.families._base import Family, UnsupportedArchitectureError, family_for_hf_config

FAMILIES: tuple[Family, ...] = (
    gemma3.FAMILY,
    gemma2.FAMILY,
    llama.FAMILY,
    mistral.FAMILY,
    qwen3.FAMILY,
    qwen2.FAMILY,
    phi3.FAMILY,
    olmo2.FAMILY,
    gpt2.FAMILY,
)

__all__ = ["FAMILIES", "Family", "UnsupportedArchitectureError", "family_for_hf_config"]
