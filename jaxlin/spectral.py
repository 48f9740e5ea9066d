"""Singular triplets of J. Dense for short inputs (the reference every matrix-free
method is tested against)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Triplets:
    """Top-k singular triplets of J (d × N·d): J ≈ U diag(S) Vᵀ.
    U: (d, k); S: (k,); V: (k, N, d), each right vector shaped like the input X."""

    U: np.ndarray
    S: np.ndarray
    V: np.ndarray


def dense_top_k(jacobian: np.ndarray, k: int) -> Triplets:
    """Top-k SVD of a materialized J of shape (d, N, d), computed in float64."""
    d, n, d_in = jacobian.shape
    rank_bound = min(d, n * d_in)
    if k > rank_bound:
        raise ValueError(f"top_k={k} exceeds the rank bound min(d, N·d) = {rank_bound}")
    u, s, vt = np.linalg.svd(np.asarray(jacobian, dtype=np.float64).reshape(d, n * d_in), full_matrices=False)
    return Triplets(U=u[:, :k], S=s[:k], V=vt[:k].reshape(k, n, d_in))
