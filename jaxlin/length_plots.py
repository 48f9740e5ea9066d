"""Figures of a length study (see `jaxlin.length_study`), and its small HTML page.

Each figure is written atomically (`outputs.write_file_atomic`); `FIGURES` names them with
the caption the page shows, so the page and the writer cannot disagree."""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: runs write PNGs, never open windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxlin.length_study import group_line  # noqa: E402
from jaxlin.outputs import write_file_atomic, write_text_atomic  # noqa: E402

Rows = list[dict[str, Any]]


def _lengths(rows: Rows) -> np.ndarray:
    return np.asarray([r["length"] for r in rows], np.float64)


def _finish(fig: plt.Figure, ax: plt.Axes, path: Path, x: str, y: str, title: str, **legend: Any) -> None:
    """Label one-panel figures the same way, then save."""
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.legend(**legend)
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def spectrum_vs_length(path: Path, summary: dict[str, Any], records: Rows) -> None:
    """σ_i of J against prefix length, each with its residual bound as an error bar."""
    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    lengths = _lengths(rows)
    sigma = np.asarray([r["spectrum"]["singular_values"] for r in rows])
    bounds = np.asarray([r["spectrum"]["residual_bounds"] for r in rows])
    for i in range(sigma.shape[1]):
        ax.errorbar(lengths, sigma[:, i], yerr=bounds[:, i], marker="o", ms=3, label=f"σ{i + 1}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _finish(
        fig,
        ax,
        path,
        "prefix length p (tokens)",
        "singular value of J",
        "top singular values of the detached Jacobian vs length",
        fontsize=7,
        ncol=2,
    )


def effective_rank_vs_length(path: Path, summary: dict[str, Any], records: Rows) -> None:
    """Stable rank (± its standard error when estimated) and the entropy-rank interval."""
    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    lengths = _lengths(rows)
    stable = np.asarray([r["stable_rank"] for r in rows])
    stable_se = np.asarray([r["stable_rank_se"] for r in rows])
    lower = np.asarray([r["entropy_rank"]["lower"] for r in rows])
    upper = np.asarray([r["entropy_rank"]["upper"] for r in rows])
    ax.errorbar(lengths, stable, yerr=stable_se, marker="o", ms=3, label="stable rank ‖J‖_F²/σ₁²")
    ax.fill_between(lengths, lower, upper, alpha=0.3, color="tab:orange", label="entropy rank (interval)")
    ax.plot(lengths, lower, color="tab:orange", linewidth=0.8)
    ax.plot(lengths, upper, color="tab:orange", linewidth=0.8)
    ax.set_xscale("log", base=2)
    _finish(
        fig,
        ax,
        path,
        "prefix length p (tokens)",
        "effective rank",
        "effective dimensionality of J vs length",
        fontsize=8,
    )


def influence_vs_distance(path: Path, summary: dict[str, Any], records: Rows) -> None:
    """‖J_t‖_F against distance from the target (log-log) for every length, with the
    fitted power law ∝ δ^−α over the tokens past the sink (solid: pointwise; dashed: through
    factor-2 bins of δ); the sink tokens are marked."""
    fig, ax = plt.subplots(figsize=(6.8, 4.8))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(records)))
    for record, row, color in zip(records, summary["rows"], colors, strict=True):
        p = record["length"]
        influence = np.sqrt(np.maximum(np.asarray(record["influence"]["jacobian_sq"]), 0.0))
        distance = p - 1 - np.arange(p)
        sink = record["sink"]["tokens"]
        past = slice(sink, p - 1)
        ax.scatter(distance[past], influence[past], s=3, alpha=0.35, color=color)
        ax.scatter(distance[:sink], influence[:sink], s=30, marker="*", color=color)
        decay = row["decay"]  # the summary's fits (a resumed record keeps those of its day)
        label = f"p = {p}"
        if decay is not None:
            x = np.asarray([1.0, float(p - 1)])
            ax.plot(x, 10 ** decay["intercept"] * x ** decay["slope"], color=color, linewidth=1.2)
            label += f": α = {decay['exponent']:.2f}"
            binned = decay["binned"]
            if binned is not None:  # dashed: the fit through factor-2 bins of δ
                line = 10 ** binned["intercept"] * x ** binned["slope"]
                ax.plot(x, line, color=color, linewidth=1.0, linestyle="--")
                label += f" (binned {binned['exponent']:.2f})"
        ax.plot([], [], color=color, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _finish(
        fig,
        ax,
        path,
        "distance from the target δ = p − 1 − t (tokens)",
        "influence ‖J_t‖_F",
        "influence vs distance (★ first tokens / sink; lines: fitted δ^−α)",
        fontsize=7,
    )


def groups_vs_distance(path: Path, summary: dict[str, Any], records: Rows) -> None:
    """‖c_g‖ of every group against its distance from the target (log-log), one line per
    length through the distance bins, the sink as a star. A bin sits at the geometric mean
    of δ + 1 over its range (δ + 1 so that the target itself, δ = 0, has a place)."""
    fig, ax = plt.subplots(figsize=(6.8, 4.8))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(summary["rows"])))
    for row, color in zip(summary["rows"], colors, strict=True):
        groups = row["groups"]
        place = np.asarray([np.sqrt((g["distance"][0] + 1.0) * (g["distance"][1] + 1.0)) for g in groups])
        norm = np.asarray([g["norm"] for g in groups])
        sink = np.asarray([g["group"] == "sink" for g in groups])
        ax.plot(place[~sink], norm[~sink], "o-", ms=3, color=color, label=f"p = {row['length']}")
        ax.scatter(place[sink], norm[sink], s=40, marker="*", color=color)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _finish(
        fig,
        ax,
        path,
        "distance from the target δ + 1 (tokens; factor-2 bins of δ)",
        "group contribution ‖c_g‖",
        "group contributions vs distance (★ sink)",
        fontsize=7,
    )


def sink_share_vs_length(path: Path, summary: dict[str, Any], records: Rows) -> None:
    """The sink tokens' share of Σ‖J_t‖_F² and of Σ‖c_t‖² against length."""
    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    lengths = _lengths(rows)
    sink = rows[0]["sink"]["tokens"]
    ax.plot(lengths, [r["sink"]["influence_share"] for r in rows], marker="o", label="share of Σ‖J_t‖_F²")
    ax.plot(lengths, [r["sink"]["contribution_share"] for r in rows], marker="s", label="share of Σ‖c_t‖²")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1)
    _finish(
        fig,
        ax,
        path,
        "prefix length p (tokens)",
        f"share of the first {sink} token(s)",
        "attention-sink share vs length",
        fontsize=8,
    )


def _fit_line(
    ax: plt.Axes, lengths: np.ndarray, fit: dict[str, float] | None, scale: float, color: str
) -> str:
    if fit is None:
        return ""
    ax.plot(lengths, 10 ** fit["intercept"] * lengths ** fit["slope"] / scale, "--", color=color, linewidth=1)
    return f" (slope {fit['slope']:.2f})"


def time_memory_vs_length(path: Path, summary: dict[str, Any], records: Rows) -> None:
    """Compute time and peak memory per length (log-log) with the fitted slopes."""
    rows = summary["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    lengths = _lengths(rows)
    fits = summary["fits"]
    compute = [r["compute_seconds"] for r in rows]
    wall = [r["seconds"] for r in rows]
    label = _fit_line(axes[0], lengths, fits["compute_seconds_vs_length"], 1.0, "tab:blue")
    axes[0].plot(lengths, compute, "o-", color="tab:blue", label="compute (no compilation)" + label)
    axes[0].plot(lengths, wall, "s:", color="tab:gray", label="wall (with compilation)")
    axes[0].set_ylabel("seconds")
    memory = np.asarray(
        [
            np.nan
            if r["memory"]["peak_above_baseline_bytes"] is None
            else r["memory"]["peak_above_baseline_bytes"]
            for r in rows
        ],
        np.float64,
    )
    label = _fit_line(axes[1], lengths, fits["peak_memory_vs_length"], 2**20, "tab:red")
    axes[1].plot(lengths, memory / 2**20, "o-", color="tab:red", label="peak above baseline" + label)
    axes[1].set_ylabel("MiB")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prefix length p (tokens)")
        ax.legend(fontsize=8)
    axes[0].set_title("time per length")
    axes[1].set_title(f"peak memory ({rows[0]['memory']['source']})", fontsize=8)
    _save(fig, path)


# File name → (caption, figure(path, summary, records), written by a bench too).
FIGURES: dict[str, tuple[str, Callable[[Path, dict[str, Any], Rows], None], bool]] = {
    "spectrum_vs_length.png": (
        "Top singular values of J against prefix length; error bars are the rigorous residual bounds.",
        spectrum_vs_length,
        False,
    ),
    "effective_rank_vs_length.png": (
        "Stable rank ‖J‖_F²/σ₁² and the interval that holds the entropy effective rank exp H(σ²/‖J‖_F²) "
        "given only the top-k singular values and ‖J‖_F.",
        effective_rank_vs_length,
        False,
    ),
    "influence_vs_distance.png": (
        "Per-token influence ‖J_t‖_F against distance from the target (log-log), each length in its own "
        "colour with the fitted power law δ^−α over the tokens past the sink (stars).",
        influence_vs_distance,
        False,
    ),
    "groups_vs_distance.png": (
        "Group contributions ‖c_g‖ = ‖Σ_{t∈g} J_t·x_t‖ against distance from the target (log-log): "
        "factor-2 bins of δ (at the geometric mean of δ + 1 over the bin) and the sink (stars); the groups "
        "with c_bias sum to y, which is the certificate beyond max_exact_tokens.",
        groups_vs_distance,
        False,
    ),
    "sink_share_vs_length.png": (
        "Share of the first token(s) — the attention sink — in Σ_t ‖J_t‖_F² and in Σ_t ‖c_t‖².",
        sink_share_vs_length,
        False,
    ),
    "time_memory_vs_length.png": (
        "Time (compute without compilation, and wall) and peak memory per length, log-log with "
        "fitted slopes.",
        time_memory_vs_length,
        True,
    ),
}


def write_figures(out: Path, summary: dict[str, Any], records: Rows) -> None:
    """Every figure of the study (or the bench's time/memory one) and report.html."""
    bench = summary["kind"] == "bench"
    written = []
    for name, (_, draw, in_bench) in FIGURES.items():
        if bench and not in_bench:
            continue
        write_file_atomic(out / name, lambda path, draw=draw: draw(path, summary, records))
        written.append(name)
    write_text_atomic(out / "report.html", page(summary, written))


def page(summary: dict[str, Any], figures: list[str]) -> str:
    """A self-contained page: the per-length table, the fits and the captioned figures."""
    title = f"{'Length study' if summary['kind'] == 'length_study' else 'Bench'} · {summary['model']}"
    head = (
        "length",
        "certificate",
        "σ₁",
        "stable rank",
        "entropy rank",
        "sink share",
        "decay α",
        "binned α",
        "compute s",
        "peak MiB",
    )
    lines = []
    for r in summary["rows"]:
        decay = f"{r['decay']['exponent']:.3f}" if r["decay"] else "–"
        binned = f"{r['decay']['binned']['exponent']:.3f}" if r["decay"] and r["decay"]["binned"] else "–"
        peak = r["memory"]["peak_above_baseline_bytes"]
        cells = (
            r["length"],
            f"{r['certificate']['relative_error']:.2e}",
            f"{r['spectrum']['singular_values'][0]:.4g}",
            f"{r['stable_rank']:.3f}",
            f"{r['entropy_rank']['lower']:.2f}–{r['entropy_rank']['upper']:.2f}",
            f"{r['sink']['influence_share']:.3f}",
            decay,
            binned,
            f"{r['compute_seconds']:.2f}",
            "–" if peak is None else f"{peak / 2**20:.1f}",
        )
        lines.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    fits = []
    for name, fit in summary["fits"].items():
        if fit is not None:
            fits.append(f"<li>{html.escape(name)}: slope {fit['slope']:.3f} (R² {fit['r2']:.3f})</li>")
    groups = "".join(
        f"<li>{r['length']}: {html.escape(group_line(r['groups']))}</li>" for r in summary["rows"]
    )
    definitions = "".join(
        f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in summary["definitions"].items()
    )
    images = "".join(
        f"<figure><img src='{name}' alt='{name}'>"
        f"<figcaption>{html.escape(FIGURES[name][0])}</figcaption></figure>"
        for name in figures
    )
    return (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "td,th{padding:2px 8px;text-align:right}"
        "img{max-width:100%}</style>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(summary['document']['source'])}, "
        f"{summary['document']['n_tokens']} tokens; {html.escape(summary['dtype'])} on "
        f"{summary['platform']}</p>"
        "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(lines) + "</table>"
        f"<h2>Fits</h2><ul>{''.join(fits)}</ul>"
        f"<h2>Group contributions ‖c_g‖ (sink, then distance from the target)</h2><ul>{groups}</ul>"
        f"{images}<h2>Definitions</h2><ul>{definitions}</ul>\n"
    )
