"""The run record: summary.json as types. Real tiny-model runs of every kind validate as
records and round-trip exactly; every figure a run writes sits in its report section
with its caption; a summary that does not fit is refused by name."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import typing
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml

from jaxlin import report
from jaxlin.cli import main
from jaxlin.plots import DRAW
from jaxlin.record import (
    FIGURES,
    SCHEMA_VERSION,
    AblationRow,
    AggregateLayerRow,
    LayerRow,
    ManyPromptRecord,
    PromptRow,
    RecordError,
    RunRecord,
    StopReason,
    figure_names,
    parse_record,
    read_record,
    record_data,
    write_record,
)
from jaxlin.spectral import STOP_REASONS

TEXT = "Hello, world! The bridge."


def run_cli(directory: Path, model_dir: Path, **settings: Any) -> Path:
    """`jaxlin run` on a tiny float64 model; the run directory."""
    config = {
        "model": {"source": "hf", "path": str(model_dir), "dtype": "float64", "cache": False},
        "output_dir": str(directory / "run"),
        **settings,
    }
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--quiet"]) == 0
    return directory / "run"


STEERING = {"enabled": True, "concept": "Golden", "prompt": "A", "lambdas": [0, 2], "max_new_tokens": 2}

# Single runs between them produce every optional field and both values of each
# either-or (exact / Lanczos spectrum, per-token on / off, ordinary Jacobian or none).
SINGLE_RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "everything": (
        "llama_biases",  # affine: a bias term in the certificate
        {
            "text": TEXT,
            "analysis": {
                "top_k": 3,
                "decode_top_tokens": 2,
                "ablation": True,
                "per_token": {"method": "exact", "top_k": 2},
                "layers": {"enabled": True, "kinds": ["residual"], "local": True, "top_k": 2},
            },
            "steering": STEERING,
        },
    ),
    "lanczos_minimal": (
        "gemma3_sliding",
        {
            "text": TEXT,
            "analysis": {
                "method": "lanczos",
                "top_k": 2,
                "decode_top_tokens": 2,
                "ordinary_jacobian": False,
                "per_token": {"method": "off"},
            },
        },
    ),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir) -> dict[str, Path]:
    """Each kind of run once: the single runs above and a many-prompt output (its steering
    section is the single run's type, shown by "everything")."""
    out = {}
    for name, (variant, settings) in SINGLE_RUNS.items():
        out[name] = run_cli(tmp_path_factory.mktemp(name), tiny_model_dir(variant), **settings)
    out["many"] = run_cli(
        tmp_path_factory.mktemp("many"),
        tiny_model_dir("gemma3_sliding"),
        texts=["The bridge.", "Golden Gate!"],
        analysis={"top_k": 2, "decode_top_tokens": 2, "layers": {"enabled": True, "kinds": ["residual"]}},
    )
    return out


def summary_of(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", [*SINGLE_RUNS, "many"])
def test_summary_json_is_the_record(runs, name):
    summary = summary_of(runs[name])
    kind = ManyPromptRecord if name == "many" else RunRecord
    record = kind.model_validate(summary)
    assert next(iter(summary)) == "schema_version" and summary["schema_version"] == SCHEMA_VERSION
    assert record_data(record) == summary  # every key and value, nothing added or dropped
    assert read_record(runs[name] / "summary.json") == record


def test_every_optional_field_is_exercised(runs):
    everything = RunRecord.model_validate(summary_of(runs["everything"]))
    minimal = RunRecord.model_validate(summary_of(runs["lanczos_minimal"]))
    assert everything.affine and everything.bias_contribution_norm > 0
    assert everything.layers and everything.ablation and everything.steering
    assert {row.scope for row in everything.layers} == {"cumulative", "local"}
    assert everything.per_token.top_left_vector and everything.spectrum.stop_reason == "exact"
    assert everything.ordinary_jacobian_relative_error is not None
    assert [run.strength for run in everything.steering.runs] == [0.0, 2.0]
    assert minimal.per_token.method == "off" and minimal.per_token.top_left_vector is None
    assert minimal.ordinary_jacobian_relative_error is None and minimal.spectrum.method == "lanczos"
    assert minimal.layers is None and "layers" not in summary_of(runs["lanczos_minimal"])
    assert "per_token" in summary_of(runs["lanczos_minimal"])


def test_many_prompt_output_and_its_prompts(runs):
    record = ManyPromptRecord.model_validate(summary_of(runs["many"]))
    assert record.n_prompts == len(record.prompts) == 2 and record.layers
    for row in record.prompts:
        prompt = summary_of(runs["many"] / row.directory)
        typed = RunRecord.model_validate(prompt)
        assert record_data(typed) == prompt
        assert typed.fingerprint is not None and typed.text == row.text
        assert typed.reconstruction_relative_error == row.reconstruction_relative_error


class Figures(HTMLParser):
    """Each embedded image's alt text, by section."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.alts: list[tuple[str | None, str]] = []
        self._section: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "section":
            self._section = attributes["id"]
        elif tag == "img":
            self.alts.append((self._section, attributes.get("alt") or ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._section = None


@pytest.mark.parametrize("name", [*SINGLE_RUNS, "many", "many_prompt"])
def test_every_png_a_run_writes_is_in_its_section_with_its_caption(runs, name):
    run = runs["many"] / "prompts" / "0000" if name == "many_prompt" else runs[name]
    record = read_record(run / "summary.json")
    written = sorted(p.name for p in run.glob("*.png"))
    assert written == sorted(figure_names(record))
    parser = Figures()
    parser.feed((run / "report.html").read_text(encoding="utf-8"))
    expected = sorted((FIGURES[n].section, f"{n}: {FIGURES[n].caption}") for n in written)
    assert sorted(parser.alts) == expected


def test_the_report_rerenders_a_run_directory(runs, tmp_path):
    """`python -m jaxlin.report RUN_DIR`: the report from summary.json alone, the same page."""
    run = tmp_path / "copy"
    shutil.copytree(runs["lanczos_minimal"], run)
    before = (run / "report.html").read_text(encoding="utf-8")
    (run / "report.html").unlink()
    done = subprocess.run(
        [sys.executable, "-m", "jaxlin.report", str(run)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert (run / "report.html").read_text(encoding="utf-8") == before.replace(
        f"· {runs['lanczos_minimal'].name}<", f"· {run.name}<"
    )
    (run / "summary.json").write_text('{"model": 3}', encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "jaxlin.report", str(run)], capture_output=True, text=True, check=False
    )
    assert done.returncode != 0 and done.stderr.startswith(f"jaxlin: error: {run / 'summary.json'}: ")
    assert "Traceback" not in done.stderr


def test_report_columns_are_record_fields():
    assert set(report.LAYER_COLUMNS) <= LayerRow.model_fields.keys()
    assert set(report.AGGREGATE_LAYER_COLUMNS) <= AggregateLayerRow.model_fields.keys()
    assert set(report.ABLATION_COLUMNS) == AblationRow.model_fields.keys()
    assert set(report.PROMPT_COLUMNS) == PromptRow.model_fields.keys()


def test_the_registry_is_complete():
    assert DRAW.keys() == FIGURES.keys()
    assert {spec.section for spec in FIGURES.values()} <= report.SECTION_TITLES.keys()
    assert all(spec.caption for spec in FIGURES.values())
    assert set(typing.get_args(StopReason)) == STOP_REASONS.keys()


# --- no model: the record's refusals and round trips --------------------------------------


@pytest.fixture(scope="module")
def recorded(runs) -> dict[str, Any]:
    return summary_of(runs["everything"])


def test_an_unknown_or_missing_field_is_named(recorded):
    with pytest.raises(RecordError, match=r"^summary: norms\.frobenius_squared: Extra inputs"):
        parse_record({**recorded, "norms": {**recorded["norms"], "frobenius_squared": 1.0}})
    missing = {k: v for k, v in recorded.items() if k != "predicted_token"}
    with pytest.raises(RecordError, match=r"^summary: predicted_token: Field required"):
        parse_record(missing)
    with pytest.raises(RecordError, match="schema_version"):
        parse_record({**recorded, "schema_version": "0"})
    many = {"n_prompts": 1, "model": "m"}  # judged as a many-prompt summary
    with pytest.raises(RecordError, match=r"^summary: family: Field required \(and \d+ more\)"):
        parse_record(many)


def test_a_summary_without_schema_version_is_version_1(recorded):
    older = {k: v for k, v in recorded.items() if k != "schema_version"}
    assert record_data(parse_record(older)) == recorded


def test_nan_and_null_survive_the_file(tmp_path, recorded):
    failed = {**recorded, "reconstruction_relative_error": math.nan, "ordinary_jacobian_relative_error": None}
    path = write_record(tmp_path / "summary.json", parse_record(failed))
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no staging left
    again = read_record(path)
    assert isinstance(again, RunRecord) and math.isnan(again.reconstruction_relative_error)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["ordinary_jacobian_relative_error"] is None and "ablation" in data
    without = {k: v for k, v in recorded.items() if k not in ("ablation", "layers", "steering")}
    assert "ablation" not in record_data(parse_record(without))


def test_a_summary_json_that_is_not_a_record_is_named(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text('{"model": 3}', encoding="utf-8")
    with pytest.raises(RecordError, match=rf"^{path}: "):
        read_record(path)
    with pytest.raises(RecordError, match="cannot be read"):
        read_record(tmp_path / "absent.json")
