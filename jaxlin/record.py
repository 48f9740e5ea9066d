"""The run record: what summary.json is, as types.

A single run's record (`RunRecord`) and a many-prompt output's (`ManyPromptRecord`) are
pydantic models whose fields are summary.json's keys, so every renderer (the terminal
summary, the figures, the HTML report) reads typed fields and a summary that does not
fit is refused by name. `schema_version` says which shape a file has.

A record keeps what was recorded: the optional sections (layers, ablation, steering, the
run's config, …) are absent from summary.json when the run did not produce them, and a
record dumps exactly the keys it was given, plus its schema version (`record_data`). The
run's config and a prompt's fingerprint are typed by `jaxlin.run_config`'s sections, so a
change there is a change of the record's schema.

`FIGURES` names every figure jaxlin writes, with the report section that shows it and its
caption; `figure_names(record)` says which of them a run with this record has. The plot
writer and the report both read it, so a figure cannot be written without a home.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    model_serializer,
)

from jaxlin.errors import JaxlinError
from jaxlin.outputs import write_json_atomic
from jaxlin.run_config import AnalysisSection, ModelSection, RunConfig

SCHEMA_VERSION = "1"


class RecordError(JaxlinError):
    pass


class _Fields(BaseModel):
    # NaN stays NaN in summary.json (a failed certificate must read as one, not as null).
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, ser_json_inf_nan="constants"
    )


# ----------------------------------------------------------------------------- decoded vectors


class DecodedVector(_Fields):
    """A left singular vector read through the unembedding: its top tokens and scores."""

    index: int
    sigma: float
    tokens: list[str]
    token_ids: list[int]
    scores: list[float]


class TokenLeftVector(DecodedVector):
    """J_t's first left vector, decoded, and its first right vector read as the nearest
    input-embedding rows."""

    token: str
    right_vector_nearest_tokens: list[str]


class RightVector(_Fields):
    """A right singular vector read at its dominant token position."""

    index: int
    dominant_position: int
    dominant_token: str
    share_of_norm: float
    nearest_tokens: list[str]
    cosines: list[float]


class LayerRightVector(RightVector):
    sigma: float
    relative_residual: float


# ----------------------------------------------------------------------------- sections


class Products(_Fields):
    """Work through the operator: linearizations (forwards), J·v and Jᵀ·u."""

    linearizations: int
    matvecs: int
    rmatvecs: int


# Why the whole-J spectrum stopped (jaxlin.spectral.STOP_REASONS; a test keeps them equal).
StopReason = Literal["converged", "stalled", "full_depth", "exact"]


class Spectrum(_Fields):
    method: Literal["rows", "dense", "lanczos"]
    residual_bounds: list[float]
    krylov_depth: int | None
    converged: bool
    tolerance: float | None
    stop_reason: StopReason
    worst_relative_bound: float
    left_vectors_top_tokens: list[DecodedVector]


class Norms(_Fields):
    frobenius: float
    frobenius_method: str
    stable_rank: float
    token_frobenius: list[float]
    token_contribution_norms: list[float]


class PerToken(_Fields):
    """Every J_t's top singular values; absent fields when `method` is off."""

    method: Literal["exact", "projected", "off"]
    top_left_vector: list[TokenLeftVector] | None = None
    singular_values: list[list[float]] | None = None
    max_relative_bound: float | None = None


class LayerTap(_Fields):
    """One tap of one layer and its effective dimensionality (what every layer row has)."""

    layer: int
    tap: Literal["residual", "attention", "mlp"]
    scope: Literal["cumulative", "local"]
    stable_rank: float
    entropy_rank: float


class LayerRow(LayerTap):
    """One tap of one layer in the layer sweep."""

    sigma_1: float
    reconstruction_relative_error: float
    path_cosines: list[float]
    top_tokens: list[list[str]]
    right_vector_space: str
    right_vectors: list[LayerRightVector]


class AblationRow(_Fields):
    position: int
    token: str
    linear_logit_change: float
    linear_top_token: str
    removed_logit_change: float
    removed_top_token: str
    zeroed_logit_change: float
    zeroed_top_token: str


class Ablation(_Fields):
    predicted_token: str
    spearman_linear_vs_removed: float | None
    spearman_linear_vs_zeroed: float | None
    top_change_agreement_removed: float
    top_change_agreement_zeroed: float
    rows: list[AblationRow]


class SteeringRun(_Fields):
    strength: float = Field(alias="lambda")
    text: str
    token_ids: list[int]


class Steering(_Fields):
    concept: str
    prompt: str
    layer: int
    mode: Literal["jacobian", "singular"]
    baseline: str
    runs: list[SteeringRun]


class Fingerprint(_Fields):
    """What must match for a many-prompt run's completed prompt to be reused."""

    model: ModelSection
    analysis: AnalysisSection
    add_bos: bool | None


# ----------------------------------------------------------------------------- records


class _Record(_Fields):
    """A record dumps the fields it was given (absent optional sections stay absent) and
    always its schema version."""

    schema_version: Literal["1"] = SCHEMA_VERSION

    @model_serializer(mode="wrap")
    def _recorded(self, handler: Any) -> dict[str, Any]:
        return {"schema_version": self.schema_version, **handler(self)}


class RunRecord(_Record):
    """One text's run (also each prompt of a many-prompt output)."""

    model: str
    family: str
    text: str
    n_tokens: int
    tokens: list[str]
    token_ids: list[int]
    add_bos: Literal["tokenizer"] | bool
    bos_added: bool
    dtype: str
    jacobian_input: str
    predicted_token: str
    predicted_token_id: int
    reconstruction_relative_error: float
    reconstruction_argmax_matches: bool
    affine: bool
    bias_contribution_norm: float
    ordinary_jacobian_relative_error: float | None
    singular_values: list[float]
    products: Products
    spectrum: Spectrum
    norms: Norms
    per_token: PerToken
    right_vectors_nearest_embeddings: list[RightVector]
    timings_seconds: dict[str, float]
    layers: list[LayerRow] | None = None
    ablation: Ablation | None = None
    steering: Steering | None = None
    fingerprint: Fingerprint | None = None
    config: RunConfig | None = None
    params_from_cache: bool | None = None
    checkpoint_sha256: dict[str, str] | None = None
    devices: int | None = None


class PromptRow(_Fields):
    """One prompt of a many-prompt output; its own run is in `directory`."""

    index: int
    text: str
    n_tokens: int
    predicted_token: str
    reconstruction_relative_error: float
    sigma_1: float
    stable_rank: float
    directory: str


class AggregateLayerRow(LayerTap):
    """One tap of one layer, averaged over the prompts (stable and entropy rank: means)."""

    prompts: int
    stable_rank_std: float
    entropy_rank_std: float
    max_reconstruction_relative_error: float


class ManyPromptRecord(_Record):
    """A many-prompt output: one row per prompt and the aggregates."""

    model: str
    family: str
    dtype: str
    text: str
    n_prompts: int
    prompts: list[PromptRow]
    max_reconstruction_relative_error: float
    mean_stable_rank: float
    config: RunConfig
    params_from_cache: bool
    checkpoint_sha256: dict[str, str]
    layers: list[AggregateLayerRow] | None = None
    steering: Steering | None = None
    timings_seconds: dict[str, float]
    prompts_reused: int
    devices: int


Record = RunRecord | ManyPromptRecord


def _kind(data: Any) -> str:
    """A many-prompt summary is the one with `n_prompts`."""
    if isinstance(data, ManyPromptRecord) or (isinstance(data, Mapping) and "n_prompts" in data):
        return "many"
    return "single"


_RECORD = TypeAdapter(
    Annotated[
        Annotated[RunRecord, Tag("single")] | Annotated[ManyPromptRecord, Tag("many")],
        Discriminator(_kind),
    ]
)


def _first_problem(error: ValidationError) -> str:
    problem = error.errors()[0]
    # The discriminator's tag leads the location; the field path follows it.
    where = ".".join(str(part) for part in problem["loc"][1:]) or "(top level)"
    count = error.error_count()
    more = f" (and {count - 1} more)" if count > 1 else ""
    return f"{where}: {problem['msg']}{more}"


def parse_record(data: Mapping[str, Any] | Record, source: str = "summary") -> Record:
    """The typed record of a summary (a dict as the runner builds it, or summary.json's
    content); one line naming the first field that does not fit otherwise."""
    if isinstance(data, RunRecord | ManyPromptRecord):
        return data
    try:
        return _RECORD.validate_python(data)
    except ValidationError as error:
        raise RecordError(f"{source}: {_first_problem(error)}") from None


def read_record(path: Path) -> Record:
    """The record in a summary.json."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise RecordError(f"{path}: cannot be read ({error.strerror or error})") from None
    try:
        return _RECORD.validate_json(text)
    except ValidationError as error:
        raise RecordError(f"{path}: {_first_problem(error)}") from None


def record_data(record: Record) -> dict[str, Any]:
    """summary.json's content: the recorded fields, JSON types, `lambda` spelled as such."""
    return record.model_dump(mode="json", by_alias=True, exclude_unset=True)


def write_record(path: Path, record: Record) -> Path:
    """summary.json, replaced atomically."""
    return write_json_atomic(path, record_data(record))


# ----------------------------------------------------------------------------- figures


@dataclasses.dataclass(frozen=True)
class FigureSpec:
    """Where a figure is shown (a report section's id) and what it shows."""

    section: str
    caption: str


FIGURES: dict[str, FigureSpec] = {
    "reconstruction.png": FigureSpec(
        "reconstruction", "y against Σ_t J_t·x_t (detached, and ordinary if computed)"
    ),
    "singular_values.png": FigureSpec("spectrum", "top singular values of J with their residual bounds"),
    "per_token.png": FigureSpec(
        "per-token", "per-token importance ‖c_t‖, ‖J_t‖_F and the spectra of each J_t"
    ),
    "importance.png": FigureSpec(
        "per-token", "‖c_t‖ and ‖J_t‖_F as heat strips over the input text (darker = larger)"
    ),
    "focus_jacobian.png": FigureSpec(
        "per-token",
        "the token Jacobian J_t of the focus token (largest ‖c_t‖ past a leading BOS) as an image, detached "
        "and ordinary if computed, with its singular values inset",
    ),
    "ablation.png": FigureSpec(
        "ablation",
        "change of the predicted token's logit when a token is dropped: the linear map's y − c_t "
        "against the model with the token removed and with its embedding zeroed",
    ),
    "layers.png": FigureSpec(
        "layers", "effective dimensionality per layer: stable rank and entropy rank of each tap"
    ),
    "layers_path.png": FigureSpec(
        "layers",
        "path of the top left singular vectors: |cos| with the final layer's, labelled with each "
        "layer's top decoded token",
    ),
    "prompts.png": FigureSpec("prompts", "certificate and stable rank of J for every prompt"),
}


def figure_names(record: Record) -> list[str]:
    """The figures a run with this record writes, in `FIGURES` order."""
    if isinstance(record, ManyPromptRecord):
        names = {"prompts.png"} | ({"layers.png"} if record.layers else set())
    else:
        names = {"reconstruction.png", "singular_values.png", "per_token.png"}
        names |= {"importance.png", "focus_jacobian.png"}
        if record.ablation is not None:
            names.add("ablation.png")
        if record.layers:
            names.add("layers.png")
            if any(row.scope == "cumulative" for row in record.layers):
                names.add("layers_path.png")
    return [name for name in FIGURES if name in names]
