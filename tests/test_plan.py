"""The planner: programs compiled from the model's config alone, and the sizes it reads
equal to what a real run allocates for the same shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters.hf import load_hf_model
from jaxlin import model as model_fns
from jaxlin.jacobian import linearize
from jaxlin.plan import Workload, abstract_params, nbytes, plan

TOKENS = np.random.default_rng(3).integers(0, 128, size=11)


def own_bytes(jacobian, params) -> int:
    """Bytes of J's leaves that are not the caller's weight buffers."""
    weights = {leaf.unsafe_buffer_pointer() for leaf in jax.tree_util.tree_leaves(params)}
    leaves = jax.tree_util.tree_leaves(jacobian)
    return sum(leaf.nbytes for leaf in leaves if leaf.unsafe_buffer_pointer() not in weights)


@pytest.mark.parametrize("variant", ["gemma3_sliding", "qwen2_biases_untied"])
def test_plan_sizes_equal_a_real_linearization(variant, tiny_model_dir):
    model = load_hf_model(tiny_model_dir(variant), jnp.float64)
    abstract = abstract_params(model.config, jnp.float64)
    assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(model.params)
    assert [(a.shape, a.dtype) for a in jax.tree_util.tree_leaves(abstract)] == [
        (p.shape, p.dtype) for p in jax.tree_util.tree_leaves(model.params)
    ]
    inputs = model_fns.embed(model.config, model.params, jnp.asarray(TOKENS))
    jacobian = linearize(model.params, inputs, model.config)
    for method in ("lanczos", "rows"):
        work = Workload(top_k=2, method=method, per_token="exact", ordinary=True)
        planned = plan(model.config, len(TOKENS), jnp.float64, work)
        assert planned.weights == nbytes(model.params)
        assert planned.jacobian == own_bytes(jacobian, model.params)
        names = [p.name for p in planned.programs]
        assert names[0] == "linearize" and ("lanczos" in names) == (method == "lanczos")
        # J's d rows are one program's output: d · N · d numbers.
        d = model.config.hidden_size
        rows = next(p for p in planned.programs if p.name == "rows")
        assert rows.outputs == d * len(TOKENS) * d * 8
        assert planned.peak >= planned.weights + planned.jacobian + rows.outputs
        # The ordinary Jacobian's contributions run while both Jacobians are held.
        ordinary = next(p for p in planned.programs if p.name == "ordinary contributions")
        assert ordinary.held > planned.jacobian


def test_plan_grows_with_the_input(tiny_model_dir):
    model = load_hf_model(tiny_model_dir("llama_gqa_untied"), jnp.float64)
    short, long = (plan(model.config, n, jnp.float64, Workload(top_k=2)) for n in (16, 64))
    assert long.jacobian > short.jacobian and long.peak > short.peak and long.weights == short.weights


def test_run_refuses_by_the_plan_only_where_the_formula_says_no(tiny_model_dir, monkeypatch):
    from jaxlin import memory, runner
    from jaxlin.analyses import INPUT_ANALYSES
    from jaxlin.memory import InsufficientMemoryError
    from jaxlin.run_config import AnalysisSection

    model = load_hf_model(tiny_model_dir("gemma3_sliding"), jnp.float64)
    config, n, options = model.config, 64, AnalysisSection()
    analyses = [analysis for analysis in INPUT_ANALYSES if analysis.enabled(options, n)]
    formula = runner.memory_estimate(config, n, jnp.float64, options, analyses)
    planned = plan(config, n, jnp.float64, runner.workload(options)).above_weights
    assert planned < formula  # the formula is the conservative one
    monkeypatch.setattr(runner, "PLAN_OVERHEAD_BYTES", 0)
    plans = []
    monkeypatch.setattr(runner, "plan", lambda *args: plans.append(1) or plan(*args))

    def with_free(free: int) -> None:
        monkeypatch.setattr(memory, "available_bytes", lambda: free)
        runner.check_memory(config, n, jnp.float64, options, analyses)

    with_free(10 * formula)  # the formula says yes: nothing is compiled
    assert plans == []
    with_free(int((formula + planned) / 2 / 0.9))  # the formula says no, the plan yes
    assert plans == [1]
    with pytest.raises(InsufficientMemoryError, match="compiled programs' plan"):
        with_free(int(planned / 2))


def test_plan_command_reads_no_weight_and_writes_nothing(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from test_cli import tiny_run_config, write_config

    from jaxlin import loading
    from jaxlin.cli import main

    def tripwire(*args, **kwargs):
        raise AssertionError("jaxlin plan loaded the model's weights")

    monkeypatch.setattr(loading, "load_model", tripwire)
    data = tiny_run_config(tmp_path, tiny_model_dir("llama_gqa_untied"))
    config = write_config(tmp_path / "run.yaml", **data)
    assert main(["plan", str(config), "--tokens", "16", "32"]) == 0
    out = capsys.readouterr().out
    assert out.count("peak per device") == 2 and "16 tokens, float64" in out and "32 tokens" in out
    assert "linearize" in out and "per-token" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]  # nothing written
    assert main(["plan", str(config), "--tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxlin: error: --tokens") and err.count("\n") == 1
