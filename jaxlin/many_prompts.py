"""A run over many prompts: one run directory per prompt under OUT/prompts/NNNN, resumable,
and aggregates in OUT (per-prompt rows, layer dynamics averaged over prompts)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlin.analyses import Timer
from jaxlin.devices import batch_devices
from jaxlin.distributed import is_writer
from jaxlin.loading import LoadedModel
from jaxlin.outputs import make_directory
from jaxlin.plots import write_figures
from jaxlin.record import parse_record, write_record
from jaxlin.report import render_report
from jaxlin.run_config import RunConfig
from jaxlin.runner import RunResult, analyse, analyse_run, write_run


def _analysis_fingerprint(config: RunConfig) -> dict[str, Any]:
    """What must match for a completed prompt to be reused on resume."""
    return {
        "model": config.model.model_dump(),
        "analysis": config.analysis.model_dump(),
        "add_bos": config.add_bos,
    }


def run_many(
    config: RunConfig,
    loaded: LoadedModel,
    texts: list[str],
    timer: Timer,
    progress: Callable[[str], None] | None,
    out: Path,
) -> tuple[RunResult, Path]:
    """One run directory per prompt under OUT/prompts/NNNN (each written atomically), then
    aggregates in OUT (each file replaced atomically). Resumable: a prompt whose directory
    is complete, for the same text and analysis settings, is read back rather than
    recomputed. OUT is a claimed many-prompt output (`claim_output` made it)."""
    make_directory(out / "prompts")
    fingerprint = _analysis_fingerprint(config)
    summaries: list[dict[str, Any]] = []
    reused = 0
    for index, text in enumerate(texts):
        prompt_dir = out / "prompts" / f"{index:04d}"
        previous = _completed(prompt_dir, text, fingerprint)
        if previous is not None:
            summaries.append(previous)
            reused += 1
            continue
        with timer.step(f"prompt {index + 1}/{len(texts)}"):
            result = analyse(loaded, text, config.analysis, config.add_bos, Timer(False), progress)
        result.summary["fingerprint"] = fingerprint
        result.summary["config"] = config.model_dump()
        write_run(result, prompt_dir, "prompt")
        summaries.append(result.summary)
        # Each prompt length compiles its own programs; every live CPU executable holds
        # memory mappings, and thousands of them exhaust the process's map limit.
        jax.clear_caches()
    if progress is not None and reused:
        progress(f"resumed: {reused} of {len(texts)} prompts were already complete")
    summary = _aggregate(summaries, loaded, config)
    for whole_run in analyse_run(loaded, config, timer):
        summary.update(whole_run.summary_entries())
    summary["timings_seconds"] = timer.seconds
    summary["prompts_reused"] = reused
    summary["devices"] = batch_devices()
    record = parse_record(summary)
    write_record(out / "summary.json", record)
    write_figures(out, record, {})
    render_report(out, record)
    return RunResult(summary, {}), out


def _completed(prompt_dir: Path, text: str, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    path = prompt_dir / "summary.json"
    if not is_writer() or not path.is_file():  # the writer alone reads back what it wrote
        return None
    try:
        previous = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if previous.get("text") != text or previous.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        return None
    return previous


def _aggregate(summaries: list[dict[str, Any]], loaded: LoadedModel, config: RunConfig) -> dict[str, Any]:
    """Per-prompt rows, and layer dynamics averaged over prompts."""
    rows = [
        {
            "index": i,
            "text": s["text"],
            "n_tokens": s["n_tokens"],
            "predicted_token": s["predicted_token"],
            "reconstruction_relative_error": s["reconstruction_relative_error"],
            "sigma_1": s["singular_values"][0],
            "stable_rank": s["norms"]["stable_rank"],
            "directory": f"prompts/{i:04d}",
        }
        for i, s in enumerate(summaries)
    ]
    first = summaries[0]
    summary: dict[str, Any] = {
        "model": first["model"],
        "family": first["family"],
        "dtype": first["dtype"],
        "text": f"{len(summaries)} prompts",
        "n_prompts": len(summaries),
        "prompts": rows,
        "max_reconstruction_relative_error": max(r["reconstruction_relative_error"] for r in rows),
        "mean_stable_rank": float(np.mean([r["stable_rank"] for r in rows])),
        "config": config.model_dump(),
        "params_from_cache": loaded.from_cache,
        "checkpoint_sha256": loaded.checkpoint_sha256,
    }
    if all("layers" in s for s in summaries):
        grouped: dict[tuple, list[dict[str, Any]]] = {}
        for s in summaries:
            for row in s["layers"]:
                grouped.setdefault((row["scope"], row["tap"], row["layer"]), []).append(row)
        summary["layers"] = [
            {
                "layer": layer,
                "tap": tap,
                "scope": scope,
                "prompts": len(group),
                "stable_rank": float(np.mean([g["stable_rank"] for g in group])),
                "stable_rank_std": float(np.std([g["stable_rank"] for g in group])),
                "entropy_rank": float(np.mean([g["entropy_rank"] for g in group])),
                "entropy_rank_std": float(np.std([g["entropy_rank"] for g in group])),
                "max_reconstruction_relative_error": max(g["reconstruction_relative_error"] for g in group),
            }
            for (scope, tap, layer), group in sorted(grouped.items())
        ]
    return summary
