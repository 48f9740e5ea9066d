"""Steering: λ = 0 is plain greedy decoding, λ > 0 changes the continuation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from converters.hf import load_hf_model
from jaxlin import model as model_fns
from jaxlin.analyses.steering import generate, prepare


def plain_greedy(model, prompt: np.ndarray, count: int) -> list[int]:
    """Reference: recompute the whole (unpadded) sequence each step, no steering code."""
    ids = list(prompt)
    for _ in range(count):
        inputs = model_fns.embed(model.config, model.params, jnp.asarray(ids))
        hidden = model_fns.final_hidden(model.config, model.params, inputs)
        ids.append(int(jnp.argmax(model_fns.logits(model.config, model.params, hidden[-1]))))
    return ids[len(prompt) :]


@pytest.mark.parametrize("variant", ["llama_gqa_untied", "gemma3_sliding"])
@pytest.mark.parametrize("mode", ["jacobian", "singular"])
def test_zero_strength_is_plain_greedy_and_positive_strength_steers(variant, mode, tiny_model_dir):
    model = load_hf_model(tiny_model_dir(variant), jnp.float64)
    rng = np.random.default_rng(12)
    concept, prompt = rng.integers(3, 128, size=7), rng.integers(3, 128, size=6)
    setup = prepare(model.config, model.params, concept, layer=None, mode=mode)
    assert setup.layer == round(2 * model.config.num_layers / 3) - 1
    baseline = generate(model.config, model.params, prompt, 10, 0.0, setup)
    assert baseline == plain_greedy(model, prompt, 10)
    steered = [generate(model.config, model.params, prompt, 10, strength, setup) for strength in (4.0, 16.0)]
    assert any(s != baseline for s in steered)


def test_bad_steering_requests(tiny_model_dir):
    model = load_hf_model(tiny_model_dir("llama_gqa_untied"), jnp.float64)
    with pytest.raises(ValueError, match="layer"):
        prepare(model.config, model.params, np.arange(3, 8), layer=99, mode="jacobian")
    with pytest.raises(ValueError, match="mode"):
        prepare(model.config, model.params, np.arange(3, 8), layer=0, mode="telepathy")
