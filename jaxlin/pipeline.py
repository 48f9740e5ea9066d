"""One run of the method: text → detached Jacobian → certificate, spectrum, decoding,
written to a run directory. Every step is timed and reported."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlin import model as model_fns
from jaxlin._policy import FreezePolicy
from jaxlin.ablation import ablate
from jaxlin.ablation import summary as ablation_summary
from jaxlin.decoding import (
    dominant_rows,
    nearest_embedding_rows,
    orient_to,
    top_tokens,
    unembedding_matrix,
)
from jaxlin.devices import batch_devices, batch_mesh, replicated
from jaxlin.errors import JaxlinError
from jaxlin.jacobian import Products, linearize
from jaxlin.layers import sweep
from jaxlin.loading import LoadedModel, load_model
from jaxlin.memory import linearization_bytes, product_bytes, require_memory
from jaxlin.model_source import read_model_config
from jaxlin.operator import (
    block_from_rows,
    certify,
    contributions,
    contributions_from_rows,
    rows,
    token_block,
)
from jaxlin.outputs import (
    OutputClaim,
    RunKind,
    claim_output,
    staged_directory,
    write_npz_atomic,
)
from jaxlin.plots import write_figures
from jaxlin.record import parse_record, write_record
from jaxlin.report import render_report
from jaxlin.run_config import AnalysisSection, ConfigError, RunConfig, SteeringSection
from jaxlin.spectral import (
    TOKEN_GROUP_BYTES,
    check_request,
    frobenius_estimate,
    krylov_basis,
    per_token_from_rows,
    rows_top_k,
    top_k,
)
from jaxlin.steering import generate, prepare

JACOBIAN_INPUT = (
    "raw embedding rows (before any embedding scale); y = final-normed hidden state of the last token"
)


class Timer:
    def __init__(self, verbose: bool) -> None:
        self.seconds: dict[str, float] = {}
        self.verbose = verbose

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        if self.verbose:
            print(f"[jaxlin] {name} …", file=sys.stderr, flush=True)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)


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


@dataclasses.dataclass
class RunResult:
    summary: dict[str, Any]
    arrays: dict[str, np.ndarray]


def _decoded(
    tokenizer: Any,
    vectors: np.ndarray,
    sigmas: np.ndarray,
    config: Any,
    params: Any,
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


def nearest_embedding_tokens(tokenizer: Any, vectors: np.ndarray, params: Any, count: int) -> list[list[str]]:
    """For each row of `vectors` (k, d): the tokens whose input-embedding rows are nearest
    by cosine similarity."""
    nearest, _ = nearest_embedding_rows(vectors, params["embedder"]["embedding"], count)
    return [token_text(tokenizer, row) for row in nearest]


def _right_vector_entries(
    tokenizer: Any,
    positions: np.ndarray,
    shares: np.ndarray,
    nearest: np.ndarray,
    cosines: np.ndarray,
    ids: np.ndarray,
) -> list[dict[str, Any]]:
    """Right singular vectors read at their dominant token positions (see
    `decoding.dominant_rows`), with the input-embedding rows nearest to those rows."""
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


def _decode_right_vectors(
    tokenizer: Any,
    right: np.ndarray,
    oriented_u: np.ndarray,
    raw_u: np.ndarray,
    params: Any,
    ids: np.ndarray,
    count: int,
) -> list[dict[str, Any]]:
    """Each right singular vector v_i (N, d) read at its dominant token: the input-embedding
    rows nearest to v_i[t] by cosine (sign follows the left vector's orientation)."""
    signs = np.where(np.sum(oriented_u * raw_u, axis=1) >= 0, 1.0, -1.0)
    positions, shares, rows = dominant_rows(right)
    nearest, cosines = nearest_embedding_rows(rows * signs[:, None], params["embedder"]["embedding"], count)
    return _right_vector_entries(tokenizer, positions, shares, nearest, cosines, ids)


# What a layer tap's right singular vectors are, and so what their nearest embedding rows mean.
RIGHT_VECTOR_SPACE = {
    "cumulative": "input-embedding space (as for the whole J)",
    "local": "residual stream entering the layer (residual-stream vectors, compared with embedding rows)",
}


def _layer_dynamics(
    config: Any,
    params: Any,
    inputs: Any,
    ids: np.ndarray,
    tokenizer: Any,
    options: AnalysisSection,
    progress: Callable[[str], None] | None,
) -> list[dict[str, Any]]:
    """Per layer and tap: effective dimensionality, decoded top left vectors and the
    cosine of each with the final layer's (the 'path'), the top right vectors read as their
    nearest input-embedding rows, and the tap's certificate."""
    section = options.layers
    scopes = [False, True] if section.local else [False]
    rows: list[dict[str, Any]] = []
    for local in scopes:
        spectra = sweep(
            config,
            params,
            inputs,
            tuple(section.kinds),
            local,
            section.final_norm,
            section.top_k,
            options.chunk,
            options.attention_block,
            progress,
        )
        final = {r.kind: r for r in spectra if r.layer == config.num_layers - 1}
        scope = "local" if local else "cumulative"
        # One nearest-row search for all taps' right vectors: every search scans the whole
        # embedding table (262k rows for Gemma), so one per tap would cost 3·L scans.
        rows_all = np.concatenate([r.right_rows for r in spectra])
        counts = np.cumsum([0, *(len(r.right_rows) for r in spectra)])
        nearest, cosines = nearest_embedding_rows(
            rows_all, params["embedder"]["embedding"], options.decode_top_tokens
        )
        for index, r in enumerate(spectra):
            decoded = _decoded(
                tokenizer,
                r.left_vectors,
                r.singular_values[: section.top_k],
                config,
                params,
                r.value,
                options.decode_top_tokens,
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
                    "path_cosines": np.abs(
                        np.sum(r.left_vectors * final[r.kind].left_vectors, axis=1)
                    ).tolist(),
                    "top_tokens": [entry["tokens"] for entry in decoded],
                    "right_vector_space": RIGHT_VECTOR_SPACE[scope],
                    "right_vectors": [
                        {**entry, "sigma": float(sigma), "relative_residual": float(residual)}
                        for sigma, residual, entry in zip(
                            r.right_sigmas,
                            r.right_residuals,
                            _right_vector_entries(
                                tokenizer,
                                r.right_positions,
                                r.right_shares,
                                nearest[counts[index] : counts[index + 1]],
                                cosines[counts[index] : counts[index + 1]],
                                ids,
                            ),
                            strict=True,
                        )
                    ],
                    "_sigma": r.singular_values,
                }
            )
    return rows


def _check_memory(config: Any, n: int, dtype: Any, options: AnalysisSection) -> None:
    estimate = linearization_bytes(config, n, dtype, options.attention_block)
    estimate += product_bytes(config, n, dtype, options.chunk, options.attention_block)
    wide = jnp.dtype(jnp.promote_types(dtype, jnp.float32)).itemsize
    per_token_rank = {"exact": config.hidden_size, "projected": options.per_token.rank, "off": 0}
    # The per-token rows (rank × N × d) stay in memory; their Gram matrices are formed a
    # group of tokens at a time.
    estimate += (options.top_k + per_token_rank[options.per_token.method]) * n * config.hidden_size * wide
    estimate += TOKEN_GROUP_BYTES if options.per_token.method != "off" else 0
    require_memory(estimate, f"the analysis of {n} tokens")


def analyse(
    loaded: LoadedModel,
    text: str,
    options: AnalysisSection,
    add_bos: bool | None = None,
    timer: Timer | None = None,
    progress: Callable[[str], None] | None = None,
) -> RunResult:
    timer = timer or Timer(verbose=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    config, params = model.config, model.params
    ids = tokenize(tokenizer, text, add_bos)
    n, d = len(ids), config.hidden_size
    if config.max_positions is not None and n > config.max_positions:
        raise JaxlinError(f"the text has {n} tokens; {model.name} has only {config.max_positions} positions")
    check_request(options.top_k, options.tolerance, d, "analysis.top_k")
    if options.per_token.method != "off":
        check_request(options.per_token.top_k, None, d, "analysis.per_token.top_k")
    if options.per_token.method == "projected" and not options.per_token.top_k <= options.per_token.rank <= d:
        raise JaxlinError(
            f"analysis.per_token.rank={options.per_token.rank} must lie between per_token.top_k and d={d}"
        )
    if options.method == "dense" and n > options.max_dense_tokens:
        raise JaxlinError(
            f"analysis.method=dense materializes J: {n} tokens > analysis.max_dense_tokens="
            f"{options.max_dense_tokens}; use method=lanczos"
        )
    _check_memory(config, n, model.dtype, options)
    block, chunk = options.attention_block, options.chunk
    inputs = model_fns.embed(config, params, jnp.asarray(ids))
    arrays: dict[str, np.ndarray] = {"token_ids": ids, "inputs": np.asarray(inputs, dtype=np.float32)}
    products = Products()
    # J's rows, when an analysis needs them all (exact per-token spectra, a dense SVD),
    # are computed once: the contributions, the whole-J spectrum, every J_t and the
    # focus block are then read off them with no further product.
    method = options.method
    if method == "auto":
        method = "rows" if options.per_token.method == "exact" else "lanczos"
    keep_rows = method in ("rows", "dense") or options.per_token.method == "exact"

    with timer.step(f"detached Jacobian ({n} tokens)" + (": all d rows" if keep_rows else "")):
        jacobian = linearize(params, inputs, config, FreezePolicy.DETACHED, block, products=products)
        dense = rows(jacobian, None, chunk, products) if keep_rows else None
        c = (
            contributions(jacobian, chunk, products)
            if dense is None
            else contributions_from_rows(dense, inputs)
        )
        y, c_bias = jacobian.output, jacobian.bias
        certificate = certify(y, c, lambda h: model_fns.logits(config, params, h), c_bias)
    y_np = np.asarray(y, dtype=np.float64)
    c_np = np.asarray(c, dtype=np.float64)
    bias_np = np.asarray(c_bias, dtype=np.float64)
    arrays.update(y=y_np, contributions=c_np, bias_contribution=bias_np)

    ordinary_error = None
    ordinary = None
    if options.ordinary_jacobian and n <= options.max_ordinary_tokens:
        with timer.step("ordinary Jacobian contributions"):
            ordinary = linearize(params, inputs, config, FreezePolicy.ORDINARY, block, products=products)
            c_ord = contributions(ordinary, chunk, products)
            arrays["ordinary_contributions"] = np.asarray(c_ord, dtype=np.float64)
            arrays["ordinary_bias_contribution"] = np.asarray(ordinary.bias, dtype=np.float64)
            ordinary_total = arrays["ordinary_contributions"].sum(0) + arrays["ordinary_bias_contribution"]
            ordinary_error = float(np.linalg.norm(ordinary_total - y_np) / np.linalg.norm(y_np))

    if dense is not None and method != "lanczos":
        with timer.step(f"exact top-{options.top_k} of J from its rows (J·Jᵀ, {d} × {d})"):
            triplets = rows_top_k(dense, options.top_k)
    else:
        with timer.step(f"Lanczos top-{options.top_k} of J"):
            triplets = top_k(
                jacobian,
                options.top_k,
                options.tolerance,
                options.krylov_depth,
                options.seed,
                min(chunk, options.top_k),
                progress,
                products,
            )
    oriented_u = orient_to(triplets.U.T, y_np)
    arrays.update(U=oriented_u.T, S=triplets.S, V=triplets.V.astype(np.float32), bounds=triplets.bounds)

    per_token: dict[str, Any] = {"method": options.per_token.method}
    token_frobenius = None
    if options.per_token.method != "off":
        k_t = options.per_token.top_k
        with timer.step(f"per-token top-{k_t} for all {n} tokens ({options.per_token.method})"):
            if options.per_token.method == "exact":
                basis, projected = jnp.eye(d, dtype=jnp.promote_types(model.dtype, jnp.float32)), dense
            else:
                basis = krylov_basis(jacobian, options.per_token.rank, options.seed, products)
                projected = rows(jacobian, basis, chunk, products)
            left, sigma, right, bounds, frob_sq = per_token_from_rows(projected, basis, k_t)
        arrays.update(
            per_token_U=np.asarray(left),
            per_token_S=np.asarray(sigma),
            per_token_V=np.asarray(right, dtype=np.float32),
            per_token_bounds=np.asarray(bounds),
        )
        if options.per_token.method == "exact":
            token_frobenius = np.sqrt(np.asarray(frob_sq, np.float64))
        else:
            arrays["per_token_captured_frobenius"] = np.sqrt(np.asarray(frob_sq, np.float64))
        first = np.asarray(left)[:, 0, :]
        per_token["top_left_vector"] = [
            {"token": tok, **entry}
            for tok, entry in zip(
                token_text(tokenizer, ids),
                _decoded(
                    tokenizer, first, np.asarray(sigma)[:, 0], config, params, y_np, options.decode_top_tokens
                ),
                strict=True,
            )
        ]
        # Each J_t's first right vector, read as the input-embedding rows nearest to it
        # (its sign follows the left vector's orientation u·y ≥ 0).
        signs = np.where(first @ y_np < 0, -1.0, 1.0)
        right_first = np.asarray(right)[:, 0, :] * signs[:, None]
        for entry, nearest in zip(
            per_token["top_left_vector"],
            nearest_embedding_tokens(tokenizer, right_first, params, options.decode_top_tokens),
            strict=True,
        ):
            entry["right_vector_nearest_tokens"] = nearest
        per_token["singular_values"] = np.asarray(sigma).tolist()
        per_token["max_relative_bound"] = float(
            np.max(np.asarray(bounds) / np.maximum(np.asarray(sigma), 1e-300))
        )
    frobenius_method = "exact (per-token blocks)"
    if token_frobenius is None:
        with timer.step(f"Hutchinson estimate of ‖J_t‖_F ({options.frobenius_samples} samples)"):
            estimate = frobenius_estimate(
                jacobian, jax.random.key(options.seed), options.frobenius_samples, products
            )
            token_frobenius = np.sqrt(np.maximum(np.asarray(estimate, np.float64), 0.0))
        frobenius_method = f"Hutchinson estimate, {options.frobenius_samples} samples"
    frobenius = float(np.sqrt(np.sum(token_frobenius**2)))
    arrays.update(token_frobenius=token_frobenius, token_contribution_norms=np.linalg.norm(c_np, axis=-1))

    # The most important token's block J_t as an image, detached and ordinary.
    # (Past a leading BOS, which often acts as an attention sink with a large ‖c_t‖.)
    skip = 1 if n > 1 and starts_with_bos(tokenizer, ids) else 0
    focus = skip + int(np.argmax(np.linalg.norm(c_np[skip:], axis=-1)))
    with timer.step(f"Jacobian block of token {focus}"):
        focus_block = (
            token_block(jacobian, focus, chunk, products) if dense is None else block_from_rows(dense, focus)
        )
        arrays["focus_block"] = np.asarray(focus_block, np.float32)
        if ordinary is not None:
            arrays["focus_block_ordinary"] = np.asarray(
                token_block(ordinary, focus, chunk, products), np.float32
            )
        del dense  # the rows are the largest array of the run; the layer sweep needs the memory
    arrays["focus_position"] = np.asarray(focus)
    right_tokens = _decode_right_vectors(
        tokenizer, triplets.V, oriented_u, triplets.U.T, params, ids, options.decode_top_tokens
    )
    ablation = None
    if options.ablation and n > 1:
        with timer.step(f"token ablation, linear vs real ({n} tokens, {2 * n} forwards)"):
            ablated = ablate(config, params, ids, y, c, min(chunk, 16))
            ablation = ablation_summary(ablated, lambda i: tokenizer.decode([i]), token_text(tokenizer, ids))
            arrays.update(
                ablation_linear=ablated.linear_change,
                ablation_removed=ablated.removed_change,
                ablation_zeroed=ablated.zeroed_change,
            )
    layers = None
    if options.layers.enabled:
        with timer.step(f"layer sweep ({len(options.layers.kinds)} taps × {config.num_layers} layers)"):
            layers = _layer_dynamics(config, params, inputs, ids, tokenizer, options, progress)
            arrays["layer_singular_values"] = np.stack([r.pop("_sigma") for r in layers])

    predicted = certificate.predicted_token_id
    summary = {
        "model": model.name,
        "family": config.family,
        "text": text,
        "n_tokens": n,
        "tokens": token_text(tokenizer, ids),
        "token_ids": ids.tolist(),
        "add_bos": bos_policy(add_bos),
        "bos_added": bos_added(tokenizer, text, ids),
        "dtype": str(jnp.dtype(model.dtype)),
        "jacobian_input": JACOBIAN_INPUT,
        "predicted_token": tokenizer.decode([predicted]),
        "predicted_token_id": predicted,
        "reconstruction_relative_error": certificate.relative_error,
        "reconstruction_argmax_matches": certificate.argmax_matches,
        "affine": config.has_biases,
        "bias_contribution_norm": float(np.linalg.norm(bias_np)),
        "ordinary_jacobian_relative_error": ordinary_error,
        "singular_values": triplets.S.tolist(),
        "products": products.as_dict(),
        "spectrum": {
            "method": method,
            "residual_bounds": triplets.bounds.tolist(),
            "krylov_depth": triplets.depth,
            "converged": triplets.converged,
            "tolerance": triplets.tolerance,
            "stop_reason": triplets.stop_reason,
            "worst_relative_bound": float(
                np.max(triplets.bounds / np.maximum(triplets.S, np.finfo(np.float64).tiny))
            ),
            "left_vectors_top_tokens": _decoded(
                tokenizer, oriented_u, triplets.S, config, params, y_np, options.decode_top_tokens
            ),
        },
        "norms": {
            "frobenius": frobenius,
            "frobenius_method": frobenius_method,
            "stable_rank": frobenius**2 / float(triplets.S[0]) ** 2,
            "token_frobenius": token_frobenius.tolist(),
            "token_contribution_norms": arrays["token_contribution_norms"].tolist(),
        },
        "per_token": per_token,
        "right_vectors_nearest_embeddings": right_tokens,
        "timings_seconds": timer.seconds,
    }
    if layers is not None:
        summary["layers"] = layers
    if ablation is not None:
        summary["ablation"] = ablation
    return RunResult(summary, arrays)


def steer(loaded: LoadedModel, section: SteeringSection, add_bos: bool | None) -> dict[str, Any]:
    """Baseline and steered greedy continuations, side by side (both prompts tokenized
    as the analysed text is)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    concept = tokenize(tokenizer, section.concept, add_bos)
    prompt = tokenize(tokenizer, section.prompt, add_bos)
    try:
        setup = prepare(model.config, model.params, concept, section.layer, section.mode)
    except ValueError as error:
        raise JaxlinError(f"steering: {error}") from None
    stop = tuple(i for i in (tokenizer.eos_token_id,) if i is not None)
    runs = []
    for strength in [0.0, *[x for x in section.lambdas if x != 0.0]]:
        tokens = generate(model.config, model.params, prompt, section.max_new_tokens, strength, setup, stop)
        runs.append({"lambda": strength, "text": tokenizer.decode(tokens), "token_ids": tokens})
    return {
        "concept": section.concept,
        "prompt": section.prompt,
        "layer": setup.layer,
        "mode": section.mode,
        "baseline": runs[0]["text"],
        "runs": runs,
    }


def write_run(result: RunResult, out_dir: Path, kind: RunKind = "single") -> Path:
    """The run directory, written in staging and renamed into place once complete (see
    `jaxlin.outputs`); `out_dir` must be absent, empty or a jaxlin run. summary.json is the
    run record (`jaxlin.record`); the figures and the report are rendered from it."""
    record = parse_record(result.summary)
    with staged_directory(out_dir, kind) as staging:
        write_record(staging / "summary.json", record)
        write_npz_atomic(staging / "arrays.npz", result.arrays)
        write_figures(staging, record, result.arrays)
        render_report(staging, record, name=out_dir.name)
    return out_dir


def device_mesh(count: int | None) -> Any:
    """The context the analyses run in: a "batch" mesh over the first `count` devices
    (default: all), or no mesh when that is one device."""
    available = jax.devices()
    if count is not None and count > len(available):
        raise ConfigError(
            f"devices: {count} requested, but {len(available)} {available[0].platform} device(s) available"
        )
    chosen = available[: count or len(available)]
    return jax.set_mesh(batch_mesh(chosen)) if len(chosen) > 1 else nullcontext()


def run(config: RunConfig, verbose: bool = True) -> tuple[RunResult, Path]:
    """The output location is checked and locked before anything is loaded (see
    `jaxlin.outputs.claim_output`)."""
    texts = config.input_texts()  # read (and checked) before any expensive step
    # The model's config alone (no weights yet): bad requests are refused before any write.
    config.check_against(read_model_config(config.model))
    kind: RunKind = "single" if texts is None else "many"
    with claim_output(config.output_dir, kind, config.overwrite) as output, device_mesh(config.devices):
        return _run(config, texts, output, verbose)


def _run(
    config: RunConfig, texts: list[str] | None, output: OutputClaim, verbose: bool
) -> tuple[RunResult, Path]:
    timer = Timer(verbose)
    with timer.step("loading model"):
        loaded = load_model(
            config.model.source,
            config.model.path,
            config.model.dtype,
            use_cache=config.model.cache,
            progress=verbose,
        )
    model = dataclasses.replace(loaded.model, params=replicated(loaded.model.params))
    loaded = dataclasses.replace(loaded, model=model)
    progress = (
        (lambda message: print(f"[jaxlin]   {message}", file=sys.stderr, flush=True)) if verbose else None
    )
    devices = batch_devices()
    if progress is not None and devices > 1:
        progress(f"batched products split across {devices} {jax.devices()[0].platform} devices")
    if texts is not None:
        return run_many(config, loaded, texts, timer, progress, output.target)
    result = analyse(loaded, config.text, config.analysis, config.add_bos, timer, progress)
    if config.steering.enabled:
        with timer.step(f"steering ({len(config.steering.lambdas)} strengths)"):
            result.summary["steering"] = steer(loaded, config.steering, config.add_bos)
    result.summary["config"] = config.model_dump()
    result.summary["params_from_cache"] = loaded.from_cache
    result.summary["checkpoint_sha256"] = loaded.checkpoint_sha256
    result.summary["devices"] = batch_devices()
    return result, write_run(result, output.target)


def _analysis_fingerprint(config: RunConfig) -> dict[str, Any]:
    """What must match for a completed prompt to be reused on resume."""
    return {
        "model": config.model.model_dump(),
        "analysis": config.analysis.model_dump(),
        "add_bos": config.add_bos,
    }


def run_many(
    config: RunConfig,
    loaded: LoadedModel,
    texts: list[str],
    timer: Timer,
    progress: Callable[[str], None] | None,
    out: Path,
) -> tuple[RunResult, Path]:
    """One run directory per prompt under OUT/prompts/NNNN (each written atomically), then
    aggregates in OUT (each file replaced atomically). Resumable: a prompt whose directory
    is complete, for the same text and analysis settings, is read back rather than
    recomputed. OUT is a claimed many-prompt output (`claim_output` made it)."""
    (out / "prompts").mkdir(exist_ok=True)
    fingerprint = _analysis_fingerprint(config)
    summaries: list[dict[str, Any]] = []
    reused = 0
    for index, text in enumerate(texts):
        prompt_dir = out / "prompts" / f"{index:04d}"
        previous = _completed(prompt_dir, text, fingerprint)
        if previous is not None:
            summaries.append(previous)
            reused += 1
            continue
        with timer.step(f"prompt {index + 1}/{len(texts)}"):
            result = analyse(loaded, text, config.analysis, config.add_bos, Timer(False), progress)
        result.summary["fingerprint"] = fingerprint
        result.summary["config"] = config.model_dump()
        write_run(result, prompt_dir, "prompt")
        summaries.append(result.summary)
        # Each prompt length compiles its own programs; every live CPU executable holds
        # memory mappings, and thousands of them exhaust the process's map limit.
        jax.clear_caches()
    if progress is not None and reused:
        progress(f"resumed: {reused} of {len(texts)} prompts were already complete")
    summary = _aggregate(summaries, loaded, config)
    if config.steering.enabled:
        with timer.step(f"steering ({len(config.steering.lambdas)} strengths)"):
            summary["steering"] = steer(loaded, config.steering, config.add_bos)
    summary["timings_seconds"] = timer.seconds
    summary["prompts_reused"] = reused
    summary["devices"] = batch_devices()
    record = parse_record(summary)
    write_record(out / "summary.json", record)
    write_figures(out, record, {})
    render_report(out, record)
    return RunResult(summary, {}), out


def _completed(prompt_dir: Path, text: str, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    path = prompt_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        previous = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if previous.get("text") != text or previous.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        return None
    return previous


def _aggregate(summaries: list[dict[str, Any]], loaded: LoadedModel, config: RunConfig) -> dict[str, Any]:
    """Per-prompt rows, and layer dynamics averaged over prompts."""
    rows = [
        {
            "index": i,
            "text": s["text"],
            "n_tokens": s["n_tokens"],
            "predicted_token": s["predicted_token"],
            "reconstruction_relative_error": s["reconstruction_relative_error"],
            "sigma_1": s["singular_values"][0],
            "stable_rank": s["norms"]["stable_rank"],
            "directory": f"prompts/{i:04d}",
        }
        for i, s in enumerate(summaries)
    ]
    first = summaries[0]
    summary: dict[str, Any] = {
        "model": first["model"],
        "family": first["family"],
        "dtype": first["dtype"],
        "text": f"{len(summaries)} prompts",
        "n_prompts": len(summaries),
        "prompts": rows,
        "max_reconstruction_relative_error": max(r["reconstruction_relative_error"] for r in rows),
        "mean_stable_rank": float(np.mean([r["stable_rank"] for r in rows])),
        "config": config.model_dump(),
        "params_from_cache": loaded.from_cache,
        "checkpoint_sha256": loaded.checkpoint_sha256,
    }
    if all("layers" in s for s in summaries):
        grouped: dict[tuple, list[dict[str, Any]]] = {}
        for s in summaries:
            for row in s["layers"]:
                grouped.setdefault((row["scope"], row["tap"], row["layer"]), []).append(row)
        summary["layers"] = [
            {
                "layer": layer,
                "tap": tap,
                "scope": scope,
                "prompts": len(group),
                "stable_rank": float(np.mean([g["stable_rank"] for g in group])),
                "stable_rank_std": float(np.std([g["stable_rank"] for g in group])),
                "entropy_rank": float(np.mean([g["entropy_rank"] for g in group])),
                "entropy_rank_std": float(np.std([g["entropy_rank"] for g in group])),
                "max_reconstruction_relative_error": max(g["reconstruction_relative_error"] for g in group),
            }
            for (scope, tap, layer), group in sorted(grouped.items())
        ]
    return summary
