"""Decoding vectors to tokens, on constructed cases whose answer is known."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxlin.decoding import orient_to, top_tokens, unembedding_matrix


def test_top_tokens_of_a_known_direction():
    rng = np.random.default_rng(0)
    d, vocab = 16, 50
    unembedding = rng.normal(size=(vocab, d)) * 0.1
    # Token 7 is exactly the direction e_3 scaled up; token 21 is −e_3.
    unembedding[7] = 5.0 * np.eye(d)[3]
    unembedding[21] = -5.0 * np.eye(d)[3]
    ids, scores = top_tokens(np.eye(d)[3][None, :], jnp.asarray(unembedding), 3)
    assert ids[0][0] == 7 and scores[0][0] == 5.0
    ids, _ = top_tokens(-np.eye(d)[3][None, :], jnp.asarray(unembedding), 1)
    assert ids[0][0] == 21


def test_orientation_makes_vectors_point_along_the_reference():
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    reference = np.array([-2.0, 1.0])
    oriented = orient_to(vectors, reference)
    assert np.all(oriented @ reference >= 0)
    np.testing.assert_array_equal(np.abs(oriented), np.abs(vectors))


def test_singular_vector_of_a_planted_jacobian_decodes_to_the_planted_token():
    """A rank-one J = σ·u vᵀ with u = W_U[token]/‖W_U[token]‖: its top left singular
    vector, oriented to y = J·x, decodes to that token first."""
    rng = np.random.default_rng(1)
    d, vocab, token = 12, 40, 17
    unembedding = rng.normal(size=(vocab, d))
    unembedding[token] *= 4.0  # make it the unique best match for its own direction
    u = unembedding[token] / np.linalg.norm(unembedding[token])
    v = rng.normal(size=d)
    v /= np.linalg.norm(v)
    jacobian = 3.0 * np.outer(u, v)
    x = v * 2.0
    y = jacobian @ x
    left, _, _ = np.linalg.svd(jacobian)
    oriented = orient_to(-left[:, :1].T, y)  # start from the wrong sign on purpose
    ids, _ = top_tokens(oriented, jnp.asarray(unembedding), 1)
    assert ids[0][0] == token


def test_unembedding_matrix_tied_and_untied():
    from jaxlin._config import Activation, ModelConfig, RopeConfig

    base = dict(
        family="t",
        vocab_size=5,
        hidden_size=3,
        num_layers=1,
        num_heads=1,
        num_kv_heads=1,
        head_dim=3,
        intermediate_size=4,
        norm_eps=1e-6,
        activation=Activation.SILU,
        rope=RopeConfig(1e4),
    )
    embedding = np.arange(15.0).reshape(5, 3)
    kernel = np.arange(15.0).reshape(3, 5) * 2
    params = {"embedder": {"embedding": embedding}, "lm_head": {"kernel": kernel}}
    np.testing.assert_array_equal(unembedding_matrix(ModelConfig(**base), params), embedding)
    untied = ModelConfig(**base, tie_word_embeddings=False)
    np.testing.assert_array_equal(unembedding_matrix(untied, params), kernel.T)


def test_nearest_embedding_rows_by_cosine():
    from jaxlin.decoding import nearest_embedding_tokens

    class Tokenizer:
        def decode(self, ids: list[int]) -> str:
            return f"t{ids[0]}"

    rng = np.random.default_rng(3)
    embedding = rng.normal(size=(30, 8))
    # Scaled copies of rows 5 and 11: cosine ignores the scale.
    vectors = np.stack([7.0 * embedding[5], 0.01 * embedding[11]])
    nearest = nearest_embedding_tokens(Tokenizer(), vectors, {"embedder": {"embedding": embedding}}, 2)
    assert nearest[0][0] == "t5" and nearest[1][0] == "t11"


def test_right_vector_read_at_its_dominant_position_finds_the_planted_row():
    """v_0 carries a scaled embedding row 9 at position 3 and v_1 the row 2 at position 1
    (small noise elsewhere): each is read at that position and decodes to that row; the
    negated row decodes elsewhere (cosine, not |cosine|). Chunks of one vector give the
    same answer as one batch."""
    from jaxlin.decoding import dominant_rows, nearest_embedding_rows

    rng = np.random.default_rng(5)
    embedding = rng.normal(size=(40, 8))
    right = 0.05 * rng.normal(size=(2, 5, 8))
    right[0, 3] = 4.0 * embedding[9]
    right[1, 1] = 0.5 * embedding[2]
    positions, shares, rows = dominant_rows(right)
    np.testing.assert_array_equal(positions, [3, 1])
    energy = np.sum(right**2, axis=2)
    np.testing.assert_allclose(shares, [energy[0, 3] / energy[0].sum(), energy[1, 1] / energy[1].sum()])
    np.testing.assert_array_equal(rows, right[[0, 1], [3, 1]])
    ids, cosines = nearest_embedding_rows(rows, embedding, 3)
    assert ids[0][0] == 9 and ids[1][0] == 2
    np.testing.assert_allclose(cosines[:, 0], 1.0, rtol=1e-6)
    assert np.all(np.diff(cosines, axis=1) <= 0)  # best first
    chunked_ids, chunked_cosines = nearest_embedding_rows(rows, embedding, 3, chunk=1)
    np.testing.assert_array_equal(chunked_ids, ids)
    # Both are float32 products (a chunk of one row is a matrix-vector product, BLAS may
    # round it differently from the batch): each within float32 rounding of the float64
    # cosines, rather than equal to each other's last bit.
    exact = np.stack(
        [
            embedding[chosen] @ row / (np.linalg.norm(embedding[chosen], axis=1) * np.linalg.norm(row))
            for chosen, row in zip(ids, rows, strict=True)
        ]
    )
    for found in (cosines, chunked_cosines):
        np.testing.assert_allclose(found, exact, rtol=4 * np.finfo(np.float32).eps)
    negated, _ = nearest_embedding_rows(-rows, embedding, 1)
    assert negated[0][0] != 9 and negated[1][0] != 2
