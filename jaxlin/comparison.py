"""Cross-model comparison: several models, the same prompts, one report.

For each model and prompt the model's own tokenizer makes the tokens (the run config's
`add_bos` policy, as in a single run) and the prompt is analysed once, exactly as a single
run analyses it (`analyse`: one linearization, certificate, whole-J top-k with residual
bounds, decoded top singular directions), with these settings fixed by the comparison:

- per-token influence ‖J_t‖_F: exact from J's d rows (`comparison.influence`, exact up to
  `max_exact_tokens` under auto), else the Hutchinson estimate (`analysis.frobenius_samples`);
- the layer sweep of the cumulative residual taps (exact spectra from J·Jᵀ per layer), whose
  effective dimensionality — stable rank ‖J‖_F²/σ₁² and entropy rank exp H(σ_i²/Σσ²), as
  `jaxlin.layer_sweep.LayerSpectrum` defines them — is reported against relative depth (ℓ+1)/L;
- no ordinary Jacobian, no ablation, no steering.

Models have different tokenizers, so per-token influence is mapped onto the prompt's
characters (`character_alignment`): each character gets the influence of the token(s) that
spell it — its token's ‖J_t‖_F when one token spells it, and ‖[J_t …]‖_F = √Σ‖J_t‖_F² when
several do (the byte pieces of one character): a value is never spread or split. Tokens
that spell no character (BOS, EOS, other special tokens) are reported apart.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from pydantic import BaseModel, ConfigDict

from jaxlin.devices import batch_devices
from jaxlin.distributed import is_writer
from jaxlin.errors import JaxlinError
from jaxlin.outputs import claim_output, make_directory, write_json_atomic
from jaxlin.record import DecodedVector, RightVector
from jaxlin.run_config import AnalysisSection, ComparedModel, ComparisonSection, LayersSection, RunConfig

# The token helpers and the single-prompt analysis, imported here only (they move to
# jaxlin.tokens / jaxlin.runner).
from jaxlin.runner import analyse
from jaxlin.tokens import tokenize

SCHEMA_VERSION = "1"

ALIGNMENT_RULE = (
    "each character holds the influence of the token(s) that spell it: its token's ‖J_t‖_F, or "
    "√Σ‖J_t‖_F² over the tokens sharing it (byte pieces of one character); a character no token's "
    "offsets cover (a space a tokenizer trims from its token's span) belongs to the token after the last "
    "one ending before it"
)

DEFINITIONS = {
    "certificate": "‖Σ_t J_t·x_t + c_bias − y‖/‖y‖ for the target y (final-normed hidden state of the "
    "prompt's last token)",
    "influence": "‖J_t‖_F per token: exact from J's d rows, or a Hutchinson estimate",
    "stable_rank": "‖J‖_F² / σ₁² (whole J; per layer: of the cumulative residual tap's Jacobian)",
    "entropy_rank": "exp H(σ_i²/Σσ²) over all d singular values of a layer's residual-tap Jacobian",
    "relative_depth": "(layer + 1) / number of layers: 1 is the last layer's output",
    "character_influence": ALIGNMENT_RULE,
}


class _Fields(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


class SilentToken(_Fields):
    """A token that spells no character of the prompt (BOS, EOS, other special tokens)."""

    position: int
    token: str
    influence: float


class CharacterAlignment(_Fields):
    owners: list[list[int]]  # per character: the token positions that spell it
    influence: list[float]  # per character
    silent_tokens: list[SilentToken]
    method: Literal["offsets", "decoding"]


class LayerPoint(_Fields):
    layer: int
    relative_depth: float
    stable_rank: float
    entropy_rank: float
    sigma_1: float
    certificate: float


class ModelResult(_Fields):
    """One model on one prompt."""

    label: str
    n_tokens: int
    tokens: list[str]
    token_ids: list[int]
    predicted_token: str
    certificate: float
    argmax_matches: bool
    singular_values: list[float]
    residual_bounds: list[float]
    converged: bool
    frobenius: float
    stable_rank: float
    influence_method: str
    influence: list[float]
    contribution_norms: list[float]
    layers: list[LayerPoint]
    left_directions: list[DecodedVector]
    right_directions: list[RightVector]
    alignment: CharacterAlignment


class PromptComparison(_Fields):
    text: str
    results: list[ModelResult]


class ComparedModelInfo(_Fields):
    label: str
    name: str
    family: str
    dtype: str
    hidden_size: int
    num_layers: int
    source: str
    path: str | None
    params_from_cache: bool
    checkpoint_sha256: dict[str, str]


class ComparisonRecord(_Fields):
    """summary.json of a comparison."""

    schema_version: Literal["1"] = SCHEMA_VERSION
    kind: Literal["comparison"] = "comparison"
    models: list[ComparedModelInfo]
    prompts: list[PromptComparison]
    max_certificate: float
    alignment_rule: str = ALIGNMENT_RULE
    definitions: dict[str, str]
    devices: int
    platform: str
    config: dict[str, Any]


# ----------------------------------------------------------------------------- characters


def _own_tokens(tokenizer: Any, text: str, ids: np.ndarray) -> tuple[int, list[int]]:
    """Where the text's own tokens (no special tokens) sit in `ids`: (offset, own ids)."""
    own = [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]
    values = [int(i) for i in ids]
    for start in range(len(values) - len(own) + 1):
        if values[start : start + len(own)] == own:
            return start, own
    raise JaxlinError(
        f"the tokens of {text!r} do not contain the text's own tokens (tokenizer {tokenizer!r})"
    )


def _offset_spans(tokenizer: Any, text: str, own: list[int]) -> list[tuple[int, int]] | None:
    """Each own token's character span from the tokenizer's offsets (None where it has none)."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return None
    if [int(i) for i in encoded["input_ids"]] != own:
        return None
    return [(int(a), int(b)) for a, b in encoded["offset_mapping"]]


def _decoded_spans(tokenizer: Any, text: str, own: list[int]) -> list[tuple[int, int]]:
    """Spans by decoding the tokens cumulatively: a token ends where the decoded prefix is a
    prefix of the text; tokens that end inside a character (a byte piece) share the span of
    the token that completes it; tokens after the text stops matching get no span."""
    spans: list[tuple[int, int]] = []
    start, pending = 0, 0
    for count in range(1, len(own) + 1):
        decoded = tokenizer.decode(own[:count])
        if text.startswith(decoded) and len(decoded) > start:
            spans.extend([(start, len(decoded))] * (count - pending))
            start, pending = len(decoded), count
    spans.extend([(start, start)] * (len(own) - pending))
    return spans


def character_owners(spans: Sequence[tuple[int, int]], n_chars: int) -> list[list[int]]:
    """Per character, the indices of the spans covering it. A character no span covers (a
    space a tokenizer trims from the span of the token that spells it, "Ġthe" → "the")
    belongs to the token after the last one whose span ends at or before it."""
    owners: list[list[int]] = [[] for _ in range(n_chars)]
    for index, (begin, end) in enumerate(spans):
        for char in range(max(begin, 0), min(end, n_chars)):
            owners[char].append(index)
    for char in range(n_chars):
        if not owners[char]:
            before = [i for i, (begin, end) in enumerate(spans) if begin < end <= char]
            owners[char] = [min(before[-1] + 1, len(spans) - 1) if before else 0]
    return owners


def character_alignment(
    tokenizer: Any, text: str, ids: np.ndarray, influence: np.ndarray, token_texts: Sequence[str]
) -> CharacterAlignment:
    """Per-token influence mapped onto `text`'s characters (see the module docstring)."""
    offset, own = _own_tokens(tokenizer, text, ids)
    spans = _offset_spans(tokenizer, text, own)
    method: Literal["offsets", "decoding"] = "offsets"
    if spans is None:
        spans, method = _decoded_spans(tokenizer, text, own), "decoding"
    owners = [[offset + i for i in row] for row in character_owners(spans, len(text))]
    influence = np.asarray(influence, np.float64)
    values = [float(math.sqrt(float(np.sum(influence[row] ** 2)))) for row in owners]
    speaking = {t for row in owners for t in row}
    silent = [
        SilentToken(position=t, token=token_texts[t], influence=float(influence[t]))
        for t in range(len(ids))
        if t not in speaking
    ]
    return CharacterAlignment(owners=owners, influence=values, silent_tokens=silent, method=method)


# ----------------------------------------------------------------------------- one model, one prompt


def comparison_analysis(config: RunConfig, n_tokens: int) -> AnalysisSection:
    """The analysis settings every (model, prompt) runs with (see the module docstring)."""
    section: ComparisonSection = config.comparison  # type: ignore[assignment]
    exact = section.influence == "exact" or (
        section.influence == "auto" and n_tokens <= section.max_exact_tokens
    )
    base = config.analysis
    layers = LayersSection(
        enabled=True,
        kinds=["residual"],
        local=False,
        final_norm=base.layers.final_norm,
        top_k=base.layers.top_k,
    )
    per_token = base.per_token.model_copy(update={"method": "exact" if exact else "off"})
    return base.model_copy(
        update={"per_token": per_token, "layers": layers, "ordinary_jacobian": False, "ablation": False}
    )


def model_result(loaded: Any, label: str, text: str, config: RunConfig) -> ModelResult:
    """One model on one prompt: the single-run analysis, its layers and its characters."""
    ids = tokenize(loaded.tokenizer, text, config.add_bos)
    summary = analyse(loaded, text, comparison_analysis(config, len(ids)), config.add_bos).summary
    depth = loaded.model.config.num_layers
    layers = [
        LayerPoint(
            layer=row["layer"],
            relative_depth=(row["layer"] + 1) / depth,
            stable_rank=row["stable_rank"],
            entropy_rank=row["entropy_rank"],
            sigma_1=row["sigma_1"],
            certificate=row["reconstruction_relative_error"],
        )
        for row in summary["layers"]
    ]
    influence = np.asarray(summary["norms"]["token_frobenius"], np.float64)
    return ModelResult(
        label=label,
        n_tokens=summary["n_tokens"],
        tokens=summary["tokens"],
        token_ids=summary["token_ids"],
        predicted_token=summary["predicted_token"],
        certificate=summary["reconstruction_relative_error"],
        argmax_matches=summary["reconstruction_argmax_matches"],
        singular_values=summary["singular_values"],
        residual_bounds=summary["spectrum"]["residual_bounds"],
        converged=summary["spectrum"]["converged"],
        frobenius=summary["norms"]["frobenius"],
        stable_rank=summary["norms"]["stable_rank"],
        influence_method=summary["norms"]["frobenius_method"],
        influence=influence.tolist(),
        contribution_norms=summary["norms"]["token_contribution_norms"],
        layers=layers,
        left_directions=summary["spectrum"]["left_vectors_top_tokens"],
        right_directions=summary["right_vectors_nearest_embeddings"],
        alignment=character_alignment(
            loaded.tokenizer, text, np.asarray(summary["token_ids"]), influence, summary["tokens"]
        ),
    )


# ----------------------------------------------------------------------------- the comparison


def _say(verbose: bool) -> Callable[[str], None]:
    def say(message: str) -> None:
        if verbose:
            print(f"[jaxlin] {message}", file=sys.stderr, flush=True)

    return say


def model_label(section: ComparedModel, name: str, taken: set[str]) -> str:
    """The model's label: its own, else its name (numbered when two models share one)."""
    label = section.label or name
    if section.label is None and label in taken:
        label = f"{label} #{len(taken) + 1}"
    return label


# ----------------------------------------------------------------------------- resume

RESULTS_DIR = "results"  # one JSON per model × prompt, so an interrupted comparison resumes
RESULT_VERSION = 1


def result_path(out: Path, model_index: int, prompt_index: int) -> Path:
    return out / RESULTS_DIR / f"m{model_index:02d}-p{prompt_index:04d}.json"


def fingerprint(entry: ComparedModel, loaded: Any, text: str, config: RunConfig) -> dict[str, Any]:
    """What a stored result must match to be reused: the model (its section and its
    checkpoint's digests), the prompt, and the analysis settings as they apply to it."""
    n_tokens = len(tokenize(loaded.tokenizer, text, config.add_bos))
    record = {
        "version": RESULT_VERSION,
        "model": entry.model_dump(exclude={"label"}),
        "checkpoint_sha256": loaded.checkpoint_sha256,
        "text": text,
        "add_bos": config.add_bos,
        "analysis": comparison_analysis(config, n_tokens).model_dump(),
    }
    return json.loads(json.dumps(record))


def stored_result(path: Path, expected: dict[str, Any]) -> ModelResult | None:
    """A stored result if it is complete, valid and computed under the same fingerprint."""
    if not is_writer():  # the writer alone reads back what it wrote (see `outputs.claim_output`)
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or record.get("fingerprint") != expected:
            return None
        return ModelResult.model_validate(record["result"])
    except (OSError, ValueError, KeyError):  # pydantic's ValidationError is a ValueError
        return None


def run_comparison(config: RunConfig, verbose: bool = True) -> tuple[ComparisonRecord, Path]:
    """The comparison of `config` written to its output directory; returns (record, dir)."""
    from jaxlin.command import device_mesh, load_placed, start
    from jaxlin.model_source import read_model_config

    section: ComparisonSection = config.comparison  # type: ignore[assignment]
    texts = config.input_texts() or [config.text]  # read (and checked) before any expensive step
    for index, entry in enumerate(section.models):
        try:
            config.check_against(read_model_config(entry))
        except JaxlinError as error:
            raise JaxlinError(f"comparison.models[{index}]: {error}") from None
    verbose = start(config, verbose)
    say = _say(verbose)
    with (
        claim_output(config.output_dir, "comparison", config.overwrite) as output,
        device_mesh(config.devices),
    ):
        out = output.target
        make_directory(out / RESULTS_DIR)
        infos: list[ComparedModelInfo] = []
        per_model: list[list[ModelResult]] = []
        reused = 0
        for model_index, entry in enumerate(section.models):
            say(f"loading {entry.label or entry.path or entry.source} …")
            loaded = load_placed(entry, verbose)
            model = loaded.model
            label = model_label(entry, model.name, {info.label for info in infos})
            infos.append(
                ComparedModelInfo(
                    label=label,
                    name=model.name,
                    family=model.config.family,
                    dtype=str(jnp.dtype(model.dtype)),
                    hidden_size=model.config.hidden_size,
                    num_layers=model.config.num_layers,
                    source=entry.source,
                    path=entry.path,
                    params_from_cache=loaded.from_cache,
                    checkpoint_sha256=loaded.checkpoint_sha256,
                )
            )
            results = []
            for index, text in enumerate(texts):
                path = result_path(out, model_index, index)
                expected = fingerprint(entry, loaded, text, config)
                stored = stored_result(path, expected)
                if stored is not None:  # the label is presentation: today's is used
                    results.append(stored.model_copy(update={"label": label}))
                    reused += 1
                    continue
                say(f"{label}: prompt {index + 1} of {len(texts)} …")
                results.append(model_result(loaded, label, text, config))
                write_json_atomic(
                    path, {"fingerprint": expected, "result": results[-1].model_dump(mode="json")}
                )
                say(f"{label}: certificate {results[-1].certificate:.1e}")
            per_model.append(results)
            del loaded, model
            jax.clear_caches()
        if reused:
            total = len(texts) * len(section.models)
            say(f"resumed: {reused} of {total} model × prompt results were complete")
        prompts = [
            PromptComparison(text=text, results=[results[i] for results in per_model])
            for i, text in enumerate(texts)
        ]
        record = ComparisonRecord(
            models=infos,
            prompts=prompts,
            max_certificate=max(r.certificate for p in prompts for r in p.results),
            definitions=DEFINITIONS,
            devices=batch_devices(),
            platform=jax.devices()[0].platform,
            config=config.model_dump(),
        )
        write_comparison(record, out)
    return record, out


def write_comparison(record: ComparisonRecord, out: Path) -> None:
    """summary.json, the figures and report.html, each written atomically in place (beside
    the per-result files an interrupted comparison resumes from)."""
    from jaxlin.comparison_plots import write_figures_and_report

    write_json_atomic(out / "summary.json", record.model_dump(mode="json"))
    write_figures_and_report(out, record)


def print_summary(record: ComparisonRecord, out: Path) -> None:
    """The terminal table of a comparison."""
    for info in record.models:
        print(f"model      {info.label}: {info.name} ({info.family}, {info.dtype}, {info.num_layers} layers)")
    for index, prompt in enumerate(record.prompts):
        print(f"prompt {index + 1}   {prompt.text!r}")
        for r in prompt.results:
            peak = max(r.layers, key=lambda point: point.entropy_rank)
            print(
                f"  {r.label:<24} {r.n_tokens:>4} tokens → {r.predicted_token!r:<12} certificate "
                f"{r.certificate:.2e}  σ₁ {r.singular_values[0]:.3f}  stable rank {r.stable_rank:.2f}  "
                f"peak entropy rank {peak.entropy_rank:.1f} at depth {peak.relative_depth:.2f}"
            )
    print(f"wrote      {out}/ (summary.json, PNG figures, report.html)")
