"""One run of the method: text → detached Jacobian → certificate, spectrum, decoding,
written to a run directory. Every step is timed and reported."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxlin import model as model_fns
from jaxlin._policy import FreezePolicy
from jaxlin.decoding import orient_to, top_tokens, unembedding_matrix
from jaxlin.errors import JaxlinError
from jaxlin.loading import LoadedModel, load_model
from jaxlin.operator import certify, contributions, materialize
from jaxlin.outputs import atomic_directory, write_json, write_npz
from jaxlin.plots import reconstruction_scatter, singular_values
from jaxlin.run_config import AnalysisSection, RunConfig
from jaxlin.spectral import dense_top_k

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


def tokenize(tokenizer: Any, text: str, add_bos: bool) -> np.ndarray:
    if not text.strip():
        raise JaxlinError("text is empty")
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if add_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    if not ids:
        raise JaxlinError(f"text {text!r} produced no tokens")
    return np.asarray(ids, dtype=np.int32)


def token_text(tokenizer: Any, ids: np.ndarray) -> list[str]:
    return [tokenizer.decode([int(i)]) for i in np.ravel(ids)]


@dataclasses.dataclass
class RunResult:
    summary: dict[str, Any]
    arrays: dict[str, np.ndarray]


def analyse(
    loaded: LoadedModel, text: str, options: AnalysisSection, add_bos: bool = True, timer: Timer | None = None
) -> RunResult:
    timer = timer or Timer(verbose=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    config, params = model.config, model.params
    ids = tokenize(tokenizer, text, add_bos)
    n, d = len(ids), config.hidden_size

    with timer.step(f"detached Jacobian contributions ({n} tokens)"):
        inputs = model_fns.embed(config, params, jnp.asarray(ids))
        y, c = contributions(params, inputs, config, FreezePolicy.DETACHED, options.chunk)
        logits_of = lambda h: model_fns.logits(config, params, h)  # noqa: E731
        certificate = certify(y, c, logits_of)
    y_np = np.asarray(y, dtype=np.float64)
    c_np = np.asarray(c, dtype=np.float64)

    ordinary_error = None
    c_ordinary = None
    if options.ordinary_jacobian:
        with timer.step("ordinary Jacobian contributions"):
            _, c_ord = contributions(params, inputs, config, FreezePolicy.ORDINARY, options.chunk)
            c_ordinary = np.asarray(c_ord, dtype=np.float64)
            ordinary_error = float(np.linalg.norm(c_ordinary.sum(0) - y_np) / np.linalg.norm(y_np))

    spectrum: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    if n <= options.max_dense_tokens:
        k = min(options.top_k, d)
        with timer.step(f"dense SVD of J ({d} × {n}·{d})"):
            triplets = dense_top_k(np.asarray(materialize(params, inputs, config, chunk=options.chunk)), k)
        u = orient_to(triplets.U.T, y_np)
        ids_top, scores_top = top_tokens(u, unembedding_matrix(config, params), options.decode_top_tokens)
        spectrum = {
            "method": "dense",
            "singular_values": triplets.S.tolist(),
            "frobenius_norm": None,
            "left_vectors_top_tokens": [
                {
                    "index": i + 1,
                    "sigma": float(triplets.S[i]),
                    "tokens": token_text(tokenizer, ids_top[i]),
                    "token_ids": ids_top[i].tolist(),
                    "scores": scores_top[i].tolist(),
                }
                for i in range(k)
            ],
        }
        arrays.update(U=u.T, S=triplets.S, V=triplets.V)
    else:
        spectrum = {
            "method": "skipped",
            "reason": f"N={n} > analysis.max_dense_tokens={options.max_dense_tokens}",
        }

    token_importance = np.linalg.norm(c_np, axis=-1)
    predicted = certificate.predicted_token_id
    summary = {
        "model": model.name,
        "family": config.family,
        "text": text,
        "n_tokens": n,
        "tokens": token_text(tokenizer, ids),
        "dtype": str(jnp.dtype(model.dtype)),
        "jacobian_input": JACOBIAN_INPUT,
        "predicted_token": tokenizer.decode([predicted]),
        "predicted_token_id": predicted,
        "reconstruction_relative_error": certificate.relative_error,
        "reconstruction_argmax_matches": certificate.argmax_matches,
        "ordinary_jacobian_relative_error": ordinary_error,
        "singular_values": spectrum.get("singular_values"),
        "spectrum": spectrum,
        "token_contribution_norms": token_importance.tolist(),
        "timings_seconds": timer.seconds,
    }
    arrays.update(y=y_np, contributions=c_np, token_ids=ids, inputs=np.asarray(inputs, dtype=np.float64))
    if c_ordinary is not None:
        arrays["ordinary_contributions"] = c_ordinary
    return RunResult(summary, arrays)


def write_run(result: RunResult, out_dir: Path) -> Path:
    s = result.summary
    with atomic_directory(out_dir) as staging:
        write_json(staging / "summary.json", s)
        write_npz(staging / "arrays.npz", result.arrays)
        ordinary = result.arrays.get("ordinary_contributions")
        reconstruction_scatter(
            staging / "reconstruction.png",
            result.arrays["y"],
            result.arrays["contributions"].sum(0),
            None if ordinary is None else ordinary.sum(0),
            s["reconstruction_relative_error"],
            s["ordinary_jacobian_relative_error"],
            f"{s['model']} · {s['n_tokens']} tokens · {s['dtype']}",
        )
        if s["singular_values"]:
            singular_values(
                staging / "singular_values.png",
                np.asarray(s["singular_values"]),
                f"top-{len(s['singular_values'])} singular values of the detached Jacobian",
            )
    return out_dir


def run(config: RunConfig, verbose: bool = True) -> tuple[RunResult, Path]:
    timer = Timer(verbose)
    with timer.step("loading model"):
        loaded = load_model(
            config.model.source,
            config.model.path,
            config.model.dtype,
            use_cache=config.model.cache,
            progress=verbose,
        )
    result = analyse(loaded, config.text, config.analysis, config.add_bos, timer)
    result.summary["config"] = config.model_dump()
    result.summary["params_from_cache"] = loaded.from_cache
    return result, write_run(result, Path(config.output_dir))
