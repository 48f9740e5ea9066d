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


# One HF rope_parameters dict per RoPE variant jaxlin reads (the GGUF-only
# "frequency_factors" as converters.gguf builds it from llama.cpp's rope_freqs).
HF_ROPE_PARAMETERS: dict[str, dict] = {
    "default": {"rope_type": "default", "rope_theta": 100.0},
    "linear": {"rope_type": "linear", "rope_theta": 100.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "dynamic": {"rope_type": "dynamic", "rope_theta": 100.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16},
    "longrope": {
        "rope_type": "longrope",
        "rope_theta": 1e4,
        "original_max_position_embeddings": 16,
        "short_factor": [1.0, 1.5],
        "long_factor": [2.0, 4.0],
    },
    "frequency_factors": {
        "rope_type": "frequency_factors",
        "rope_theta": 1e4,
        "frequency_factors": [1.0, 8.0],
    },
}


@pytest.mark.parametrize("rope_type", sorted(HF_ROPE_PARAMETERS))
def test_each_rope_variant_reads_its_hf_parameters_and_round_trips_through_json(rope_type):
    from types import SimpleNamespace

    from jaxlin._config import ROPE_TYPES, rope_from_json, rope_to_json
    from jaxlin.families._base import rope

    assert set(ROPE_TYPES) == set(HF_ROPE_PARAMETERS)  # every variant is exercised here
    parameters = HF_ROPE_PARAMETERS[rope_type]
    ours = rope(parameters, hf_config=SimpleNamespace(max_position_embeddings=64))
    assert type(ours) is ROPE_TYPES[rope_type] and ours.rope_type == rope_type
    assert ours.theta == parameters["rope_theta"]
    assert rope_from_json(json.loads(json.dumps(rope_to_json(ours)))) == ours
    inv_freq = ours.inverse_frequencies(4, 80)
    assert inv_freq.dtype == np.float64 and inv_freq.shape == (2,) and np.all(inv_freq > 0)
    if rope_type == "dynamic":  # the context HF grows the base past is the config's
        assert ours.original_max_position_embeddings == 64
    if rope_type == "longrope":  # long input: long factors; HF's attention factor from the ratio
        plain = 1e4 ** -(np.arange(0, 4, 2) / 4)
        np.testing.assert_array_equal(inv_freq, plain / np.array([2.0, 4.0]))
        assert ours.factor == 4.0 and ours.attention_factor == np.sqrt(1 + np.log(4.0) / np.log(16))


def test_rope_json_written_with_every_field_on_one_type_still_reads():
    """Params cache entries from before the variants were types carry every field."""
    from jaxlin._config import LinearRope, rope_from_json

    old = {
        "theta": 100.0,
        "rope_type": "linear",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "attention_factor": 1.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": True,
        "short_factor": [],
        "long_factor": [],
        "frequency_factors": [],
    }
    assert rope_from_json(old) == LinearRope(100.0, factor=4.0)


def test_unknown_or_incomplete_rope_parameters_name_the_field():
    from jaxlin.families._base import ConfigFieldError, rope

    with pytest.raises(ConfigFieldError, match=r"rope_type 'ntk' is not supported \(supported: default, "):
        rope({"rope_type": "ntk", "rope_theta": 1.0})
    with pytest.raises(ConfigFieldError, match=r"'rope_parameters' \(llama3\) lacks 'low_freq_factor'"):
        rope({"rope_type": "llama3", "rope_theta": 1.0, "factor": 8.0})
    with pytest.raises(ConfigFieldError, match="'max_position_embeddings' is missing"):
        rope({"rope_type": "dynamic", "rope_theta": 1.0, "factor": 2.0}, hf_config=object())
