"""Every bad input a user can give `jaxlin run`: exit code 2, exactly one line on stderr
(`jaxlin: error: ...` naming the field or file), no traceback, nothing written — and
files already in the output location byte-identical afterwards.

A case is one row of CASES. Unless it says `loads_weights=True`, the refusal must come
before any weight is read: `load_model` is replaced by a tripwire, so a check that only
fires after loading fails the case."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from jaxlin.cli import main

TINY = "llama_gqa_untied"  # hidden size d = 64, 2 layers (tests/conftest.py)
Planted = dict[str, "bytes | str | None"]  # path under tmp_path → contents (None: a directory)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    # A config mapping (written as YAML), raw YAML text or bytes, or None for no config
    # file. "{model}" becomes the tiny model's directory, "{tmp}" the test's directory.
    config: dict[str, Any] | str | bytes | None
    expected: tuple[str, ...]  # fragments the error line must contain
    files: Planted = dataclasses.field(default_factory=dict)
    argv: tuple[str, ...] = ()
    loads_weights: bool = False


def run_config(**sections: Any) -> dict[str, Any]:
    """A valid config for the tiny model; `sections` replace or extend its parts."""
    base: dict[str, Any] = {
        "model": {"source": "hf", "path": "{model}", "dtype": "float64", "cache": False},
        "text": "Hello, world!",
        "analysis": {"top_k": 4},
        "output_dir": "{tmp}/run",
    }
    for key, value in sections.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def yaml_text(**sections: Any) -> str:
    return yaml.safe_dump(run_config(**sections), sort_keys=False)


NOT_UTF8 = b"caf\xe9\n"  # latin-1
EMBEDDED = {"source": "embedded", "path": None, "cache": False}

CASES: list[Case] = [
    # --- the config file itself
    Case("config_missing", None, ("config file", "run.yaml", "does not exist")),
    Case("config_is_a_directory", None, ("config file", "run.yaml", "a directory"), {"run.yaml": None}),
    Case("config_not_utf8", b"text: " + NOT_UTF8, ("config file", "not UTF-8", "line 1")),
    Case("yaml_empty", "", ("run.yaml", "the config is empty")),
    Case("yaml_only_a_comment", "# a run\n", ("run.yaml", "the config is empty")),
    Case("yaml_null", "null\n", ("run.yaml", "the config is empty")),
    Case("yaml_list", "[]\n", ("run.yaml", "expected a mapping", "a list")),
    Case("yaml_false", "false\n", ("run.yaml", "expected a mapping", "a boolean")),
    Case("yaml_scalar", "hello\n", ("run.yaml", "expected a mapping", "a string")),
    Case("yaml_syntax", yaml_text() + "text: [\n", ("run.yaml", "not valid YAML", "line")),
    Case("yaml_python_tag", "text: !!python/object/apply:os.system [ls]\n", ("not valid YAML", "line 1")),
    Case(
        "duplicate_top_level_key",
        "text: hi\nanalysis: {top_k: 3}\ntext: again\n",
        ("duplicate key 'text'", "line 3", "first given on line 1"),
    ),
    Case(
        "duplicate_nested_key",
        "text: hi\nanalysis:\n  top_k: 3\n  per_token:\n    rank: 8\n    rank: 9\n",
        ("duplicate key 'rank'", "line 6", "first given on line 5"),
    ),
    Case(
        "duplicate_key_in_flow_mapping", "text: hi\nmodel: {dtype: float32, dtype: float64}\n", ("'dtype'",)
    ),
    # --- keys and types
    Case("unknown_key", run_config(analysis={"topk": 3}), ("analysis.topk", "unknown key")),
    Case(
        "renamed_key",
        run_config(analysis={"attention_block": 64}),
        ("analysis.attention_block", "renamed to attention_chunk"),
    ),
    Case("unknown_source", run_config(model={"source": "onnx"}), ("model.source",)),
    Case("section_null", "text: hi\nmodel:\n", ("model", "expected a mapping", "got null")),
    Case("bool_for_int", run_config(analysis={"top_k": True}), ("analysis.top_k", "integer", "true")),
    Case("string_for_int", run_config(analysis={"per_token": {"top_k": "3"}}), ("analysis.per_token.top_k",)),
    Case("float_for_int", run_config(analysis={"chunk": 2.0}), ("analysis.chunk", "integer")),
    Case("int_for_bool", run_config(model={"cache": 1}), ("model.cache", "boolean")),
    Case("bool_for_float", run_config(analysis={"tolerance": True}), ("analysis.tolerance",)),
    Case("infinite_tolerance", "text: hi\nanalysis: {tolerance: .inf}\n", ("analysis.tolerance", "finite")),
    Case("nan_tolerance", "text: hi\nanalysis: {tolerance: .nan}\n", ("analysis.tolerance", "finite")),
    Case(
        "infinite_lambda",
        "text: hi\nsteering: {enabled: true, lambdas: [0, -.inf]}\n",
        ("steering.lambdas.1", "finite"),
    ),
    Case("negative_chunk", run_config(analysis={"chunk": -1}), ("analysis.chunk",)),
    Case(
        "frobenius_samples_past_bound",
        run_config(analysis={"frobenius_samples": 10**20}),
        ("analysis.frobenius_samples", "65536"),
    ),
    Case("negative_seed", run_config(analysis={"seed": -1}), ("analysis.seed",)),
    Case("seed_past_32_bits", run_config(analysis={"seed": 2**32}), ("analysis.seed",)),
    Case("no_input", run_config(text=None), ("give exactly one of text, texts, texts_file",)),
    Case("two_inputs", run_config(texts=["a", "b"]), ("give exactly one", "text", "texts")),
    Case("empty_text_flag", run_config(), ("text", "empty"), argv=("--text", "   ")),
    Case("unknown_flag", run_config(), ("unrecognized arguments: --bogus", "--help"), argv=("--bogus",)),
    Case("flag_without_value", run_config(), ("--out", "expected one argument"), argv=("--out",)),
    Case("path_without_source", run_config(model={"source": "embedded"}), ("model", "source is 'embedded'")),
    Case("source_without_path", run_config(model={"path": None}), ("model", "path is required", "'hf'")),
    # --- texts_file
    Case(
        "texts_file_missing",
        run_config(text=None, texts_file="{tmp}/t.txt"),
        ("texts_file", "does not exist"),
    ),
    # A file name may hold a line break; the error is still one line.
    Case(
        "texts_file_name_with_a_line_break",
        run_config(text=None, texts_file="{tmp}/two\nlines.txt"),
        ("texts_file", "two lines.txt", "does not exist"),
    ),
    Case(
        "texts_file_is_a_directory",
        run_config(text=None, texts_file="{tmp}/t"),
        ("texts_file", "t is a directory"),
        {"t": None},
    ),
    Case(
        "texts_file_not_utf8",
        run_config(text=None, texts_file="{tmp}/t.txt"),
        ("texts_file", "t.txt", "not UTF-8", "line 2"),
        {"t.txt": b"first prompt\n" + NOT_UTF8},
    ),
    Case(
        "texts_file_blank",
        run_config(text=None, texts_file="{tmp}/t.txt"),
        ("texts_file", "no non-empty line"),
        {"t.txt": "\n  \n"},
    ),
    # --- the model
    Case(
        "gguf_missing",
        run_config(model={"source": "gguf", "path": "{tmp}/m.gguf"}),
        ("model.path", "m.gguf", "does not exist"),
    ),
    Case(
        "gguf_path_is_a_directory",
        run_config(model={"source": "gguf", "path": "{tmp}/m"}),
        ("model.path", "is a directory", "model.source: hf"),
        {"m": None},
    ),
    Case(
        "gguf_not_a_gguf",
        run_config(model={"source": "gguf", "path": "{tmp}/m.gguf"}),
        ("m.gguf", "not a GGUF file"),
        {"m.gguf": "name,value\n" * 8},
    ),
    Case(
        "gguf_truncated_header",
        run_config(model={"source": "gguf", "path": "{tmp}/m.gguf"}),
        ("m.gguf", "truncated or corrupt GGUF header"),
        {"m.gguf": b"GGUF\x03\x00\x00\x00" + b"\x00" * 8 + b"\x05" + b"\x00" * 7 + b"\x20\x00"},
    ),
    Case(
        "hf_directory_missing",
        run_config(model={"path": "{tmp}/absent"}),
        ("absent", "no such model directory"),
    ),
    Case(
        "hf_path_is_a_file",
        run_config(model={"path": "{tmp}/m.gguf"}),
        ("m.gguf", "expected a model directory"),
        {"m.gguf": b"GGUF"},
    ),
    Case(
        "hf_hub_id_not_cached",
        run_config(model={"path": "nobody-at-all/no-such-model"}),
        ("nobody-at-all/no-such-model", "not in the local Hugging Face cache"),
    ),
    Case(
        "hf_config_json_missing",
        run_config(model={"path": "{tmp}/m"}),
        ("model.path", "no config.json"),
        {"m/model.safetensors": b"\0" * 16},
    ),
    Case(
        "hf_config_json_malformed",
        run_config(model={"path": "{tmp}/m"}),
        ("model.path", "config.json", "not valid JSON", "line 1"),
        {"m/config.json": '{"model_type": "llama",', "m/model.safetensors": b"\0" * 16},
    ),
    Case(
        "hf_config_json_not_an_object",
        run_config(model={"path": "{tmp}/m"}),
        ("config.json", "expected a JSON object"),
        {"m/config.json": "[1, 2]", "m/model.safetensors": b"\0" * 16},
    ),
    Case(
        "hf_config_json_not_utf8",
        run_config(model={"path": "{tmp}/m"}),
        ("config.json", "not UTF-8"),
        {"m/config.json": b'{"model_type": "' + NOT_UTF8 + b'"}', "m/model.safetensors": b"\0" * 16},
    ),
    Case(
        "hf_unsupported_model_type",
        run_config(model={"path": "{tmp}/m"}),
        ("model_type 'gpt_neox' is not supported", "llama"),
        {"m/config.json": json.dumps({"model_type": "gpt_neox"}), "m/model.safetensors": b"\0" * 16},
    ),
    Case(
        "hf_hidden_size_not_a_number",
        run_config(model={"path": "{tmp}/m"}),
        ("model.path", "config.json"),
        {
            "m/config.json": json.dumps({"model_type": "llama", "hidden_size": "wide"}),
            "m/model.safetensors": b"\0" * 16,
        },
    ),
    # --- what the model's config alone rules out (d = 64, 2 layers), before any weight
    Case("top_k_above_d", run_config(analysis={"top_k": 65}), ("analysis.top_k=65", "d=64")),
    Case(
        "per_token_top_k_above_d",
        run_config(analysis={"per_token": {"top_k": 65}}),
        ("analysis.per_token.top_k=65", "d=64"),
    ),
    Case(
        "layers_top_k_above_d",
        run_config(analysis={"layers": {"enabled": True, "top_k": 65}}),
        ("analysis.layers.top_k=65", "d=64"),
    ),
    Case(
        "projected_rank_above_d",
        run_config(analysis={"per_token": {"method": "projected", "rank": 65}}),
        ("analysis.per_token.rank=65", "d=64"),
    ),
    Case(
        "projected_rank_below_top_k",
        run_config(analysis={"per_token": {"method": "projected", "rank": 2, "top_k": 3}}),
        ("analysis.per_token.rank=2", "analysis.per_token.top_k=3"),
    ),
    Case(
        "steering_layer_past_the_last",
        run_config(steering={"enabled": True, "layer": 2}),
        ("steering.layer=2", "0..1", "2 layers"),
    ),
    Case("more_devices_than_available", run_config(devices=4096), ("devices: 4096 requested", "available")),
    # The issue's own case: Gemma 3 270M (the embedded GGUF) has d = 640.
    Case(
        "embedded_per_token_top_k_641",
        run_config(model=EMBEDDED, analysis={"per_token": {"top_k": 641}}),
        ("analysis.per_token.top_k=641", "d=640"),
    ),
    # --- an output location holding the user's own files stays untouched
    Case(
        "bad_input_next_to_user_files",
        run_config(analysis={"top_k": 65}),
        ("analysis.top_k=65",),
        {"run/notes.txt": "mine\n", "run/data/table.csv": "a,b\n1,2\n"},
    ),
    # --- the output location (issue 10, item 1): a user's files are never replaced
    Case(
        "output_dir_holds_user_files",
        run_config(),
        ("output_dir", "is a directory that is not a jaxlin run"),
        {"run/notes.txt": "my own notes\n", "run/data/table.bin": b"\x00\x01\x02"},
    ),
    Case("output_dir_is_a_user_file", run_config(), ("output_dir", "is a file"), {"run": "my file\n"}),
    Case(
        "output_dir_under_a_user_file",
        run_config(output_dir="{tmp}/notes.txt/run"),
        ("output_dir", "notes.txt"),
        {"notes.txt": "my file\n"},
    ),
    Case(
        "output_dir_earlier_run_without_overwrite",
        run_config(),
        ("output_dir", "earlier jaxlin run", "--overwrite"),
        {"run/.jaxlin-run": '{"jaxlin_run": 1, "kind": "single"}\n', "run/summary.json": "{}\n"},
    ),
    # --- checkpoints that ask to run their own code (issue 10, item 2)
    Case(
        "config_json_auto_map",
        run_config(model={"path": "{tmp}/m"}),
        ("config.json", "auto_map"),
        {
            "m/config.json": json.dumps(
                {"model_type": "planted", "auto_map": {"AutoConfig": "planted.PlantedConfig"}}
            ),
            "m/planted.py": "open('MARKER', 'w').write('ran')\n",
        },
    ),
    Case(
        "tokenizer_config_auto_map",
        run_config(model={"path": "{tmp}/m"}),
        ("tokenizer_config.json", "auto_map"),
        {
            "m/config.json": json.dumps({"model_type": "llama"}),
            "m/tokenizer_config.json": json.dumps({"auto_map": {"AutoTokenizer": ["planted.T", None]}}),
            "m/planted.py": "open('MARKER', 'w').write('ran')\n",
        },
    ),
]


def _materialize(value: Any, tmp_path: Path, model: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{model}", str(model)).replace("{tmp}", str(tmp_path))
    if isinstance(value, dict):
        return {k: _materialize(v, tmp_path, model) for k, v in value.items()}
    if isinstance(value, list):
        return [_materialize(v, tmp_path, model) for v in value]
    return value


def _write_config(case: Case, tmp_path: Path, model: Path) -> Path:
    path = tmp_path / "run.yaml"
    if isinstance(case.config, dict):
        path.write_text(yaml.safe_dump(_materialize(case.config, tmp_path, model), sort_keys=False))
    elif isinstance(case.config, str):
        path.write_text(_materialize(case.config, tmp_path, model))
    elif isinstance(case.config, bytes):
        path.write_bytes(case.config)
    return path


def _plant(files: Planted, tmp_path: Path) -> None:
    for relative, contents in files.items():
        target = tmp_path / relative
        if contents is None:
            target.mkdir(parents=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(contents, bytes):
            target.write_bytes(contents)
        else:
            target.write_text(contents)


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for a directory)."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir) -> Path:
    return tiny_model_dir(TINY)


def _refuse_to_load(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the weights were loaded before the bad input was refused")


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(case, tmp_path, tiny_model, capsys, monkeypatch):
    monkeypatch.setenv("JAXLIN_CACHE", str(tmp_path / "cache"))
    if not case.loads_weights:
        import jaxlin.command

        monkeypatch.setattr(jaxlin.command, "load_model", _refuse_to_load)
    _plant(case.files, tmp_path)
    config = _write_config(case, tmp_path, tiny_model)
    before = _snapshot(tmp_path)
    capsys.readouterr()  # drop what building the fixtures printed

    try:
        code = main(["run", str(config), "--quiet", *case.argv])
    except SystemExit as exit:  # argparse refuses a bad command line by exiting
        code = exit.code

    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("jaxlin: error: "), err
    for fragment in case.expected:
        assert fragment in lines[0], (fragment, lines[0])
    assert _snapshot(tmp_path) == before  # nothing written, nothing removed, nothing changed


def test_case_ids_are_unique():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))


# --------------------------------------------------------------------------- what the early checks rest on


@pytest.mark.parametrize("variant", ["llama_gqa_untied", "gemma3_sliding", "gpt2_affine", "phi3_longrope"])
def test_config_read_without_weights_is_the_loaded_models(variant, tiny_model_dir):
    """The early checks see exactly the shape loading builds (d, layers, positions, …)."""
    from jaxlin.loading import load_model
    from jaxlin.model_source import read_model_config
    from jaxlin.run_config import ModelSection

    directory = tiny_model_dir(variant)
    section = ModelSection(source="hf", path=str(directory), cache=False)
    loaded = load_model("hf", directory, "float32", use_cache=False, progress=False)
    assert read_model_config(section) == loaded.model.config


def test_embedded_model_config_is_read_from_the_gguf_header():
    from jaxlin.model_source import read_model_config
    from jaxlin.run_config import ModelSection

    config = read_model_config(ModelSection())
    assert (config.hidden_size, config.num_layers) == (640, 18)  # Gemma 3 270M


def test_analyse_names_the_field_as_a_second_line_of_defence(tiny_model):
    """Past the early check (a caller of `analyse` directly), k is still refused by name."""
    from jaxlin.loading import load_model
    from jaxlin.run_config import AnalysisSection
    from jaxlin.runner import analyse
    from jaxlin.spectral import SpectralError

    loaded = load_model("hf", tiny_model, "float32", use_cache=False, progress=False)
    for options, field in [
        (AnalysisSection(top_k=65), "analysis.top_k=65"),
        (AnalysisSection(per_token={"top_k": 65}), "analysis.per_token.top_k=65"),
    ]:
        with pytest.raises(SpectralError, match=field.replace(".", r"\.")):
            analyse(loaded, "abc", options)


def test_strict_types_keep_what_yaml_users_write(tmp_path):
    """Strictness refuses bool-for-int and non-finite floats, not ordinary YAML: an int
    where a float belongs, a bare `off`, anchors."""
    from jaxlin.run_config import load_run_config

    path = tmp_path / "run.yaml"
    path.write_text(
        "text: hi\n"
        "analysis:\n  tolerance: 1\n  per_token: {method: off, top_k: &k 2}\n  layers: {top_k: *k}\n"
        "steering: {lambdas: [0, 2, 4.5]}\n"
    )
    config = load_run_config(path)
    assert config.analysis.tolerance == 1.0 and isinstance(config.analysis.tolerance, float)
    assert config.analysis.per_token.method == "off" and config.analysis.layers.top_k == 2
    assert config.steering.lambdas == [0.0, 2.0, 4.5]


def test_merge_keys_may_be_overridden_without_counting_as_duplicates():
    from jaxlin.run_config import _UniqueKeyLoader

    text = "base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n"
    assert yaml.load(text, Loader=_UniqueKeyLoader) == {"base": {"x": 1, "y": 2}, "other": {"x": 3, "y": 2}}
