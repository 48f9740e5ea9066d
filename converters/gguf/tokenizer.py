"""The tokenizer of a GGUF file, built from transformers' own GGUF tokenizer pieces,
without torch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from converters.gguf.architectures import gguf_names
from converters.gguf.config import hf_config
from converters.gguf.reader import GGUFError, GGUFFile, GGUFFileNotFoundError, GGUFSource, parsed

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Special-token attribute → GGUF id key, as in transformers' get_gguf_tokenizer.
_SPECIAL_TOKEN_IDS: dict[str, str] = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def load_gguf_tokenizer(source: GGUFSource) -> PreTrainedTokenizerBase:
    """The tokenizer `AutoTokenizer.from_pretrained(dirname, gguf_file=basename)` builds,
    for a parsed `GGUFFile` or a path, assembled without torch from transformers' own GGUF
    tokenizer pieces: the class AutoTokenizer picks for the config's model type, the
    backend `convert_gguf_tokenizer` builds, and the settings `get_gguf_tokenizer` reads.
    Unlike AutoTokenizer it never reads other files lying in the same directory. Falls back
    to AutoTokenizer itself (which needs torch) if a transformers release moves those pieces."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
        from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        from transformers import AutoTokenizer

        file = Path(source.path if isinstance(source, GGUFFile) else source)
        if not file.exists():
            raise GGUFFileNotFoundError(f"{os.fspath(file)}: no such GGUF file") from None
        return AutoTokenizer.from_pretrained(
            os.fspath(file.parent), gguf_file=file.name, trust_remote_code=False, local_files_only=True
        )

    file = parsed(source)
    architecture = gguf_names(file).architecture
    config = hf_config(file)

    # transformers' get_gguf_tokenizer, step for step.
    groups = {
        group: {
            name: file.metadata[f"tokenizer.{key}"]
            for key, name in renames.items()
            if f"tokenizer.{key}" in file.metadata
        }
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = groups["tokenizer"], groups["tokenizer_config"]
    tokens = tokenizer_dict.get("tokens")
    if not isinstance(tokens, list):
        raise GGUFError(f"{file.path}: metadata field 'tokenizer.ggml.tokens' is missing")
    tokenizer_type = tokenizer_dict.get("tokenizer_type")
    if tokenizer_type == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
        tokenizer_config.setdefault("add_bos_token", True)
    elif tokenizer_type == "gemma4":
        tokenizer_config["add_bos_token"] = False
    for attribute, key in _SPECIAL_TOKEN_IDS.items():
        token_id = file.metadata.get(f"tokenizer.ggml.{key}")
        tokenizer_config[attribute] = tokens[token_id] if token_id is not None else None

    try:
        backend, extra_kwargs = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except ValueError as error:
        raise GGUFError(f"{file.path}: cannot build its tokenizer ({error})") from None
    tokenizer_class = TOKENIZER_MAPPING.get(type(config), TokenizersBackend) or TokenizersBackend
    return tokenizer_class(
        tokenizer_object=backend,
        name_or_path=os.fspath(Path(file.path).parent),
        **tokenizer_config,
        **extra_kwargs,
    )
