"""A Hugging Face model directory (config.json + safetensors, sharded or not), or a hub
id resolved offline from the local HF cache → `Model`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from converters.params import CheckpointError, params_from_tensors
from jaxlin.families import family_for_hf_config
from jaxlin.model import Model

_PICKLED = ("pytorch_model.bin", "model.pt", "pytorch_model.bin.index.json", "consolidated.00.pth")


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


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
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
    path_or_id: str | os.PathLike, dtype: jnp.dtype = jnp.float32, progress: bool = False
) -> Model:
    from safetensors import safe_open
    from transformers import AutoConfig

    directory = resolve_model_directory(path_or_id)
    if not (directory / "config.json").exists():
        raise CheckpointError(f"{directory}: config.json is missing")
    hf_config = AutoConfig.from_pretrained(directory)
    family = family_for_hf_config(hf_config)
    config = family.config_from_hf(hf_config)

    handles = [safe_open(str(f), framework="flax") for f in safetensors_files(directory)]
    where = {name: handle for handle in handles for name in handle.keys()}

    def read(name: str) -> np.ndarray:
        # framework="flax" reads bf16 too (numpy's reader does not); np.asarray then
        # gives an ml_dtypes array that casts exactly to any wider dtype.
        return np.asarray(where[name].get_tensor(name))

    params = params_from_tensors(config, family, list(where), read, dtype, str(directory), progress)
    return Model(config, params, name=str(path_or_id))
