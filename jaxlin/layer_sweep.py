"""Layer dynamics: the detached Jacobian of every layer's taps, swept over depth.

Each (tap kind, layer) is one linearization (`jaxlin.jacobian.linearize` with a `Tap`
whose layer is data, so one compiled program serves every layer of a kind) and one
exact spectrum (`jaxlin.spectral`'s Gram routine: every singular value from the
eigendecomposition of J·Jᵀ, d × d, so the effective dimensionalities need no truncation,
and the top-k triplets with the same rigorous residual bounds as the whole J's). Two ways
to form J·Jᵀ, picked by memory:

- rows in memory (short inputs): the d transposed products Jᵀ·e_i are the rows of J
  (d × N·d); J·Jᵀ, the triplets and the per-token contributions J_t·x_t (the tap's
  certificate) are then contractions of those rows — d passes per tap in all;
- streamed (long inputs, when the rows would not fit): d products J·(Jᵀ·e_i), one
  batched pass each way for the triplets, and the contributions from the cheaper side
  (`jaxlin.operator.contributions`) — about twice the passes, memory O(chunk · N · d).

Memory: a tap's J refers to the caller's weights like the whole J does; a tap is
linearized under `jax.checkpoint` so that neither the cumulative tap's layer `cond` nor
the local tap's layer slice copies them (`model.tap_values`; benchmarks/tap_residuals.py:
258 MB → 10.6 MB for a cumulative tap of Gemma 3 270M f32 at N = 64, products unchanged).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlin._config import ModelConfig
from jaxlin.decoding import dominant_rows
from jaxlin.distributed import to_host
from jaxlin.jacobian import DEFAULT_ATTENTION_CHUNK, DetachedJacobian, Products, linearize
from jaxlin.memory import available_bytes
from jaxlin.model import Params, Tap, layer_inputs
from jaxlin.operator import contributions, contributions_from_rows, rows
from jaxlin.spectral import Triplets, rows_top_k, streamed_top_k

TAP_KINDS = ("residual", "attention", "mlp")

# J's rows for one tap are d·N·d numbers: 15 MB for Gemma 3 270M at N = 9, 1.6 GB at N = 1000.
ROWS_BUDGET_BYTES = 2**30


def _rows_fit(config: ModelConfig, embeddings: jax.Array) -> bool:
    wide = jnp.dtype(jnp.promote_types(embeddings.dtype, jnp.float32)).itemsize
    rows_bytes = config.hidden_size * embeddings.size * wide
    free = available_bytes()
    return rows_bytes <= ROWS_BUDGET_BYTES and (free is None or rows_bytes <= free // 4)


def tap_spectrum(
    jacobian: DetachedJacobian,
    top_k: int,
    chunk: int,
    rows_in_memory: bool,
    products: Products | None = None,
) -> tuple[Triplets, jax.Array]:
    """A tap's exact spectrum (`Triplets` with every singular value in `spectrum`, left
    vectors oriented so that u·value ≥ 0) and its reconstruction Σ_t J_t·x_t, each
    computed once: from J's rows when `rows_in_memory`, else streamed (module docstring)."""
    if rows_in_memory:
        dense = rows(jacobian, chunk=chunk, products=products)  # (d, N, d): rows[i] = Jᵀe_i
        triplets = rows_top_k(dense, top_k)
        total = jnp.sum(contributions_from_rows(dense, jacobian.inputs), axis=0)
        del dense
    else:
        triplets = streamed_top_k(jacobian, top_k, chunk, products)
        total = jnp.sum(contributions(jacobian, chunk, products), axis=0)
    # A singular pair's sign is arbitrary: fix it so the left vector points along the tap.
    value = to_host(jacobian.output, np.float64)
    sign = np.where(triplets.U.T.astype(np.float64) @ value < 0, -1.0, 1.0)
    oriented = dataclasses.replace(
        triplets, U=triplets.U * sign[None, :].astype(triplets.U.dtype), V=triplets.V * sign[:, None, None]
    )
    return oriented, total


@dataclasses.dataclass
class LayerSpectrum:
    layer: int
    kind: str
    local: bool
    singular_values: np.ndarray  # all d, descending
    left_vectors: np.ndarray  # (k, d), top-k, oriented so that u·value ≥ 0
    value: np.ndarray  # the tap at the last token
    reconstruction_error: float
    # The top-k right vectors v_i = Jᵀu_i/σ_i live in the tap's input space: the input
    # embeddings (cumulative) or the residual stream entering the layer (local). Each is
    # kept as the row at its dominant token position; the full (k, N, d) vectors only on
    # request, since for every tap of a long input they would not fit in memory.
    right_sigmas: np.ndarray  # (k,) ‖Jᵀu_i‖
    right_residuals: np.ndarray  # (k,) relative residual bounds ‖J·v_i − σ_i·u_i‖ / (√2·σ_i)
    right_positions: np.ndarray  # (k,) token position carrying most of ‖v_i‖²
    right_shares: np.ndarray  # (k,) that position's share of ‖v_i‖²
    right_rows: np.ndarray  # (k, d) v_i at that position
    right_vectors: np.ndarray | None = None  # (k, N, d), with sweep(keep_right_vectors=True)

    @property
    def stable_rank(self) -> float:
        return float(np.sum(self.singular_values**2) / self.singular_values[0] ** 2)

    @property
    def entropy_rank(self) -> float:
        """exp of the entropy of σ_i²/Σσ²: an effective number of directions."""
        energy = self.singular_values**2
        p = energy[energy > 0] / energy.sum()
        return float(np.exp(-np.sum(p * np.log(p))))


def sweep(
    config: ModelConfig,
    params: Params,
    embeddings: jax.Array,
    kinds: tuple[str, ...],
    local: bool,
    final_norm: bool,
    top_k: int = 3,
    chunk: int = 64,
    attention_chunk: int | None = DEFAULT_ATTENTION_CHUNK,
    progress: Callable[[str], None] | None = None,
    keep_right_vectors: bool = False,
    rows_in_memory: bool | None = None,
    products: Products | None = None,
) -> list[LayerSpectrum]:
    """Every layer × tap kind: full spectrum (from the exact Gram matrix), top-k left and
    right singular vectors, and the tap's reconstruction certificate. `rows_in_memory`:
    see the module docstring; by default, whenever J's rows take at most `ROWS_BUDGET_BYTES` and a
    quarter of the free memory."""
    if rows_in_memory is None:
        rows_in_memory = _rows_fit(config, embeddings)
    inputs_per_layer = layer_inputs(config, params, embeddings, attention_chunk) if local else None
    results = []
    for kind in kinds:
        for layer in range(config.num_layers):
            inputs = inputs_per_layer[layer] if local else embeddings
            tap = Tap(layer, kind, final_norm, local)
            jacobian = linearize(
                params, inputs, config, attention_chunk=attention_chunk, tap=tap, products=products
            )
            triplets, total = tap_spectrum(jacobian, top_k, chunk, rows_in_memory, products)
            value, total, bias = to_host((jacobian.output, total, jacobian.bias), np.float64)
            total = total + bias
            error = float(np.linalg.norm(total - value) / max(np.linalg.norm(value), 1e-300))
            right = triplets.V.astype(np.float64)
            positions, shares, dominant = dominant_rows(right)
            sigma = triplets.S
            results.append(
                LayerSpectrum(
                    layer,
                    kind,
                    local,
                    triplets.spectrum,
                    triplets.U.astype(np.float64).T,
                    value,
                    error,
                    right_sigmas=sigma,
                    # The bound of `spectral._triplet_bounds`, relative to its σ.
                    right_residuals=triplets.bounds / np.maximum(sigma, np.finfo(np.float64).tiny),
                    right_positions=positions,
                    right_shares=shares,
                    right_rows=dominant,
                    right_vectors=right if keep_right_vectors else None,
                )
            )
            if progress is not None and layer == config.num_layers - 1:
                progress(f"layer sweep: {kind} ({'local' if local else 'cumulative'}) done")
    return results
