"""The planner: programs compiled from the model's config alone, and the sizes it reads
equal to what a real run allocates for the same shapes."""

from __future__ import annotations

from pathlib import Path

import gguf
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
    monkeypatch.setattr(memory, "PLAN_OVERHEAD_BYTES", 0)
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


# ----------------------------------------------------------------- published models

PUBLISHED = Path(__file__).resolve().parent.parent / "configs" / "published"
# Model cards' parameter counts (Gemma 3: the multimodal checkpoint, vision tower included).
PUBLISHED_PARAMETERS = {
    "meta-llama/Llama-3.1-8B-Instruct": 8.03e9,
    "meta-llama/Llama-3.3-70B-Instruct": 70.6e9,
    "Qwen/Qwen3-8B": 8.2e9,
    "Qwen/Qwen3-14B": 14.8e9,
    "Qwen/Qwen3-32B": 32.8e9,
    "google/gemma-3-4b-it": 4.3e9,
    "google/gemma-3-12b-it": 12.2e9,
    "google/gemma-3-27b-it": 27.4e9,
    "microsoft/phi-4": 14.7e9,
    "mistralai/Ministral-8B-Instruct-2410": 8.02e9,
    "allenai/OLMo-2-1124-7B": 7.3e9,
}


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty local Hugging Face cache, offline: hub ids must come from jaxlin's own files."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_every_published_config_names_a_shipped_architecture(empty_hf_cache):
    from jaxlin.model_source import read_planning_config, shipped_architecture
    from jaxlin.run_config import load_run_config

    configs = sorted(PUBLISHED.glob("*.yaml"))
    assert len(configs) == len(PUBLISHED_PARAMETERS)
    hub_ids = set()
    for path in configs:
        config = load_run_config(path)
        assert config.model.source == "hf"
        hub_ids.add(config.model.path)
        model, where = read_planning_config(config.model)
        shipped = shipped_architecture(config.model.path)
        assert shipped is not None and shipped.name in where and "not in the local" in where
        assert model.num_layers > 0 and model.hidden_size > 0
        # Each names the mesh it needs, from the planner.
        assert "smallest mesh" in path.read_text(), path.name
    assert hub_ids == set(PUBLISHED_PARAMETERS)


def test_the_local_cache_config_wins_over_the_shipped_one(empty_hf_cache, tiny_model_dir):
    """A hub id in the cache is read from the cache's config.json, not jaxlin's file."""
    from jaxlin.model_source import read_planning_config
    from jaxlin.run_config import ModelSection

    snapshot = empty_hf_cache / "models--Qwen--Qwen3-8B" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    (snapshot / "config.json").write_text((tiny_model_dir("llama_gqa_untied") / "config.json").read_text())
    model, where = read_planning_config(ModelSection(source="hf", path="Qwen/Qwen3-8B"))
    assert model.family == "llama" and model.hidden_size < 1000 and "not in the local" not in where


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED_PARAMETERS))
def test_shipped_architectures_have_the_published_parameter_counts(hub_id):
    """jaxlin's params from the shipped file count exactly what transformers' model class
    builds from it (its language model), and that is the model card's count."""
    torch = pytest.importorskip("torch")
    import json

    import transformers

    from jaxlin.model_source import architecture_config, shipped_architecture

    path = shipped_architecture(hub_id)
    data = json.loads(path.read_text())
    hf_config = transformers.CONFIG_MAPPING[data["model_type"]].from_dict(data)
    multimodal = data["model_type"] == "gemma3"
    model_class = (
        transformers.Gemma3ForConditionalGeneration
        if multimodal
        else transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]
    )
    with torch.device("meta"):
        hf_model = model_class(hf_config)
    total = sum(p.numel() for p in hf_model.parameters())
    language = sum(
        p.numel()
        for name, p in hf_model.named_parameters()
        if "vision" not in name and "multi_modal" not in name
    )
    params = abstract_params(architecture_config(path), jnp.bfloat16)
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params)) == language
    assert abs(total - PUBLISHED_PARAMETERS[hub_id]) / PUBLISHED_PARAMETERS[hub_id] < 0.005
    assert multimodal == (language < total)


def test_plan_command_on_a_published_config_needs_no_weights_or_network(empty_hf_cache, capsys, monkeypatch):
    from jaxlin import loading
    from jaxlin.cli import main

    def tripwire(*args, **kwargs):
        raise AssertionError("jaxlin plan loaded the model's weights")

    monkeypatch.setattr(loading, "load_model", tripwire)
    config = PUBLISHED / "gemma-3-4b.yaml"
    assert main(["plan", str(config), "--tokens", "8", "--device-memory", "80GB", "--quantized", "Q4_K"]) == 0
    out = capsys.readouterr().out
    assert "google/gemma-3-4b-it is not in the local Hugging Face cache" in out
    assert "google__gemma-3-4b-it.json" in out and "8 tokens, float32" in out and "Q4_K layout" in out
    assert "peak per device" in out and "smallest mesh that fits 74.51 GiB: data 1 × fsdp 1 × tensor 1" in out
    assert main(["plan", str(config), "--tokens", "8", "--device-memory", "lots"]) == 2
    assert capsys.readouterr().err.startswith("jaxlin: error: --device-memory")


def test_parse_bytes():
    from jaxlin.errors import JaxlinError
    from jaxlin.plan import parse_bytes

    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("1.5e9") == 1_500_000_000 and parse_bytes(" 2 tb ") == 2 * 10**12
    for bad in ("", "GB", "-1GB", "0", "nanGB", "infGB"):
        with pytest.raises(JaxlinError, match="--device-memory"):
            parse_bytes(bad)


# ----------------------------------------------------------------- quantized plans


def test_quantized_plan_layouts_are_what_a_q4_k_gguf_loads(tmp_path):
    """`--quantized Q4_K` plans the params a GGUF with every matrix in Q4_K loads as:
    the same quantized params, layouts and bytes."""
    torch = pytest.importorskip("torch")
    from test_gguf import HF_CONFIGS, llama_cpp_convert, tiny_hf_model, write_llama_cpp_gguf
    from test_quantized import WIDE, quantized_blocks

    from converters.gguf_model import load_gguf_model
    from jaxlin.quantized import layouts, params_nbytes

    fields = {**HF_CONFIGS["qwen2"], **WIDE, "head_dim": 64}
    fields.pop("rope_theta")
    model, hf = tiny_hf_model("llama", torch, fields)
    rng = np.random.default_rng(0)
    tensors = {
        name: (quantized_blocks(values, gguf.GGMLQuantizationType.Q4_K, rng), gguf.GGMLQuantizationType.Q4_K)
        if values.ndim == 2
        else (values, qtype)
        for name, (values, qtype) in llama_cpp_convert("llama", model.config, hf).items()
    }
    path = write_llama_cpp_gguf(tmp_path / "q4k.gguf", "llama", model.config, tensors)
    loaded = load_gguf_model(path, jnp.float32, keep_quantized=True)
    planned = abstract_params(loaded.config, jnp.float32, quantized="Q4_K")
    assert layouts(planned) == layouts(loaded.params) and layouts(planned)
    assert (
        nbytes(planned) == params_nbytes(loaded.params) < nbytes(abstract_params(loaded.config, jnp.float32))
    )
    quantized = plan(loaded.config, 16, jnp.float32, Workload(top_k=2), quantized="Q4_K")
    assert quantized.weights == params_nbytes(loaded.params) and quantized.quantized == "Q4_K"


def test_quantized_layout_names_are_checked():
    from jaxlin.errors import JaxlinError
    from jaxlin.plan import quantized_layouts

    with pytest.raises(JaxlinError, match="--quantized: 'Q3_K'"):
        quantized_layouts({}, "Q3_K")


# ----------------------------------------------------------------- the smallest mesh


def test_smallest_mesh_search_order_and_pruning():
    """The search tries meshes by device count, skips (uncompiled) those whose weights
    alone exceed the limit or that are known not to fit, and stops at the first fit."""
    from jaxlin.plan import Plan, ProgramMemory, mesh_candidates, smallest_mesh

    assert len(mesh_candidates(8)) == 20 and len(mesh_candidates(6)) == 1 + 3 + 3 + 9
    weights = lambda sizes: 100 // (sizes["fsdp"] * sizes["tensor"])  # noqa: E731
    peaks = {(1, 2, 2): 40, (1, 1, 4): 35}  # the rest: 10 over their weights
    compiled = []

    def plan_on(sizes):
        key = (sizes["data"], sizes["fsdp"], sizes["tensor"])
        compiled.append(key)
        above = peaks.get(key, weights(sizes) + 10) - weights(sizes)
        program = ProgramMemory("linearize", 0, above, 0, 0)
        return Plan(1, "float32", weights(sizes), 0, (program,), tuple(sizes.items()))

    search = smallest_mesh(8, 40, weights, plan_on, known_misfit=lambda sizes: sizes["tensor"] == 4)
    assert search.sizes == {"data": 1, "fsdp": 2, "tensor": 2} and search.found.peak == 40
    assert all(weights(t.sizes) > 40 or t.sizes["tensor"] == 4 for t in search.trials if t.peak is None)
    assert compiled == [(1, 2, 2)]  # the 1- and 2-device meshes hold 50+ weights per device
    # One mesh per device count: the fewest weights per device, the widest tensor axis first.
    compiled.clear()
    cheap = smallest_mesh(8, 40, weights, plan_on, per_count=1)
    assert [tuple(t.sizes.values()) for t in cheap.trials] == [(1, 1, 1), (1, 1, 2), (1, 1, 4)]
    assert compiled == [(1, 1, 4)] and cheap.found.peak == 35


MESH_SCRIPT = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
from jaxlin.model_source import read_model_config
from jaxlin.run_config import ModelSection
from jaxlin.mesh import MESH_AXES
from jaxlin.plan import (Workload, mesh_candidates, nbytes, plans_by_mesh, smallest_mesh,
                         weights_per_device)
config = read_model_config(ModelSection(source="hf", path=sys.argv[1]))
work = Workload(top_k=2, chunk=4)
plan_on = plans_by_mesh(config, 24, jnp.dtype("float64"), work, None)
weights_on = lambda sizes: weights_per_device(config, jnp.float64, sizes, None)
# Every mesh of 1 or 2 devices compiled (the search's answer has 2: see the limit).
peaks = {tuple(s[a] for a in MESH_AXES): plan_on(s).peak for s in mesh_candidates(2)}
weights = {tuple(s[a] for a in MESH_AXES): weights_on(s) for s in mesh_candidates(4)}
one = plan_on({"data": 1, "fsdp": 1, "tensor": 1})
best_two = min(peak for key, peak in peaks.items() if key[0] * key[1] * key[2] == 2)
limit = (one.peak + best_two) // 2
search = smallest_mesh(4, limit, weights_on, plan_on)
print(json.dumps({"peaks": [[list(k), v] for k, v in peaks.items()],
                  "weights": [[list(k), v] for k, v in weights.items()],
                  "limit": limit, "found": search.sizes, "found_peak": search.found.peak,
                  "found_weights": search.found.weights, "one_weights": one.weights}))
"""


def test_smallest_mesh_fits_and_its_smaller_neighbours_do_not(tiny_model_dir):
    """On 4 host CPU devices (a subprocess: the count is fixed when jax starts), compiled
    plans of a tiny model: the mesh found fits, each neighbour with an axis halved does not,
    and the weights each device holds shrink with fsdp × tensor."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    directory = tiny_model_dir("llama_gqa_untied")
    result = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT, str(directory)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    peaks = {tuple(key): peak for key, peak in found["peaks"]}
    weights = {tuple(key): value for key, value in found["weights"]}
    mesh = tuple(found["found"][axis] for axis in ("data", "fsdp", "tensor"))
    limit = found["limit"]
    assert peaks[mesh] == found["found_peak"] <= limit and mesh != (1, 1, 1)
    for axis in range(3):
        if mesh[axis] > 1:
            neighbour = tuple(size // 2 if i == axis else size for i, size in enumerate(mesh))
            assert peaks[neighbour] > limit, (neighbour, peaks)
    assert all(peak > limit for key, peak in peaks.items() if np.prod(key) < np.prod(mesh))
    # Weights per device: replicated along data, split along fsdp and tensor.
    assert weights[(1, 1, 1)] == found["one_weights"] == weights[(2, 1, 1)] == weights[(4, 1, 1)]
    assert weights[(1, 2, 2)] < weights[(1, 2, 1)] < weights[(1, 1, 1)]
    assert found["found_weights"] == weights[mesh]


# ----------------------------------------------------------------- the analyses' own programs


def programs_named(planned, prefix: str) -> dict[str, object]:
    return {p.name: p for p in planned.programs if p.name.startswith(prefix)}


def compiled_sizes(compiled) -> tuple[int, int]:
    stats = compiled.memory_analysis()
    return int(stats.output_size_in_bytes), int(stats.temp_size_in_bytes)


def test_the_layer_sweep_and_ablation_are_planned_as_they_compile(tiny_model_dir):
    """With the layer sweep and ablation enabled the plan lists their programs; each
    planned size is what the run's own program, compiled with the real weights and input,
    allocates; a cumulative tap's J holds what a real one holds (no more than the whole
    J: it refers to the weights); and the plan's peak is at least the plan's without them."""
    from jaxlin._policy import FreezePolicy
    from jaxlin.analyses import INPUT_ANALYSES
    from jaxlin.analyses.ablation import _ablate, edits_at_once
    from jaxlin.jacobian import _linearize
    from jaxlin.model import Tap
    from jaxlin.plan import workload
    from jaxlin.run_config import AnalysisSection

    model = load_hf_model(tiny_model_dir("llama_gqa_untied"), jnp.float64)
    config, n = model.config, len(TOKENS)
    options = AnalysisSection(
        top_k=2,
        chunk=4,
        ablation=True,
        per_token={"method": "off"},
        layers={"enabled": True, "kinds": ["mlp"]},
    )
    enabled = [analysis for analysis in INPUT_ANALYSES if analysis.enabled(options, n)]
    assert {analysis.name for analysis in enabled} >= {"layers", "ablation"}
    with_them = plan(config, n, jnp.float64, workload(options, enabled))
    without = plan(config, n, jnp.float64, workload(options))
    assert not programs_named(without, "layers") and not programs_named(without, "ablation")
    layers = programs_named(with_them, "layers cumulative mlp")
    assert list(layers) == [
        "layers cumulative mlp: linearize",
        "layers cumulative mlp: rows",  # J's rows fit: the sweep's rows path
        "layers cumulative mlp: spectrum",
        "layers cumulative mlp: certificate",
    ]
    assert with_them.peak >= without.peak and with_them.weights == without.weights
    # The free check before any compiling counts their programs, conservatively.
    from jaxlin import runner

    own = {a.name: a.program_bytes(config, n, jnp.float64, options) for a in enabled if a.program_bytes}
    assert own["ablation"] > 0 and own["layers"] > 0
    formula = runner.memory_estimate(config, n, jnp.float64, options, enabled) + sum(own.values())
    assert formula >= with_them.above_weights

    inputs = model_fns.embed(config, model.params, jnp.asarray(TOKENS))
    tap = Tap(0, "mlp", options.layers.final_norm)
    real = _linearize.lower(model.params, inputs, config, FreezePolicy.DETACHED, 256, tap).compile()
    planned = layers["layers cumulative mlp: linearize"]
    assert (planned.outputs, planned.temporaries) == compiled_sizes(real)
    # Held while it runs: the input's J, the ordinary J (kept once the certificate made it)
    # and the previous tap's J, each as large as a real one.
    tap_jacobian = linearize(model.params, inputs, config, tap=tap)
    ordinary = linearize(model.params, inputs, config, FreezePolicy.ORDINARY, None)
    input_held = with_them.jacobian + own_bytes(ordinary, model.params)
    assert planned.held == input_held + own_bytes(tap_jacobian, model.params)
    assert own_bytes(tap_jacobian, model.params) <= with_them.jacobian  # no weight copy (model.tap_values)

    jacobian = linearize(model.params, inputs, config)
    contributions = jnp.zeros_like(inputs)
    token, chunk = jnp.asarray(0), edits_at_once(options, n)
    ids = jnp.asarray(TOKENS, jnp.int32)
    real = _ablate.lower(model.params, ids, jacobian.output, contributions, token, config, chunk).compile()
    ablation = with_them.programs[[p.name for p in with_them.programs].index("ablation: edited forwards")]
    assert (ablation.outputs, ablation.temporaries) == compiled_sizes(real)
    assert ablation.held == input_held + contributions.nbytes


def test_analyses_after_the_last_row_reader_are_planned_without_the_rows():
    """As the runner drops J's rows after the last analysis that reads them, the planner
    plans the analyses after it without them (and the ones up to it with them)."""
    from jaxlin.analyses.base import Analysis
    from jaxlin.plan import Abstracts, workload
    from jaxlin.run_config import AnalysisSection

    seen = []

    def programs(options, planned):
        seen.append((planned.rows is not None, planned.held))
        return ()

    def analysis(name: str, uses_rows: bool) -> Analysis:
        return Analysis(name, run=None, uses_rows=uses_rows, programs=programs)

    order = [analysis("a", False), analysis("reads", True), analysis("after", False)]
    rows = jax.ShapeDtypeStruct((4, 3, 4), jnp.float64)
    planned = Abstracts(None, None, None, None, 1000 + nbytes(rows), None, rows=rows)
    for source in workload(AnalysisSection(), order).extra:
        source(planned)
    assert seen == [(True, 1384), (True, 1384), (False, 1000)]


def test_a_program_planned_larger_compiles_larger(tiny_model_dir):
    """The ablation's forwards, 2 edited inputs at a time against all at once (on a tiny
    input not the smaller, as it happens): the plan says which is larger, and the real
    programs (real weights, real input) agree, byte for byte."""
    from jaxlin.analyses import ablation
    from jaxlin.plan import workload
    from jaxlin.run_config import AnalysisSection

    model = load_hf_model(tiny_model_dir("llama_gqa_untied"), jnp.float64)
    config, n = model.config, len(TOKENS)
    inputs = model_fns.embed(config, model.params, jnp.asarray(TOKENS))
    jacobian = linearize(model.params, inputs, config)
    planned, real = {}, {}
    for chunk in (2, 64):
        options = AnalysisSection(chunk=chunk, ablation=True, ordinary_jacobian=False)
        whole = plan(config, n, jnp.float64, workload(options, [ablation.ANALYSIS]))
        (program,) = programs_named(whole, "ablation").values()
        planned[chunk] = program.transient
        arguments = (jnp.asarray(TOKENS, jnp.int32), jacobian.output, jnp.zeros_like(inputs), jnp.asarray(0))
        chunked = ablation.edits_at_once(options, n)
        real[chunk] = sum(
            compiled_sizes(ablation._ablate.lower(model.params, *arguments, config, chunked).compile())
        )
    larger, smaller = sorted(planned, key=planned.get, reverse=True)
    assert planned[larger] > planned[smaller] and real[larger] > real[smaller]
    assert planned == real


def test_plan_command_lists_the_enabled_analyses_programs(tiny_model_dir, tmp_path, capsys):
    from test_cli import tiny_run_config, write_config

    from jaxlin.cli import main

    data = tiny_run_config(tmp_path, tiny_model_dir("llama_gqa_untied"))
    data["analysis"].update(
        ablation=True, ordinary_jacobian=False, layers={"enabled": True, "kinds": ["attention"]}
    )
    data["steering"] = {"enabled": True, "concept": "bridge", "prompt": "a", "max_new_tokens": 2}
    config = write_config(tmp_path / "run.yaml", **data)
    assert main(["plan", str(config), "--tokens", "12"]) == 0
    out = capsys.readouterr().out
    for name in (
        "linearize",
        "ablation: edited forwards",
        "layers cumulative attention: linearize",
        "layers cumulative attention: spectrum",
        "steering: linearize",
        "steering: greedy step",
    ):
        assert f"  {name} " in out, name
    assert "layers cumulative mlp" not in out and "ordinary" not in out


def test_the_memory_check_plans_on_the_run_mesh_and_every_process_refuses_together(
    tiny_model_dir, monkeypatch
):
    """`check_memory` compiles its plan on the ambient mesh; its verdict is every
    process's: a process whose own check passes refuses, naming the process that did not,
    and what each process sends the others is its own shortfall (MiB)."""
    from jaxlin import memory, runner
    from jaxlin.memory import InsufficientMemoryError
    from jaxlin.mesh import make_mesh
    from jaxlin.plan import Plan, ProgramMemory
    from jaxlin.run_config import AnalysisSection

    config = load_hf_model(tiny_model_dir("llama_gqa_untied"), jnp.float64).config
    options, mib, gib = AnalysisSection(), 2**20, 2**30
    meshes, sent = [], []
    others = [[0, 0, 0], [0, 0, 0]]

    def fake_plan(config, n, dtype, work, mesh, quantized=None):
        meshes.append(mesh)
        return Plan(n, "float64", 0, 0, (ProgramMemory("linearize", 0, 3 * mib, 0, 0),))

    def fake_gather(values):
        sent.append(list(values))
        return np.asarray([list(values), *others[1:]])

    monkeypatch.setattr(runner, "plan", fake_plan)
    monkeypatch.setattr(memory, "PLAN_OVERHEAD_BYTES", 0)
    monkeypatch.setattr(memory, "from_every_process", fake_gather)
    monkeypatch.setattr(memory, "available_bytes", lambda: 1 * mib)  # the formula says no
    mesh = make_mesh({"data": 1})
    with jax.set_mesh(mesh), pytest.raises(InsufficientMemoryError, match="compiled programs' plan"):
        runner.check_memory(config, 11, jnp.float64, options, [])
    assert meshes == [mesh] and sent == [[1, 3, 1]]
    with pytest.raises(InsufficientMemoryError):
        runner.check_memory(config, 11, jnp.float64, options, [])  # on no mesh: planned on none
    assert meshes[-1] is None
    # This process has room; process 1 has not: every process refuses, naming it.
    monkeypatch.setattr(memory, "available_bytes", lambda: 100 * gib)
    others[1] = [1, 5 * 1024, 2 * 1024]
    with pytest.raises(InsufficientMemoryError) as refused:
        runner.check_memory(config, 11, jnp.float64, options, [])
    assert str(refused.value).startswith(
        "process 1 of 2: the analysis of 11 tokens needs about 5.0 GiB but only 2.0 GiB is available"
    )
    assert sent[-1] == [0, 0, 0]
    others[1] = [0, 0, 0]
    runner.check_memory(config, 11, jnp.float64, options, [])  # every process has room


def test_steering_is_planned_for_its_prompts_and_refused_before_any_input(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """`jaxlin run` checks steering's own programs right after loading: planned for the
    concept's real token count (its tokenizer's), no input's J held; refused, it is one
    line and nothing is written."""
    from test_cli import tiny_run_config, write_config

    from jaxlin import memory, runner
    from jaxlin.cli import main
    from jaxlin.loading import load_model
    from jaxlin.plan import token_bound
    from jaxlin.tokens import tokenize

    data = tiny_run_config(tmp_path, tiny_model_dir("llama_gqa_untied"))
    data["steering"] = {"enabled": True, "concept": "bridge", "prompt": "a", "max_new_tokens": 2}
    plans = []
    monkeypatch.setattr(runner, "plan", lambda *args: plans.append(plan(*args)) or plans[-1])
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**10)
    assert main(["run", str(write_config(tmp_path / "run.yaml", **data)), "--quiet"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the loader's progress
    assert last.startswith("jaxlin: error: steering (compiled programs' plan) needs")
    assert not (tmp_path / "run").exists()
    (planned,) = plans
    assert planned.jacobian == 0 and all(p.name.startswith("steering") for p in planned.programs)
    rows = next(p for p in planned.programs if p.name == "steering: concept rows")
    loaded = load_model("hf", tiny_model_dir("llama_gqa_untied"), "float64", use_cache=False, progress=False)
    concept, d = len(tokenize(loaded.tokenizer, "bridge", None)), loaded.model.config.hidden_size
    assert rows.outputs == d * concept * d * 8 and concept < token_bound("bridge")


def test_plan_command_plans_a_length_study_per_prefix(tiny_model_dir, tmp_path, capsys):
    """A config with a length_study section is planned as the study measures each prefix:
    exact influence (J's rows, their spectrum and contributions) up to max_exact_tokens,
    sampled influence and Lanczos beyond."""
    from test_cli import tiny_run_config, write_config

    from jaxlin.cli import main

    data = tiny_run_config(tmp_path, tiny_model_dir("llama_gqa_untied"))
    del data["text"]
    data["length_study"] = {"document": "A short document.", "lengths": [6, 12], "max_exact_tokens": 8}
    config = write_config(tmp_path / "study.yaml", **data)
    assert main(["plan", str(config), "--tokens", "6", "12"]) == 0
    exact, sampled = capsys.readouterr().out.split("12 tokens")
    for name in ("rows", "top_k from rows", "length study: contributions"):
        assert f"  {name} " in exact and f"  {name} " not in sampled, name
    for name in ("lanczos", "length study: sampled influence", "length study: group contributions"):
        assert f"  {name} " in sampled and f"  {name} " not in exact, name
    assert "per-token" not in exact + sampled and "ordinary" not in exact + sampled


def test_every_process_of_a_length_study_keeps_the_same_lengths(tiny_model_dir, monkeypatch):
    """A length one process has no room for is skipped by every process (each would
    otherwise run a different list of lengths, and wait for the others in a collective)."""
    from jaxlin import memory
    from jaxlin.length_study import StudySettings, plan_lengths
    from jaxlin.run_config import parse_run_config

    config = load_hf_model(tiny_model_dir("llama_gqa_untied"), jnp.float64).config
    settings = StudySettings.from_config(parse_run_config({"length_study": {"lengths": [4, 8]}}), "study")
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**40)  # room here
    room_elsewhere = {4: [0, 0, 0], 8: [1, 7 * 1024, 3 * 1024]}  # process 1: none for length 8
    asked = []

    def fake_gather(values):
        asked.append(list(values))
        return np.asarray([list(values), room_elsewhere[4 * len(asked)]])

    monkeypatch.setattr(memory, "from_every_process", fake_gather)
    kept, skipped = plan_lengths([4, 8], 100, config, jnp.float64, settings)
    assert kept == [4] and asked == [[0, 0, 0], [0, 0, 0]]
    assert skipped == [
        {
            "length": 8,
            "reason": "process 1 of 2: length 8 needs about 7.0 GiB but only 3.0 GiB is available on its "
            "device; use a shorter input, a smaller analysis.chunk, or a machine with more memory",
        }
    ]


def test_a_length_study_refuses_a_length_by_the_plan_only_where_the_formula_says_no(
    tiny_model_dir, monkeypatch
):
    """A length the conservative formula has no room for is kept when the study's programs,
    compiled at that length on the run's mesh, fit (as `jaxlin run` decides for an input),
    and skipped, naming the plan, when they do not."""
    import jaxlin.plan
    from jaxlin import length_study, memory
    from jaxlin.mesh import make_mesh
    from jaxlin.run_config import parse_run_config

    config = load_hf_model(tiny_model_dir("llama_gqa_untied"), jnp.float64).config
    section = {"lengths": [16], "max_exact_tokens": 16}
    settings = length_study.StudySettings.from_config(parse_run_config({"length_study": section}), "study")
    formula = length_study._memory_estimate(config, 16, jnp.float64, settings)
    planned = plan(config, 16, jnp.float64, length_study.study_workload(settings, 16)).above_weights
    assert planned < formula  # the formula is the conservative one
    monkeypatch.setattr(memory, "PLAN_OVERHEAD_BYTES", 0)
    plans, real_plan = [], jaxlin.plan.plan

    def recorded_plan(*args):
        plans.append((args, real_plan(*args)))
        return plans[-1][1]

    monkeypatch.setattr(jaxlin.plan, "plan", recorded_plan)

    def with_free(free: int) -> tuple[list[int], list[dict]]:
        monkeypatch.setattr(memory, "available_bytes", lambda: free)
        return length_study.plan_lengths([16], 100, config, jnp.float64, settings, "Q4_0")

    assert with_free(10 * formula) == ([16], []) and plans == []  # the formula says yes: nothing compiled
    mesh = make_mesh({"data": 1})
    with jax.set_mesh(mesh):
        # The formula says no, the plan yes.
        assert with_free(int((formula + planned) / 2 / 0.9)) == ([16], [])
    ((_, n, _, work, on, quantized), result), *_ = plans
    assert (n, on, quantized) == (16, mesh, "Q4_0") and work.method == "rows"
    assert "length study: contributions" in [program.name for program in result.programs]
    kept, skipped = with_free(int(planned / 2))
    assert kept == [] and skipped[0]["reason"].startswith("length 16 (compiled programs' plan) needs about")


@pytest.mark.parametrize("variant", ["gemma3_sliding", "llama_gqa_untied"])
def test_a_plan_standing_in_for_an_accelerator_holds_no_float32_copy_of_bfloat16_weights(
    variant, tiny_model_dir
):
    """XLA's CPU backend computes bfloat16 dots in float32 and hoists every layer's weight
    conversion out of the layer scan; an accelerator computes in bfloat16. Compiled standing
    in for one, a bfloat16 program needs no more scratch than the float32 one (it did
    not before: 2.7–4.5× here); float32, float64 and quantized plans move by bytes."""
    config = load_hf_model(tiny_model_dir(variant), jnp.float64).config
    work = Workload(top_k=2, chunk=4, per_token="off")

    def temporaries(dtype, stand_in: bool, quantized=None) -> dict[str, int]:
        planned = plan(config, 16, dtype, work, None, quantized, stand_in)
        assert planned.stand_in == stand_in
        return {program.name: program.temporaries for program in planned.programs}

    single = temporaries(jnp.float32, False)
    standing, hoisted = temporaries(jnp.bfloat16, True), temporaries(jnp.bfloat16, False)
    for name, size in single.items():
        assert standing[name] <= size < hoisted[name], name
    for dtype, quantized in ((jnp.float32, None), (jnp.float64, None), (jnp.float32, "Q4_K")):
        run, stand = temporaries(dtype, False, quantized), temporaries(dtype, True, quantized)
        assert all(run[name] - 1024 <= stand[name] <= run[name] for name in run), (dtype, quantized)


def test_plan_command_stands_in_for_an_accelerator_only_for_other_hardware(tiny_model_dir, tmp_path):
    """`jaxlin plan --device-memory` on CPU plans for other hardware; without it, for this
    machine, compiled as its own run compiles (what `jaxlin run`'s refusal reads)."""
    from test_cli import tiny_run_config

    from jaxlin.plan import plan_run
    from jaxlin.run_config import parse_run_config

    data = tiny_run_config(tmp_path, tiny_model_dir("llama_gqa_untied"))
    data["model"]["dtype"] = "bfloat16"
    config = parse_run_config(data)
    here, there = plan_run(config, [8]), plan_run(config, [8], device_memory=80 * 10**9)
    assert [p.stand_in for p in here.plans] == [False] and [p.stand_in for p in there.plans] == [True]
    assert there.plans[0].peak < here.plans[0].peak
    assert "standing in for an accelerator" in there.text() and "standing in" not in here.text()
