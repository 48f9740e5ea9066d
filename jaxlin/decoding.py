"""Reading vectors in model space as tokens."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlin._config import ModelConfig
from jaxlin.distributed import to_host
from jaxlin.model import Params
from jaxlin.quantized import as_float
from jaxlin.tokens import token_text


def unembedding_matrix(config: ModelConfig, params: Params) -> jnp.ndarray:
    """W_U, shape (vocab, d): logits = W_U·h (before any final softcap)."""
    if config.tie_word_embeddings:
        return as_float(params["embedder"]["embedding"])
    return as_float(params["lm_head"]["kernel"]).T


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
    return to_host(ids), to_host(values)


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
    rows = to_host(as_float(embedding), np.float32)  # a quantized embedding, dequantized
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


def decode_left_vectors(
    tokenizer: Any,
    vectors: np.ndarray,
    sigmas: np.ndarray,
    config: ModelConfig,
    params: Params,
    y: np.ndarray,
    count: int,
) -> list[dict[str, Any]]:
    """Top tokens of each left singular vector (k, d), oriented so that u·y ≥ 0."""
    oriented = orient_to(vectors, y)
    ids, scores = top_tokens(oriented, unembedding_matrix(config, params), count)
    return [
        {
            "index": i + 1,
            "sigma": float(sigmas[i]),
            "tokens": token_text(tokenizer, ids[i]),
            "token_ids": ids[i].tolist(),
            "scores": scores[i].tolist(),
        }
        for i in range(len(vectors))
    ]


def nearest_embedding_tokens(
    tokenizer: Any, vectors: np.ndarray, params: Params, count: int
) -> list[list[str]]:
    """For each row of `vectors` (k, d): the tokens whose input-embedding rows are nearest
    by cosine similarity."""
    nearest, _ = nearest_embedding_rows(vectors, params["embedder"]["embedding"], count)
    return [token_text(tokenizer, row) for row in nearest]


def right_vector_entries(
    tokenizer: Any,
    positions: np.ndarray,
    shares: np.ndarray,
    nearest: np.ndarray,
    cosines: np.ndarray,
    ids: np.ndarray,
) -> list[dict[str, Any]]:
    """Right singular vectors read at their dominant token positions (see
    `dominant_rows`), with the input-embedding rows nearest to those rows."""
    return [
        {
            "index": i + 1,
            "dominant_position": int(t),
            "dominant_token": tokenizer.decode([int(ids[t])]),
            "share_of_norm": float(shares[i]),
            "nearest_tokens": token_text(tokenizer, nearest[i]),
            "cosines": cosines[i].tolist(),
        }
        for i, t in enumerate(positions)
    ]


def decode_right_vectors(
    tokenizer: Any,
    right: np.ndarray,
    oriented_u: np.ndarray,
    raw_u: np.ndarray,
    params: Params,
    ids: np.ndarray,
    count: int,
) -> list[dict[str, Any]]:
    """Each right singular vector v_i (N, d) read at its dominant token: the input-embedding
    rows nearest to v_i[t] by cosine (sign follows the left vector's orientation)."""
    signs = np.where(np.sum(oriented_u * raw_u, axis=1) >= 0, 1.0, -1.0)
    positions, shares, rows = dominant_rows(right)
    nearest, cosines = nearest_embedding_rows(rows * signs[:, None], params["embedder"]["embedding"], count)
    return right_vector_entries(tokenizer, positions, shares, nearest, cosines, ids)
