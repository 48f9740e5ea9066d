"""Figures a person can read: labelled axes, token text rather than ids."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs write PNGs, never open windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


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
