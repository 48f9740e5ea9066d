"""By default jaxlin analyses exactly the tokens the model's own tokenizer gives —
transformers' ids for the same text, BOS (and EOS) where the tokenizer's config adds
them and not otherwise — and `add_bos: true/false` overrides that. Evidence: tiny GGUF
files whose metadata says BOS / no BOS, tokenized by transformers' own GGUF loader
(needs torch: the reference only); tiny HF directories; the real Gemma 3 270M GGUF."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gguf
import numpy as np
import pytest
import yaml
from conftest import save_char_tokenizer
from test_gguf import add_byte_level_tokenizer, byte_level_vocab, tiny_checkpoint, write_gguf

from converters.gguf import load_gguf_tokenizer
from jaxlin.analyses import steering
from jaxlin.cli import main
from jaxlin.errors import JaxlinError
from jaxlin.loading import load_model
from jaxlin.run_config import SteeringSection
from jaxlin.tokens import bos_added, tokenize

TEXTS = ["the theme", " élan 7", "them\nthe  the"]

# A tiny sentencepiece ("llama" tokenizer model) vocabulary: control tokens, the 256 byte
# fallbacks, and a few pieces whose scores favour the longest match.
PIECES = ["▁", "t", "h", "e", "m", "▁t", "he", "▁the", "me", "▁theme", "é", "l", "a", "n", "▁é", "7", "▁7"]
SENTENCEPIECE = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)), *PIECES]
SENTENCEPIECE_TYPES = [2, 3, 3] + [6] * 256 + [1] * len(PIECES)  # unknown, control, byte, normal
SENTENCEPIECE_SCORES = [0.0] * 259 + [float(len(piece)) for piece in PIECES]

# (add_bos_token, add_eos_token) written to the GGUF metadata; None: neither key.
FLAGS = {"unset": None, "no_bos": (False, False), "bos": (True, False), "bos_eos": (True, True)}


@pytest.fixture(scope="module")
def torch() -> Any:
    return pytest.importorskip("torch", reason="transformers' GGUF loading (the reference) needs torch")


def write_tokenizer_gguf(path: Path, vocabulary: str, flags: tuple[bool, bool] | None) -> Path:
    """A GGUF holding a tiny Llama config and a tokenizer, no tensors: all that either
    tokenizer loader reads."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(32)
    writer.add_block_count(1)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(8)
    if vocabulary == "sentencepiece":
        writer.add_tokenizer_model("llama")
        writer.add_token_list(SENTENCEPIECE)
        writer.add_token_scores(SENTENCEPIECE_SCORES)
        writer.add_token_types(SENTENCEPIECE_TYPES)
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
    else:
        add_byte_level_tokenizer(writer, "llama-bpe")
    if flags is not None:
        writer.add_add_bos_token(flags[0])
        writer.add_add_eos_token(flags[1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def transformers_gguf_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


# --------------------------------------------------------------------------- GGUF files


@pytest.mark.parametrize("flags", sorted(FLAGS))
@pytest.mark.parametrize("vocabulary", ["sentencepiece", "byte_level"])
def test_gguf_default_is_transformers_tokens(tmp_path: Path, torch: Any, vocabulary: str, flags: str) -> None:
    path = write_tokenizer_gguf(tmp_path / "tiny.gguf", vocabulary, FLAGS[flags])
    tokenizer, reference = load_gguf_tokenizer(path), transformers_gguf_tokenizer(path)
    # llama.cpp (and transformers) add BOS to a sentencepiece vocabulary that does not say.
    expect_bos = flags in ("bos", "bos_eos") or (flags == "unset" and vocabulary == "sentencepiece")
    for text in TEXTS:
        ids = tokenize(tokenizer, text, None)
        assert ids.tolist() == reference(text).input_ids, text
        assert (ids[0] == tokenizer.bos_token_id) == expect_bos
        assert (ids[-1] == tokenizer.eos_token_id) == (flags == "bos_eos")
        assert bos_added(tokenizer, text, ids) == expect_bos


@pytest.mark.parametrize("flags", ["no_bos", "bos_eos"])
def test_gguf_add_bos_overrides_the_metadata(tmp_path: Path, flags: str) -> None:
    tokenizer = load_gguf_tokenizer(
        write_tokenizer_gguf(tmp_path / "tiny.gguf", "sentencepiece", FLAGS[flags])
    )
    bos = tokenizer.bos_token_id
    for text in TEXTS:
        plain = tokenizer.encode(text, add_special_tokens=False)
        assert tokenize(tokenizer, text, True).tolist() == [bos, *plain]
        assert tokenize(tokenizer, text, False).tolist() == plain  # no BOS, and no EOS either


def test_a_text_that_spells_the_bos_token_is_not_a_bos_added(tmp_path: Path) -> None:
    tokenizer = load_gguf_tokenizer(
        write_tokenizer_gguf(tmp_path / "tiny.gguf", "byte_level", FLAGS["no_bos"])
    )
    ids = tokenize(tokenizer, "<|bos|>the", None)
    assert ids[0] == tokenizer.bos_token_id and not bos_added(tokenizer, "<|bos|>the", ids)
    again = tokenize(tokenizer, "<|bos|>the", True)
    assert again.tolist() == [tokenizer.bos_token_id, *ids] and bos_added(tokenizer, "<|bos|>the", again)


def test_add_bos_true_without_a_bos_token_is_refused(tmp_path: Path) -> None:
    tokenizer = SimpleNamespace(bos_token_id=None, encode=lambda text, add_special_tokens=True: [5, 6])
    assert tokenize(tokenizer, "ab", None).tolist() == [5, 6]
    with pytest.raises(JaxlinError, match="add_bos: true, but the model's tokenizer has no BOS token"):
        tokenize(tokenizer, "ab", True)


@pytest.mark.parametrize("flags", ["no_bos", "bos"])
def test_cached_tokenizer_keeps_the_policy(tmp_path: Path, flags: str) -> None:
    """The params cache stores the tokenizer too: restored, it gives the same ids."""
    tensors, _, head_dim = tiny_checkpoint("llama")

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_add_bos_token(FLAGS[flags][0])
        writer.add_add_eos_token(False)

    path = write_gguf(tmp_path / "tiny.gguf", "llama", tensors, metadata, head_dim)
    fresh = load_model("gguf", path, "float32", cache_dir=tmp_path / "cache", progress=False)
    cached = load_model("gguf", path, "float32", cache_dir=tmp_path / "cache", progress=False)
    assert not fresh.from_cache and cached.from_cache
    for text in TEXTS:
        ids = tokenize(fresh.tokenizer, text, None)
        assert tokenize(cached.tokenizer, text, None).tolist() == ids.tolist()
        assert (ids[0] == fresh.tokenizer.bos_token_id) == (flags == "bos")


# --------------------------------------------------------------------------- HF directories


@pytest.mark.parametrize("adds", ["bos", "nothing", "bos_eos"])
def test_hf_default_is_transformers_tokens(tmp_path: Path, adds: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokens, merges, _ = byte_level_vocab()
    backend = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split()) for m in merges])
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        add_bos_token=adds != "nothing",
        add_eos_token=adds == "bos_eos",
    ).save_pretrained(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "add_bos_token": adds != "nothing"}))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)  # what jaxlin's loader uses
    reference = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        ids = tokenize(tokenizer, text, None)
        assert ids.tolist() == reference(text).input_ids
        assert (ids[0] == tokenizer.bos_token_id) == (adds != "nothing")
        assert (ids[-1] == tokenizer.eos_token_id) == (adds == "bos_eos")


def test_steering_prompts_follow_the_same_rule(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tokenizer = load_gguf_tokenizer(
        write_tokenizer_gguf(tmp_path / "tiny.gguf", "byte_level", FLAGS["no_bos"])
    )
    seen: dict[str, list[int]] = {}

    def prepare(config: Any, params: Any, concept: np.ndarray, layer: Any, mode: str) -> Any:
        seen["concept"] = concept.tolist()
        return SimpleNamespace(layer=0)

    def generate(config: Any, params: Any, prompt: np.ndarray, *rest: Any) -> list[int]:
        seen["prompt"] = prompt.tolist()
        return []

    monkeypatch.setattr(steering, "prepare", prepare)
    monkeypatch.setattr(steering, "generate", generate)
    loaded = SimpleNamespace(model=SimpleNamespace(config=None, params=None), tokenizer=tokenizer)
    section = SteeringSection(enabled=True, concept="the theme", prompt="them", lambdas=[0.0])
    for add_bos in (None, True, False):
        steering.steer(loaded, section, add_bos)
        assert seen["concept"] == tokenize(tokenizer, "the theme", add_bos).tolist()
        assert seen["prompt"] == tokenize(tokenizer, "them", add_bos).tolist()
    assert seen["prompt"][0] != tokenizer.bos_token_id  # the last call: add_bos false


# --------------------------------------------------------------------------- jaxlin run


def run_summary(tmp_path: Path, model: dict, add_bos: bool | None, text: str) -> dict:
    config = {
        "model": {**model, "dtype": "float64", "cache": False},
        "text": text,
        "analysis": {"top_k": 2, "decode_top_tokens": 2, "per_token": {"method": "off"}},
        "output_dir": str(tmp_path / "run"),
    }
    if add_bos is not None:
        config["add_bos"] = add_bos
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--quiet"]) == 0
    return json.loads((tmp_path / "run" / "summary.json").read_text())


def test_run_of_a_no_bos_gguf_analyses_transformers_tokens(tmp_path: Path, torch: Any) -> None:
    """The issue's case: a Llama GGUF whose metadata says add_bos_token = false."""
    tensors, _, head_dim = tiny_checkpoint("llama")
    path = write_gguf(
        tmp_path / "tiny.gguf", "llama", tensors, lambda writer: writer.add_add_bos_token(False), head_dim
    )
    text = "the theme them"
    summary = run_summary(tmp_path, {"source": "gguf", "path": str(path)}, None, text)
    expected = transformers_gguf_tokenizer(path)(text).input_ids
    assert summary["token_ids"] == expected and expected[0] != 259  # <|bos|>
    assert summary["n_tokens"] == len(expected)
    assert summary["add_bos"] == "tokenizer" and summary["bos_added"] is False
    assert summary["tokens"] == [load_gguf_tokenizer(path).decode([i]) for i in expected]
    assert np.load(tmp_path / "run" / "arrays.npz")["token_ids"].tolist() == expected


@pytest.fixture(scope="module")
def no_bos_model_dir(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny HF checkpoint whose tokenizer adds no BOS (as Qwen's)."""
    directory = tmp_path_factory.mktemp("no_bos")
    for file in tiny_model_dir("qwen3_mha_tied").iterdir():
        if file.name.startswith(("config", "model")):
            shutil.copy(file, directory / file.name)
    save_char_tokenizer(directory, add_bos=False)
    return directory


@pytest.mark.parametrize("add_bos", [None, True, False])
def test_run_records_tokens_and_the_bos_policy(tmp_path: Path, no_bos_model_dir: Path, add_bos: Any) -> None:
    from transformers import AutoTokenizer

    text = "Hello, bridge"
    summary = run_summary(tmp_path, {"source": "hf", "path": str(no_bos_model_dir)}, add_bos, text)
    tokenizer = AutoTokenizer.from_pretrained(no_bos_model_dir)
    plain = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer(text).input_ids == plain  # this tokenizer adds nothing itself
    expected = [tokenizer.bos_token_id, *plain] if add_bos else plain
    assert summary["token_ids"] == expected
    assert summary["tokens"][0] == ("<bos>" if add_bos else "H")
    assert summary["bos_added"] is bool(add_bos)
    assert summary["add_bos"] == ("tokenizer" if add_bos is None else add_bos)
    assert summary["config"]["add_bos"] == add_bos


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_real_gemma_default_tokens_are_transformers_ids(gemma_gguf_path: Path, torch: Any) -> None:
    tokenizer, reference = load_gguf_tokenizer(gemma_gguf_path), transformers_gguf_tokenizer(gemma_gguf_path)
    for text in [
        "The bridge out of Marin is the Golden",
        "  leading\n\ttabs 数学 🚀",
        "<start_of_turn>user\nhi",
    ]:
        ids = tokenize(tokenizer, text, None)
        assert ids.tolist() == reference(text).input_ids, text
        assert ids[0] == tokenizer.bos_token_id == 2 and bos_added(tokenizer, text, ids)  # Gemma adds <bos>
