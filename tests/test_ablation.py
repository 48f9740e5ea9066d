"""Token ablation: the linear prediction is J applied to the input without the token
(exactly y − c_t), the real edits are fresh forwards of the edited input, and a run
reports both with their rank correlation."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from converters.hf import load_hf_model
from jaxlin import model as model_fns
from jaxlin.analyses.ablation import ablate, spearman
from jaxlin.cli import main
from jaxlin.jacobian import linearize
from jaxlin.operator import contributions

TOKENS = np.random.default_rng(13).integers(0, 128, size=11)


@pytest.mark.parametrize("variant", ["gemma3_sliding", "qwen2_biases_untied", "gpt2_affine"])
def test_linear_and_real_ablations_are_what_they_claim(variant, tiny_model_dir):
    model = load_hf_model(tiny_model_dir(variant), jnp.float64)
    config, params = model.config, model.params
    inputs = model_fns.embed(config, params, jnp.asarray(TOKENS))
    jacobian = linearize(params, inputs, config)
    c = contributions(jacobian)
    result = ablate(config, params, TOKENS, jacobian.output, c, chunk=4)  # 4 does not divide 11
    token = result.predicted_token_id
    logit = lambda h: float(model_fns.logits(config, params, h)[token])  # noqa: E731
    base = logit(jacobian.output)
    for t in range(len(TOKENS)):
        # Linear: J applied to X with row t zeroed, plus the bias term, is y − c_t.
        without = inputs.at[t].set(0.0)
        linear_hidden = jacobian.matvec(without) + jacobian.bias
        np.testing.assert_allclose(linear_hidden, jacobian.output - c[t], rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(
            result.linear_change[t], logit(linear_hidden) - base, rtol=1e-9, atol=1e-10
        )
        # Removed: a fresh forward of the text without token t (re-embedded: positions shift).
        shorter = model_fns.embed(config, params, jnp.asarray(np.delete(TOKENS, t)))
        removed = model_fns.final_hidden(config, params, shorter)[-1]
        np.testing.assert_allclose(result.removed_change[t], logit(removed) - base, rtol=1e-10, atol=1e-11)
        top = int(jnp.argmax(model_fns.logits(config, params, removed)))
        assert int(result.removed_top[t]) == top
        # Zeroed: a fresh forward with t's input row zero.
        zeroed = model_fns.final_hidden(config, params, without)[-1]
        np.testing.assert_allclose(result.zeroed_change[t], logit(zeroed) - base, rtol=1e-10, atol=1e-11)


def test_spearman_matches_its_definition():
    a = np.array([0.3, -1.0, 2.0, 2.0, 5.0])
    b = np.array([1.0, 0.0, 3.0, 4.0, 2.0])
    # Average ranks: a → [1, 0, 2.5, 2.5, 4], b → [1, 0, 3, 4, 2]; Pearson of the ranks.
    ra, rb = np.array([1, 0, 2.5, 2.5, 4.0]), np.array([1, 0, 3, 4, 2.0])
    assert spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1], rel=1e-12)
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a[:2], b[:2]) is None and spearman(a, np.ones(5)) is None


def test_a_run_reports_the_ablation(tmp_path, tiny_model_dir):
    config = {
        "model": {
            "source": "hf",
            "path": str(tiny_model_dir("llama_gqa_untied")),
            "dtype": "float64",
            "cache": False,
        },
        "text": "Hello, world! The bridge.",
        "analysis": {
            "top_k": 2,
            "ablation": True,
            "per_token": {"method": "off"},
            "ordinary_jacobian": False,
        },
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--quiet"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    section = summary["ablation"]
    assert len(section["rows"]) == summary["n_tokens"]
    assert -1.0 <= section["spearman_linear_vs_removed"] <= 1.0
    arrays = np.load(tmp_path / "run" / "arrays.npz")
    changes = [r["linear_logit_change"] for r in section["rows"]]
    np.testing.assert_array_equal(arrays["ablation_linear"], changes)
    assert (tmp_path / "run" / "ablation.png").stat().st_size > 0
    report = (tmp_path / "run" / "report.html").read_text()
    assert "Token ablation: linear vs real" in report and "spearman linear vs removed" in report
