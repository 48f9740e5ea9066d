"""The CLI end to end on tiny models, and its refusals of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxlin.cli import main


def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections))
    return path


def tiny_run_config(tmp_path: Path, model_dir: Path, **extra) -> dict:
    return {
        "model": {"source": "hf", "path": str(model_dir), "dtype": "float64", "cache": False},
        "text": "Hello, world! The bridge out of Marin.",
        "analysis": {"top_k": 4, "decode_top_tokens": 3},
        "output_dir": str(tmp_path / "run"),
        **extra,
    }


def test_run_writes_summary_arrays_and_plots(tmp_path, tiny_model_dir, capsys):
    config = write_config(
        tmp_path / "run.yaml", **tiny_run_config(tmp_path, tiny_model_dir("gemma3_sliding"))
    )
    assert main(["run", str(config), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "predicted" in out and "certificate" in out
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    for key in (
        "model",
        "text",
        "n_tokens",
        "dtype",
        "predicted_token",
        "predicted_token_id",
        "reconstruction_relative_error",
        "singular_values",
    ):
        assert key in summary, key
    assert summary["dtype"] == "float64"
    assert summary["reconstruction_relative_error"] <= 1e-12
    assert summary["ordinary_jacobian_relative_error"] > 1e-3
    assert len(summary["singular_values"]) == 4
    first_token = summary["per_token"]["top_left_vector"][0]
    assert len(first_token["right_vector_nearest_tokens"]) == 3 and len(first_token["tokens"]) == 3
    arrays = np.load(run / "arrays.npz")
    n, d = summary["n_tokens"], 64
    assert arrays["contributions"].shape == (n, d) and arrays["y"].shape == (d,)
    np.testing.assert_allclose(
        arrays["contributions"].sum(0), arrays["y"], rtol=0, atol=1e-12 * np.abs(arrays["y"]).max() * n
    )
    assert arrays["token_ids"].shape == (n,)
    assert (run / "reconstruction.png").stat().st_size > 10_000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]  # no staging left


def test_text_and_out_flags_override_the_config(tmp_path, tiny_model_dir):
    config = write_config(
        tmp_path / "run.yaml", **tiny_run_config(tmp_path, tiny_model_dir("llama_gqa_untied"))
    )
    assert main(["run", str(config), "--quiet", "--text", "abc", "--out", str(tmp_path / "other")]) == 0
    summary = json.loads((tmp_path / "other" / "summary.json").read_text())
    assert summary["text"] == "abc" and summary["n_tokens"] == 4  # BOS + 3 characters
    assert not (tmp_path / "run").exists()


def expect_refusal(capsys, tmp_path: Path, argv: list[str], *fragments: str) -> None:
    capsys.readouterr()  # drop what building the fixtures printed (HF's save progress bars)
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxlin: error:") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not (tmp_path / "run").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]


def test_unknown_config_key_is_named(tmp_path, tiny_model_dir, capsys):
    data = tiny_run_config(tmp_path, tiny_model_dir("llama_gqa_untied"))
    data["analysis"]["topk"] = 3
    config = write_config(tmp_path / "run.yaml", **data)
    expect_refusal(capsys, tmp_path, ["run", str(config)], "analysis.topk", "unknown key")


def test_bad_value_is_named(tmp_path, tiny_model_dir, capsys):
    data = tiny_run_config(tmp_path, tiny_model_dir("llama_gqa_untied"))
    data["model"]["dtype"] = "float16"
    config = write_config(tmp_path / "run.yaml", **data)
    expect_refusal(capsys, tmp_path, ["run", str(config)], "model.dtype")


def test_more_devices_than_available_are_refused(tmp_path, tiny_model_dir, capsys):
    data = tiny_run_config(tmp_path, tiny_model_dir("llama_gqa_untied"))
    data["devices"] = 64
    config = write_config(tmp_path / "run.yaml", **data)
    expect_refusal(capsys, tmp_path, ["run", str(config)], "devices: 64 requested", "available")


def test_empty_text_is_refused(tmp_path, tiny_model_dir, capsys):
    config = write_config(
        tmp_path / "run.yaml", **tiny_run_config(tmp_path, tiny_model_dir("llama_gqa_untied"))
    )
    expect_refusal(capsys, tmp_path, ["run", str(config), "--text", "   "], "text", "empty")


def test_missing_config_file_is_named(tmp_path, capsys):
    expect_refusal(capsys, tmp_path, ["run", str(tmp_path / "nope.yaml")], "nope.yaml")


def test_missing_checkpoint_file_is_named(tmp_path, tiny_model_dir, capsys):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama_gqa_untied"), broken)
    (broken / "model.safetensors").unlink()
    config = write_config(tmp_path / "run.yaml", **tiny_run_config(tmp_path, broken))
    expect_refusal(capsys, tmp_path, ["run", str(config)], "safetensors")
    data = tiny_run_config(tmp_path, tmp_path / "absent.gguf")
    data["model"]["source"] = "gguf"
    config = write_config(tmp_path / "run.yaml", **data)
    expect_refusal(capsys, tmp_path, ["run", str(config)], "absent.gguf")


def test_checkpoint_missing_a_tensor_is_named(tmp_path, tiny_model_dir, capsys):
    from safetensors.numpy import load_file, save_file

    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama_gqa_untied"), broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    config = write_config(tmp_path / "run.yaml", **tiny_run_config(tmp_path, broken))
    expect_refusal(capsys, tmp_path, ["run", str(config)], "model.layers.1.mlp.up_proj.weight", "missing")


def test_misshaped_tensor_is_named(tmp_path, tiny_model_dir, capsys):
    from safetensors.numpy import load_file, save_file

    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama_gqa_untied"), broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:-1]
    save_file(tensors, broken / "model.safetensors")
    config = write_config(tmp_path / "run.yaml", **tiny_run_config(tmp_path, broken))
    expect_refusal(capsys, tmp_path, ["run", str(config)], "model.layers.0.self_attn.k_proj.weight", "shape")


def test_unsupported_hf_architecture_lists_supported(tmp_path, tiny_model_dir, capsys):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama_gqa_untied"), broken)
    config_json = json.loads((broken / "config.json").read_text())
    config_json["model_type"] = "gpt_neox"
    config_json["architectures"] = ["GPTNeoXForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config_json))
    config = write_config(tmp_path / "run.yaml", **tiny_run_config(tmp_path, broken))
    expect_refusal(capsys, tmp_path, ["run", str(config)], "gpt_neox", "gemma3_text", "llama", "qwen3")


def test_unsupported_gguf_architecture_is_refused(tmp_path, capsys):
    import gguf

    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = tiny_run_config(tmp_path, path)
    data["model"]["source"] = "gguf"
    config = write_config(tmp_path / "run.yaml", **data)
    expect_refusal(capsys, tmp_path, ["run", str(config)], "mamba", "gemma3")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_run_in_lower_precisions(tmp_path, tiny_model_dir, dtype):
    data = tiny_run_config(tmp_path, tiny_model_dir("qwen3_sliding"))
    data["model"]["dtype"] = dtype
    config = write_config(tmp_path / "run.yaml", **data)
    assert main(["run", str(config), "--quiet"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dtype"] == dtype
    assert summary["reconstruction_relative_error"] <= (1e-5 if dtype == "float32" else 0.1)


def test_input_too_long_for_memory_is_refused_up_front(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import jaxlin.memory

    monkeypatch.setattr(jaxlin.memory, "available_bytes", lambda: 2**20)
    config = write_config(
        tmp_path / "run.yaml", **tiny_run_config(tmp_path, tiny_model_dir("llama_gqa_untied"))
    )
    expect_refusal(capsys, tmp_path, ["run", str(config)], "needs about", "GiB", "available")


def test_spectral_options_are_validated(tmp_path, tiny_model_dir, capsys):
    data = tiny_run_config(tmp_path, tiny_model_dir("llama_gqa_untied"))
    data["analysis"]["top_k"] = 65  # d = 64
    config = write_config(tmp_path / "run.yaml", **data)
    expect_refusal(capsys, tmp_path, ["run", str(config)], "top_k=65")
    data["analysis"]["top_k"] = 4
    data["analysis"]["tolerance"] = 0
    config = write_config(tmp_path / "run.yaml", **data)
    expect_refusal(capsys, tmp_path, ["run", str(config)], "analysis.tolerance")


def test_projected_per_token_and_dense_methods(tmp_path, tiny_model_dir):
    data = tiny_run_config(tmp_path, tiny_model_dir("gemma3_sliding"))
    data["analysis"]["per_token"] = {"method": "projected", "rank": 16, "top_k": 2}
    config = write_config(tmp_path / "run.yaml", **data)
    assert main(["run", str(config), "--quiet"]) == 0
    lanczos = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert lanczos["per_token"]["method"] == "projected"
    assert "Hutchinson" in lanczos["norms"]["frobenius_method"]
    data["analysis"]["method"] = "dense"
    config = write_config(tmp_path / "run.yaml", **data)
    assert main(["run", str(config), "--quiet", "--overwrite"]) == 0
    dense = json.loads((tmp_path / "run" / "summary.json").read_text())
    np.testing.assert_allclose(lanczos["singular_values"], dense["singular_values"], rtol=1e-10)
    arrays = np.load(tmp_path / "run" / "arrays.npz")
    assert arrays["per_token_S"].shape == (dense["n_tokens"], 2)


class Interrupted(Exception):
    """Stands for a kill (Ctrl-C, OOM, pre-emption) in the middle of a run."""


def test_many_prompts_resume_after_an_interruption(tmp_path, tiny_model_dir, monkeypatch):
    import jaxlin.many_prompts

    texts = ["The bridge.", "Golden Gate!", "A painting of the"]
    data = tiny_run_config(tmp_path, tiny_model_dir("gemma3_sliding"))
    del data["text"]
    data["texts"] = texts
    data["analysis"]["layers"] = {"enabled": True, "kinds": ["residual"], "top_k": 2}
    config = write_config(tmp_path / "run.yaml", **data)
    reference_out = tmp_path / "uninterrupted"
    assert main(["run", str(config), "--quiet", "--out", str(reference_out)]) == 0

    real_analyse = jaxlin.many_prompts.analyse
    calls = []

    def failing_analyse(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise Interrupted  # the run dies while on the second prompt
        return real_analyse(*args, **kwargs)

    monkeypatch.setattr(jaxlin.many_prompts, "analyse", failing_analyse)
    with pytest.raises(Interrupted):
        main(["run", str(config), "--quiet"])
    run = tmp_path / "run"
    assert (run / "prompts" / "0000" / "summary.json").is_file()
    assert not (run / "prompts" / "0001").exists()  # no partial prompt directory
    first_written = (run / "prompts" / "0000" / "summary.json").stat().st_mtime_ns

    calls.clear()

    def recording_analyse(*args, **kwargs):
        calls.append(args[1])
        return real_analyse(*args, **kwargs)

    monkeypatch.setattr(jaxlin.many_prompts, "analyse", recording_analyse)
    assert main(["run", str(config), "--quiet"]) == 0
    assert calls == texts[1:]  # the completed prompt is not recomputed
    assert (run / "prompts" / "0000" / "summary.json").stat().st_mtime_ns == first_written
    resumed = json.loads((run / "summary.json").read_text())
    reference = json.loads((reference_out / "summary.json").read_text())
    assert resumed["prompts_reused"] == 1
    assert [r["predicted_token"] for r in resumed["prompts"]] == [
        r["predicted_token"] for r in reference["prompts"]
    ]
    np.testing.assert_allclose(
        [r["stable_rank"] for r in resumed["prompts"]],
        [r["stable_rank"] for r in reference["prompts"]],
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        [r["stable_rank"] for r in resumed["layers"]],
        [r["stable_rank"] for r in reference["layers"]],
        rtol=1e-12,
    )
    for i in range(3):
        a = np.load(run / "prompts" / f"{i:04d}" / "arrays.npz")
        b = np.load(reference_out / "prompts" / f"{i:04d}" / "arrays.npz")
        np.testing.assert_allclose(a["contributions"], b["contributions"], rtol=1e-12, atol=1e-15)
    assert (run / "report.html").is_file() and (run / "prompts" / "0002" / "report.html").is_file()


def test_layers_and_steering_reach_summary_and_report(tmp_path, tiny_model_dir):
    from html.parser import HTMLParser

    data = tiny_run_config(tmp_path, tiny_model_dir("llama_gqa_untied"))
    data["analysis"]["layers"] = {"enabled": True, "kinds": ["residual", "mlp"], "local": True}
    data["steering"] = {
        "enabled": True,
        "concept": "Golden Gate",
        "prompt": "A painting of",
        "lambdas": [0, 4],
        "max_new_tokens": 4,
    }
    config = write_config(tmp_path / "run.yaml", **data)
    assert main(["run", str(config), "--quiet"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(summary["layers"]) == 2 * 2 * 2  # kinds × scopes × layers
    assert all(r["reconstruction_relative_error"] <= 1e-12 for r in summary["layers"])
    for row in summary["layers"]:  # every tap's top-3 right vectors, decoded
        assert len(row["right_vectors"]) == 3
        for entry in row["right_vectors"]:
            assert len(entry["nearest_tokens"]) == 3 and entry["relative_residual"] <= 1e-10
            assert 0 <= entry["dominant_position"] < summary["n_tokens"]
        assert ("residual stream" in row["right_vector_space"]) == (row["scope"] == "local")
    report_text = (tmp_path / "run" / "report.html").read_text()
    assert "v₁: nearest embedding rows" in report_text and "residual stream entering the layer" in report_text
    assert [r["lambda"] for r in summary["steering"]["runs"]] == [0.0, 4.0]

    class Sections(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.ids: set[str] = set()
            self.images = 0

        def handle_starttag(self, tag, attrs):
            attributes = dict(attrs)
            if tag == "section":
                self.ids.add(attributes.get("id", ""))
            if tag == "img" and attributes.get("src", "").startswith("data:image/png;base64,"):
                self.images += 1

    parser = Sections()
    parser.feed((tmp_path / "run" / "report.html").read_text())
    for section in (
        "overview",
        "certificate",
        "reconstruction",
        "spectrum",
        "per-token",
        "layers",
        "steering",
        "config",
        "timings",
    ):
        assert section in parser.ids, section
    assert parser.images == len(list((tmp_path / "run").glob("*.png")))
