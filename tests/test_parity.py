"""Forward parity of the JAX ports with Hugging Face's PyTorch implementations."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import VARIANTS
from hf_reference import hf_forward

from converters.hf import load_hf_model
from jaxlin import model as model_fns
from jaxlin._policy import FreezePolicy

# Longer than every sliding window of the tiny variants (Gemma 8, Qwen 6).
TOKENS = np.random.default_rng(3).integers(0, 128, size=21)


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def jax_forward(directory, dtype, policy=FreezePolicy.DETACHED):
    model = load_hf_model(directory, dtype)
    inputs = model_fns.embed(model.config, model.params, jnp.asarray(TOKENS))
    hidden = model_fns.final_hidden(model.config, model.params, inputs, policy)
    return hidden, model_fns.logits(model.config, model.params, hidden)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_float64_parity_with_exact_hf(variant, tiny_model_dir):
    directory = tiny_model_dir(variant)
    reference = hf_forward(directory, TOKENS, "exact_float64")
    hidden, logits = jax_forward(directory, jnp.float64)
    assert hidden.dtype == jnp.float64
    assert relative(hidden, reference["last_hidden_state"]) <= 1e-10
    assert relative(logits, reference["logits"]) <= 1e-10


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_float32_parity_with_stock_hf(variant, tiny_model_dir):
    directory = tiny_model_dir(variant)
    reference = hf_forward(directory, TOKENS, "float32")
    hidden, logits = jax_forward(directory, jnp.float32)
    assert hidden.dtype == jnp.float32
    assert relative(hidden, reference["last_hidden_state"]) <= 1e-5
    assert relative(logits, reference["logits"]) <= 1e-5


@pytest.mark.parametrize("variant", ["gemma3_sliding", "qwen3_sliding"])
def test_sliding_window_is_honoured(variant, tiny_model_dir):
    """Guard against the published code's defect: the sliding layers must ignore keys
    outside the window, so a model forced to all-global layers must differ."""
    import dataclasses

    model = load_hf_model(tiny_model_dir(variant), jnp.float64)
    assert any(model.config.layer_is_sliding)
    inputs = model_fns.embed(model.config, model.params, jnp.asarray(TOKENS))
    windowed = model_fns.final_hidden(model.config, model.params, inputs)
    all_global = dataclasses.replace(model.config, sliding_layers=(), sliding_window=None, rope_sliding=None)
    unwindowed = model_fns.final_hidden(all_global, model.params, inputs)
    assert relative(unwindowed[-1], np.asarray(windowed[-1])) > 1e-3


@pytest.mark.parametrize("variant", ["gemma3_untied_softcap", "llama_gqa_untied"])
def test_policies_agree_on_values(variant, tiny_model_dir):
    """Freezing changes derivatives only: forward values are identical."""
    detached, _ = jax_forward(tiny_model_dir(variant), jnp.float64, FreezePolicy.DETACHED)
    ordinary, _ = jax_forward(tiny_model_dir(variant), jnp.float64, FreezePolicy.ORDINARY)
    np.testing.assert_array_equal(np.asarray(detached), np.asarray(ordinary))


def test_longrope_short_factors_below_the_original_context(tiny_model_dir):
    """LongRoPE switches to its long factors only past the original context (16 here):
    a 12-token input must use the short ones, as HF does."""
    directory = tiny_model_dir("phi3_longrope")
    short = TOKENS[:12]
    reference = hf_forward(directory, short, "exact_float64")
    model = load_hf_model(directory, jnp.float64)
    inputs = model_fns.embed(model.config, model.params, jnp.asarray(short))
    hidden = model_fns.final_hidden(model.config, model.params, inputs)
    assert relative(hidden, reference["last_hidden_state"]) <= 1e-10


def test_dynamic_ntk_rope_below_at_and_past_the_context(tiny_model_dir):
    """Dynamic NTK (context 16): inputs that fit keep the plain base, as HF's freshly
    loaded model does; a 21-token input regrows it from its length. Each against HF run
    exactly in float64, and past the context plain RoPE must be measurably another model."""
    import dataclasses

    from jaxlin._config import RopeConfig

    directory = tiny_model_dir("llama_dynamic_rope")
    model = load_hf_model(directory, jnp.float64)
    assert model.config.rope.rope_type == "dynamic"
    plain = dataclasses.replace(model.config, rope=RopeConfig(model.config.rope.theta))
    rotary_dim = model.config.rotary_dim
    for length in (12, 16, 21):
        tokens = TOKENS[:length]
        reference = hf_forward(directory, tokens, "exact_float64")["last_hidden_state"]
        inputs = model_fns.embed(model.config, model.params, jnp.asarray(tokens))
        hidden = model_fns.final_hidden(model.config, model.params, inputs)
        assert relative(hidden, reference) <= 1e-10, length
        grown = model.config.rope.inverse_frequencies(rotary_dim, length)
        if length <= 16:
            np.testing.assert_array_equal(grown, plain.rope.inverse_frequencies(rotary_dim, length))
        else:
            assert np.all(grown[1:] < plain.rope.inverse_frequencies(rotary_dim, length)[1:])
            unscaled = model_fns.final_hidden(plain, model.params, inputs)
            assert relative(unscaled, reference) > 1e-3


def test_learned_positions_refuse_inputs_longer_than_the_table(tiny_model_dir, tmp_path):
    from jaxlin.errors import JaxlinError
    from jaxlin.loading import LoadedModel
    from jaxlin.run_config import AnalysisSection
    from jaxlin.runner import analyse

    model = load_hf_model(tiny_model_dir("gpt2_affine"), jnp.float64)

    class Tokenizer:
        bos_token_id = None

        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [5] * len(text)

    with pytest.raises(JaxlinError, match="positions"):
        analyse(LoadedModel(model, Tokenizer(), False), "x" * 65, AnalysisSection())
