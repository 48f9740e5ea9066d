"""When Lanczos stops: at the tolerance (dtype-aware by default), at full depth d, or when
the bounds stop improving at the operator's rounding floor — and a run says which, in the
terminal, in summary.json and in the report."""

from __future__ import annotations

import html
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from converters.hf import load_hf_model
from jaxlin import model as model_fns
from jaxlin.cli import main
from jaxlin.jacobian import linearize
from jaxlin.spectral import default_tolerance, lanczos_top_k, top_k

N = 19
D = 64  # hidden size of the tiny models


@pytest.fixture(scope="module")
def case(tiny_model_dir):
    built = {}

    def get(dtype):
        if dtype not in built:
            model = load_hf_model(tiny_model_dir("gemma3_sliding"), dtype)
            ids = np.random.default_rng(21).integers(0, 128, size=N)
            built[dtype] = (model, model_fns.embed(model.config, model.params, jnp.asarray(ids)))
        return built[dtype]

    return get


def test_default_tolerances() -> None:
    assert default_tolerance(jnp.float64) == 1e-10  # unchanged
    assert default_tolerance(jnp.float32) == 1e-4  # unchanged
    assert default_tolerance(jnp.bfloat16) == 4 * 2.0**-7  # 4·eps: above the bf16 rounding floor


def test_bounds_that_cannot_improve_stop_before_full_depth(case) -> None:
    """A tolerance below float32 rounding: the bounds fall to ~5e-7 and stay there."""
    model, inputs = case(jnp.float32)
    steps: list[str] = []
    found = top_k(linearize(model.params, inputs, model.config), 6, 1e-12, 8, progress=steps.append)
    assert not found.converged and found.stop_reason == "stalled"
    assert found.depth < D and found.tolerance == 1e-12
    assert len(steps) >= 3  # it did grow while the bounds improved
    worst = float(np.max(found.bounds / found.S))
    assert 1e-12 < worst < 1e-5


def test_an_early_plateau_is_not_a_stall(case) -> None:
    """float64 from depth 8: the worst bound only halves from depth 8 to 12 (0.32 → 0.16),
    far above rounding; the run must go on and converge."""
    model, inputs = case(jnp.float64)
    steps: list[str] = []
    found = top_k(linearize(model.params, inputs, model.config), 6, None, 8, progress=steps.append)
    assert found.converged and found.stop_reason == "converged" and found.tolerance == 1e-10
    assert np.max(found.bounds / found.S) <= 1e-10
    assert found.depth > 12


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_converged_case_unchanged(case, dtype) -> None:
    """The default run converges at the first depth, as before: the same triplets as one
    Lanczos run of that depth."""
    model, inputs = case(dtype)
    found = top_k(linearize(model.params, inputs, model.config), 6)
    assert found.converged and found.stop_reason == "converged" and found.depth == 3 * 6 + 30
    _, s, _, bounds, _ = lanczos_top_k(
        linearize(model.params, inputs, model.config), jax.random.key(0), 6, found.depth
    )
    np.testing.assert_array_equal(found.S, np.asarray(s, np.float64))
    np.testing.assert_array_equal(found.bounds, np.asarray(bounds, np.float64))


def test_full_depth_is_its_own_reason(case) -> None:
    model, inputs = case(jnp.float64)
    found = top_k(linearize(model.params, inputs, model.config), 6, 1e-300)
    assert found.depth == D and not found.converged and found.stop_reason == "full_depth"


def run(tmp_path: Path, capsys, model_dir: Path, dtype: str, **analysis) -> tuple[dict, str, str]:
    """`jaxlin run` of a default-like config (only the model and dtype changed)."""
    config = {
        "model": {"source": "hf", "path": str(model_dir), "dtype": dtype, "cache": False},
        "text": "The bridge out of Marin is the Golden",
        "output_dir": str(tmp_path / "run"),
    }
    if analysis:
        config["analysis"] = analysis
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["run", str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    return summary, out, (tmp_path / "run" / "report.html").read_text()


def test_bfloat16_run_converges_in_bounded_depth(tmp_path, capsys, tiny_model_dir) -> None:
    # Lanczos, not the exact route from J's rows that the default's exact per-token spectra open.
    summary, out, report = run(
        tmp_path, capsys, tiny_model_dir("gemma3_sliding"), "bfloat16", method="lanczos"
    )
    spectrum = summary["spectrum"]
    assert summary["dtype"] == "bfloat16"
    assert spectrum["converged"] is True and spectrum["stop_reason"] == "converged"
    assert spectrum["tolerance"] == default_tolerance(jnp.bfloat16)
    assert spectrum["krylov_depth"] < D
    assert spectrum["worst_relative_bound"] <= spectrum["tolerance"]
    line = f"Lanczos: converged at depth {spectrum['krylov_depth']} (worst relative bound "
    assert line in out
    assert html.escape(line) in report and 'id="convergence-badge" class="badge pass"' in report


def test_a_run_that_does_not_converge_says_so(tmp_path, capsys, tiny_model_dir) -> None:
    summary, out, report = run(
        tmp_path,
        capsys,
        tiny_model_dir("gemma3_sliding"),
        "float32",
        tolerance=1e-12,
        krylov_depth=8,
        per_token={"method": "off"},
    )
    spectrum = summary["spectrum"]
    assert spectrum["converged"] is False and spectrum["stop_reason"] == "stalled"
    assert spectrum["tolerance"] == 1e-12 and spectrum["krylov_depth"] < D
    line = (
        f"Lanczos: NOT converged at depth {spectrum['krylov_depth']} (worst relative bound "
        f"{spectrum['worst_relative_bound']:.1e} > target 1.0e-12; the bounds stopped improving"
    )
    assert line in out
    assert html.escape(line) in report and 'id="convergence-badge" class="badge fail"' in report
