"""The typed schema of a run config (YAML). Unknown keys and bad values are errors
that name the offending field."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jaxlin.errors import JaxlinError


class ConfigError(JaxlinError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Strict):
    source: Literal["embedded", "gguf", "hf"] = "embedded"
    path: str | None = Field(
        None, description="GGUF file, HF model directory, or hub id in the local HF cache"
    )
    dtype: Literal["float32", "float64", "bfloat16"] = "float32"
    cache: bool = Field(True, description="cache converted params (orbax) so later runs skip conversion")


class PerTokenSection(_Strict):
    method: Literal["exact", "projected", "off"] = Field(
        "exact",
        description="exact: every block J_t from d transposed products; projected: blocks projected on a "
        "rank-`rank` Krylov basis of the whole J (cheaper, approximate); off: skip",
    )
    top_k: int = Field(4, ge=1, description="singular triplets per token")
    rank: int = Field(64, ge=1, description="projection rank for method=projected")

    @field_validator("method", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        return "off" if value is False else value  # YAML reads a bare `off` as false


class LayersSection(_Strict):
    enabled: bool = Field(False, description="sweep every layer's taps (exact spectra from J·Jᵀ)")
    kinds: list[Literal["residual", "attention", "mlp"]] = Field(
        ["residual", "attention", "mlp"], min_length=1, description="taps to sweep"
    )
    local: bool = Field(False, description="layer-local Jacobians (w.r.t. each layer's input) as well")
    final_norm: bool = Field(True, description="apply the final norm to each tap (logit-lens style)")
    top_k: int = Field(
        3,
        ge=1,
        description="top singular triplets per tap: left and right vectors decoded, left ones followed",
    )


class AnalysisSection(_Strict):
    method: Literal["lanczos", "dense"] = Field(
        "lanczos", description="whole-J top-k: matrix-free Lanczos on J·Jᵀ, or a dense SVD (short inputs)"
    )
    top_k: int = Field(8, ge=1, description="singular triplets of the whole J to report")
    tolerance: float | None = Field(
        None,
        gt=0,
        description="relative residual bound to reach (default: 1e-10 in float64, 1e-4 in float32, "
        "4·eps ≈ 3.1e-2 in bfloat16)",
    )
    krylov_depth: int | None = Field(None, ge=1, description="initial Lanczos depth (grown until converged)")
    seed: int = Field(0, description="seed of the Lanczos start vector and stochastic estimates")
    per_token: PerTokenSection = PerTokenSection()
    layers: LayersSection = LayersSection()
    frobenius_samples: int = Field(
        64, ge=1, description="Hutchinson samples for ‖J_t‖_F when per-token spectra are not exact"
    )
    decode_top_tokens: int = Field(5, ge=1, le=100, description="tokens shown per decoded singular vector")
    ordinary_jacobian: bool = Field(True, description="also reconstruct y with the ordinary Jacobian")
    max_ordinary_tokens: int = Field(
        512, ge=1, description="longest input for the ordinary Jacobian (it needs dense attention)"
    )
    max_dense_tokens: int = Field(48, ge=1, description="longest input for method=dense")
    chunk: int = Field(64, ge=1, description="vectors pushed through the operator at once")
    attention_block: int = Field(256, ge=1, description="query block of the O(N)-memory attention")


class SteeringSection(_Strict):
    enabled: bool = False
    concept: str = Field("The bridge out of Marin is the Golden", description="the concept prompt S")
    prompt: str = Field("Here is a painting of the", description="the prompt to continue")
    layer: int | None = Field(None, ge=0, description="0-based layer (default: round(2L/3) − 1)")
    lambdas: list[float] = Field([0.0, 2.0, 4.0, 8.0], min_length=1, description="strengths λ")
    max_new_tokens: int = Field(16, ge=1, le=512)
    mode: Literal["jacobian", "singular"] = Field(
        "jacobian",
        description="jacobian: running sum of J_S·e_k (published rule); singular: J_S's top direction",
    )


class RunConfig(_Strict):
    model: ModelSection = ModelSection()
    text: str | None = Field(None, description="the input text; the CLI's --text overrides it")
    texts: list[str] | None = Field(
        None, min_length=1, description="many input texts (one run each, resumable)"
    )
    texts_file: str | None = Field(None, description="a UTF-8 file with one input text per non-empty line")
    add_bos: bool | None = Field(
        None,
        description="null: exactly the tokens the model's own tokenizer gives (its special-token policy: "
        "HF tokenizer_config / GGUF tokenizer.ggml.add_bos_token); true/false: the text's tokens with / "
        "without the BOS token prepended",
    )
    analysis: AnalysisSection = AnalysisSection()
    steering: SteeringSection = SteeringSection()
    devices: int | None = Field(
        None, ge=1, description="split the batched products across this many devices (default: all)"
    )
    output_dir: str = "runs/default"

    @field_validator("text")
    @classmethod
    def _text_not_empty(cls, text: str | None) -> str | None:
        if text is not None and not text.strip():
            raise ValueError("text is empty")
        return text

    @field_validator("texts")
    @classmethod
    def _texts_not_empty(cls, texts: list[str] | None) -> list[str] | None:
        for index, text in enumerate(texts or []):
            if not text.strip():
                raise ValueError(f"texts[{index}] is empty")
        return texts

    @model_validator(mode="after")
    def _one_input(self) -> RunConfig:
        given = [name for name in ("text", "texts", "texts_file") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, texts, texts_file (got {given or 'none'})")
        return self

    def input_texts(self) -> list[str] | None:
        """The prompts of a multi-prompt run (None for a single `text`)."""
        if self.texts is not None:
            return list(self.texts)
        if self.texts_file is not None:
            path = Path(self.texts_file)
            if not path.is_file():
                raise ConfigError(f"texts_file: {path} does not exist")
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if not lines:
                raise ConfigError(f"texts_file: {path} has no non-empty line")
            return lines
        return None


def _format(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "<root>"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    more = f" (+{error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{source}: {where}: {message}{more}"


def parse_run_config(data: object, source: str = "config", **overrides: object) -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    # An override of None removes the key (e.g. --text replaces a config's texts).
    merged = dict(data)
    for key, value in overrides.items():
        if value is None:
            if key in ("texts", "texts_file"):
                merged.pop(key, None)
        else:
            merged[key] = value
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as error:
        raise ConfigError(_format(error, source)) from None


def load_run_config(path: str | Path, **overrides: object) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    return parse_run_config(data or {}, str(path), **overrides)
