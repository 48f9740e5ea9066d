"""A self-contained HTML report of one run directory: every figure embedded as a data URI,
inline CSS, no JavaScript and no external resources, so it can be mailed, archived or
opened offline. A renderer of the run record (`jaxlin.record`): built from the record
and the PNGs beside it; the run is not re-done. Each figure is shown in the section that
`record.FIGURES` names for it, with its caption.

`python -m jaxlin.report RUN_DIR` writes RUN_DIR/report.html."""

from __future__ import annotations

import base64
import html
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from jaxlin.errors import JaxlinError
from jaxlin.outputs import write_text_atomic
from jaxlin.record import (
    FIGURES,
    Ablation,
    AggregateLayerRow,
    LayerRow,
    ManyPromptRecord,
    PromptRow,
    Record,
    RunRecord,
    Spectrum,
    Steering,
    figure_names,
    parse_record,
    read_record,
)

REPORT_NAME = "report.html"

# The reconstruction Σ_t J_t·x_t (+ bias) = y is exact up to rounding, so the bar scales
# with the working precision. float32 is the default for any dtype not listed.
THRESHOLDS: dict[str, float] = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 1e-1}
DEFAULT_THRESHOLD = THRESHOLDS["float32"]

# Every report section: id → title (the ids that `record.FIGURES` names).
SECTION_TITLES: dict[str, str] = {
    "overview": "Overview",
    "certificate": "Certificate",
    "reconstruction": "Reconstruction",
    "spectrum": "Spectrum of J",
    "per-token": "Per-token view",
    "ablation": "Token ablation: linear vs real",
    "layers": "Layers",
    "steering": "Steering",
    "prompts": "Prompts",
    "config": "Config",
    "timings": "Timings",
}

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f;
       max-width: 1150px; margin: 0 auto; padding: 1.5em; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 2px solid #e3e3e8; padding-bottom: 0.2em; margin-top: 1.8em; }
h3 { font-size: 1.05em; }
nav a { margin-right: 0.9em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #d8d8de; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.kv th { width: 16em; }
code.tok { background: #eef1f8; border-radius: 3px; padding: 0 0.25em; margin-right: 0.25em;
           white-space: pre; }
.text { white-space: pre-wrap; font-family: ui-monospace, Menlo, Consolas, monospace; }
pre { background: #f6f6f8; padding: 0.8em; overflow-x: auto; }
.badge { display: inline-block; padding: 0.1em 0.6em; border-radius: 0.8em; font-weight: 700;
         color: #fff; }
.badge.pass { background: #1f8a3b; }
.badge.fail { background: #c62828; }
.note { color: #5a5a66; font-size: 0.9em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e3e8; }
figcaption { color: #5a5a66; font-size: 0.9em; }
"""


# --- text -------------------------------------------------------------------------------


def esc(value: Any) -> str:
    """HTML-escape anything (quotes too: the same helper fills attributes)."""
    return html.escape(str(value), quote=True)


# Whitespace and control characters would vanish or break the layout of a token chip.
_VISIBLE = {" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍", "\x7f": "␡"}


def visible(token: str) -> str:
    """A token with whitespace/control characters shown as symbols (not yet escaped)."""
    if token == "":
        return "∅"
    return "".join(_VISIBLE.get(ch, chr(0x2400 + ord(ch)) if ord(ch) < 0x20 else ch) for ch in token)


def token_html(token: str) -> str:
    return f'<code class="tok" title="{esc(repr(token))}">{esc(visible(token))}</code>'


def tokens_html(tokens: Iterable[str]) -> str:
    return "".join(token_html(str(t)) for t in tokens)


def fmt(value: Any, spec: str = ".6g") -> str:
    """Numbers formatted, None as a dash, booleans as yes/no; returns escaped HTML."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format(value, spec)
    return esc(value)


def cell(value: str | float | bool | None) -> str:
    """A table cell: numbers right-aligned, strings with whitespace kept."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f'<td class="num">{fmt(value)}</td>'
    if isinstance(value, str):
        return f'<td class="text">{esc(value)}</td>'
    return f"<td>{fmt(value)}</td>"


# --- building blocks --------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], css_class: str = "") -> str:
    """Headers are plain text; rows are already-rendered `<td>` cells."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(f"<tr>{''.join(r)}</tr>" for r in rows)
    klass = f' class="{css_class}"' if css_class else ""
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def key_values(pairs: Iterable[tuple[str, str]]) -> str:
    """A two-column table: plain-text label, already-rendered HTML value."""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def fields_table(rows: Sequence[Any], fields: Sequence[str]) -> str:
    """Records of one type as a table: one column per named field (its name as header)."""
    return table(fields, ([cell(getattr(row, name)) for name in fields] for row in rows))


def section(section_id: str, body: str) -> str:
    title = SECTION_TITLES[section_id]
    return f'<section id="{esc(section_id)}">\n<h2>{esc(title)}</h2>\n{body}\n</section>'


def figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    alt = f"{path.name}: {caption}"
    cap = f"<figcaption>{esc(path.name)} — {esc(caption)}</figcaption>"
    return f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def figures(run_dir: Path, record: Record, section_id: str) -> str:
    """The figures of this record that `FIGURES` puts in this section, with their captions
    (a note for one the run directory lacks)."""
    parts = []
    for name in figure_names(record):
        spec = FIGURES[name]
        if spec.section != section_id:
            continue
        path = run_dir / name
        if path.is_file():
            parts.append(figure(path, spec.caption))
        else:
            parts.append(f'<p class="note">{esc(name)} not found in the run directory.</p>')
    return "\n".join(parts)


def yaml_block(value: Any) -> str:
    text = yaml.safe_dump(value, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return f"<pre>{esc(text)}</pre>"


# --- sections ---------------------------------------------------------------------------


def certificate_threshold(dtype: str | None) -> float:
    return THRESHOLDS.get(str(dtype), DEFAULT_THRESHOLD)


def certificate_passes(error: float | None, dtype: str | None) -> bool:
    # NaN or a missing error fails: the certificate must be shown to hold.
    return error is not None and math.isfinite(error) and error <= certificate_threshold(dtype)


def badge(ok: bool, element_id: str = "") -> str:
    ident = f' id="{esc(element_id)}"' if element_id else ""
    return f'<span{ident} class="badge {"pass" if ok else "fail"}">{"PASS" if ok else "FAIL"}</span>'


def certificate_value(error: float, dtype: str) -> str:
    """The certificate with its PASS/FAIL badge and the threshold it is held to."""
    return (
        f"{fmt(error, '.3e')} {badge(certificate_passes(error, dtype), 'certificate-badge')} "
        f'<span class="note">threshold {certificate_threshold(dtype):.0e} for {esc(dtype)}</span>'
    )


def overview(r: RunRecord) -> str:
    return key_values(
        [
            ("model", fmt(r.model)),
            ("family", fmt(r.family)),
            ("dtype", fmt(r.dtype)),
            ("text", f'<span class="text">{fmt(r.text)}</span>'),
            ("tokens", f"{fmt(r.n_tokens)}: {tokens_html(r.tokens)}"),
            ("predicted next token", f"{token_html(r.predicted_token)} (id {fmt(r.predicted_token_id)})"),
            ("params from cache", fmt(r.params_from_cache)),
            ("Jacobian input", fmt(r.jacobian_input)),
        ]
    )


def many_overview(r: ManyPromptRecord) -> str:
    worst = r.max_reconstruction_relative_error
    return key_values(
        [
            ("model", fmt(r.model)),
            ("family", fmt(r.family)),
            ("dtype", fmt(r.dtype)),
            ("prompts", f"{fmt(r.n_prompts)} ({fmt(r.prompts_reused)} reused from an earlier run)"),
            ("worst certificate ‖Σ_t J_t·x_t − y‖ / ‖y‖", certificate_value(worst, r.dtype)),
            ("mean stable rank of J", fmt(r.mean_stable_rank)),
            ("params from cache", fmt(r.params_from_cache)),
        ]
    )


def certificate(r: RunRecord) -> str:
    error, dtype = r.reconstruction_relative_error, r.dtype
    argmax = r.reconstruction_argmax_matches
    ordinary = r.ordinary_jacobian_relative_error
    if r.affine:
        bias = f"‖c_bias‖ = {fmt(r.bias_contribution_norm)} (included in the reconstruction)"
    else:
        bias = "none: the model has no biases, so J is linear"
    rows = [
        ("‖Σ_t J_t·x_t − y‖ / ‖y‖", certificate_value(error, dtype)),
        ("next-token argmax from Σ_t c_t", f"{fmt(argmax)} {badge(argmax)}"),
        (
            "ordinary Jacobian, same reconstruction",
            f"{fmt(ordinary, '.3e')}"
            + ("" if ordinary is None else ' <span class="note">(not expected to reconstruct y)</span>'),
        ),
        ("bias term (affine models)", esc(bias)),
    ]
    return key_values(rows)


def convergence_verdict(spec: Spectrum) -> str:
    """One line saying whether the Lanczos run converged, where it stopped and why, or that
    the spectrum is exact (also printed by the CLI)."""
    worst, target, depth = spec.worst_relative_bound, spec.tolerance, spec.krylov_depth
    if spec.stop_reason == "exact":
        return f"Spectrum: exact, from J's rows (no iteration; worst relative bound {worst:.1e})"
    bar = "no target" if target is None else f"target {target:.1e}"
    if spec.stop_reason == "converged":
        return f"Lanczos: converged at depth {depth} (worst relative bound {worst:.1e} ≤ {bar})"
    why = {
        "stalled": "the bounds stopped improving: the operator's rounding allows no better",
        "full_depth": "full depth d reached",
    }[spec.stop_reason]
    return f"Lanczos: NOT converged at depth {depth} (worst relative bound {worst:.1e} > {bar}; {why})"


def spectrum(r: RunRecord) -> str:
    spec, norms = r.spectrum, r.norms
    facts = key_values(
        [
            ("method", fmt(spec.method)),
            ("Krylov depth", fmt(spec.krylov_depth)),
            ("converged", fmt(spec.converged)),
            ("stopping", f"{badge(spec.converged, 'convergence-badge')} {esc(convergence_verdict(spec))}"),
            ("‖J‖_F", f"{fmt(norms.frobenius)} ({fmt(norms.frobenius_method)})"),
            ("stable rank ‖J‖_F² / σ₁²", fmt(norms.stable_rank)),
        ]
    )
    rows = []
    for i, sigma in enumerate(r.singular_values):
        bound = spec.residual_bounds[i] if i < len(spec.residual_bounds) else None
        decoded = spec.left_vectors_top_tokens
        tokens = decoded[i].tokens if i < len(decoded) else []
        rows.append(
            [
                cell(i + 1),
                cell(sigma),
                f'<td class="num">{fmt(bound, ".1e")}</td>',
                f"<td>{tokens_html(tokens)}</td>",
            ]
        )
    return facts + table(["i", "σ_i", "residual bound", "top tokens of u_i"], rows)


def per_token(r: RunRecord) -> str:
    pt, norms = r.per_token, r.norms
    sigmas = pt.singular_values or []
    lefts = pt.top_left_vector or []

    def at(values: Sequence[Any], t: int) -> Any:
        return values[t] if t < len(values) else None

    rows = []
    for t, token in enumerate(r.tokens):
        sigma_row, left = at(sigmas, t), at(lefts, t)
        rows.append(
            [
                cell(t),
                f"<td>{token_html(token)}</td>",
                cell(at(norms.token_contribution_norms, t)),
                cell(at(norms.token_frobenius, t)),
                cell(sigma_row[0] if sigma_row else None),
                f"<td>{tokens_html(left.tokens if left else [])}</td>",
                f"<td>{tokens_html(left.right_vector_nearest_tokens if left else [])}</td>",
            ]
        )
    note = (
        f'<p class="note">Per-token spectra: {fmt(pt.method)}; largest relative residual bound '
        f"{fmt(pt.max_relative_bound, '.1e')}. ‖J_t‖_F: {fmt(norms.frobenius_method)}. "
        "Left vectors are read through the unembedding (sign fixed so that u·y ≥ 0); right vectors "
        "as the input-embedding rows nearest by cosine (sign following the left vector).</p>"
    )
    headers = [
        "t",
        "token",
        "‖c_t‖",
        "‖J_t‖_F",
        "σ₁(J_t)",
        "top tokens of J_t's first left vector",
        "embedding rows nearest J_t's first right vector",
    ]
    return note + table(headers, rows)


# The scalar fields of a layer row shown as columns, per kind of row.
LAYER_COLUMNS = ("layer", "tap", "stable_rank", "entropy_rank", "sigma_1", "reconstruction_relative_error")
AGGREGATE_LAYER_COLUMNS = (
    "layer",
    "tap",
    "prompts",
    "stable_rank",
    "stable_rank_std",
    "entropy_rank",
    "entropy_rank_std",
    "max_reconstruction_relative_error",
)


def _decoded_layer_cells(row: LayerRow) -> list[str]:
    """The tap's top triplet read as tokens: u₁ through the unembedding, v₁ at its dominant
    position as the nearest input-embedding rows."""
    top = row.top_tokens[0] if row.top_tokens else []
    cells = [f"<td>{tokens_html(top)}</td>"]
    if not row.right_vectors:
        return cells + ["<td>—</td>"] * 3
    first = row.right_vectors[0]
    where = (
        f"{fmt(first.dominant_position)} {token_html(first.dominant_token)} "
        f"({fmt(first.share_of_norm, '.2f')})"
    )
    return cells + [
        f"<td>{where}</td>",
        f"<td>{tokens_html(first.nearest_tokens)}</td>",
        f'<td class="num">{fmt(first.relative_residual, ".1e")}</td>',
    ]


def layers(rows: Sequence[LayerRow] | Sequence[AggregateLayerRow]) -> str:
    """The layer sweep, one table per scope (cumulative / local); a single run's rows also
    show each tap's top triplet read as tokens."""
    decoded = all(isinstance(row, LayerRow) for row in rows)
    columns = LAYER_COLUMNS if decoded else AGGREGATE_LAYER_COLUMNS
    headers = list(columns)
    if decoded:
        headers += [
            "top tokens of u₁",
            "v₁: dominant position (share of ‖v₁‖²)",
            "v₁: nearest embedding rows",
            "‖Jv₁ − σ₁u₁‖/σ₁",
        ]
    parts = []
    for scope in dict.fromkeys(row.scope for row in rows):
        group = [row for row in rows if row.scope == scope]
        body = []
        for row in group:
            cells = [cell(getattr(row, name)) for name in columns]
            if isinstance(row, LayerRow):
                cells += _decoded_layer_cells(row)
            body.append(cells)
        parts.append(f"<h3>{esc(scope)}</h3>")
        first = group[0]
        if isinstance(first, LayerRow):
            parts.append(
                f'<p class="note">Right vectors v_i = Jᵀu_i/σ_i live in the {esc(first.right_vector_space)}; '
                "each is read at the token position carrying most of its norm, as the input-embedding "
                "rows nearest by cosine.</p>"
            )
        parts.append(table(headers, body))
    if decoded:
        parts.append(
            '<p class="note">Not shown (see summary.json): path_cosines (also in layers_path.png) and '
            "each tap's further decoded vectors.</p>"
        )
    return "\n".join(parts)


def steering(value: Steering) -> str:
    """Baseline and the λ-continuations in one table so they read side by side."""
    rows = [["<td>baseline</td>", cell(value.baseline)]]
    rows += [[cell(run.strength), cell(run.text)] for run in value.runs]
    facts = key_values(
        [
            ("concept", f'<span class="text">{fmt(value.concept)}</span>'),
            ("prompt", f'<span class="text">{fmt(value.prompt)}</span>'),
            ("layer", fmt(value.layer)),
            ("mode", fmt(value.mode)),
        ]
    )
    return facts + table(["λ", "text"], rows)


ABLATION_COLUMNS = (
    "position",
    "token",
    "linear_logit_change",
    "linear_top_token",
    "removed_logit_change",
    "removed_top_token",
    "zeroed_logit_change",
    "zeroed_top_token",
)


def ablation(value: Ablation) -> str:
    """The rank correlations first, then one row per token."""
    facts = key_values(
        [
            ("predicted token", token_html(value.predicted_token)),
            ("spearman linear vs removed", fmt(value.spearman_linear_vs_removed)),
            ("spearman linear vs zeroed", fmt(value.spearman_linear_vs_zeroed)),
            ("top change agreement removed", fmt(value.top_change_agreement_removed)),
            ("top change agreement zeroed", fmt(value.top_change_agreement_zeroed)),
        ]
    )
    return facts + fields_table(value.rows, ABLATION_COLUMNS)


PROMPT_COLUMNS = (
    "index",
    "text",
    "n_tokens",
    "predicted_token",
    "reconstruction_relative_error",
    "sigma_1",
    "stable_rank",
    "directory",
)


def prompts(rows: Sequence[PromptRow]) -> str:
    return fields_table(rows, PROMPT_COLUMNS)


def config(r: Record) -> str:
    if r.config is None:
        return '<p class="note">not recorded</p>'
    return yaml_block(r.config.model_dump(mode="json"))


def timings(seconds: Mapping[str, float]) -> str:
    rows = [[f"<td>{esc(step)}</td>", cell(value)] for step, value in seconds.items()]
    if seconds:
        rows.append(["<th>total</th>", cell(round(sum(seconds.values()), 3))])
    return table(["step", "seconds"], rows)


# --- the report -------------------------------------------------------------------------


def _sections(r: Record) -> list[tuple[str, Callable[[], str]]]:
    """(section id, body) in page order; the optional ones only when the record has them."""
    if isinstance(r, ManyPromptRecord):
        head: list[tuple[str, Callable[[], str]]] = [
            ("overview", lambda: many_overview(r)),
            ("prompts", lambda: prompts(r.prompts)),
        ]
    else:
        head = [
            ("overview", lambda: overview(r)),
            ("certificate", lambda: certificate(r)),
            ("reconstruction", lambda: ""),
            ("spectrum", lambda: spectrum(r)),
            ("per-token", lambda: per_token(r)),
        ]
        if r.ablation is not None:
            head.append(("ablation", lambda: ablation(r.ablation)))
    if r.layers:
        head.append(("layers", lambda: layers(r.layers)))
    if r.steering is not None:
        head.append(("steering", lambda: steering(r.steering)))
    return [*head, ("config", lambda: config(r)), ("timings", lambda: timings(r.timings_seconds))]


def _build(run_dir: Path, r: Record, name: str | None = None) -> str:
    sections = _sections(r)
    nav = " ".join(f'<a href="#{esc(i)}">{esc(SECTION_TITLES[i])}</a>' for i, _ in sections)
    body = "\n".join(section(i, figures(run_dir, r, i) + render()) for i, render in sections)
    title = f"jaxlin · {r.model} · {name or run_dir.name}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{esc(title)}</h1>\n<nav>{nav}</nav>\n{body}\n</body>\n</html>\n"
    )


def render_report(
    run_dir: Path, record: Record | Mapping[str, Any] | None = None, name: str | None = None
) -> Path:
    """Write run_dir/report.html (self-contained) and return its path. `record` defaults
    to run_dir/summary.json's; `name` is the run's name in the title (default: the
    directory's; a run rendered in its staging directory passes its final name)."""
    run_dir = Path(run_dir)
    typed = read_record(run_dir / "summary.json") if record is None else parse_record(record)
    path = run_dir / REPORT_NAME
    write_text_atomic(path, _build(run_dir, typed, name))  # never seen half-written
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m jaxlin.report RUN_DIR")
    try:
        print(render_report(Path(sys.argv[1])))
    except JaxlinError as error:
        sys.exit(f"jaxlin: error: {error}")
