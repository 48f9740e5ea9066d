"""The cross-model comparison (jaxlin.comparison) on two tiny float64 models with different
tokenizers (characters; byte-level BPE): the character alignment is exact on both, each
model's results equal a separate single run and a direct computation, bad input is one
line with exit status 2 and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from hf_reference import make_tiny_model

from jaxlin.cli import main
from jaxlin.comparison import character_alignment, character_owners, comparison_analysis
from jaxlin.jacobian import linearize
from jaxlin.layer_sweep import sweep
from jaxlin.loading import load_model
from jaxlin.operator import rows
from jaxlin.run_config import parse_run_config
from jaxlin.spectral import rows_top_k
from jaxlin.tokens import tokenize

# "é" is one character but two byte-level tokens; the character tokenizer maps it to <unk>.
TEXT = "the cat é theme"
CHAR_VARIANT = "llama_gqa_untied"
TOL = 1e-10


def save_byte_level_tokenizer(directory: Path) -> None:
    """A GPT-2 style byte-level BPE tokenizer (256 bytes, three merges, BOS added)."""
    from test_gguf import byte_level_vocab
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens, merges, _ = byte_level_vocab()
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    bos = vocab["<|bos|>"]
    # As GPT-2's own: offsets trimmed of the space a token spells ("Ġthe" → "the").
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=True),
            processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", bos)]),
        ]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>"
    ).save_pretrained(directory)


@pytest.fixture(scope="module")
def byte_model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("qwen3_byte_level")
    make_tiny_model("qwen3", directory, seed=3, vocab_size=272, num_hidden_layers=3)
    save_byte_level_tokenizer(directory)
    return directory


def model_entry(path: Path, label: str) -> dict:
    return {"source": "hf", "path": str(path), "dtype": "float64", "cache": False, "label": label}


def comparison_config(tmp_path: Path, char_dir: Path, byte_dir: Path, **extra) -> dict:
    return {
        "text": TEXT,
        "analysis": {"top_k": 3, "decode_top_tokens": 3, "layers": {"top_k": 2}},
        "comparison": {"models": [model_entry(char_dir, "chars"), model_entry(byte_dir, "bytes")]},
        "output_dir": str(tmp_path / "compare"),
        **extra,
    }


def write_config(tmp_path: Path, data: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, tiny_model_dir, byte_model_dir) -> tuple[dict, Path]:
    tmp_path = tmp_path_factory.mktemp("comparison")
    config = write_config(tmp_path, comparison_config(tmp_path, tiny_model_dir(CHAR_VARIANT), byte_model_dir))
    assert main(["run", str(config), "--quiet"]) == 0
    out = tmp_path / "compare"
    return json.loads((out / "summary.json").read_text(encoding="utf-8")), out


def test_the_two_tokenizers_really_differ(tiny_model_dir, byte_model_dir):
    chars = load_model("hf", tiny_model_dir(CHAR_VARIANT), "float64", use_cache=False, progress=False)
    bytes_ = load_model("hf", byte_model_dir, "float64", use_cache=False, progress=False)
    char_ids = tokenize(chars.tokenizer, TEXT, None)
    byte_ids = tokenize(bytes_.tokenizer, TEXT, None)
    assert len(char_ids) == len(TEXT) + 1  # BOS + one token per character
    assert len(byte_ids) != len(char_ids)
    assert "Ġthe" in bytes_.tokenizer.convert_ids_to_tokens(byte_ids.tolist())


@pytest.mark.parametrize("label", ["chars", "bytes"])
def test_character_alignment_is_exact(comparison, label):
    summary, _ = comparison
    result = next(r for r in summary["prompts"][0]["results"] if r["label"] == label)
    alignment, influence = result["alignment"], np.asarray(result["influence"])
    owners = alignment["owners"]
    assert len(owners) == len(alignment["influence"]) == len(TEXT)
    # Every character is covered exactly once: by one token, or by the byte pieces of itself.
    for char, row in enumerate(owners):
        assert row, f"character {char} has no token"
        if len(row) > 1:
            assert label == "bytes" and TEXT[char] == "é" and len(row) == 2
    # Each token owns one contiguous run of characters, and the runs follow token order.
    firsts = {}
    for char, row in enumerate(owners):
        for t in row:
            firsts.setdefault(t, char)
    assert list(firsts) == sorted(firsts)
    # Values equal the token's influence (√Σ over the pieces of one character).
    for char, row in enumerate(owners):
        expected = np.sqrt(np.sum(influence[row] ** 2))
        assert alignment["influence"][char] == pytest.approx(expected, rel=1e-14, abs=0)
        if len(row) == 1:
            assert alignment["influence"][char] == influence[row[0]]
    # BOS spells no character and is reported apart, with its own influence.
    assert [s["position"] for s in alignment["silent_tokens"]] == [0]
    assert alignment["silent_tokens"][0]["influence"] == influence[0]
    spoken = sorted({t for row in owners for t in row})
    assert spoken == list(range(1, result["n_tokens"]))
    if label == "chars":
        assert all(row == [char + 1] for char, row in enumerate(owners))
        assert alignment["method"] == "offsets"
    else:
        # A byte-level token such as "Ġé" owns the space in front of its character.
        assert len(owners[TEXT.index("é")]) == 2  # its two byte pieces
        tokens = result["tokens"]
        space = TEXT.index(" é")
        assert tokens[owners[space][0]].startswith(" ")


def test_decoding_fallback_agrees_with_offsets(byte_model_dir):
    """Without offsets (a slow tokenizer), cumulative decoding gives the same alignment."""
    loaded = load_model("hf", byte_model_dir, "float64", use_cache=False, progress=False)
    ids = tokenize(loaded.tokenizer, TEXT, None)
    influence = np.arange(1.0, len(ids) + 1.0)
    texts = [loaded.tokenizer.decode([int(i)]) for i in ids]
    with_offsets = character_alignment(loaded.tokenizer, TEXT, ids, influence, texts)

    class Slow:
        is_fast = False

        def __getattr__(self, name):
            return getattr(loaded.tokenizer, name)

    decoded = character_alignment(Slow(), TEXT, ids, influence, texts)
    assert with_offsets.method == "offsets" and decoded.method == "decoding"
    assert decoded.owners == with_offsets.owners
    assert decoded.influence == with_offsets.influence


def test_character_owners_gives_a_trimmed_space_to_its_token():
    # Character 3 (a space trimmed from token 1's span) and the trailing one belong to the
    # token after the last span that ends before them; byte pieces share their character.
    assert character_owners([(0, 3), (4, 6), (6, 6)], 7) == [[0], [0], [0], [1], [1], [1], [2]]
    assert character_owners([(0, 1), (1, 1), (2, 3)], 3) == [[0], [1], [2]]
    assert character_owners([(0, 1), (0, 1), (1, 2)], 2) == [[0, 1], [2]]


@pytest.mark.parametrize("index", [0, 1])
def test_each_model_equals_a_separate_single_run_and_a_direct_computation(
    comparison, tmp_path, tiny_model_dir, byte_model_dir, index
):
    summary, _ = comparison
    result = summary["prompts"][0]["results"][index]
    path = [tiny_model_dir(CHAR_VARIANT), byte_model_dir][index]
    # A separate single run of the same model and text.
    single = {
        "model": {"source": "hf", "path": str(path), "dtype": "float64", "cache": False},
        "text": TEXT,
        "analysis": {"top_k": 3, "decode_top_tokens": 3, "ordinary_jacobian": False},
        "output_dir": str(tmp_path / "single"),
    }
    assert main(["run", str(write_config(tmp_path, single, "single.yaml")), "--quiet"]) == 0
    run = json.loads((tmp_path / "single" / "summary.json").read_text(encoding="utf-8"))
    assert result["token_ids"] == run["token_ids"]
    assert result["predicted_token"] == run["predicted_token"]
    np.testing.assert_allclose(result["singular_values"], run["singular_values"], rtol=TOL, atol=0)
    np.testing.assert_allclose(result["influence"], run["norms"]["token_frobenius"], rtol=TOL, atol=0)
    assert abs(result["certificate"] - run["reconstruction_relative_error"]) <= TOL
    assert [d["token_ids"] for d in result["left_directions"]] == [
        d["token_ids"] for d in run["spectrum"]["left_vectors_top_tokens"]
    ]
    # A direct computation: J's rows, its spectrum, ‖J_t‖_F, and the per-layer spectra.
    loaded = load_model("hf", path, "float64", use_cache=False, progress=False)
    config, params = loaded.model.config, loaded.model.params
    from jaxlin import model as model_fns

    ids = tokenize(loaded.tokenizer, TEXT, None)
    inputs = model_fns.embed(config, params, np.asarray(ids))
    dense = np.asarray(rows(linearize(params, inputs, config), None, 64), np.float64)  # (d, N, d)
    np.testing.assert_allclose(result["influence"], np.sqrt(np.sum(dense**2, axis=(0, 2))), rtol=TOL, atol=0)
    np.testing.assert_allclose(result["singular_values"], rows_top_k(dense, 3).S, rtol=TOL, atol=0)
    layers = sweep(config, params, inputs, ("residual",), local=False, final_norm=True, top_k=2)
    assert [p["layer"] for p in result["layers"]] == list(range(config.num_layers))
    for point, layer in zip(result["layers"], layers, strict=True):
        assert point["relative_depth"] == (layer.layer + 1) / config.num_layers
        assert point["entropy_rank"] == pytest.approx(layer.entropy_rank, rel=TOL, abs=0)
        assert point["stable_rank"] == pytest.approx(layer.stable_rank, rel=TOL, abs=0)
        assert point["certificate"] <= 1e-10


def test_record_and_report(comparison):
    summary, out = comparison
    assert summary["schema_version"] == "1" and summary["kind"] == "comparison"
    assert [m["label"] for m in summary["models"]] == ["chars", "bytes"]
    assert summary["max_certificate"] <= 1e-10
    assert (out / "effective_dimensionality_vs_depth.png").is_file()
    assert (out / "character_influence_p1.png").is_file()
    report = (out / "report.html").read_text(encoding="utf-8")
    for heading in ("Certificates", "Effective dimensionality", "Influence on the characters", "decoded"):
        assert heading in report
    from jaxlin.comparison import ComparisonRecord

    assert ComparisonRecord.model_validate(summary).model_dump(mode="json") == summary


def test_stochastic_influence_under_auto_past_max_exact_tokens(tmp_path, tiny_model_dir, byte_model_dir):
    config = parse_run_config(
        comparison_config(tmp_path, tiny_model_dir(CHAR_VARIANT), byte_model_dir)
        | {
            "comparison": {
                "models": [model_entry(byte_model_dir, "a"), model_entry(byte_model_dir, "b")],
                "max_exact_tokens": 4,
            }
        }
    )
    assert comparison_analysis(config, 4).per_token.method == "exact"
    assert comparison_analysis(config, 5).per_token.method == "off"  # → the Hutchinson estimate
    assert comparison_analysis(config, 5).layers.kinds == ["residual"]


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"comparison": {"models": []}}, "comparison.models: List should have at least 2 items"),
        ({"model": {"source": "embedded"}}, "model is given but a comparison lists its models"),
        ({"length_study": {}}, "give at most one of length_study, comparison"),
        ({"text": None}, "give exactly one of text, texts, texts_file"),
        (
            {"comparison": {"models": [{"source": "gguf"}, {}]}},
            "comparison.models.0: path is required for source 'gguf'",
        ),
        ({"comparison": {"models": [{"label": "x"}, {"label": "x"}]}}, "models has a label given twice"),
        ({"comparison": {"models": [{}, {}], "influence": "maybe"}}, "comparison.influence"),
    ],
)
def test_bad_comparison_config_is_one_line(
    tmp_path, tiny_model_dir, byte_model_dir, capsys, change, fragment
):
    data = comparison_config(tmp_path, tiny_model_dir(CHAR_VARIANT), byte_model_dir)
    data.update(change)
    data = {k: v for k, v in data.items() if v is not None}
    assert main(["run", str(write_config(tmp_path, data)), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxlin: error: ") and err.count("\n") == 1, err
    assert fragment in err, err
    assert not (tmp_path / "compare").exists()


def test_a_missing_model_file_is_one_line_and_nothing_written(tmp_path, tiny_model_dir, capsys):
    data = comparison_config(tmp_path, tiny_model_dir(CHAR_VARIANT), tmp_path / "nowhere")
    assert main(["run", str(write_config(tmp_path, data)), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxlin: error: comparison.models[1]: ") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_an_interrupted_comparison_resumes(tmp_path, tiny_model_dir, byte_model_dir, monkeypatch):
    """A second run reuses every stored model × prompt result (no analysis runs) and writes
    the same summary; a result whose file is gone, or whose settings changed, is recomputed."""
    from jaxlin import comparison as comparison_module

    data = comparison_config(tmp_path, tiny_model_dir(CHAR_VARIANT), byte_model_dir)
    data["texts"], data["text"] = [TEXT, "a theme"], None
    config = write_config(tmp_path, data)
    assert main(["run", str(config), "--quiet"]) == 0
    out = tmp_path / "compare"
    first = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    stored = sorted(p.name for p in (out / "results").iterdir())
    assert stored == ["m00-p0000.json", "m00-p0001.json", "m01-p0000.json", "m01-p0001.json"]

    computed: list[tuple[str, str]] = []
    real = comparison_module.model_result

    def counting(loaded, label, text, run_config):
        computed.append((label, text))
        return real(loaded, label, text, run_config)

    monkeypatch.setattr(comparison_module, "model_result", counting)
    (out / "results" / "m01-p0001.json").unlink()  # as if interrupted before the last result
    (out / "summary.json").unlink()
    assert main(["run", str(config), "--quiet"]) == 0
    assert computed == [("bytes", "a theme")]
    again = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert again["prompts"] == first["prompts"]

    computed.clear()
    data["analysis"]["top_k"] = 2  # other settings: nothing stored is reused
    assert main(["run", str(write_config(tmp_path, data)), "--quiet"]) == 0
    assert len(computed) == 4
