"""Checkpoint sources: HF directories, sharded safetensors, hub ids from the local
cache (offline), the orbax params cache, and refusals."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from converters.hf import load_hf_model, resolve_model_directory
from converters.params import CheckpointError
from jaxlin.loading import load_model


def params_equal(a, b) -> bool:
    import jax

    return all(
        bool(jnp.array_equal(x, y))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def test_hub_id_resolves_from_the_local_cache_offline(tiny_model_dir, tmp_path, monkeypatch):
    source = tiny_model_dir("qwen3_sliding")
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-qwen3" / "snapshots" / "0123456789abcdef"
    shutil.copytree(source, snapshot)
    (cache / "models--tiny-org--tiny-qwen3" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-qwen3" / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    assert resolve_model_directory("tiny-org/tiny-qwen3") == snapshot
    from_hub = load_hf_model("tiny-org/tiny-qwen3", jnp.float32)
    assert params_equal(from_hub.params, load_hf_model(source, jnp.float32).params)
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        resolve_model_directory("tiny-org/absent")


def test_sharded_safetensors_load_like_a_single_file(tiny_model_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    source = tiny_model_dir("llama_gqa_untied")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(source / "config.json", sharded / "config.json")
    tensors = load_file(source / "model.safetensors")
    names = sorted(tensors)
    halves = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, sharded / file)
        weight_map.update({n: file for n in part})
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    assert params_equal(load_hf_model(sharded, jnp.float32).params, load_hf_model(source, jnp.float32).params)


def test_pickled_checkpoints_are_never_loaded(tiny_model_dir, tmp_path):
    directory = tmp_path / "pickled"
    directory.mkdir()
    shutil.copy(tiny_model_dir("llama_gqa_untied") / "config.json", directory / "config.json")
    (directory / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(CheckpointError, match="never loads pickles"):
        load_hf_model(directory, jnp.float32)


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_orbax_cache_round_trip(tiny_model_dir, tmp_path, dtype):
    source = tiny_model_dir("gemma3_sliding")
    first = load_model("hf", source, dtype, cache_dir=tmp_path, progress=False)
    second = load_model("hf", source, dtype, cache_dir=tmp_path, progress=False)
    assert not first.from_cache and second.from_cache
    assert second.model.config == first.model.config
    assert params_equal(first.model.params, second.model.params)
    assert second.model.dtype == first.model.dtype
    ids = second.tokenizer.encode("abc", add_special_tokens=False)
    assert ids == first.tokenizer.encode("abc", add_special_tokens=False)
    # A damaged entry is rebuilt, not trusted.
    entry = next((tmp_path / "params").iterdir())
    (entry / "model.json").write_text("{")
    third = load_model("hf", source, dtype, cache_dir=tmp_path, progress=False)
    assert not third.from_cache and params_equal(third.model.params, first.model.params)
    np.testing.assert_array_equal(
        np.asarray(third.model.params["final_norm"]["scale"], np.float64),
        np.asarray(first.model.params["final_norm"]["scale"], np.float64),
    )
