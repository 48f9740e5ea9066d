"""The HTML report of a run directory, on a synthetic summary and tiny PNGs (no model)."""

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
from jaxlin.outputs import write_json  # noqa: E402
from jaxlin.report import render_report  # noqa: E402

REQUIRED = ["overview", "certificate", "reconstruction", "spectrum", "per-token", "config", "timings"]
OPTIONAL = ["layers", "steering", "prompts"]
NASTY = '<script>&"'
TOKENS = ["<bos>", "The", " bridge", "\n", NASTY, " Golden"]


def tiny_png(path: Path, value: float) -> None:
    """A few-hundred-byte PNG; `value` makes each file's bytes distinct."""
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [0, value])
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
        "spectrum": {
            "method": "lanczos",
            "residual_bounds": [1e-6, 2e-6, 3e-6],
            "krylov_depth": 32,
            "converged": True,
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
        "timings_seconds": {"loading model": 1.5, "Lanczos top-3 of J": 2.25},
        "config": {"model": {"source": "hf", "dtype": "float32"}, "text": "The bridge"},
        "params_from_cache": False,
        **extra,
    }


OPTIONAL_VALUES: dict[str, Any] = {
    "layers": [
        {"layer": 0, "frobenius": 1.25, "kind": "sliding", "sigmas": [1.0, 0.5]},
        {"layer": 1, "frobenius": 2.5, "kind": "global", "sigmas": [2.0, 0.5]},
    ],
    "steering": {
        "baseline": "the Golden Gate",
        "direction": "u_1",
        "continuations": [
            {"lambda": -2.0, "text": "the Golden Mile"},
            {"lambda": 2.0, "text": "a <b>old</b>"},
        ],
    },
    "prompts": [
        {"text": "first prompt", "predicted_token": " A", "reconstruction_relative_error": 1e-7},
        {"text": "second prompt", "predicted_token": " B", "reconstruction_relative_error": 2e-7},
    ],
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
    write_json(run / "summary.json", summary)
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


def test_required_sections_and_embedded_figures(tmp_path):
    pngs = [*STANDARD_PNGS, "layers_norms.png", "zz_extra.png"]
    summary = synthetic_summary(layers=OPTIONAL_VALUES["layers"])
    run = make_run(tmp_path, summary, pngs)
    _, parsed = render(run, summary)

    for section_id in [*REQUIRED, "layers", "other-figures"]:
        assert parsed.sections.get(section_id), f"section {section_id} missing or without an <h2>"
    order = list(parsed.sections)
    assert order[: len(REQUIRED) - 2] == REQUIRED[:-2] and order[-1] == "other-figures"

    # Every PNG exactly once, as a data URI of its exact bytes, in the section that owns it.
    where: dict[bytes, str | None] = {}
    for section_id, attributes in parsed.images:
        src = attributes["src"] or ""
        assert src.startswith("data:image/png;base64,")
        assert attributes.get("alt")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data not in where, "a PNG is embedded twice"
        where[data] = section_id
    assert len(where) == len(pngs)
    expected = {
        "reconstruction.png": "reconstruction",
        "singular_values.png": "spectrum",
        "per_token.png": "per-token",
        "layers_norms.png": "layers",
        "zz_extra.png": "other-figures",
    }
    for name, section_id in expected.items():
        assert where[(run / name).read_bytes()] == section_id, name


def test_self_contained(tmp_path):
    summary = synthetic_summary(**OPTIONAL_VALUES)
    run = make_run(tmp_path, summary, STANDARD_PNGS)
    text, parsed = render(run, summary)
    assert "script" not in parsed.tags and "link" not in parsed.tags
    assert all(url.startswith(("data:", "#")) for url in parsed.urls)
    assert not re.search(r"https?://", text)


@pytest.mark.parametrize("present", [(), ("layers",), ("steering",), ("prompts",), tuple(OPTIONAL)])
def test_optional_sections_iff_keys(tmp_path, present):
    summary = synthetic_summary(**{key: OPTIONAL_VALUES[key] for key in present})
    run = make_run(tmp_path, summary, STANDARD_PNGS)
    _, parsed = render(run, summary)
    for key in OPTIONAL:
        assert (key in parsed.sections) == (key in present), key
    # Only the three standard figures: nothing left over for an other-figures section.
    assert "other-figures" not in parsed.sections
    assert set(parsed.sections) == set(REQUIRED) | set(present)


def test_optional_section_contents(tmp_path):
    summary = synthetic_summary(**OPTIONAL_VALUES)
    run = make_run(tmp_path, summary, STANDARD_PNGS)
    text, parsed = render(run, summary)
    layers = parsed.text_by_section["layers"]
    assert "frobenius" in layers and "sliding" in layers and "sigmas" in layers  # nested field noted
    steering = parsed.text_by_section["steering"]
    assert "the Golden Gate" in steering and "the Golden Mile" in steering and "-2" in steering
    assert "a <b>old</b>" in steering and "<b>old" not in text  # escaped, shown as text
    assert "second prompt" in parsed.text_by_section["prompts"]


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
            {"index": 2, "nearest_tokens": ["not shown"]},
        ],
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
