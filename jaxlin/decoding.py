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


def dominant_rows(right: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each right singular vector v_i (k, N, d) read at the token position carrying most of
    its norm: (positions (k,), that row's share of ‖v_i‖² (k,), the rows v_i[t_i] (k, d))."""
    row_energy = np.sum(np.square(right, dtype=np.float64), axis=2)  # (k, N)
    positions = np.argmax(row_energy, axis=1)
    shares = row_energy[np.arange(len(right)), positions] / np.maximum(row_energy.sum(axis=1), 1e-300)
    return positions, shares, right[np.arange(len(right)), positions]


def nearest_embedding_rows(
    vectors: np.ndarray, embedding: np.ndarray, count: int, chunk: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """For each row of `vectors` (k, d): ids and cosines of the `count` rows of `embedding`
    (vocab, d) nearest by cosine similarity (scale-free, so a scaled copy of a row finds it).
    Rows are divided by their norms after the product, so no normalized copy of a large
    embedding table is made; `chunk` vectors at a time bound the (chunk, vocab) scores."""
    rows = np.asarray(embedding, np.float32)
    row_norms = np.linalg.norm(rows, axis=1) + 1e-30
    unit = np.asarray(vectors, np.float32)
    unit = unit / (np.linalg.norm(unit, axis=1, keepdims=True) + 1e-30)
    count = min(count, len(rows))
    ids, cosines = [], []
    for start in range(0, len(unit), chunk):
        scores = (unit[start : start + chunk] @ rows.T) / row_norms
        candidates = np.argpartition(-scores, count - 1, axis=1)[:, :count]
        order = np.argsort(-np.take_along_axis(scores, candidates, axis=1), axis=1, kind="stable")
        best = np.take_along_axis(candidates, order, axis=1)
        ids.append(best)
        cosines.append(np.take_along_axis(scores, best, axis=1))
    if not ids:
        return np.zeros((0, count), np.int64), np.zeros((0, count), np.float32)
    return np.concatenate(ids), np.concatenate(cosines)
