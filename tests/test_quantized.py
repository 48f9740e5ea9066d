"""Quantized weights kept quantized (jaxlin/quantized.py, converters/gguf/quantized.py).

Three kinds of evidence: the device dequantization equals gguf's numpy one bit for bit
on random blocks of every kept type; tiny GGUF files of every family with a GGUF
architecture, written the way llama.cpp's converter writes them but with quantized
matrices (mixed types across layers, as llama.cpp's K-quant mixes do), give the same y,
contributions, bias term, certificate and top-k σ kept quantized as dequantized at load
(float64); and a linearization of a quantized model holds the quantized leaves, not a
float copy of the weights.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_gguf import (
    F16,
    F32,
    HF_CONFIGS,
    llama_cpp_convert,
    tiny_checkpoint,
    tiny_hf_model,
    write_gguf,
    write_llama_cpp_gguf,
)

from converters.gguf import read_gguf, read_gguf_state_dict
from converters.gguf.quantized import DECODERS, quantized_matrix
from converters.gguf_model import load_gguf_model
from jaxlin import model as model_fns
from jaxlin.jacobian import linearize
from jaxlin.operator import certify, contributions
from jaxlin.quantized import (
    QuantizedArray,
    dequantize,
    dequantized_params,
    is_quantized,
    param_value,
    params_nbytes,
    stack,
    widen,
)
from jaxlin.spectral import top_k

Q = gguf.GGMLQuantizationType
# Byte ranges of each type's float16 fields inside one block (d, and dmin/m where present).
F16_FIELDS: dict[Q, tuple[slice, ...]] = {
    Q.Q8_0: (slice(0, 2),),
    Q.Q4_0: (slice(0, 2),),
    Q.Q4_1: (slice(0, 2), slice(2, 4)),
    Q.Q5_0: (slice(0, 2),),
    Q.Q5_1: (slice(0, 2), slice(2, 4)),
    Q.Q4_K: (slice(0, 2), slice(2, 4)),
    Q.Q5_K: (slice(0, 2), slice(2, 4)),
    Q.Q6_K: (slice(-2, None),),
}
BLOCK_32 = [Q.Q4_0, Q.Q8_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
BLOCK_256 = [Q.Q4_K, Q.Q6_K, Q.Q5_K]
TOKENS = [3, 17, 5, 42, 8, 11, 2, 29, 14]


def random_blocks(
    qtype: Q, rows: int, cols: int, rng: np.random.Generator, scale: float = 1.0, signed: bool = True
) -> np.ndarray:
    """(rows, bytes per row) random blocks of `qtype` whose float16 fields are finite:
    uniform in ±scale (or [0, scale]), with some exact zeros and negative zeros."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // block_size, type_size), dtype=np.uint8)
    for field in F16_FIELDS[qtype]:
        values = rng.uniform(-scale if signed else 0.0, scale, len(blocks)).astype(np.float16)
        values[::7] = 0.0
        values[3::11] = -0.0 if signed else 0.0
        blocks[:, field] = values.view(np.uint8).reshape(len(blocks), 2)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", list(DECODERS), ids=lambda qtype: qtype.name)
def test_dequantize_equals_gguf_bit_for_bit(qtype: Q) -> None:
    rng = np.random.default_rng(int(qtype))
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    raw = random_blocks(qtype, 8, 3 * block_size, rng, scale=1e3)
    expected = gguf.quants.dequantize(raw, qtype)
    weight = quantized_matrix(raw, qtype)
    got = np.asarray(jax.jit(dequantize)(weight))
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    # Widened to int8 codes in groups of 16 with an offset (a stack of mixed layers).
    wide = widen(weight, 16, with_offset=True)
    assert (wide.bits, wide.group, wide.code_offset) == (8, 16, 0) and wide.offset is not None
    np.testing.assert_array_equal(np.asarray(dequantize(wide)).view(np.uint32), expected.view(np.uint32))


def test_kept_layouts_are_the_checkpoint_size_or_close() -> None:
    rng = np.random.default_rng(0)
    for qtype, bits_per_value in {Q.Q4_0: 5, Q.Q4_1: 6, Q.Q4_K: 6, Q.Q8_0: 9, Q.Q6_K: 10}.items():
        block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
        weight = quantized_matrix(random_blocks(qtype, 4, block_size, rng), qtype)
        assert weight.nbytes * 8 == bits_per_value * 4 * block_size, qtype.name


def test_stacking_mixed_types_widens_to_one_exact_layout() -> None:
    rng = np.random.default_rng(1)
    raws = {qtype: random_blocks(qtype, 4, 512, rng) for qtype in (Q.Q4_K, Q.Q6_K, Q.Q8_0)}
    layers = [quantized_matrix(raw, qtype) for qtype, raw in raws.items()]
    stacked = stack(layers)
    assert stacked.codes.shape == (3, 4, 512) and stacked.group == 16 and stacked.offset is not None
    values = np.asarray(dequantize(stacked))
    for layer, (qtype, raw) in enumerate(raws.items()):
        np.testing.assert_array_equal(values[layer], gguf.quants.dequantize(raw, qtype))
    alike = stack([quantized_matrix(raws[Q.Q4_K], Q.Q4_K)] * 2)
    assert alike.bits == 4 and alike.codes.shape == (2, 4, 256)  # same type: kept as it is


def test_transpose_and_row_slices_follow_numpy() -> None:
    raw = random_blocks(Q.Q4_1, 6, 64, np.random.default_rng(2))
    weight = quantized_matrix(raw, Q.Q4_1)
    full = gguf.quants.dequantize(raw, Q.Q4_1)
    assert weight.shape == (6, 64) and weight.T.shape == (64, 6)
    np.testing.assert_array_equal(np.asarray(param_value(weight.T)), full.T)
    rows = np.take(weight, np.arange(2, 5), axis=0)  # numpy calls the array's own `take`
    np.testing.assert_array_equal(np.asarray(param_value(rows)), full[2:5])
    np.testing.assert_array_equal(np.asarray(param_value(np.take(weight.T, [1, 4], axis=1))), full[[1, 4]].T)
    with pytest.raises(ValueError, match="rows"):
        np.take(weight, [0, 1], axis=1)  # columns would cut through blocks


# --------------------------------------------------------------------------- tiny GGUF files


def quantized_blocks(values: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """The matrix quantized to `qtype` (gguf's numpy quantizer) or, for the K-quants gguf
    cannot quantize, random blocks with small scales (the values need not be the HF ones:
    both load paths read the same file)."""
    if qtype in BLOCK_32:
        return gguf.quants.quantize(np.ascontiguousarray(values, np.float32), qtype)
    return random_blocks(qtype, values.shape[0], values.shape[1], rng, scale=2e-3, signed=False)


def quantize_matrices(tensors: dict[str, tuple[np.ndarray, Any]], seed: int, encode: bool = True) -> dict:
    """Every matrix quantized: even-numbered leaves one type in every layer, odd ones a
    different type per layer (mixed stacks), K-quants where the rows allow 256-blocks.
    `encode=False`: only the types (for a writer that quantizes itself)."""
    rng = np.random.default_rng(seed)
    out = {}
    for index, (name, (values, qtype)) in enumerate(tensors.items()):
        if values.ndim == 2 and values.shape[1] % 32 == 0:
            choices = BLOCK_256 if values.shape[1] % 256 == 0 else BLOCK_32
            layer = int(name.split(".")[1]) if name.startswith("blk.") else 0
            qtype = choices[(index + (layer if index % 2 else 0)) % len(choices)]
            values = quantized_blocks(values, qtype, rng) if encode else values
        out[name] = (values, qtype)
    return out


GGUF_FAMILIES = ["llama", "qwen2", "qwen3", "gemma2", "phi3", "olmo2", "gpt2"]
WIDE = dict(hidden_size=256, intermediate_size=512)


@pytest.fixture(scope="module")
def torch() -> Any:
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def quantized_gguf(tmp_path_factory: pytest.TempPathFactory, torch: Any) -> Any:
    built: dict[str, Path] = {}

    def build(arch: str) -> Path:
        if arch in built:
            return built[arch]
        directory = tmp_path_factory.mktemp(f"quantized-{arch}")
        if arch == "qwen3":  # written by test_gguf's own llama.cpp-style writer
            tensors, _, head_dim = tiny_checkpoint(arch)
            tensors = {
                name: (values, F32 if qtype == F16 else qtype) for name, (values, qtype) in tensors.items()
            }
            tensors = quantize_matrices(tensors, 0, encode=False)
            path = write_gguf(directory / "q.gguf", arch, tensors, None, head_dim, "qwen2")
        else:
            if arch == "gpt2":
                fields = {**HF_CONFIGS["gpt2"], "n_embd": 256}
            elif arch == "llama":
                fields = {**HF_CONFIGS["qwen2"], **WIDE, "head_dim": 64}
                fields.pop("rope_theta")
            else:
                fields = {**HF_CONFIGS[arch], **WIDE}
            model, hf = tiny_hf_model(arch, torch, fields)
            tensors = quantize_matrices(llama_cpp_convert(arch, model.config, hf), 0)
            path = write_llama_cpp_gguf(directory / "q.gguf", arch, model.config, tensors)
        built[arch] = path
        return path

    return build


def analysis(model: Any) -> dict[str, np.ndarray]:
    config, params = model.config, model.params
    inputs = model_fns.embed(config, params, jnp.asarray(TOKENS))
    jacobian = linearize(params, inputs, config)
    c = contributions(jacobian)
    logits = jax.jit(lambda h: model_fns.logits(config, params, h))
    certificate = certify(jacobian.output, c, logits, jacobian.bias)
    triplets = top_k(jacobian, 2, tolerance=1e-4)  # loose: both paths run the same iterations
    return {
        "inputs": np.asarray(inputs),
        "y": np.asarray(jacobian.output),
        "bias": np.asarray(jacobian.bias),
        "contributions": np.asarray(c),
        "certificate": np.asarray(certificate.relative_error),
        "logits": np.asarray(logits(jacobian.output)),
        "sigma": np.asarray(triplets.S),
    }


@pytest.mark.parametrize("arch", GGUF_FAMILIES)
def test_kept_quantized_equals_dequantized_at_load(quantized_gguf: Any, arch: str) -> None:
    file = read_gguf(quantized_gguf(arch))
    types = {tensor.tensor_type for tensor in file.tensors if len(tensor.shape) == 2}
    assert types & set(DECODERS) and not types & {F32, F16}, "every matrix of the file is quantized"
    kept = load_gguf_model(file, jnp.float64, keep_quantized=True)
    loaded = load_gguf_model(file, jnp.float64)
    quantized = [
        leaf for leaf in jax.tree_util.tree_leaves(kept.params, is_leaf=is_quantized) if is_quantized(leaf)
    ]
    assert quantized and all(leaf.dtype == jnp.float64 for leaf in quantized)
    assert params_nbytes(kept.params) < params_nbytes(loaded.params) / 3
    # The same float params, every leaf bit for bit ...
    same = jax.tree_util.tree_map(
        lambda a, b: a.shape == b.shape and bool(jnp.all(a == b)),
        dequantized_params(kept.params),
        loaded.params,
    )
    assert all(jax.tree_util.tree_leaves(same)), same
    # ... and the same analysis.
    ours, reference = analysis(kept), analysis(loaded)
    for name, value in reference.items():
        scale = max(float(np.max(np.abs(value))), 1e-300)
        assert float(np.max(np.abs(ours[name] - value))) <= 1e-12 * scale, name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_state_dict_quantized_matrices_are_the_dequantized_ones(quantized_gguf: Any, arch: str) -> None:
    """HF names and layouts: the unpermuted q/k rows (Llama), GPT-2's transposed Conv1D."""
    path = quantized_gguf(arch)
    kept = read_gguf_state_dict(path, keep_quantized=True)
    loaded = read_gguf_state_dict(path)
    assert kept.keys() == loaded.keys()
    assert any(is_quantized(value) and value.transposed for value in kept.values()) == (arch == "gpt2")
    for name, value in kept.items():
        if is_quantized(value):
            np.testing.assert_array_equal(np.asarray(param_value(value)), loaded[name], err_msg=name)
        else:
            np.testing.assert_array_equal(value, loaded[name], err_msg=name)


def test_linearization_holds_the_quantized_leaves_not_float_weights(quantized_gguf: Any) -> None:
    # The dequantization runs inside jax.checkpoint: J·v / Jᵀ·u dequantize again, so the
    # residuals are the quantized params themselves (held by reference) and the same
    # N-dependent values as the dequantized model's, never a float copy of a matrix.
    path = quantized_gguf("llama")

    def residuals(keep_quantized: bool) -> tuple[Any, list, list]:
        model = load_gguf_model(path, jnp.float64, keep_quantized=keep_quantized)
        inputs = model_fns.embed(model.config, model.params, jnp.asarray(TOKENS))
        jacobian = linearize(model.params, inputs, model.config)
        own = {leaf.unsafe_buffer_pointer() for leaf in jax.tree_util.tree_leaves(model.params)}
        leaves = jax.tree_util.tree_leaves(jacobian.linear)
        referred = [leaf for leaf in leaves if leaf.unsafe_buffer_pointer() in own]
        fresh = [leaf for leaf in leaves if leaf.unsafe_buffer_pointer() not in own]
        return (model, jacobian), referred, fresh

    (model, jacobian), referred, fresh = residuals(keep_quantized=True)
    _, float_referred, float_fresh = residuals(keep_quantized=False)
    assert {leaf.dtype for leaf in referred} >= {np.dtype(np.int8), np.dtype(np.uint8)}
    matrices = {param_value(leaf).shape for leaf in quantized_params(model.params)}
    for leaf in fresh:
        assert leaf.dtype == jnp.float64 and leaf.shape not in matrices, leaf.shape
    assert sum(leaf.nbytes for leaf in fresh) <= sum(leaf.nbytes for leaf in float_fresh)
    assert sum(leaf.nbytes for leaf in referred) < sum(leaf.nbytes for leaf in float_referred) / 3
    v = jax.random.normal(jax.random.key(2), jacobian.inputs.shape, jnp.float64)
    u = jax.random.normal(jax.random.key(3), jacobian.output.shape, jnp.float64)
    np.testing.assert_allclose(jnp.vdot(u, jacobian.matvec(v)), jnp.vdot(jacobian.rmatvec(u), v), rtol=1e-12)


def quantized_params(params: Any) -> list[QuantizedArray]:
    return [leaf for leaf in jax.tree_util.tree_leaves(params, is_leaf=is_quantized) if is_quantized(leaf)]


def test_quantized_array_is_a_pytree_that_jit_and_slicing_keep() -> None:
    weight = stack([quantized_matrix(random_blocks(Q.Q4_K, 2, 256, np.random.default_rng(3)), Q.Q4_K)] * 3)
    weight = jax.tree_util.tree_map(jnp.asarray, weight)
    sliced = jax.tree_util.tree_map(lambda leaf: leaf[1:2], weight)
    assert isinstance(sliced, QuantizedArray) and sliced.shape == (1, 2, 256)
    np.testing.assert_array_equal(jax.jit(dequantize)(sliced), dequantize(weight)[1:2])
    assert dataclasses.replace(weight, dtype=jnp.float64).dtype == jnp.float64


def test_cache_entries_keep_quantized_and_float_apart(quantized_gguf: Any, tmp_path: Path) -> None:
    from jaxlin.loading import load_model

    path = quantized_gguf("qwen3")
    first = load_model("gguf", path, "float64", cache_dir=tmp_path, progress=False, quantized=True)
    again = load_model("gguf", path, "float64", cache_dir=tmp_path, progress=False, quantized=True)
    assert not first.from_cache and again.from_cache
    assert jax.tree_util.tree_structure(again.model.params) == jax.tree_util.tree_structure(
        first.model.params
    )
    for ours, theirs in zip(
        quantized_params(again.model.params), quantized_params(first.model.params), strict=True
    ):
        assert ours.dtype == jnp.float64
        np.testing.assert_array_equal(dequantize(ours), dequantize(theirs))
    floats = load_model("gguf", path, "float64", cache_dir=tmp_path, progress=False)
    assert not floats.from_cache and not quantized_params(floats.model.params)  # its own entry
    assert len(list((tmp_path / "params").iterdir())) == 2
    assert load_model("gguf", path, "float64", cache_dir=tmp_path, progress=False, quantized=True).from_cache


def test_quantized_is_refused_for_hf_sources() -> None:
    from pydantic import ValidationError

    from jaxlin.run_config import ModelSection

    assert ModelSection(source="gguf", path="model.gguf", quantized=True).quantized
    with pytest.raises(ValidationError, match="GGUF sources only"):
        ModelSection(source="hf", path="some/model", quantized=True)


# --------------------------------------------------------------------------- the real models
#
# Gemma 3 270M (Q4_K_M: Q8_0 embedding; Q5_0, Q8_0, Q4_K and Q6_K matrices, ffn_down and
# attn_v mixing two types across layers) and SmolLM2-135M (Q4_1, Q8_0 embedding).

REAL_TEXTS = {"gemma": "The bridge out of Marin is the Golden", "smollm2": "The capital of France is"}


@pytest.mark.slow
@pytest.mark.parametrize("which", ["gemma", "smollm2"])
def test_real_model_kept_quantized_equals_dequantized_float32(
    request: pytest.FixtureRequest, which: str
) -> None:
    from converters.gguf import load_gguf_tokenizer

    file = read_gguf(request.getfixturevalue(f"{which}_gguf_path"))
    kept = load_gguf_model(file, jnp.float32, keep_quantized=True)
    loaded = load_gguf_model(file, jnp.float32)
    types = {leaf.bits for leaf in quantized_params(kept.params)}
    assert types and params_nbytes(kept.params) < params_nbytes(loaded.params) / 3
    tokenizer = load_gguf_tokenizer(file)
    ids = [tokenizer.bos_token_id, *tokenizer.encode(REAL_TEXTS[which], add_special_tokens=False)]
    results = []
    for model in (kept, loaded):
        config, params = model.config, model.params
        inputs = model_fns.embed(config, params, jnp.asarray(ids))
        jacobian = linearize(params, inputs, config)
        c = contributions(jacobian)
        certificate = certify(jacobian.output, c, functools.partial(model_fns.logits, config, params))
        results.append((inputs, jacobian.output, c, certificate, top_k(jacobian, 4).S))
    (x, y, c, certificate, sigma), (x0, y0, c0, certificate0, sigma0) = results
    for ours, reference in ((x, x0), (y, y0), (c, c0), (sigma, sigma0)):
        reference = np.asarray(reference, np.float64)
        assert np.linalg.norm(np.asarray(ours, np.float64) - reference) <= 1e-6 * np.linalg.norm(reference)
    assert certificate.predicted_token_id == certificate0.predicted_token_id
    assert certificate.argmax_matches and certificate0.argmax_matches
    assert abs(certificate.relative_error - certificate0.relative_error) <= 1e-6


# --------------------------------------------------------------------------- sharded and planned
#
# A tiny Llama GGUF whose matrices keep several layouts, for the mesh tests of
# tests/test_shards.py and the plan below: Q4_K (4-bit codes with offsets), Q4_0, Q4_1,
# Q8_0, attn_v Q4_K in layer 0 and Q8_0 in layer 1 (stacked in a widened layout), and an
# MLP width of 96 (3 groups of 32): no tensor split of ffn_down's columns holds whole groups.

MIXED_HIDDEN, MIXED_HEADS, MIXED_KV_HEADS, MIXED_FFN, MIXED_LAYERS = 256, 4, 2, 96, 2


def mixed_layout_tensors(seed: int = 0) -> dict[str, tuple[np.ndarray, Q]]:
    """llama.cpp name → (stored data: float32 values, or the raw blocks of a K-quant, which
    gguf cannot quantize; its type)."""
    from test_gguf import VOCAB

    rng = np.random.default_rng(seed)
    d, head_dim = MIXED_HIDDEN, MIXED_HIDDEN // MIXED_HEADS

    def matrix(rows: int, cols: int, qtype: Q) -> tuple[np.ndarray, Q]:
        if qtype == Q.Q4_K:
            return random_blocks(qtype, rows, cols, rng, scale=2e-3, signed=False), qtype
        return (0.1 * rng.standard_normal((rows, cols))).astype(np.float32), qtype

    def norm() -> tuple[np.ndarray, Q]:
        return (1 + 0.1 * rng.standard_normal(d)).astype(np.float32), F32

    tensors = {
        "token_embd.weight": matrix(VOCAB, d, Q.Q8_0),
        "output_norm.weight": norm(),
        "output.weight": matrix(VOCAB, d, Q.Q4_K),
    }
    for layer in range(MIXED_LAYERS):
        blk = f"blk.{layer}."
        tensors |= {
            blk + "attn_norm.weight": norm(),
            blk + "ffn_norm.weight": norm(),
            blk + "attn_q.weight": matrix(MIXED_HEADS * head_dim, d, Q.Q4_K),
            blk + "attn_k.weight": matrix(MIXED_KV_HEADS * head_dim, d, Q.Q4_0),
            blk + "attn_v.weight": matrix(MIXED_KV_HEADS * head_dim, d, Q.Q8_0 if layer else Q.Q4_K),
            blk + "attn_output.weight": matrix(d, MIXED_HEADS * head_dim, Q.Q4_1),
            blk + "ffn_gate.weight": matrix(MIXED_FFN, d, Q.Q4_0),
            blk + "ffn_up.weight": matrix(MIXED_FFN, d, Q.Q8_0),
            blk + "ffn_down.weight": matrix(d, MIXED_FFN, Q.Q8_0),
        }
    return tensors


def write_mixed_layout_gguf(path: Path) -> Path:
    from test_gguf import add_byte_level_tokenizer

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(MIXED_HIDDEN)
    writer.add_block_count(MIXED_LAYERS)
    writer.add_feed_forward_length(MIXED_FFN)
    writer.add_head_count(MIXED_HEADS)
    writer.add_head_count_kv(MIXED_KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(MIXED_HIDDEN // MIXED_HEADS)
    add_byte_level_tokenizer(writer, "llama-bpe")
    for name, (values, qtype) in mixed_layout_tensors().items():
        if qtype == F32:
            writer.add_tensor(name, values)
        else:
            raw = values if values.dtype == np.uint8 else gguf.quants.quantize(values, qtype)
            writer.add_tensor(name, raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_plan_of_a_quantized_gguf_reads_its_layouts_not_its_weights(tmp_path, monkeypatch, capsys):
    """`jaxlin plan` on a GGUF with `model.quantized: true` plans the file's own layouts
    (mixed layers widened as loading widens them), read from the header alone: its planned
    weights are the loaded quantized params' bytes, and no block is decoded."""
    import yaml

    from converters.gguf_model import gguf_quantized_layouts
    from converters.lazy import LazyTensor
    from converters.lazy_quantized import LazyQuantized
    from jaxlin.cli import main
    from jaxlin.plan import plan_run
    from jaxlin.quantized import layouts
    from jaxlin.run_config import load_run_config

    path = write_mixed_layout_gguf(tmp_path / "mixed.gguf")
    loaded = load_gguf_model(path, jnp.float64, keep_quantized=True)
    recorded = gguf_quantized_layouts(path)
    assert recorded == layouts(loaded.params) and len(recorded) == 9
    assert recorded["['layers']['attn']['v_proj']['kernel']"]["bits"] == 8  # Q4_K and Q8_0 layers

    def tripwire(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("jaxlin plan decoded a weight")

    monkeypatch.setattr(LazyQuantized, "read", tripwire)
    monkeypatch.setattr(LazyTensor, "__getitem__", tripwire)
    model = {"source": "gguf", "path": str(path), "dtype": "float64", "quantized": True, "cache": False}
    run = str(tmp_path / "run")
    data = {"model": model, "text": "the theme", "analysis": {"top_k": 2}, "output_dir": run}
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(data))
    report = plan_run(load_run_config(config_path), [12])
    (planned,) = report.plans
    assert planned.weights == params_nbytes(loaded.params) and planned.quantized == "the GGUF's own"
    assert "planned as float" not in report.architecture
    assert main(["plan", str(config_path), "--tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "model.quantized: the GGUF's own block layouts" in out and "weights (the GGUF's own layout)" in out


def test_quantized_specs_follow_the_float_param_and_keep_groups_whole(tmp_path):
    """On abstract meshes: a quantized param's leaves are split as its float param along
    the matrix's rows and columns (a Flax kernel is the transpose of the stored matrix),
    the columns only where each shard holds whole groups of 32."""
    from jax.sharding import AbstractMesh, AxisType
    from jax.sharding import PartitionSpec as P

    from converters.gguf_model import gguf_quantized_layouts
    from jaxlin.mesh import param_specs
    from jaxlin.model_source import read_model_config
    from jaxlin.plan import abstract_params
    from jaxlin.run_config import ModelSection

    path = write_mixed_layout_gguf(tmp_path / "mixed.gguf")
    config = read_model_config(ModelSection(source="gguf", path=str(path)))
    quantized = abstract_params(config, jnp.float32, quantized=gguf_quantized_layouts(path))
    floats = abstract_params(config, jnp.float32)

    def specs(data: int, fsdp: int, tensor: int) -> tuple[Any, Any]:
        mesh = AbstractMesh((data, fsdp, tensor), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
        return param_specs(quantized, config, mesh), param_specs(floats, config, mesh)

    ours, theirs = specs(1, 2, 2)
    q, down = ours["layers"]["attn"]["q_proj"]["kernel"], ours["layers"]["mlp"]["down_proj"]["kernel"]
    assert theirs["layers"]["attn"]["q_proj"]["kernel"] == P(None, "fsdp", "tensor")  # (in, out)
    assert (q.codes, q.scale, q.offset) == (P(None, "tensor", "fsdp"),) * 3  # (out, in) stored
    assert theirs["layers"]["mlp"]["down_proj"]["kernel"] == P(None, "tensor", "fsdp")
    assert (down.codes, down.scale, down.offset) == (P(None, "fsdp", None), P(None, "fsdp", None), None)
    # 256 columns over fsdp 8: one group a shard (split); over fsdp 16: half a group (whole).
    for fsdp, cols in ((8, "fsdp"), (16, None)):
        ours, theirs = specs(1, fsdp, 1)
        assert theirs["embedder"]["embedding"] == P(None, "fsdp")
        assert ours["embedder"]["embedding"].codes == P(None, cols)
        assert ours["layers"]["attn"]["k_proj"]["kernel"].scale == P(None, None, cols)


def test_the_memory_checks_plan_the_quantized_weights_the_run_keeps(tmp_path, monkeypatch):
    """`jaxlin run` with `model.quantized: true` decides its refusal on the programs it
    will compile: the input's (`runner.check_memory`) and steering's
    (`runner.check_run_memory`) plans hold the loaded params' own quantized layouts —
    their weights are the quantized params' bytes, not the float model's."""
    from jaxlin import memory, runner
    from jaxlin.loading import load_model
    from jaxlin.memory import InsufficientMemoryError
    from jaxlin.plan import GGUF_OWN_LAYOUTS, plan
    from jaxlin.quantized import params_nbytes
    from jaxlin.run_config import AnalysisSection, parse_run_config

    path = write_mixed_layout_gguf(tmp_path / "mixed.gguf")
    loaded = load_model("gguf", path, "float32", use_cache=False, progress=False, quantized=True)
    params = loaded.model.params
    assert quantized_params(params)
    plans = []

    def recorded(*args: Any, **kwargs: Any) -> Any:
        plans.append(plan(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(runner, "plan", recorded)
    # The formula says no, so each check compiles its plan, which refuses too.
    monkeypatch.setattr(memory, "available_bytes", lambda: 1)
    options = AnalysisSection(top_k=2, per_token={"method": "off"}, ordinary_jacobian=False)
    with pytest.raises(InsufficientMemoryError, match="the analysis of 4 tokens"):
        runner.analyse(loaded, "abcd", options, add_bos=False)
    config = parse_run_config(
        {
            "model": {"source": "gguf", "path": str(path), "quantized": True},
            "text": "abcd",
            "steering": {"enabled": True, "concept": "abc", "prompt": "ab", "max_new_tokens": 2},
        }
    )
    with pytest.raises(InsufficientMemoryError, match="steering"):
        runner.check_run_memory(loaded, config)
    assert len(plans) == 2
    float_bytes = params_nbytes(dequantized_params(params))
    for planned in plans:
        assert planned.quantized == GGUF_OWN_LAYOUTS, planned
        assert planned.weights == params_nbytes(params) < float_bytes, (planned.weights, float_bytes)
