"""A Hugging Face model directory (config.json + safetensors, sharded or not), or a hub
id resolved offline from the local HF cache → `Model`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax.numpy as jnp
from jax.sharding import Mesh

from converters.lazy import LazyTensor
from converters.params import CheckpointError, params_from_tensors
from jaxlin.families import family_for_hf_config
from jaxlin.model import Model

_PICKLED = ("pytorch_model.bin", "model.pt", "pytorch_model.bin.index.json", "consolidated.00.pth")
# Fields by which a config asks transformers to import Python files from the model
# directory (or the hub). jaxlin only ever runs its own ports, so these are refused.
_REMOTE_CODE_FIELDS = ("auto_map", "trust_remote_code")
# The JSON files of a model directory that transformers reads when jaxlin loads one.
_CONFIG_FILES = ("config.json", "tokenizer_config.json")


def resolve_model_directory(path_or_id: str | os.PathLike) -> Path:
    """A local directory as-is; otherwise a hub id looked up in the local HF cache only."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a model directory (config.json + *.safetensors)")
    text = str(path_or_id)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(text, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError) as error:
            raise CheckpointError(
                f"{text}: not a local directory and not in the local Hugging Face cache "
                f"(offline lookup: {type(error).__name__})"
            ) from None
    raise CheckpointError(f"{path}: no such model directory")


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else is one line naming the file."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror or error})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _remote_code_field(data: Any, prefix: str = "") -> str | None:
    """The dotted name of the first field (at any depth) that asks for remote code."""
    if isinstance(data, dict):
        for key, value in data.items():
            if key in _REMOTE_CODE_FIELDS and value:
                return prefix + key
            found = _remote_code_field(value, f"{prefix}{key}.")
            if found:
                return found
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found = _remote_code_field(value, f"{prefix}{index}.")
            if found:
                return found
    return None


def checked_config_json(directory: Path) -> dict[str, Any]:
    """config.json of a model directory, read by jaxlin before transformers sees it:
    malformed JSON, a field asking for remote code (in it or in tokenizer_config.json)
    and an unsupported model_type are each one line naming the file or field."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: config.json is missing")
    for name in _CONFIG_FILES:
        path = directory / name
        if not path.is_file():
            continue
        data = read_json_object(path)
        field = _remote_code_field(data)
        if field:
            raise CheckpointError(
                f"{path}: field {field!r} asks to run Python code from the checkpoint; "
                "jaxlin never runs code from a model directory"
            )
        if name == "config.json":
            config = data
    family_for_hf_config(SimpleNamespace(model_type=config.get("model_type")))
    return config


def load_hf_tokenizer(directory: Path) -> Any:
    """The directory's own tokenizer; never custom code, never a prompt."""
    from transformers import AutoTokenizer

    checked_config_json(directory)
    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{directory}: cannot load its tokenizer ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(f, str) and f and Path(f).name == f for f in weight_map.values()
        ):
            raise CheckpointError(f"{index}: field 'weight_map' must map tensor names to file names")
        files = sorted({directory / f for f in weight_map.values()})
    elif (directory / "model.safetensors").exists():
        files = [directory / "model.safetensors"]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = [p for p in _PICKLED if (directory / p).exists()]
        hint = (
            f" (found pickled {pickled[0]}: jaxlin never loads pickles; convert it to safetensors)"
            if pickled
            else ""
        )
        raise CheckpointError(f"{directory}: no *.safetensors checkpoint{hint}")
    missing = [f for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{directory}: checkpoint shard {missing[0].name} is missing")
    return files


def load_hf_model(
    path_or_id: str | os.PathLike,
    dtype: jnp.dtype = jnp.float32,
    progress: bool = False,
    mesh: Mesh | None = None,
) -> Model:
    """The model of a HF directory, each param built on `mesh` (default: none, the
    default device) from the slices of the safetensors its devices hold."""
    from safetensors import safe_open
    from transformers import AutoConfig

    directory = resolve_model_directory(path_or_id)
    checked_config_json(directory)
    try:
        hf_config = AutoConfig.from_pretrained(directory, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{directory / 'config.json'}: {_first_line(error)}") from None
    family = family_for_hf_config(hf_config)
    config = family.config_from_hf(hf_config)

    # framework="numpy" reads bf16 as ml_dtypes' bfloat16, which casts exactly to any
    # wider dtype; a slice handle reads only the bytes of the slice asked for.
    handles = [safe_open(str(f), framework="numpy") for f in safetensors_files(directory)]
    where = {name: handle for handle in handles for name in handle.keys()}

    def read(name: str) -> LazyTensor:
        tensor = where[name].get_slice(name)
        return LazyTensor.of(tensor.get_shape(), lambda index: tensor[index])

    params = params_from_tensors(config, family, list(where), read, dtype, str(directory), progress, mesh)
    return Model(config, params, name=str(path_or_id))
