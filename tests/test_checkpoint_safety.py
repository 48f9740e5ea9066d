"""Checkpoints never execute code, and the params cache is trusted only when it verifies.

Remote code: a model directory whose config.json (or tokenizer_config.json) has
`auto_map` ships a Python module that writes a marker file when imported; jaxlin
refuses the directory in one line, even with "y" on stdin, and the marker never appears.

Cache: an entry stores the sha256 of the checkpoint files it was converted from, of
the converted arrays and of its own files. A same-size byte flip, a truncation, or
arrays rewritten behind a consistent file list are each one warning line and a
rebuild, after which the model computes exactly what an intact cache gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from test_gguf import tiny_checkpoint, write_gguf

import jaxlin.loading as loading
from converters.params import CheckpointError
from jaxlin.cli import main
from jaxlin.loading import load_model
from jaxlin.model import embed, final_hidden, logits

REPO = Path(__file__).resolve().parent.parent
TINY = "llama_gqa_untied"


# --------------------------------------------------------------------------- remote code


def plant_remote_code(tmp_path: Path, tiny_model_dir, where: str) -> tuple[Path, Path]:
    """(a copy of a tiny model directory that asks for its own code, the marker file
    that code writes when imported). `where`: "config" (config.json's auto_map with
    an unknown model_type) or "tokenizer" (tokenizer_config.json's auto_map)."""
    directory = tmp_path / f"remote-{where}"
    shutil.copytree(tiny_model_dir(TINY), directory)
    marker = tmp_path / f"marker-{where}"
    (directory / "planted_code.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('the checkpoint ran code')\n"
        "from transformers import LlamaConfig, PreTrainedTokenizerFast\n"
        "class PlantedConfig(LlamaConfig):\n    model_type = 'planted'\n"
        "class PlantedTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    if where == "config":
        config = json.loads((directory / "config.json").read_text())
        config["model_type"] = "planted"
        config["auto_map"] = {"AutoConfig": "planted_code.PlantedConfig"}
        (directory / "config.json").write_text(json.dumps(config))
    else:
        tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
        tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "planted_code.PlantedTokenizer"]}
        tokenizer_config["tokenizer_class"] = "PlantedTokenizer"  # no class of that name in transformers
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory, marker


@pytest.mark.parametrize("where", ["config", "tokenizer"])
def test_planted_code_is_live_when_trusted(tmp_path, tiny_model_dir, where):
    """The control: transformers given trust_remote_code=True does run the planted
    module, so the marker's absence in the tests below means jaxlin refused it."""
    directory, marker = plant_remote_code(tmp_path, tiny_model_dir, where)
    auto = "AutoConfig" if where == "config" else "AutoTokenizer"
    script = (
        f"from transformers import {auto}; {auto}.from_pretrained({str(directory)!r}, trust_remote_code=True)"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert marker.exists()


@pytest.mark.parametrize(
    ("where", "file"), [("config", "config.json"), ("tokenizer", "tokenizer_config.json")]
)
def test_cli_refuses_remote_code_even_when_answering_yes(tmp_path, tiny_model_dir, where, file):
    directory, marker = plant_remote_code(tmp_path, tiny_model_dir, where)
    config = tmp_path / "run.yaml"
    out = tmp_path / "run"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"source": "hf", "path": str(directory), "dtype": "float32", "cache": False},
                "text": "abc",
                "output_dir": str(out),
            }
        )
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "JAXLIN_CACHE": str(tmp_path / "cache"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "jaxlin.cli", "run", str(config), "--quiet"],
        input="y\n",
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxlin: error:"), done.stderr
    assert "auto_map" in lines[0] and str(directory / file) in lines[0], lines[0]
    assert not marker.exists()
    assert not out.exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("where", ["config", "tokenizer"])
def test_load_model_refuses_remote_code(tmp_path, tiny_model_dir, where, monkeypatch):
    directory, marker = plant_remote_code(tmp_path, tiny_model_dir, where)
    monkeypatch.setattr("builtins.input", lambda *_: "y")
    with pytest.raises(CheckpointError, match="auto_map"):
        load_model("hf", directory, "float32", cache_dir=tmp_path / "cache", progress=False)
    assert not marker.exists()


def test_transformers_is_never_asked_to_trust_code(tmp_path, tiny_model_dir, monkeypatch):
    """Behind jaxlin's own refusal: with it switched off and "y" answered to any
    prompt, the transformers calls themselves still refuse (trust_remote_code=False)."""
    directory, marker = plant_remote_code(tmp_path, tiny_model_dir, "tokenizer")
    monkeypatch.setattr("converters.hf._remote_code_field", lambda data: None)
    monkeypatch.setattr("builtins.input", lambda *_: "y")
    # Where transformers would copy the module to import it (read at its import time).
    monkeypatch.setattr("transformers.dynamic_module_utils.HF_MODULES_CACHE", str(tmp_path / "modules"))
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_model("hf", directory, "float32", use_cache=False, progress=False)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("trust_remote_code", True, "trust_remote_code"),
        ("text_config", {"auto_map": {"AutoConfig": "x.Y"}}, "text_config.auto_map"),
    ],
)
def test_any_field_asking_for_code_is_refused(tmp_path, tiny_model_dir, capsys, field, value, named):
    directory = tmp_path / "model"
    shutil.copytree(tiny_model_dir(TINY), directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, field: value}))
    expect_one_line_refusal(tmp_path, capsys, directory, named, str(directory / "config.json"))


# --------------------------------------------------------------------------- malformed configs


def expect_one_line_refusal(tmp_path: Path, capsys, model_path: Path, *fragments: str) -> None:
    config = tmp_path / "run.yaml"
    out = tmp_path / "run"
    model = {"source": "hf", "path": str(model_path), "dtype": "float32", "cache": False}
    config.write_text(yaml.safe_dump({"model": model, "text": "abc", "output_dir": str(out)}))
    capsys.readouterr()
    assert main(["run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxlin: error:") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not out.exists()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"model_type": "llama",', "not valid JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'{"model_type": "\xff\xfe"}', "not UTF-8"),
        (b'{"model_type": "no-such-family"}', "model_type 'no-such-family' is not supported"),
    ],
)
def test_malformed_config_json_is_one_line_naming_the_file(tmp_path, tiny_model_dir, capsys, content, reason):
    directory = tmp_path / "model"
    shutil.copytree(tiny_model_dir(TINY), directory)
    (directory / "config.json").write_bytes(content)
    fragments = [reason] if "model_type" in reason else [reason, str(directory / "config.json")]
    expect_one_line_refusal(tmp_path, capsys, directory, *fragments)


def test_weight_map_outside_the_directory_is_refused(tmp_path, tiny_model_dir, capsys):
    directory = tmp_path / "model"
    shutil.copytree(tiny_model_dir(TINY), directory)
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_one_line_refusal(tmp_path, capsys, directory, "weight_map", "model.safetensors.index.json")


# --------------------------------------------------------------------------- verified cache


@pytest.fixture(scope="module")
def tiny_gguf_file(tmp_path_factory) -> Path:
    tensors, _, head_dim = tiny_checkpoint("qwen3")
    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen3.gguf"
    return write_gguf(path, "qwen3", tensors, None, head_dim, "qwen2")


def numbers(loaded) -> tuple[np.ndarray, int]:
    """The model's own forward on a fixed input: y (last token's final hidden state)
    and the predicted next token."""
    model = loaded.model
    ids = jnp.asarray(loaded.tokenizer.encode("the theme", add_special_tokens=False), dtype=jnp.int32)
    hidden = final_hidden(model.config, model.params, embed(model.config, model.params, ids))
    y = hidden[-1]
    return np.asarray(y), int(jnp.argmax(logits(model.config, model.params, y)))


def the_entry(cache: Path) -> Path:
    (entry,) = (cache / "params").iterdir()
    return entry


def largest_array_file(entry: Path) -> Path:
    """The orbax file holding the most array bytes (zstd-compressed chunks in OCDBT)."""
    return max((entry / "params" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)


def orbax_params(entry: Path, like):
    """The entry's arrays read with orbax directly, without any verification."""
    import orbax.checkpoint as ocp

    target = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), like)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(entry.resolve() / "params", target)


def bit_equal(a, b) -> bool:
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in pairs)


def load_again(path: Path, cache: Path, capfd) -> tuple[object, list[str]]:
    capfd.readouterr()
    loaded = load_model("gguf", path, "float32", cache_dir=cache, progress=False)
    return loaded, capfd.readouterr().err.strip().splitlines()


def expect_rebuilt(path, cache, capfd, intact, reason: str) -> None:
    """One warning line naming the reason, a rebuild, the intact numbers to the bit,
    and an entry that restores (verified) afterwards."""
    loaded, lines = load_again(path, cache, capfd)
    assert len(lines) == 1 and lines[0].startswith("jaxlin: warning: params cache entry"), lines
    assert reason in lines[0] and "rebuilding it from the checkpoint" in lines[0], lines[0]
    assert not loaded.from_cache
    y, token = numbers(loaded)
    assert y.tobytes() == intact[0].tobytes() and token == intact[1]
    again, lines = load_again(path, cache, capfd)
    assert again.from_cache and lines == []
    assert numbers(again)[0].tobytes() == intact[0].tobytes()


@pytest.fixture
def cached(tiny_gguf_file, tmp_path, capfd):
    """(GGUF path, cache dir, the numbers an intact cached entry gives, its params)."""
    cache = tmp_path / "cache"
    load_model("gguf", tiny_gguf_file, "float32", cache_dir=cache, progress=False)
    loaded, lines = load_again(tiny_gguf_file, cache, capfd)
    assert loaded.from_cache and lines == []
    return tiny_gguf_file, cache, numbers(loaded), loaded.model.params


def test_same_size_byte_flip_is_detected_and_rebuilt(cached, capfd):
    path, cache, intact, params = cached
    entry = the_entry(cache)
    data = largest_array_file(entry)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    # The flip is the silent kind: orbax reads the entry without complaint, wrong.
    assert not bit_equal(orbax_params(entry, params), params)
    expect_rebuilt(path, cache, capfd, intact, "differs from what was stored")


def test_arrays_rewritten_behind_consistent_files_are_detected(cached, capfd):
    """Arrays replaced by a valid orbax tree and the file list re-hashed to match:
    only the arrays' own digest can tell, and it does."""
    import orbax.checkpoint as ocp

    path, cache, intact, params = cached
    entry = the_entry(cache)
    forged = jax.tree_util.tree_map(lambda a: a, params)
    forged["final_norm"]["scale"] = params["final_norm"]["scale"].at[0].add(1.0)
    shutil.rmtree(entry / "params")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(entry.resolve() / "params", forged)
        checkpointer.wait_until_finished()
    digests = json.loads((entry / "digests.json").read_text())
    digests["files_sha256"] = loading._entry_files_sha256(entry)
    (entry / "digests.json").write_text(json.dumps(digests))
    assert bit_equal(orbax_params(entry, params), forged)
    expect_rebuilt(path, cache, capfd, intact, "restored arrays' sha256 differs")


@pytest.mark.parametrize(
    "damage",
    ["truncate array file", "truncate digests.json", "remove digests.json", "garble model.json"],
)
def test_unreadable_entry_is_one_warning_line_and_rebuilt(cached, capfd, damage):
    path, cache, intact, _ = cached
    entry = the_entry(cache)
    if damage == "truncate array file":
        data = largest_array_file(entry)
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif damage == "truncate digests.json":
        (entry / "digests.json").write_text((entry / "digests.json").read_text()[:40])
    elif damage == "remove digests.json":  # what an entry from before digests looks like
        (entry / "digests.json").unlink()
    else:
        (entry / "model.json").write_text("{")
    expect_rebuilt(path, cache, capfd, intact, "")


def test_checkpoint_digest_is_the_files_sha256(tiny_gguf_file, tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    expected = {tiny_gguf_file.name: hashlib.sha256(tiny_gguf_file.read_bytes()).hexdigest()}
    converted = load_model("gguf", tiny_gguf_file, "float32", cache_dir=cache, progress=False)
    restored = load_model("gguf", tiny_gguf_file, "float32", cache_dir=cache, progress=False)
    uncached = load_model("gguf", tiny_gguf_file, "float32", use_cache=False, progress=False)
    assert restored.from_cache and not converted.from_cache
    for loaded in (converted, restored, uncached):
        assert loaded.checkpoint_sha256 == expected
    stored = json.loads((the_entry(cache) / "digests.json").read_text())
    assert stored["checkpoint_sha256"] == expected
    assert stored["params_sha256"] == loading.params_sha256(restored.model.params)

    directory = tiny_model_dir(TINY)
    hf = load_model("hf", directory, "float32", cache_dir=tmp_path / "hf-cache", progress=False)
    assert hf.checkpoint_sha256 == {
        name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
        for name in ("config.json", "model.safetensors")
    }


def test_params_digest_covers_path_dtype_shape_and_bytes():
    base = {"a": {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3)}, "b": jnp.ones(2, jnp.float32)}
    variants = [
        {"a": {"w": base["a"]["w"].at[1, 2].set(5.5)}, "b": base["b"]},  # bytes
        {"a": {"w": base["a"]["w"].reshape(3, 2)}, "b": base["b"]},  # shape
        {"a": {"w": base["a"]["w"].view(jnp.int32)}, "b": base["b"]},  # dtype, same bytes
        {"a": {"v": base["a"]["w"]}, "b": base["b"]},  # path
    ]
    digest = loading.params_sha256(base)
    assert loading.params_sha256(jax.tree_util.tree_map(lambda a: a, base)) == digest
    for variant in variants:
        assert loading.params_sha256(variant) != digest


def test_params_digest_does_not_depend_on_how_leaves_are_sliced(monkeypatch):
    """Leaves are read to the host in slices of their first axis; any slicing hashes
    the same bytes in the same order."""
    params = {"w": jnp.arange(60, dtype=jnp.float32).reshape(5, 3, 4), "s": jnp.float32(2.0)}
    whole = loading.params_sha256(params)
    monkeypatch.setattr(loading, "_HASH_SLICE_BYTES", 20)  # under one row: a row per slice
    assert loading.params_sha256(params) == whole
    monkeypatch.setattr(loading, "_HASH_SLICE_BYTES", 100)  # two rows per slice, a short last one
    assert loading.params_sha256(params) == whole
    expected_leaf = hashlib.sha256(np.arange(60, dtype=np.float32).tobytes()).hexdigest()
    assert loading._leaf_sha256(params["w"]) == expected_leaf
