"""Figures a person can read: labelled axes, token text rather than ids.

Renderers of the run record: `write_figures` writes the figures `record.figure_names`
lists for a record (with the arrays of its arrays.npz), each through the atomic writer."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: runs write PNGs, never open windows
import warnings  # noqa: E402

# Decoded tokens span every script; a glyph the font lacks is drawn as a box, which is
# fine in a figure and not worth a warning per token.
warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from jaxlin.outputs import write_file_atomic  # noqa: E402
from jaxlin.record import (  # noqa: E402
    FIGURES,
    Ablation,
    LayerRow,
    LayerTap,
    ManyPromptRecord,
    PromptRow,
    Record,
    RunRecord,
    figure_names,
)

Arrays = Mapping[str, np.ndarray]


def reconstruction_scatter(
    path: Path,
    y: np.ndarray,
    detached: np.ndarray,
    ordinary: np.ndarray | None,
    detached_error: float,
    ordinary_error: float | None,
    title: str,
) -> None:
    """y against Σ_t J_t·x_t for the detached (and the ordinary) Jacobian."""
    panels = 1 if ordinary is None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 5), squeeze=False)
    lo, hi = float(np.min(y)), float(np.max(y))
    items = [("detached Jacobian", detached, detached_error, "tab:blue")]
    if ordinary is not None:
        items.append(("ordinary Jacobian", ordinary, ordinary_error, "tab:red"))
    for ax, (label, recon, error, color) in zip(axes[0], items, strict=True):
        ax.scatter(y, recon, s=6, alpha=0.6, color=color)
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, label="y = Σ J_t x_t")
        ax.set_xlabel("y: final hidden state of the last token")
        ax.set_ylabel("Σ_t J_t · x_t")
        ax.set_title(f"{label}\nrelative error {error:.2e}")
        ax.legend(loc="upper left")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def singular_values(path: Path, values: np.ndarray, title: str, bounds: np.ndarray | None = None) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    index = np.arange(1, len(values) + 1)
    ax.semilogy(index, values, "o-", label="σ_i")
    if bounds is not None:
        ax.errorbar(index, values, yerr=bounds, fmt="none", ecolor="gray", label="residual bound")
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value σ_i of J")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _token_axis(ax: plt.Axes, tokens: list[str]) -> None:
    """Token text on the x axis (every token when few, evenly thinned when many)."""
    step = max(1, len(tokens) // 60)
    ticks = np.arange(0, len(tokens), step)
    ax.set_xticks(ticks)
    ax.set_xticklabels([repr(tokens[i])[1:-1] or "␣" for i in ticks], rotation=90, fontsize=7)


def per_token_spectra(
    path: Path,
    tokens: list[str],
    contribution_norms: np.ndarray,
    frobenius: np.ndarray,
    sigmas: np.ndarray | None,
    title: str,
) -> None:
    """Per-token importance (‖c_t‖, ‖J_t‖_F) and, if computed, each J_t's top singular values."""
    rows = 2 if sigmas is not None else 1
    width = min(24.0, max(8.0, 0.22 * len(tokens)))
    fig, axes = plt.subplots(rows, 1, figsize=(width, 3.4 * rows + 1.0), squeeze=False, sharex=True)
    positions = np.arange(len(tokens))
    ax = axes[0][0]
    ax.bar(positions - 0.2, contribution_norms, width=0.4, label="‖c_t‖ = ‖J_t·x_t‖", color="tab:blue")
    twin = ax.twinx()
    twin.bar(positions + 0.2, frobenius, width=0.4, label="‖J_t‖_F", color="tab:orange")
    ax.set_ylabel("‖c_t‖")
    twin.set_ylabel("‖J_t‖_F")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, ["‖c_t‖ = ‖J_t·x_t‖", "‖J_t‖_F"], loc="upper left")
    ax.set_title(title)
    if sigmas is not None:
        ax = axes[1][0]
        for i in range(sigmas.shape[1]):
            ax.semilogy(positions, sigmas[:, i], marker=".", label=f"σ_{i + 1}(J_t)")
        ax.set_ylabel("singular value of J_t")
        ax.legend(loc="upper left", ncols=min(4, sigmas.shape[1]))
        ax.grid(alpha=0.3, which="both")
    _token_axis(axes[-1][0], tokens)
    axes[-1][0].set_xlabel("input token")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def layer_dynamics(path: Path, rows: Sequence[LayerTap]) -> None:
    """Effective dimensionality per layer (stable rank and entropy rank) for each tap."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[tuple[str, str], list[LayerTap]] = {}
    for row in rows:
        series.setdefault((row.tap, row.scope), []).append(row)
    for (tap, scope), entries in sorted(series.items()):
        layers = [e.layer for e in entries]
        style = "-" if scope == "cumulative" else "--"
        axes[0].plot(layers, [e.stable_rank for e in entries], style, marker="o", label=f"{tap} ({scope})")
        axes[1].plot(layers, [e.entropy_rank for e in entries], style, marker="o", label=f"{tap} ({scope})")
    axes[0].set_ylabel("stable rank ‖J‖_F² / σ₁²")
    axes[1].set_ylabel("entropy effective rank exp H(σ²/Σσ²)")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("effective dimensionality of the detached Jacobian per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def layer_paths(path: Path, rows: Sequence[LayerRow], tap: str = "residual") -> None:
    """The 'path': |cos| of each layer's top left singular vectors with the final layer's,
    each point labelled with the top decoded token of that layer's vector."""
    entries = [r for r in rows if r.tap == tap and r.scope == "cumulative"] or [
        r for r in rows if r.scope == "cumulative"
    ]
    if not entries:
        raise ValueError("the layer path needs cumulative layer rows")
    fig, ax = plt.subplots(figsize=(12, 5))
    count = len(entries[0].path_cosines)
    for i in range(count):
        layers = [e.layer for e in entries]
        cosines = [e.path_cosines[i] for e in entries]
        ax.plot(layers, cosines, marker="o", label=f"u_{i + 1}")
        for layer, cosine, entry in zip(layers, cosines, entries, strict=True):
            label = repr(entry.top_tokens[i][0])[1:-1] if entry.top_tokens[i] else ""
            ax.annotate(
                label, (layer, cosine), fontsize=6, rotation=30, xytext=(2, 3), textcoords="offset points"
            )
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("|cos(u_i at layer, u_i at final layer)|")
    ax.set_ylim(-0.05, 1.1)
    ax.set_title(f"path of the top left singular vectors ({entries[0].tap} taps, cumulative)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def importance_strip(
    path: Path, tokens: list[str], contribution_norms: np.ndarray, frobenius: np.ndarray
) -> None:
    """Per-token importance as heat strips over the input text: ‖c_t‖ and ‖J_t‖_F."""
    count = len(tokens)
    per_row = 24
    rows = -(-count // per_row)
    fig, axes = plt.subplots(
        2 * rows, 1, figsize=(min(22, 0.9 * per_row), 1.1 * 2 * rows + 0.8), squeeze=False
    )
    for offset, (values, label, cmap) in enumerate(
        [(contribution_norms, "‖c_t‖", "Blues"), (frobenius, "‖J_t‖_F", "Oranges")]
    ):
        top = float(np.max(values)) or 1.0
        for row in range(rows):
            ax = axes[2 * row + offset][0]
            span = slice(row * per_row, min(count, (row + 1) * per_row))
            chunk = values[span]
            ax.imshow(chunk[None, :] / top, cmap=cmap, vmin=0, vmax=1, aspect="auto")
            ax.set_yticks([0])
            ax.set_yticklabels([label])
            ax.set_xticks(np.arange(len(chunk)))
            ax.set_xticklabels(
                [repr(t)[1:-1] or "␣" for t in tokens[span]], fontsize=8, rotation=45, ha="right"
            )
    fig.suptitle("per-token importance over the input (darker = larger, scaled to the maximum)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def jacobian_images(
    path: Path, detached: np.ndarray, ordinary: np.ndarray | None, token: str, position: int
) -> None:
    """The token Jacobian J_t of one token as an image (detached, and ordinary beside it), each
    with its singular values inset."""
    panels = [("detached", detached)] + ([("ordinary", ordinary)] if ordinary is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5.6), squeeze=False)
    for ax, (label, block) in zip(axes[0], panels, strict=True):
        limit = float(np.percentile(np.abs(block), 99.5)) or 1.0
        image = ax.imshow(block, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_title(f"{label} J_t for token {token!r} (position {position})")
        ax.set_xlabel("input dimension j (embedding of token t)")
        ax.set_ylabel("output dimension i (y)")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        inset = ax.inset_axes([0.58, 0.62, 0.38, 0.33])
        sigma = np.linalg.svd(block, compute_uv=False)
        inset.semilogy(np.arange(1, len(sigma) + 1), sigma, color="black", linewidth=1)
        inset.set_title("singular values", fontsize=7)
        inset.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def prompt_overview(path: Path, rows: Sequence[PromptRow]) -> None:
    """Across prompts: reconstruction error (the certificate) and stable rank of J."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    index = [r.index for r in rows]
    axes[0].semilogy(index, [max(r.reconstruction_relative_error, 1e-300) for r in rows], "o")
    axes[0].set_ylabel("‖Σ_t J_t·x_t − y‖ / ‖y‖")
    axes[1].plot(index, [r.stable_rank for r in rows], "o")
    axes[1].set_ylabel("stable rank of J")
    for ax in axes:
        ax.set_xlabel("prompt index")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(f"{len(rows)} prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ablation_scatter(path: Path, section: Ablation) -> None:
    """The linear map's logit change (y − c_t) against the model's, token removed and
    embedding zeroed, with Spearman's ρ."""
    rows = section.rows
    linear = np.asarray([r.linear_logit_change for r in rows])
    real_changes = {
        "removed": ([r.removed_logit_change for r in rows], section.spearman_linear_vs_removed),
        "zeroed": ([r.zeroed_logit_change for r in rows], section.spearman_linear_vs_zeroed),
    }
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, (kind, (changes, rho)) in zip(axes, real_changes.items(), strict=True):
        real = np.asarray(changes)
        ax.scatter(linear, real, s=14, color="tab:blue")
        for r, x, z in zip(rows, linear, real, strict=True):
            ax.annotate(repr(r.token)[1:-1] or "␣", (x, z), fontsize=6, alpha=0.7)
        low, high = float(min(linear.min(), real.min())), float(max(linear.max(), real.max()))
        ax.plot([low, high], [low, high], color="grey", linewidth=0.8, linestyle="--")
        ax.set_title(f"token {kind}: Spearman ρ = {rho:.3f}" if rho is not None else f"token {kind}")
        ax.set_xlabel("linear: Δ logit of the predicted token (y − c_t)")
        ax.set_ylabel(f"model, token {kind}: Δ logit")
    fig.suptitle(f"token ablation, predicted token {section.predicted_token!r}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- the record's figures


def _reconstruction(path: Path, record: RunRecord, arrays: Arrays) -> None:
    ordinary = arrays.get("ordinary_contributions")
    reconstruction_scatter(
        path,
        arrays["y"],
        arrays["contributions"].sum(0) + arrays["bias_contribution"],
        None if ordinary is None else ordinary.sum(0) + arrays["ordinary_bias_contribution"],
        record.reconstruction_relative_error,
        record.ordinary_jacobian_relative_error,
        f"{record.model} · {record.n_tokens} tokens · {record.dtype}",
    )


def _singular_values(path: Path, record: RunRecord, arrays: Arrays) -> None:
    singular_values(
        path,
        np.asarray(record.singular_values),
        f"top-{len(record.singular_values)} singular values of J ({record.spectrum.method})",
        arrays.get("bounds"),
    )


def _per_token(path: Path, record: RunRecord, arrays: Arrays) -> None:
    per_token_spectra(
        path,
        record.tokens,
        arrays["token_contribution_norms"],
        arrays["token_frobenius"],
        arrays.get("per_token_S"),
        f"per-token view · {record.n_tokens} tokens",
    )


def _importance(path: Path, record: RunRecord, arrays: Arrays) -> None:
    importance_strip(path, record.tokens, arrays["token_contribution_norms"], arrays["token_frobenius"])


def _focus_jacobian(path: Path, record: RunRecord, arrays: Arrays) -> None:
    focus = int(arrays["focus_position"])
    jacobian_images(
        path, arrays["focus_jacobian"], arrays.get("focus_jacobian_ordinary"), record.tokens[focus], focus
    )


def _ablation(path: Path, record: RunRecord, arrays: Arrays) -> None:
    assert record.ablation is not None  # figure_names lists ablation.png only then
    ablation_scatter(path, record.ablation)


def _layers(path: Path, record: Record, arrays: Arrays) -> None:
    layer_dynamics(path, record.layers or [])


def _layers_path(path: Path, record: RunRecord, arrays: Arrays) -> None:
    layer_paths(path, record.layers or [])


def _prompts(path: Path, record: ManyPromptRecord, arrays: Arrays) -> None:
    prompt_overview(path, record.prompts)


# How each figure of `record.FIGURES` is drawn from a record and its arrays.
DRAW: dict[str, Callable[[Path, Any, Arrays], None]] = {
    "reconstruction.png": _reconstruction,
    "singular_values.png": _singular_values,
    "per_token.png": _per_token,
    "importance.png": _importance,
    "focus_jacobian.png": _focus_jacobian,
    "ablation.png": _ablation,
    "layers.png": _layers,
    "layers_path.png": _layers_path,
    "prompts.png": _prompts,
}
assert DRAW.keys() == FIGURES.keys(), "every registered figure is drawn, and only those"


def write_figures(directory: Path, record: Record, arrays: Arrays) -> list[str]:
    """Every figure of this record (see `record.figure_names`) in `directory`; their names."""
    names = figure_names(record)
    for name in names:
        write_file_atomic(Path(directory) / name, partial(DRAW[name], record=record, arrays=arrays))
    return names
