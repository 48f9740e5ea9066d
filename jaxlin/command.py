"""`jaxlin run CONFIG` as a function: the output claimed and the request checked before
anything is loaded, the model loaded and placed, then one input (`jaxlin.runner`) or many
(`jaxlin.many_prompts`), then the analyses of the run as a whole (steering)."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import jax

from jaxlin.analyses import Timer
from jaxlin.devices import batch_devices, batch_mesh
from jaxlin.distributed import initialize, is_writer
from jaxlin.loading import LoadedModel, load_model
from jaxlin.many_prompts import run_many
from jaxlin.mesh import make_mesh
from jaxlin.model_source import read_model_config
from jaxlin.outputs import OutputClaim, RunKind, claim_output
from jaxlin.run_config import ConfigError, MeshSection, ModelSection, RunConfig
from jaxlin.runner import RunResult, analyse, analyse_run, check_run_memory, write_run


def device_mesh(count: int | None, mesh: MeshSection | None = None) -> Any:
    """The context the analyses run in: the configured data × fsdp × tensor mesh, else a
    mesh with the first `count` devices (default: all) on `data`; no mesh for one device."""
    available = jax.devices()
    if count is not None and count > len(available):
        raise ConfigError(
            f"devices: {count} requested, but {len(available)} {available[0].platform} device(s) available"
        )
    chosen = available[: count or len(available)]
    built = make_mesh(mesh.sizes(), chosen) if mesh is not None else batch_mesh(chosen)
    return jax.set_mesh(built) if built.size > 1 else nullcontext()


def load_placed(section: ModelSection, verbose: bool) -> LoadedModel:
    """The model of a `model:` section, its parameters built straight on the ambient mesh:
    each device reads (from the checkpoint, or the params cache) and holds only its shard
    of every split parameter (`jaxlin.mesh`'s rules)."""
    mesh = jax.sharding.get_mesh()
    return load_model(
        section.source,
        section.path,
        section.dtype,
        use_cache=section.cache,
        progress=verbose,
        quantized=section.quantized,
        mesh=None if mesh.empty else mesh,
    )


def start(config: RunConfig, verbose: bool) -> bool:
    """What every kind of run does first, before any device is touched: join the other
    processes of a distributed run (`jaxlin.distributed`); returns whether this process
    prints progress (process 0 only)."""
    initialize(config.distributed)
    return verbose and is_writer()


def run(config: RunConfig, verbose: bool = True) -> tuple[RunResult, Path]:
    """The output location is checked and locked before anything is loaded (see
    `jaxlin.outputs.claim_output`)."""
    texts = config.input_texts()  # read (and checked) before any expensive step
    # The model's config alone (no weights yet): bad requests are refused before any write.
    config.check_against(read_model_config(config.model))
    verbose = start(config, verbose)
    kind: RunKind = "single" if texts is None else "many"
    claim = claim_output(config.output_dir, kind, config.overwrite)
    with claim as output, device_mesh(config.devices, config.mesh):
        return _run(config, texts, output, verbose)


def _run(
    config: RunConfig, texts: list[str] | None, output: OutputClaim, verbose: bool
) -> tuple[RunResult, Path]:
    timer = Timer(verbose)
    with timer.step("loading model"):
        loaded = load_placed(config.model, verbose)
    check_run_memory(loaded, config)  # steering's own programs, before any input is analysed
    progress = (
        (lambda message: print(f"[jaxlin]   {message}", file=sys.stderr, flush=True)) if verbose else None
    )
    devices = batch_devices()
    if progress is not None and devices > 1:
        progress(f"batched products split across {devices} {jax.devices()[0].platform} devices")
    if texts is not None:
        return run_many(config, loaded, texts, timer, progress, output.target)
    result = analyse(loaded, config.text, config.analysis, config.add_bos, timer, progress)
    for whole_run in analyse_run(loaded, config, timer):
        result.summary.update(whole_run.summary_entries())
        result.arrays.update(whole_run.arrays())
    result.summary["config"] = config.model_dump()
    result.summary["params_from_cache"] = loaded.from_cache
    result.summary["checkpoint_sha256"] = loaded.checkpoint_sha256
    result.summary["devices"] = batch_devices()
    return result, write_run(result, output.target)
