"""The comparison's figures and report.html, rendered from its record (jaxlin.comparison)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxlin.outputs import write_file_atomic, write_text_atomic  # noqa: E402
from jaxlin.report import cell, esc, figure, table, tokens_html, visible  # noqa: E402

if TYPE_CHECKING:
    from jaxlin.comparison import ComparisonRecord, PromptComparison

DIMENSIONALITY = "effective_dimensionality_vs_depth.png"


def character_figure_name(index: int) -> str:
    return f"character_influence_p{index + 1}.png"


def effective_dimensionality(path: Path, record: ComparisonRecord) -> None:
    """Entropy and stable rank of each layer's residual tap against relative depth: one line
    per model (and line style per prompt)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = ["-", "--", ":", "-."]
    for p, prompt in enumerate(record.prompts):
        for m, result in enumerate(prompt.results):
            depth = [point.relative_depth for point in result.layers]
            label = result.label if len(record.prompts) == 1 else f"{result.label} · prompt {p + 1}"
            for axis, name in zip(axes, ("entropy_rank", "stable_rank"), strict=True):
                values = [getattr(point, name) for point in result.layers]
                axis.plot(
                    depth, values, styles[p % len(styles)], color=f"C{m}", marker="o", ms=3, label=label
                )
    axes[0].set_ylabel("entropy effective rank exp H(σ²/Σσ²)")
    axes[1].set_ylabel("stable rank ‖J‖_F²/σ₁²")
    for axis in axes:
        axis.set_xlabel("relative depth (layer + 1) / L")
        axis.set_xlim(0, 1.02)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("effective dimensionality of the residual stream's detached Jacobian per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def character_influence(path: Path, prompt: PromptComparison) -> None:
    """One row per model over the prompt's characters, each row divided by its maximum."""
    matrix = np.asarray([r.alignment.influence for r in prompt.results], np.float64)
    scaled = matrix / np.maximum(matrix.max(axis=1, keepdims=True), 1e-300)
    n_chars = matrix.shape[1]
    fig, axis = plt.subplots(figsize=(min(2 + 0.18 * n_chars, 24), 1.2 + 0.5 * len(matrix)))
    image = axis.imshow(scaled, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    axis.set_yticks(range(len(matrix)), [r.label for r in prompt.results])
    if n_chars <= 160:
        axis.set_xticks(range(n_chars), [visible(c) for c in prompt.text], fontsize=7)
    axis.set_xlabel("character of the prompt")
    fig.colorbar(image, ax=axis, label="influence / row max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_figures_and_report(out: Path, record: ComparisonRecord) -> None:
    write_file_atomic(out / DIMENSIONALITY, lambda path: effective_dimensionality(path, record))
    for index, prompt in enumerate(record.prompts):
        name = character_figure_name(index)
        write_file_atomic(out / name, lambda path, prompt=prompt: character_influence(path, prompt))
    write_text_atomic(out / "report.html", page(out, record))


# ----------------------------------------------------------------------------- report.html


def _certificates(record: ComparisonRecord) -> str:
    rows = []
    for p, prompt in enumerate(record.prompts):
        for r in prompt.results:
            rows.append(
                [
                    cell(p + 1),
                    cell(r.label),
                    cell(r.n_tokens),
                    cell(r.predicted_token),
                    cell(r.certificate),
                    cell(r.argmax_matches),
                    cell(r.singular_values[0]),
                    cell(r.stable_rank),
                    cell(r.converged),
                    cell(r.influence_method),
                ]
            )
    headers = ["prompt", "model", "tokens", "predicted", "certificate", "argmax ok", "σ₁", "stable rank"]
    return table([*headers, "top-k converged", "influence"], rows)


def _character_rows(prompt: PromptComparison) -> str:
    """Characters as columns, one row per model, shaded by the row-normalized influence."""
    head = "<th></th>" + "".join(f"<th>{esc(visible(c))}</th>" for c in prompt.text)
    body = []
    for r in prompt.results:
        top = max(max(r.alignment.influence), 1e-300)
        cells = "".join(
            f'<td title="{value:.4g}" style="background:rgba(40,90,200,{value / top:.3f})"></td>'
            for value in r.alignment.influence
        )
        body.append(f"<tr><th>{esc(r.label)}</th>{cells}</tr>")
    silent = "".join(
        f"<li>{esc(r.label)}: "
        + (
            ", ".join(
                f"{esc(repr(s.token))} (position {s.position}, ‖J_t‖_F {s.influence:.4g})"
                for s in r.alignment.silent_tokens
            )
            or "none"
        )
        + "</li>"
        for r in prompt.results
    )
    return (
        f'<table class="chars"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
        f"<p>Tokens that spell no character:</p><ul>{silent}</ul>"
    )


def _directions(prompt: PromptComparison) -> str:
    """The top left singular directions of each model, decoded, side by side."""
    count = max(len(r.left_directions) for r in prompt.results)
    rows = []
    for i in range(count):
        row = [cell(i + 1)]
        for r in prompt.results:
            entry = r.left_directions[i] if i < len(r.left_directions) else None
            row.append(
                "<td>—</td>"
                if entry is None
                else f'<td class="text">σ {entry.sigma:.4g}: {tokens_html(entry.tokens)}</td>'
            )
        rows.append(row)
    return table(["i", *(f"{r.label}: u_i → top tokens" for r in prompt.results)], rows)


def page(out: Path, record: ComparisonRecord) -> str:
    labels = ", ".join(info.label for info in record.models)
    parts = [
        f"<h1>Comparison · {esc(labels)}</h1>",
        "<h2>Models</h2>",
        table(
            ["label", "name", "family", "dtype", "d", "layers"],
            (
                [
                    cell(i.label),
                    cell(i.name),
                    cell(i.family),
                    cell(i.dtype),
                    cell(i.hidden_size),
                    cell(i.num_layers),
                ]
                for i in record.models
            ),
        ),
        "<h2>Certificates</h2>",
        _certificates(record),
        "<h2>Effective dimensionality against relative depth</h2>",
        figure(out / DIMENSIONALITY, "entropy and stable rank per layer, one line per model"),
    ]
    for index, prompt in enumerate(record.prompts):
        parts += [
            f"<h2>Prompt {index + 1}: {esc(repr(prompt.text))}</h2>",
            "<h3>Influence on the characters</h3>",
            f"<p>{esc(record.alignment_rule)}; each row shaded relative to its own maximum.</p>",
            _character_rows(prompt),
            figure(out / character_figure_name(index), "per-character influence, one row per model"),
            "<h3>Top singular directions, decoded</h3>",
            _directions(prompt),
        ]
    definitions = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in record.definitions.items())
    parts.append(f"<h2>Definitions</h2><ul>{definitions}</ul>")
    return (
        "<!doctype html><meta charset='utf-8'><title>jaxlin comparison</title>"
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}td,th{padding:2px 6px}"
        ".num{text-align:right}table.chars td{width:10px;height:18px;padding:0}"
        "table.chars th{font-weight:normal;font-family:monospace}img{max-width:100%}</style>"
        + "\n".join(parts)
        + "\n"
    )
