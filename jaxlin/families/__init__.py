"""Model families: each a small file mapping a Hugging Face config onto `ModelConfig`
and naming the checkpoint tensors that differ from the shared table."""

from __future__ import annotations

from jaxlin.families import gemma3, llama, qwen3
from jaxlin.families._base import Family, UnsupportedArchitectureError, family_for_hf_config

FAMILIES: tuple[Family, ...] = (gemma3.FAMILY, llama.FAMILY, qwen3.FAMILY)

__all__ = ["FAMILIES", "Family", "UnsupportedArchitectureError", "family_for_hf_config"]
