"""A self-contained HTML report of one run directory: every figure embedded as a data URI,
inline CSS, no JavaScript and no external resources, so it can be mailed, archived or
opened offline. Built from `summary.json` and the PNGs beside it; the run is not re-done.

`python -m jaxlin.report RUN_DIR` writes RUN_DIR/report.html."""

from __future__ import annotations

import base64
import html
import json
import math
import sys
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from jaxlin.outputs import write_text_atomic

REPORT_NAME = "report.html"

# The reconstruction Σ_t J_t·x_t (+ bias) = y is exact up to rounding, so the bar scales
# with the working precision. float32 is the default for any dtype not listed.
THRESHOLDS: dict[str, float] = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 1e-1}
DEFAULT_THRESHOLD = THRESHOLDS["float32"]

# Optional sections: (summary key, section id, title). Each also claims PNGs named `<key>*.png`.
OPTIONAL_SECTIONS: tuple[tuple[str, str, str], ...] = (
    ("ablation", "ablation", "Token ablation: linear vs real"),
    ("layers", "layers", "Layers"),
    ("steering", "steering", "Steering"),
    ("prompts", "prompts", "Prompts"),
)

# Figures written by `pipeline.write_run`, with the section that shows them.
KNOWN_FIGURES: dict[str, str] = {
    "reconstruction.png": "y against Σ_t J_t·x_t (detached, and ordinary if computed)",
    "singular_values.png": "top singular values of J with their residual bounds",
    "per_token.png": "per-token importance ‖c_t‖, ‖J_t‖_F and the spectra of each J_t",
    "ablation.png": "change of the predicted token's logit when a token is dropped: the linear map's "
    "y − c_t against the model with the token removed and with its embedding zeroed",
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


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def cell(value: Any) -> str:
    """A table cell for any value: numbers right-aligned, strings with whitespace kept."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f'<td class="num">{fmt(value)}</td>'
    if isinstance(value, str):
        return f'<td class="text">{esc(value)}</td>'
    if _is_scalar(value):
        return f"<td>{fmt(value)}</td>"
    return f'<td class="text">{esc(json.dumps(value, ensure_ascii=False))}</td>'


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


def section(section_id: str, title: str, body: str) -> str:
    return f'<section id="{esc(section_id)}">\n<h2>{esc(title)}</h2>\n{body}\n</section>'


def figure(path: Path, caption: str = "") -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    alt = f"{path.name}: {caption}" if caption else path.name
    cap = f"<figcaption>{esc(path.name)}{' — ' + esc(caption) if caption else ''}</figcaption>"
    return f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def _split_fields(records: Sequence[dict], skip: Collection[str] = ()) -> tuple[list[str], list[str]]:
    """(scalar keys, nested keys) over all records in first-seen order; a key that is
    nested in any record counts as nested."""
    keys = list(dict.fromkeys(key for record in records for key in record if key not in skip))
    nested = [k for k in keys if any(k in r and not _is_scalar(r[k]) for r in records)]
    return [k for k in keys if k not in nested], nested


def records_table(records: Sequence[Any]) -> str:
    """A list of dicts as one table of their scalar fields (union of keys, first-seen order);
    large nested fields are left to summary.json rather than flooding the page."""
    dicts = [r for r in records if isinstance(r, dict)]
    if len(dicts) != len(records) or not dicts:
        return yaml_block(records)
    keys, nested = _split_fields(dicts)
    rows = [[cell(record.get(k)) for k in keys] for record in dicts]
    note = ""
    if nested:
        note = f'<p class="note">Non-scalar fields omitted (see summary.json): {esc(", ".join(nested))}</p>'
    return table(keys, rows) + note


def yaml_block(value: Any) -> str:
    text = yaml.safe_dump(value, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return f"<pre>{esc(text)}</pre>"


def generic(value: Any) -> str:
    """Render an unknown structure: a dict's scalars as key/value rows, its lists of dicts
    as tables, anything else as YAML."""
    if isinstance(value, list):
        return records_table(value)
    if not isinstance(value, dict):
        return yaml_block(value)
    scalars = [(str(k), fmt(v)) for k, v in value.items() if _is_scalar(v)]
    parts = [key_values(scalars)] if scalars else []
    for key, item in value.items():
        if _is_scalar(item):
            continue
        parts.append(f"<h3>{esc(key)}</h3>")
        parts.append(generic(item))
    return "\n".join(parts)


# --- sections ---------------------------------------------------------------------------


def certificate_threshold(dtype: str | None) -> float:
    return THRESHOLDS.get(str(dtype), DEFAULT_THRESHOLD)


def certificate_passes(error: float | None, dtype: str | None) -> bool:
    # NaN or a missing error fails: the certificate must be shown to hold.
    return error is not None and math.isfinite(error) and error <= certificate_threshold(dtype)


def badge(ok: bool, element_id: str = "") -> str:
    ident = f' id="{esc(element_id)}"' if element_id else ""
    return f'<span{ident} class="badge {"pass" if ok else "fail"}">{"PASS" if ok else "FAIL"}</span>'


def overview(s: dict[str, Any]) -> str:
    predicted = s.get("predicted_token")
    predicted_html = "—" if predicted is None else token_html(predicted)
    if s.get("predicted_token_id") is not None:
        predicted_html += f" (id {fmt(s['predicted_token_id'])})"
    return key_values(
        [
            ("model", fmt(s.get("model"))),
            ("family", fmt(s.get("family"))),
            ("dtype", fmt(s.get("dtype"))),
            ("text", f'<span class="text">{fmt(s.get("text"))}</span>'),
            ("tokens", f"{fmt(s.get('n_tokens'))}: {tokens_html(s.get('tokens', []))}"),
            ("predicted next token", predicted_html),
            ("params from cache", fmt(s.get("params_from_cache"))),
            ("Jacobian input", fmt(s.get("jacobian_input"))),
        ]
    )


def certificate(s: dict[str, Any]) -> str:
    error, dtype = s.get("reconstruction_relative_error"), s.get("dtype")
    threshold = certificate_threshold(dtype)
    ok = certificate_passes(error, dtype)
    argmax = s.get("reconstruction_argmax_matches")
    ordinary = s.get("ordinary_jacobian_relative_error")
    if s.get("affine"):
        bias = f"‖c_bias‖ = {fmt(s.get('bias_contribution_norm'))} (included in the reconstruction)"
    else:
        bias = "none: the model has no biases, so J is linear"
    rows = [
        (
            "‖Σ_t J_t·x_t − y‖ / ‖y‖",
            f"{fmt(error, '.3e')} {badge(ok, 'certificate-badge')} "
            f'<span class="note">threshold {threshold:.0e} for {esc(dtype)}</span>',
        ),
        ("next-token argmax from Σ_t c_t", f"{fmt(argmax)} {badge(bool(argmax))}"),
        (
            "ordinary Jacobian, same reconstruction",
            f"{fmt(ordinary, '.3e')}"
            + ("" if ordinary is None else ' <span class="note">(not expected to reconstruct y)</span>'),
        ),
        ("bias term (affine models)", esc(bias)),
    ]
    return key_values(rows)


def convergence_verdict(spec: dict[str, Any]) -> str | None:
    """One line saying whether the Lanczos run converged, where it stopped and why, or that
    the spectrum is exact (also printed by the CLI); None for a summary that does not
    record it."""
    reason, worst, target = spec.get("stop_reason"), spec.get("worst_relative_bound"), spec.get("tolerance")
    if reason == "exact" and worst is not None:
        return f"Spectrum: exact, from J's rows (no iteration; worst relative bound {worst:.1e})"
    if reason not in ("converged", "stalled", "full_depth") or worst is None or target is None:
        return None
    depth = spec.get("krylov_depth")
    if reason == "converged":
        return f"Lanczos: converged at depth {depth} (worst relative bound {worst:.1e} ≤ target {target:.1e})"
    why = {
        "stalled": "the bounds stopped improving: the operator's rounding allows no better",
        "full_depth": "full depth d reached",
    }[reason]
    return (
        f"Lanczos: NOT converged at depth {depth} "
        f"(worst relative bound {worst:.1e} > target {target:.1e}; {why})"
    )


def spectrum(s: dict[str, Any]) -> str:
    spec, norms = s.get("spectrum", {}), s.get("norms", {})
    sigmas = s.get("singular_values", [])
    bounds = spec.get("residual_bounds", [])
    decoded = spec.get("left_vectors_top_tokens", [])
    verdict = convergence_verdict(spec)
    stopping = (
        []
        if verdict is None
        else [("stopping", f"{badge(spec.get('converged') is True, 'convergence-badge')} {esc(verdict)}")]
    )
    facts = key_values(
        [
            ("method", fmt(spec.get("method"))),
            ("Krylov depth", fmt(spec.get("krylov_depth"))),
            ("converged", fmt(spec.get("converged"))),
            *stopping,
            ("‖J‖_F", f"{fmt(norms.get('frobenius'))} ({fmt(norms.get('frobenius_method'))})"),
            ("stable rank ‖J‖_F² / σ₁²", fmt(norms.get("stable_rank"))),
        ]
    )
    rows = []
    for i, sigma in enumerate(sigmas):
        bound = bounds[i] if i < len(bounds) else None
        tokens = decoded[i].get("tokens", []) if i < len(decoded) else []
        rows.append(
            [
                cell(i + 1),
                cell(sigma),
                f'<td class="num">{fmt(bound, ".1e")}</td>',
                f"<td>{tokens_html(tokens)}</td>",
            ]
        )
    return facts + table(["i", "σ_i", "residual bound", "top tokens of u_i"], rows)


def per_token(s: dict[str, Any]) -> str:
    pt, norms = s.get("per_token", {}), s.get("norms", {})
    tokens = s.get("tokens", [])
    contrib = norms.get("token_contribution_norms", [])
    frob = norms.get("token_frobenius", [])
    sigmas = pt.get("singular_values", [])
    lefts = pt.get("top_left_vector", [])

    def at(values: Sequence[Any], t: int) -> Any:
        return values[t] if t < len(values) else None

    rows = []
    for t, token in enumerate(tokens):
        sigma_row = at(sigmas, t)
        left = at(lefts, t) or {}
        rows.append(
            [
                cell(t),
                f"<td>{token_html(token)}</td>",
                cell(at(contrib, t)),
                cell(at(frob, t)),
                cell(sigma_row[0] if sigma_row else None),
                f"<td>{tokens_html(left.get('tokens', []))}</td>",
                f"<td>{tokens_html(left.get('right_vector_nearest_tokens', []))}</td>",
            ]
        )
    note = (
        f'<p class="note">Per-token spectra: {fmt(pt.get("method"))}; largest relative residual bound '
        f"{fmt(pt.get('max_relative_bound'), '.1e')}. ‖J_t‖_F: {fmt(norms.get('frobenius_method'))}. "
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


# Layer-row fields shown by `layers` in their own columns (or as the section's grouping).
_LAYER_DECODED = ("scope", "top_tokens", "right_vector_space", "right_vectors")


def layers(value: Any) -> str:
    """The layer sweep, one table per scope (cumulative / local): every scalar field, and the
    top triplet read as tokens: u₁ through the unembedding, v₁ at its dominant position as
    the nearest input-embedding rows. Anything else (e.g. rows without a scope) is shown
    generically."""
    if not (
        isinstance(value, list)
        and value
        and all(isinstance(r, dict) and {"layer", "scope"} <= r.keys() for r in value)
    ):
        return generic(value)
    scalar_keys, nested = _split_fields(value, skip=_LAYER_DECODED)
    with_left = any(r.get("top_tokens") for r in value)
    with_right = any(r.get("right_vectors") for r in value)
    headers = list(scalar_keys)
    if with_left:
        headers.append("top tokens of u₁")
    if with_right:
        headers += ["v₁: dominant position (share of ‖v₁‖²)", "v₁: nearest embedding rows", "‖Jv₁ − σ₁u₁‖/σ₁"]
    parts = []
    for scope in dict.fromkeys(r["scope"] for r in value):
        rows = []
        group = [r for r in value if r["scope"] == scope]
        for row in group:
            cells = [cell(row.get(k)) for k in scalar_keys]
            if with_left:
                top = row.get("top_tokens") or [[]]
                cells.append(f"<td>{tokens_html(top[0])}</td>")
            if with_right:
                first = (row.get("right_vectors") or [{}])[0]
                position = first.get("dominant_position")
                where = "—"
                if position is not None:
                    where = (
                        f"{fmt(position)} {token_html(str(first.get('dominant_token', '')))} "
                        f"({fmt(first.get('share_of_norm'), '.2f')})"
                    )
                cells += [
                    f"<td>{where}</td>",
                    f"<td>{tokens_html(first.get('nearest_tokens', []))}</td>",
                    f'<td class="num">{fmt(first.get("relative_residual"), ".1e")}</td>',
                ]
            rows.append(cells)
        parts.append(f"<h3>{esc(scope)}</h3>")
        space = next((r["right_vector_space"] for r in group if r.get("right_vector_space")), None)
        if with_right and space:
            parts.append(
                f'<p class="note">Right vectors v_i = Jᵀu_i/σ_i live in the {esc(space)}; each is read '
                "at the token position carrying most of its norm, as the input-embedding rows nearest "
                "by cosine.</p>"
            )
        parts.append(table(headers, rows))
    if nested:
        parts.append(
            f'<p class="note">Non-scalar fields omitted (see summary.json): {esc(", ".join(nested))}</p>'
        )
    return "\n".join(parts)


def steering(value: Any) -> str:
    """Baseline and the λ-continuations in one table so they read side by side."""
    if not isinstance(value, dict):
        return generic(value)
    runs = next(
        (
            (key, item)
            for key, item in value.items()
            if isinstance(item, list)
            and item
            and all(isinstance(r, dict) and "lambda" in r and "text" in r for r in item)
        ),
        None,
    )
    if runs is None:
        return generic(value)
    key, continuations = runs
    rows = []
    if "baseline" in value:
        rows.append(["<td>baseline</td>", cell(value["baseline"])])
    rows += [[cell(r["lambda"]), cell(r["text"])] for r in continuations]
    rest = {k: v for k, v in value.items() if k not in (key, "baseline")}
    extras = [r for r in continuations if set(r) - {"lambda", "text"}]
    parts = [table(["λ", "text"], rows)]
    if extras:
        parts.append(f"<h3>{esc(key)}: all fields</h3>" + records_table(continuations))
    if rest:
        parts.append(generic(rest))
    return "\n".join(parts)


def ablation(value: Any) -> str:
    """The rank correlations first, then one row per token."""
    if not isinstance(value, dict) or "rows" not in value:
        return generic(value)
    facts = key_values(
        (esc(key.replace("_", " ")), cell(value[key]))
        for key in (
            "predicted_token",
            "spearman_linear_vs_removed",
            "spearman_linear_vs_zeroed",
            "top_change_agreement_removed",
            "top_change_agreement_zeroed",
        )
        if key in value
    )
    return facts + records_table(value["rows"])


def timings(s: dict[str, Any]) -> str:
    seconds = s.get("timings_seconds") or {}
    rows = [[f"<td>{esc(step)}</td>", cell(value)] for step, value in seconds.items()]
    numbers = [v for v in seconds.values() if isinstance(v, int | float)]
    if numbers:
        rows.append(["<th>total</th>", cell(round(sum(numbers), 3))])
    return table(["step", "seconds"], rows)


# --- the report -------------------------------------------------------------------------


def _build(run_dir: Path, s: dict[str, Any], name: str | None = None) -> str:
    pngs = {p.name: p for p in sorted(run_dir.glob("*.png")) if p.is_file()}
    shown: set[str] = set()

    def claim(names: Iterable[str]) -> str:
        """Figures for one section; each PNG is embedded once, in the first section claiming it."""
        parts = []
        for name in names:
            if name in pngs and name not in shown:
                shown.add(name)
                parts.append(figure(pngs[name], KNOWN_FIGURES.get(name, "")))
        return "\n".join(parts)

    def known(name: str) -> str:
        return claim([name]) or f'<p class="note">{esc(name)} not found in the run directory.</p>'

    sections = [
        ("overview", "Overview", overview(s)),
        ("certificate", "Certificate", certificate(s)),
        ("reconstruction", "Reconstruction", known("reconstruction.png")),
        ("spectrum", "Spectrum of J", known("singular_values.png") + spectrum(s)),
        ("per-token", "Per-token view", known("per_token.png") + per_token(s)),
    ]
    for key, section_id, title in OPTIONAL_SECTIONS:
        if key in s:
            renderer = {"steering": steering, "layers": layers, "ablation": ablation}.get(key, generic)
            body = renderer(s[key])
            own = claim(n for n in pngs if n.startswith(key))
            sections.append((section_id, title, own + body))
    config = s.get("config")
    sections.append(
        ("config", "Config", yaml_block(config) if config is not None else '<p class="note">not recorded</p>')
    )
    sections.append(("timings", "Timings", timings(s)))
    rest = claim(n for n in pngs if n not in shown)
    if rest:
        sections.append(("other-figures", "Other figures", rest))

    nav = " ".join(f'<a href="#{esc(i)}">{esc(t)}</a>' for i, t, _ in sections)
    body = "\n".join(section(i, t, b) for i, t, b in sections)
    title = f"jaxlin · {s.get('model', '?')} · {name or run_dir.name}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{esc(title)}</h1>\n<nav>{nav}</nav>\n{body}\n</body>\n</html>\n"
    )


def render_report(run_dir: Path, summary: dict | None = None, name: str | None = None) -> Path:
    """Write run_dir/report.html (self-contained) and return its path. `name` is the run's
    name in the title (default: the directory's; a run rendered in its staging
    directory passes its final name)."""
    run_dir = Path(run_dir)
    if summary is None:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    path = run_dir / REPORT_NAME
    write_text_atomic(path, _build(run_dir, summary, name))  # never seen half-written
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m jaxlin.report RUN_DIR")
    print(render_report(Path(sys.argv[1])))
