"""The HTML report of a run directory, on synthetic run records and tiny PNGs (no model)."""

from __future__ import annotations

import base64
import copy
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from jaxlin import report  # noqa: E402
from jaxlin.outputs import write_json_atomic  # noqa: E402
from jaxlin.record import FIGURES, figure_names, parse_record  # noqa: E402
from jaxlin.report import render_report  # noqa: E402

REQUIRED = ["overview", "certificate", "reconstruction", "spectrum", "per-token", "config", "timings"]
OPTIONAL = ["ablation", "layers", "steering"]
MANY_REQUIRED = ["overview", "prompts", "config", "timings"]
NASTY = '<script>&"'
TOKENS = ["<bos>", "The", " bridge", "\n", NASTY, " Golden"]


def tiny_png(path: Path, value: float) -> None:
    """A few-hundred-byte PNG; `value` makes each file's bytes distinct."""
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [0, value])
    ax.set_ylim(0, 12)  # fixed axes, so that the line (and the bytes) differ with `value`
    fig.savefig(path, dpi=20)
    plt.close(fig)


def synthetic_summary(**extra: Any) -> dict[str, Any]:
    n, k = len(TOKENS), 3
    return {
        "model": "tiny <model>",
        "family": "gemma3",
        "text": 'The bridge\n<script>&" Golden',
        "n_tokens": n,
        "tokens": TOKENS,
        "token_ids": list(range(n)),
        "add_bos": "tokenizer",
        "bos_added": True,
        "dtype": "float32",
        "jacobian_input": "raw embedding rows",
        "predicted_token": " Gate",
        "predicted_token_id": 26010,
        "reconstruction_relative_error": 7.5e-7,
        "reconstruction_argmax_matches": True,
        "affine": True,
        "bias_contribution_norm": 0.125,
        "ordinary_jacobian_relative_error": 0.97,
        "singular_values": [3.0, 2.0, 1.0],
        "products": {"linearizations": 2, "matvecs": 40, "rmatvecs": 40},
        "spectrum": {
            "method": "lanczos",
            "residual_bounds": [1e-6, 2e-6, 3e-6],
            "krylov_depth": 32,
            "converged": True,
            "tolerance": 1e-5,
            "stop_reason": "converged",
            "worst_relative_bound": 3e-6,
            "left_vectors_top_tokens": [
                {
                    "index": i + 1,
                    "sigma": 3.0 - i,
                    "tokens": [f" u{i}a", NASTY],
                    "token_ids": [1, 2],
                    "scores": [0.5, 0.4],
                }
                for i in range(k)
            ],
        },
        "norms": {
            "frobenius": 4.0,
            "frobenius_method": "exact (per-token blocks)",
            "stable_rank": 1.7,
            "token_frobenius": [1.0 + t for t in range(n)],
            "token_contribution_norms": [0.5 + t for t in range(n)],
        },
        "per_token": {
            "method": "exact",
            "top_left_vector": [
                {
                    "token": tok,
                    "index": 1,
                    "sigma": 9.0 + t,
                    "tokens": [f"jt{t}", " x"],
                    "token_ids": [3, 4],
                    "scores": [0.1, 0.0],
                    "right_vector_nearest_tokens": [f"e{t}", NASTY, " y"],
                }
                for t, tok in enumerate(TOKENS)
            ],
            "singular_values": [[9.0 + t, 1.0] for t in range(n)],
            "max_relative_bound": 1e-7,
        },
        "right_vectors_nearest_embeddings": [
            {
                "index": i + 1,
                "dominant_position": 1,
                "dominant_token": "The",
                "share_of_norm": 0.5,
                "nearest_tokens": ["the", NASTY],
                "cosines": [0.5, 0.25],
            }
            for i in range(k)
        ],
        "timings_seconds": {"loading model": 1.5, "Lanczos top-3 of J": 2.25},
        "config": {"model": {"source": "embedded", "dtype": "float32"}, "text": "The bridge"},
        "params_from_cache": False,
        **extra,
    }


def steering_value() -> dict[str, Any]:
    return {
        "concept": "The bridge",
        "prompt": "Here is",
        "layer": 1,
        "mode": "jacobian",
        "baseline": "the Golden Gate",
        "runs": [
            {"lambda": 0.0, "text": "the Golden Gate", "token_ids": [1]},
            {"lambda": -2.0, "text": "the Golden Mile", "token_ids": [2]},
            {"lambda": 2.0, "text": "a <b>old</b>", "token_ids": [3]},
        ],
    }


def ablation_value() -> dict[str, Any]:
    return {
        "predicted_token": " Gate",
        "spearman_linear_vs_removed": 0.875,
        "spearman_linear_vs_zeroed": 0.5,
        "top_change_agreement_removed": 1.0,
        "top_change_agreement_zeroed": 0.75,
        "rows": [
            {
                "position": t,
                "token": tok,
                "linear_logit_change": 0.5 * t,
                "linear_top_token": " Gate",
                "removed_logit_change": 0.25 * t,
                "removed_top_token": " Gate",
                "zeroed_logit_change": 0.125 * t,
                "zeroed_top_token": NASTY,
            }
            for t, tok in enumerate(TOKENS)
        ],
    }


def optional_values() -> dict[str, Any]:
    """Every optional section of a single run's record."""
    return {
        "ablation": ablation_value(),
        "layers": [layer_row(layer, scope) for scope in ("cumulative", "local") for layer in range(2)],
        "steering": steering_value(),
    }


def many_summary(**extra: Any) -> dict[str, Any]:
    """A many-prompt output's record."""
    return {
        "model": "tiny <model>",
        "family": "gemma3",
        "dtype": "float32",
        "text": "2 prompts",
        "n_prompts": 2,
        "prompts": [
            {
                "index": i,
                "text": text,
                "n_tokens": 4 + i,
                "predicted_token": token,
                "reconstruction_relative_error": 1e-7 * (i + 1),
                "sigma_1": 3.0,
                "stable_rank": 1.5,
                "directory": f"prompts/{i:04d}",
            }
            for i, (text, token) in enumerate([("first prompt", " A"), ("second prompt", " B")])
        ],
        "max_reconstruction_relative_error": 2e-7,
        "mean_stable_rank": 1.5,
        "config": {
            "model": {"source": "embedded", "dtype": "float32"},
            "texts": ["first prompt", "second prompt"],
        },
        "params_from_cache": False,
        "checkpoint_sha256": {"model.safetensors": "0" * 64},
        "timings_seconds": {"loading model": 1.5},
        "prompts_reused": 1,
        "devices": 1,
        **extra,
    }


class Parsed(HTMLParser):
    """Sections with their h2 titles, images with their section, badges, and every URL."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: dict[str, str] = {}
        self.images: list[tuple[str | None, dict[str, str | None]]] = []
        self.urls: list[str] = []
        self.tags: list[str] = []
        self.badge_text: dict[str, str] = {}
        self.text_by_section: dict[str, str] = {}
        self._section: str | None = None
        self._in_h2 = False
        self._badge: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append(tag)
        self.urls += [v or "" for k, v in attrs if k in ("src", "href")]
        if tag == "section":
            self._section = attributes["id"]
            assert self._section not in self.sections, f"duplicate section {self._section}"
            self.sections[self._section] = ""
            self.text_by_section[self._section] = ""
        elif tag == "h2":
            self._in_h2 = True
        elif tag == "img":
            self.images.append((self._section, attributes))
        elif tag == "span" and attributes.get("id"):
            self._badge = attributes["id"]
            self.badge_text[self._badge] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._section = None
        elif tag == "h2":
            self._in_h2 = False
        elif tag == "span":
            self._badge = None

    def handle_data(self, data: str) -> None:
        if self._section is not None:
            self.text_by_section[self._section] += data
            if self._in_h2:
                self.sections[self._section] += data
        if self._badge is not None:
            self.badge_text[self._badge] += data


class Tables(HTMLParser):
    """Every table's rows as lists of cell texts (header cells included), by section."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[list[str]]]] = {}
        self._section: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "section":
            self._section = dict(attrs)["id"]
            self.tables[self._section] = []
        elif tag == "table" and self._section is not None:
            self.tables[self._section].append([])
        elif tag == "tr" and self._section is not None:
            self.tables[self._section][-1].append([])
        elif tag in ("td", "th") and self._section is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._section is not None:
            self.tables[self._section][-1][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "section":
            self._section = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def column(rows: list[list[str]], header: str) -> list[str]:
    """The body cells of the column whose header contains `header` (exactly one such)."""
    matches = [i for i, h in enumerate(rows[0]) if header in h]
    assert len(matches) == 1, (header, rows[0])
    return [row[matches[0]] for row in rows[1:]]


def tables_of(text: str) -> dict[str, list[list[list[str]]]]:
    parser = Tables()
    parser.feed(text)
    parser.close()
    return parser.tables


def make_run(tmp_path: Path, summary: dict[str, Any], pngs: list[str]) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    write_json_atomic(run / "summary.json", summary)
    for i, name in enumerate(pngs):
        tiny_png(run / name, 1.0 + i)
    return run


def render(run: Path, summary: dict[str, Any] | None = None) -> tuple[str, Parsed]:
    path = render_report(run, summary)
    assert path == run / "report.html"
    text = path.read_text(encoding="utf-8")
    parsed = Parsed()
    parsed.feed(text)
    parsed.close()
    return text, parsed


STANDARD_PNGS = ["reconstruction.png", "singular_values.png", "per_token.png"]


def embedded(run: Path, parsed: Parsed) -> dict[bytes, tuple[str | None, str]]:
    """Every embedded PNG's exact bytes → (its section, its alt text); each PNG once."""
    where: dict[bytes, tuple[str | None, str]] = {}
    for section_id, attributes in parsed.images:
        src = attributes["src"] or ""
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data not in where, "a PNG is embedded twice"
        where[data] = (section_id, attributes.get("alt") or "")
    return where


@pytest.mark.parametrize("many", [False, True])
def test_every_figure_in_its_section_with_its_caption(tmp_path, many):
    summary = many_summary(layers=[aggregate_row(0)]) if many else synthetic_summary(**optional_values())
    names = figure_names(parse_record(summary))
    # A PNG jaxlin did not write for this record is not claimed by any section.
    run = make_run(tmp_path, summary, [*names, "zz_extra.png", "layers_norms.png"])
    text, parsed = render(run, summary)

    required = MANY_REQUIRED if many else REQUIRED
    for section_id in [*required, "layers"]:
        assert parsed.sections.get(section_id), f"section {section_id} missing or without an <h2>"
    assert "other-figures" not in parsed.sections
    order = list(parsed.sections)
    assert order[: len(required) - 2] == required[:-2] and order[-2:] == ["config", "timings"]

    where = embedded(run, parsed)
    assert len(where) == len(names)
    for name in names:
        section_id, alt = where[(run / name).read_bytes()]
        assert section_id == FIGURES[name].section, name
        assert alt == f"{name}: {FIGURES[name].caption}"
        assert f"{name} — {report.esc(FIGURES[name].caption)}</figcaption>" in text
    expected = (
        {"prompts.png", "layers.png"}
        if many
        else {
            "reconstruction.png",
            "singular_values.png",
            "per_token.png",
            "importance.png",
            "focus_jacobian.png",
            "ablation.png",
            "layers.png",
            "layers_path.png",
        }
    )
    assert set(names) == expected
    assert {FIGURES[n].section for n in ("importance.png", "focus_jacobian.png")} == {"per-token"}


def test_self_contained(tmp_path):
    summary = synthetic_summary(**optional_values())
    run = make_run(tmp_path, summary, STANDARD_PNGS)
    text, parsed = render(run, summary)
    assert "script" not in parsed.tags and "link" not in parsed.tags
    assert all(url.startswith(("data:", "#")) for url in parsed.urls)
    assert not re.search(r"https?://", text)


@pytest.mark.parametrize("present", [(), ("ablation",), ("layers",), ("steering",), tuple(OPTIONAL)])
def test_optional_sections_iff_keys(tmp_path, present):
    summary = synthetic_summary(**{key: optional_values()[key] for key in present})
    run = make_run(tmp_path, summary, STANDARD_PNGS)
    _, parsed = render(run, summary)
    for key in OPTIONAL:
        assert (key in parsed.sections) == (key in present), key
    assert "other-figures" not in parsed.sections
    assert set(parsed.sections) == set(REQUIRED) | set(present)


@pytest.mark.parametrize("present", [(), ("layers",), ("steering",)])
def test_many_prompt_sections_iff_keys(tmp_path, present):
    values = {"layers": [aggregate_row(0), aggregate_row(1)], "steering": steering_value()}
    summary = many_summary(**{key: values[key] for key in present})
    run = make_run(tmp_path, summary, [])
    _, parsed = render(run, summary)
    assert set(parsed.sections) == set(MANY_REQUIRED) | set(present)
    assert "second prompt" in parsed.text_by_section["prompts"]
    assert "prompts.png not found" in parsed.text_by_section["prompts"]
    assert parsed.badge_text["certificate-badge"] == "PASS"  # the worst prompt's, 2e-7


def test_optional_section_contents(tmp_path):
    summary = synthetic_summary(**optional_values())
    run = make_run(tmp_path, summary, STANDARD_PNGS)
    text, parsed = render(run, summary)
    layers = parsed.text_by_section["layers"]
    assert "stable_rank" in layers and "residual" in layers and "path_cosines" in layers  # noted
    steering = parsed.text_by_section["steering"]
    assert "the Golden Gate" in steering and "the Golden Mile" in steering and "-2" in steering
    assert "a <b>old</b>" in steering and "<b>old" not in text  # escaped, shown as text
    ablation = parsed.text_by_section["ablation"]
    assert "0.875" in ablation and NASTY in ablation and "zeroed_top_token" in ablation


def test_a_summary_that_is_not_a_record_is_refused(tmp_path):
    summary = synthetic_summary(frobenius_of_everything=1.0)
    run = make_run(tmp_path, summary, STANDARD_PNGS)
    with pytest.raises(report.JaxlinError, match="frobenius_of_everything"):
        render(run, summary)
    assert not (run / "report.html").exists()


def test_text_is_escaped_and_whitespace_visible(tmp_path):
    summary = synthetic_summary()
    run = make_run(tmp_path, summary, STANDARD_PNGS)
    text, parsed = render(run, summary)
    assert "<script" not in text.lower()
    assert "&lt;script&gt;&amp;&quot;" in text
    per_token = parsed.text_by_section["per-token"]
    assert NASTY in per_token and "␣bridge" in per_token and "⏎" in per_token
    assert "tiny <model>" in parsed.text_by_section["overview"]


def test_visible_tokens():
    assert report.visible(" a\tb\n") == "␣a⇥b⏎"
    assert report.visible("\x00") == "␀"
    assert report.visible("") == "∅"


@pytest.mark.parametrize(
    ("dtype", "error", "passes"),
    [
        ("float32", 9e-6, True),
        ("float32", 2e-5, False),
        ("float64", 1e-13, True),
        ("float64", 1e-11, False),
        ("bfloat16", 5e-2, True),
        ("bfloat16", 0.2, False),
        ("float32", float("nan"), False),
    ],
)
def test_certificate_badge(tmp_path, dtype, error, passes):
    summary = synthetic_summary(dtype=dtype, reconstruction_relative_error=error)
    run = make_run(tmp_path, summary, STANDARD_PNGS)
    text, parsed = render(run, summary)
    assert parsed.badge_text["certificate-badge"] == ("PASS" if passes else "FAIL")
    assert f"{report.THRESHOLDS[dtype]:.0e}" in parsed.text_by_section["certificate"]
    certificate = parsed.text_by_section["certificate"]
    assert "9.700e-01" in certificate  # the ordinary Jacobian beside it
    assert "0.125" in certificate  # the bias term of an affine model


def test_per_token_off_and_missing_figures(tmp_path):
    summary = synthetic_summary(per_token={"method": "off"}, ordinary_jacobian_relative_error=None)
    summary.pop("config")
    run = make_run(tmp_path, summary, [])
    _, parsed = render(run, summary)
    assert set(parsed.sections) == set(REQUIRED)
    assert not parsed.images
    assert "per_token.png not found" in parsed.text_by_section["per-token"]


def test_reads_summary_json_and_writes_atomically(tmp_path, monkeypatch):
    summary = synthetic_summary()
    run = make_run(tmp_path, summary, STANDARD_PNGS)
    before = set(os.listdir(run))
    _, parsed = render(run)  # summary read from summary.json
    assert "tiny <model>" in parsed.text_by_section["overview"]
    assert set(os.listdir(run)) == before | {"report.html"}
    first = (run / "report.html").read_text(encoding="utf-8")

    # A failed write leaves the previous report intact and no temp file behind.
    def broken_replace(*args: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)  # the one atomic writer: jaxlin.outputs
    changed = copy.deepcopy(summary)
    changed["model"] = "another model"
    with pytest.raises(OSError, match="disk full"):
        render_report(run, changed)
    assert set(os.listdir(run)) == before | {"report.html"}
    assert (run / "report.html").read_text(encoding="utf-8") == first


def test_per_token_table_shows_decoded_left_and_right_vectors(tmp_path):
    summary = synthetic_summary()
    run = make_run(tmp_path, summary, STANDARD_PNGS)
    text, _ = render(run, summary)
    (rows,) = tables_of(text)["per-token"]
    assert len(rows) == 1 + len(TOKENS)
    lefts = column(rows, "first left vector")
    rights = column(rows, "first right vector")
    for t, (left, right) in enumerate(zip(lefts, rights, strict=True)):
        assert left == f"jt{t}␣x"
        assert right == f"e{t}{NASTY}␣y"  # every token, in order, escaped and visible


def layer_row(layer: int, scope: str) -> dict[str, Any]:
    """A row as `jaxlin.analyses.layers.dynamics` writes it."""
    return {
        "layer": layer,
        "tap": "residual",
        "scope": scope,
        "stable_rank": 1.5 + layer,
        "entropy_rank": 2.5,
        "sigma_1": 3.0,
        "reconstruction_relative_error": 1e-7,
        "path_cosines": [1.0, 0.5],
        "top_tokens": [[f" left{layer}{scope[0]}", "b"], ["c"]],
        "right_vector_space": f"space of {scope}",
        "right_vectors": [
            {
                "index": 1,
                "dominant_position": 4,
                "dominant_token": NASTY,
                "share_of_norm": 0.75,
                "nearest_tokens": [f" right{layer}{scope[0]}", "\n"],
                "cosines": [0.9, 0.1],
                "sigma": 3.0,
                "relative_residual": 2e-9,
            },
            {
                "index": 2,
                "dominant_position": 0,
                "dominant_token": "x",
                "share_of_norm": 0.5,
                "nearest_tokens": ["not shown"],
                "cosines": [0.5],
                "sigma": 1.0,
                "relative_residual": 1e-9,
            },
        ],
    }


def aggregate_row(layer: int) -> dict[str, Any]:
    """A layer row of a many-prompt output (averaged over prompts)."""
    return {
        "layer": layer,
        "tap": "residual",
        "scope": "cumulative",
        "prompts": 2,
        "stable_rank": 1.5,
        "stable_rank_std": 0.25,
        "entropy_rank": 2.5,
        "entropy_rank_std": 0.5,
        "max_reconstruction_relative_error": 1e-7,
    }


def test_layers_section_shows_decoded_left_and_right_vectors(tmp_path):
    rows = [layer_row(layer, scope) for scope in ("cumulative", "local") for layer in range(2)]
    summary = synthetic_summary(layers=rows)
    run = make_run(tmp_path, summary, STANDARD_PNGS)
    text, parsed = render(run, summary)
    cumulative, local = tables_of(text)["layers"]
    for scope, table in (("cumulative", cumulative), ("local", local)):
        assert column(table, "layer") == ["0", "1"]
        assert column(table, "stable_rank") == ["1.5", "2.5"]
        assert column(table, "top tokens of u₁") == [f"␣left0{scope[0]}b", f"␣left1{scope[0]}b"]
        assert column(table, "nearest embedding rows") == [f"␣right0{scope[0]}⏎", f"␣right1{scope[0]}⏎"]
        assert column(table, "dominant position") == [f"4 {NASTY} (0.75)"] * 2
        assert column(table, "‖Jv₁ − σ₁u₁‖/σ₁") == ["2.0e-09"] * 2
    section = parsed.text_by_section["layers"]
    assert "space of cumulative" in section and "space of local" in section
    assert "not shown" not in section  # only the top triplet per tap
    assert "path_cosines" in section  # noted as left to summary.json
