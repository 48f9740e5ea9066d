"""Reading vectors in model space as tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlin._config import ModelConfig
from jaxlin.model import Params


def unembedding_matrix(config: ModelConfig, params: Params) -> jnp.ndarray:
    """W_U, shape (vocab, d): logits = W_U·h (before any final softcap)."""
    if config.tie_word_embeddings:
        return params["embedder"]["embedding"]
    return params["lm_head"]["kernel"].T


def orient_to(vectors: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Flip each row of `vectors` (k, d) so that its dot product with `reference` is ≥ 0
    (a singular vector's sign is arbitrary; this makes 'top tokens' mean 'pushes y up')."""
    signs = np.where(vectors @ reference < 0, -1.0, 1.0)
    return vectors * signs[:, None]


def top_tokens(vectors: np.ndarray, unembedding: jnp.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row v of `vectors` (k, d): the ids and scores of the `count` largest
    entries of W_U·v. A final logit softcap is monotonic, so it changes no ranking."""
    scores = jnp.asarray(vectors, dtype=jnp.float32) @ jnp.asarray(unembedding, dtype=jnp.float32).T
    values, ids = jax.lax.top_k(scores, count)
    return np.asarray(ids), np.asarray(values)
