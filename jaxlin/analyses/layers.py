"""Layer dynamics: for every layer and tap (residual, attention, MLP output at the last
token; cumulative w.r.t. the input embeddings and, optionally, local w.r.t. the layer's
input), the tap's exact spectrum, its effective dimensionality, its decoded top left
vectors and how far each follows the final layer's (the 'path'), its top right vectors
read as their nearest input-embedding rows, and the tap's certificate. Each tap is its
own linearization (`jaxlin.layer_sweep.sweep`), its products counted with the run's."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlin._config import ModelConfig
from jaxlin.analyses.base import Analysis, Context
from jaxlin.decoding import decode_left_vectors, nearest_embedding_rows, right_vector_entries
from jaxlin.jacobian import DetachedJacobian, Products
from jaxlin.layer_sweep import LayerSpectrum, _rows_fit, sweep
from jaxlin.memory import linearization_bytes, product_bytes
from jaxlin.model import Params, Tap, layer_inputs
from jaxlin.plan import Abstracts, ProgramMemory, abstract_params, nbytes, program_memory
from jaxlin.run_config import AnalysisSection

# What a layer tap's right singular vectors are, and so what their nearest embedding rows mean.
RIGHT_VECTOR_SPACE = {
    "cumulative": "input-embedding space (as for the whole J)",
    "local": "residual stream entering the layer (residual-stream vectors, compared with embedding rows)",
}


@dataclasses.dataclass(frozen=True, eq=False)
class LayersResult:
    rows: list[dict[str, Any]]  # one per (scope, tap, layer), as summary.json records them
    singular_values: np.ndarray  # (rows, d): every tap's full spectrum

    def summary_entries(self) -> dict[str, Any]:
        return {"layers": self.rows}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"layer_singular_values": self.singular_values}


def dynamics(
    config: ModelConfig,
    params: Params,
    inputs: jax.Array,
    ids: np.ndarray,
    tokenizer: Any,
    options: AnalysisSection,
    progress: Callable[[str], None] | None,
    products: Products | None = None,
) -> LayersResult:
    """Every tap of every layer, per scope (cumulative, and local when asked)."""
    section = options.layers
    rows: list[dict[str, Any]] = []
    sigmas: list[np.ndarray] = []
    for local in [False, True] if section.local else [False]:
        spectra = sweep(
            config,
            params,
            inputs,
            tuple(section.kinds),
            local,
            section.final_norm,
            section.top_k,
            options.chunk,
            options.attention_chunk,
            progress,
            products=products,
        )
        rows += _scope_rows(
            config, params, spectra, ids, tokenizer, options, "local" if local else "cumulative"
        )
        sigmas += [r.singular_values for r in spectra]
    return LayersResult(rows, np.stack(sigmas))


def _scope_rows(
    config: ModelConfig,
    params: Params,
    spectra: list[LayerSpectrum],
    ids: np.ndarray,
    tokenizer: Any,
    options: AnalysisSection,
    scope: str,
) -> list[dict[str, Any]]:
    top_k, count = options.layers.top_k, options.decode_top_tokens
    final = {r.kind: r for r in spectra if r.layer == config.num_layers - 1}
    # One nearest-row search for all taps' right vectors: every search scans the whole
    # embedding table (262k rows for Gemma), so one per tap would cost 3·L scans.
    rows_all = np.concatenate([r.right_rows for r in spectra])
    counts = np.cumsum([0, *(len(r.right_rows) for r in spectra)])
    nearest, cosines = nearest_embedding_rows(rows_all, params["embedder"]["embedding"], count)
    rows = []
    for index, r in enumerate(spectra):
        decoded = decode_left_vectors(
            tokenizer, r.left_vectors, r.singular_values[:top_k], config, params, r.value, count
        )
        entries = right_vector_entries(
            tokenizer,
            r.right_positions,
            r.right_shares,
            nearest[counts[index] : counts[index + 1]],
            cosines[counts[index] : counts[index + 1]],
            ids,
        )
        rows.append(
            {
                "layer": r.layer,
                "tap": r.kind,
                "scope": scope,
                "stable_rank": r.stable_rank,
                "entropy_rank": r.entropy_rank,
                "sigma_1": float(r.singular_values[0]),
                "reconstruction_relative_error": r.reconstruction_error,
                "path_cosines": np.abs(np.sum(r.left_vectors * final[r.kind].left_vectors, axis=1)).tolist(),
                "top_tokens": [entry["tokens"] for entry in decoded],
                "right_vector_space": RIGHT_VECTOR_SPACE[scope],
                "right_vectors": [
                    {**entry, "sigma": float(sigma), "relative_residual": float(residual)}
                    for sigma, residual, entry in zip(r.right_sigmas, r.right_residuals, entries, strict=True)
                ],
            }
        )
    return rows


def enabled(options: AnalysisSection, n: int) -> bool:
    return options.layers.enabled


def run(jacobian: DetachedJacobian, context: Context) -> LayersResult:
    section = context.options.layers
    with context.timer.step(f"layer sweep ({len(section.kinds)} taps × {context.config.num_layers} layers)"):
        return dynamics(
            context.config,
            context.params,
            jacobian.inputs,
            context.ids,
            context.tokenizer,
            context.options,
            context.progress,
            context.products,
        )


def program_bytes(config: ModelConfig, n: int, dtype: Any, options: AnalysisSection) -> int:
    """Conservative: two taps' J at once (the sweep's previous and current), each as large
    as the whole J's residuals plus one layer's weights (a local tap's J holds its layer's
    slice, module docstring of `jaxlin.layer_sweep`), the tap's rows or one batch of
    streamed products, and the local scope's layer inputs."""
    attention_chunk = options.attention_chunk
    embeddings = jax.ShapeDtypeStruct((n, config.hidden_size), dtype)
    wide = jnp.dtype(jnp.promote_types(dtype, jnp.float32)).itemsize
    layer_weights = nbytes(abstract_params(config, dtype)["layers"]) // config.num_layers
    tap = linearization_bytes(config, n, dtype, attention_chunk) + layer_weights
    spectrum = (
        config.hidden_size * n * config.hidden_size * wide
        if _rows_fit(config, embeddings)
        else product_bytes(config, n, dtype, options.chunk, attention_chunk)
    )
    inputs = config.num_layers * n * config.hidden_size * jnp.dtype(dtype).itemsize
    return 2 * tap + spectrum + (inputs if options.layers.local else 0)


def programs(options: AnalysisSection, planned: Abstracts) -> Iterator[ProgramMemory]:
    """The sweep's programs (`jaxlin.layer_sweep.sweep`) per scope and tap kind: one
    linearization per kind (the tap's layer is data: one program serves every layer), then
    the tap's spectrum from its rows or streamed, as the sweep decides for this input.
    While they run, the input's J stays held, and so does the previous tap's J while the
    next one is linearized (the sweep rebinds it only once the new one exists)."""
    from jaxlin import operator, spectral

    section, config, attention_chunk = options.layers, planned.config, options.attention_chunk
    rows_in_memory = _rows_fit(config, planned.inputs)
    d = config.hidden_size
    for local in [False, True] if section.local else [False]:
        scope = "local" if local else "cumulative"
        held = planned.held
        if local:
            collect = jax.jit(layer_inputs, static_argnames=("config", "attention_chunk"))
            arguments = (config, planned.params, planned.inputs, attention_chunk)
            program, inputs = planned.program(f"layers {scope}: layer inputs", collect, *arguments, held=held)
            yield program
            held += nbytes(inputs)
        previous = 0  # the last tap's J, alive while the next is linearized
        for kind in section.kinds:
            tap = Tap(0, kind, section.final_norm, local)
            name = f"layers {scope} {kind}"
            linearize = f"{name}: linearize"
            program, jacobian, tap_held = planned.linearization(
                planned.inputs, attention_chunk, tap, name=linearize
            )
            previous = max(previous, tap_held)
            yield dataclasses.replace(program, held=held + previous)
            with_tap = held + tap_held
            if rows_in_memory:
                identity = jax.ShapeDtypeStruct((d, d), jacobian.dtype)
                program, dense = planned.program(
                    f"{name}: rows", operator._rows, jacobian, identity, options.chunk, held=with_tap
                )
                yield program
                with_rows = with_tap + nbytes(dense)
                lowered = spectral._rows_top_k.lower(dense, section.top_k)
                yield program_memory(f"{name}: spectrum", lowered, with_rows)
                lowered = jax.jit(operator.contributions_from_rows).lower(dense, jacobian.inputs)
                yield program_memory(f"{name}: certificate", lowered, with_rows)
            else:
                lowered = spectral._streamed_top_k.lower(jacobian, section.top_k, options.chunk)
                yield program_memory(f"{name}: spectrum", lowered, with_tap)
                lowered = operator._contributions.lower(jacobian, options.chunk)
                yield program_memory(f"{name}: certificate", lowered, with_tap)
            previous = tap_held


ANALYSIS = Analysis("layers", run, enabled=enabled, programs=programs, program_bytes=program_bytes)
