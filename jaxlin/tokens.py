"""Text → token ids, as a run makes them, and token ids → their text."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlin.errors import JaxlinError


def tokenize(tokenizer: Any, text: str, add_bos: bool | None) -> np.ndarray:
    """The token ids of `text`. add_bos=None: exactly what the model's own tokenizer gives
    (`tokenizer.encode(text)`: its own special tokens — BOS where its config adds one, EOS
    for some); True/False: the text's tokens alone, with or without the BOS prepended."""
    if not text.strip():
        raise JaxlinError("text is empty")
    if add_bos is None:
        ids = list(tokenizer.encode(text))
    else:
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        if add_bos:
            if tokenizer.bos_token_id is None:
                raise JaxlinError("add_bos: true, but the model's tokenizer has no BOS token")
            ids = [tokenizer.bos_token_id, *ids]
    if not ids:
        raise JaxlinError(f"text {text!r} produced no tokens")
    return np.asarray(ids, dtype=np.int32)


def starts_with_bos(tokenizer: Any, ids: np.ndarray) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and len(ids) > 0 and int(ids[0]) == bos


def bos_added(tokenizer: Any, text: str, ids: np.ndarray) -> bool:
    """Whether tokenization put a BOS in front of the text's own tokens (a text that
    spells the BOS token itself does not count)."""
    own = np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int32)

    def leading(values: np.ndarray) -> int:
        count = 0
        while count < len(values) and int(values[count]) == tokenizer.bos_token_id:
            count += 1
        return count

    return tokenizer.bos_token_id is not None and leading(ids) > leading(own)


def bos_policy(add_bos: bool | None) -> str | bool:
    """How the tokens were made, as summary.json records it."""
    return "tokenizer" if add_bos is None else add_bos


def token_text(tokenizer: Any, ids: np.ndarray) -> list[str]:
    return [tokenizer.decode([int(i)]) for i in np.ravel(ids)]
