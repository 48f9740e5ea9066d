"""converters.gguf: GGUF files → HF names, layouts, config and tokenizer.

Three kinds of evidence: tiny GGUF files written here the way llama.cpp's converter
writes them (its q/k permutation and its generated RoPE tensors copied verbatim),
transformers' own GGUF loader on the same files (needs torch: the reference only), and
the real Gemma 3 270M Q4_K_M file.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from hf_reference import _DEFAULTS

from converters.gguf import (
    GGUF_FAMILIES,
    SUPPORTED_GGUF_ARCHITECTURES,
    GGUFError,
    GGUFFileNotFoundError,
    load_gguf_tokenizer,
    read_gguf,
    read_gguf_config,
    read_gguf_state_dict,
)
from jaxlin.families._base import GGUF_GLOBAL_TENSORS

Q8_0 = gguf.GGMLQuantizationType.Q8_0
F16 = gguf.GGMLQuantizationType.F16
F32 = gguf.GGMLQuantizationType.F32

# Tiny shapes: hidden 32 is one Q8_0 block per row.
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 32, 4, 2, 64, 2
ARCH_IDS = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
TEXTS = ["the theme", " the  thethe\n", "<|bos|>x<|eos|>", "", "élan 7"]


# --------------------------------------------------------------------------- writing


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py / conversion/llama.py), verbatim
    but for torch → numpy; applied as permute(q, n_head, n_head) and permute(k, n_head, n_kv)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def stored(values: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """What a reader can recover from `values` written as `qtype` (float32)."""
    if qtype == F32:
        return values.astype(np.float32)
    if qtype == F16:
        return values.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(values, qtype), qtype).astype(np.float32)


def byte_level_vocab() -> tuple[list[str], list[str], list[int]]:
    """A GPT-2 style byte-level vocabulary: 256 bytes, three merges, two control tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = [*bytes_to_unicode().values(), "Ġt", "he", "Ġthe", "<|bos|>", "<|eos|>"]
    token_types = [1] * (len(tokens) - 2) + [3, 3]  # 3 = CONTROL
    return tokens, merges, token_types


VOCAB = len(byte_level_vocab()[0])


def add_byte_level_tokenizer(writer: gguf.GGUFWriter, tokenizer_pre: str) -> None:
    """The byte-level BPE vocabulary of `byte_level_vocab` as GGUF tokenizer metadata."""
    tokens, merges, token_types = byte_level_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(token_types)
    writer.add_bos_token_id(tokens.index("<|bos|>"))
    writer.add_eos_token_id(tokens.index("<|eos|>"))


def write_gguf(
    path: Path,
    arch: str,
    tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]],
    metadata: Callable[[gguf.GGUFWriter], None] | None = None,
    head_dim: int = HIDDEN // HEADS,
    tokenizer_pre: str = "llama-bpe",
    head_count_kv: int | None = KV_HEADS,
) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    if head_count_kv is not None:
        writer.add_head_count_kv(head_count_kv)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    else:  # llama.cpp writes an explicit HF head_dim as key/value length
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    add_byte_level_tokenizer(writer, tokenizer_pre)
    if metadata is not None:
        metadata(writer)
    for name, (values, qtype) in tensors.items():
        if qtype in (F32, F16) or values.dtype.kind in "iu":
            writer.add_tensor(name, values.astype(np.float16) if qtype == F16 else values)
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_checkpoint(arch: str, seed: int = 0) -> tuple[dict, dict[str, np.ndarray], int]:
    """(GGUF tensors as llama.cpp would write them, the HF state dict a reader should
    recover, head_dim). llama: untied, q/k permuted; qwen3: tied, head_dim ≠ hidden/heads."""
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS if arch == "llama" else 16

    def random(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    hf: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] = {
        "model.embed_tokens.weight": (random(VOCAB, HIDDEN), F16),
        "model.norm.weight": (random(HIDDEN), F32),
    }
    if arch == "llama":
        hf["lm_head.weight"] = (random(VOCAB, HIDDEN), Q8_0)
    for layer in range(LAYERS):
        # Layer 0 exact (F32/F16), layer 1 through Q8_0: quantization is per row, so it
        # commutes with the row permutation and the original is recoverable either way.
        exact = layer == 0
        prefix = f"model.layers.{layer}."
        hf |= {
            prefix + "input_layernorm.weight": (random(HIDDEN), F32),
            prefix + "post_attention_layernorm.weight": (random(HIDDEN), F32),
            prefix + "self_attn.q_proj.weight": (random(HEADS * head_dim, HIDDEN), F32 if exact else Q8_0),
            prefix + "self_attn.k_proj.weight": (random(KV_HEADS * head_dim, HIDDEN), F32 if exact else Q8_0),
            prefix + "self_attn.v_proj.weight": (random(KV_HEADS * head_dim, HIDDEN), F16),
            prefix + "self_attn.o_proj.weight": (random(HIDDEN, HEADS * head_dim), Q8_0 if exact else F16),
            prefix + "mlp.gate_proj.weight": (random(FFN, HIDDEN), F16 if exact else Q8_0),
            prefix + "mlp.up_proj.weight": (random(FFN, HIDDEN), F32),
            prefix + "mlp.down_proj.weight": (random(HIDDEN, FFN), Q8_0),
        }
        if arch == "qwen3":
            hf[prefix + "self_attn.q_norm.weight"] = (random(head_dim), F32)
            hf[prefix + "self_attn.k_norm.weight"] = (random(head_dim), F32)

    # GGUF names from gguf's own HF → GGUF map (what llama.cpp's converter uses), not ours.
    name_map = gguf.get_tensor_name_map(ARCH_IDS[arch], LAYERS)
    gguf_tensors = {}
    for name, (values, qtype) in hf.items():
        gguf_name = name_map.get_name(name, try_suffixes=(".weight",))
        if arch == "llama" and ".q_proj." in name:
            values = llama_cpp_permute(values, HEADS, HEADS)
        elif arch == "llama" and ".k_proj." in name:
            values = llama_cpp_permute(values, HEADS, KV_HEADS)
        gguf_tensors[gguf_name] = (values, qtype)
    expected = {name: stored(values, qtype) for name, (values, qtype) in hf.items()}
    return gguf_tensors, expected, head_dim


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, dict]]:
    """arch → (a tiny GGUF file, the HF state dict it must read back as), built once."""
    built: dict[str, tuple[Path, dict]] = {}

    def build(arch: str) -> tuple[Path, dict]:
        if arch not in built:
            tensors, expected, head_dim = tiny_checkpoint(arch)
            pre = "qwen2" if arch == "qwen3" else "llama-bpe"
            path = write_gguf(
                tmp_path_factory.mktemp(arch) / f"{arch}.gguf", arch, tensors, None, head_dim, pre
            )
            built[arch] = (path, expected)
        return built[arch]

    return build


# --------------------------------------------------------------------------- tiny files


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_round_trip_recovers_hf_names_layouts_and_values(tiny_gguf, arch: str) -> None:
    path, expected = tiny_gguf(arch)
    state_dict = read_gguf_state_dict(path)
    assert sorted(state_dict) == sorted(expected)
    for name, values in state_dict.items():
        assert values.dtype == np.float32, name
        # Exact: llama's q/k permutation undone, nothing rounded twice.
        np.testing.assert_array_equal(values, expected[name], err_msg=name)


def test_llama_permutation_is_undone_not_just_consistent(tiny_gguf) -> None:
    # Guard against a round trip that is exact because it does nothing: the file's q/k
    # rows really are in llama.cpp's order, and ours are HF's.
    path, expected = tiny_gguf("llama")
    raw = {t.name: t for t in read_gguf(path).tensors}["blk.0.attn_q.weight"].data.view(np.float32)
    q = read_gguf_state_dict(path)["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(raw, q)
    np.testing.assert_array_equal(raw, llama_cpp_permute(q, HEADS, HEADS))


def test_missing_head_count_kv_defaults_to_head_count_like_llama_cpp(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    k = rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32)  # HEADS kv heads of 8
    path = write_gguf(
        tmp_path / "mha.gguf",
        "llama",
        {"blk.0.attn_k.weight": (llama_cpp_permute(k, HEADS, None), F32)},
        head_count_kv=None,
    )
    np.testing.assert_array_equal(read_gguf_state_dict(path)["model.layers.0.self_attn.k_proj.weight"], k)


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_dtype_and_progress(tiny_gguf, dtype: type) -> None:
    path, expected = tiny_gguf("qwen3")
    state_dict = read_gguf_state_dict(path, dtype=dtype, progress=True)
    for name, values in state_dict.items():
        assert values.dtype == dtype
        np.testing.assert_array_equal(values, expected[name].astype(dtype), err_msg=name)
        assert values.flags.writeable  # not a view of the read-only memory map


def test_name_tables_agree_with_gguf_tensor_name_map() -> None:
    """Each (GGUF, HF) pair is also what gguf's own HF → GGUF TensorNameMap says."""
    for arch, family in GGUF_FAMILIES.items():
        spec = family.gguf
        name_map = gguf.get_tensor_name_map(ARCH_IDS[arch], LAYERS)
        for leaf, hf_leaf in spec.layer_tensors.items():
            hf_name = f"{family.layer_prefix.format(layer=1)}{hf_leaf}"
            assert name_map.get_name(hf_name) == f"blk.1.{leaf}", (arch, leaf)
        for gguf_name, hf_name in spec.global_tensors.items():
            assert name_map.get_name(hf_name) == gguf_name, (arch, hf_name)
        assert set(spec.global_tensors) <= set(GGUF_GLOBAL_TENSORS) or arch == "gpt2"
    # gemma2 has no output tensor in gguf's (and llama.cpp's) tensor list at all.
    assert gguf.MODEL_TENSOR.OUTPUT not in gguf.MODEL_TENSORS[ARCH_IDS["gemma2"]]
    assert set(SUPPORTED_GGUF_ARCHITECTURES) == {
        "gemma2",
        "gemma3",
        "gpt2",
        "llama",
        "olmo2",
        "phi3",
        "qwen2",
        "qwen3",
    }
    # No GGUF architecture "mistral": llama.cpp writes Mistral 7B as llama.
    assert "mistral" not in ARCH_IDS


def test_parser_agrees_with_gguf_reader(tmp_path: Path) -> None:
    """The header parser against gguf.GGUFReader, over every metadata value type."""

    def every_type(writer: gguf.GGUFWriter) -> None:
        writer.add_uint8("t.u8", 200)
        writer.add_int8("t.i8", -100)
        writer.add_uint16("t.u16", 60000)
        writer.add_int16("t.i16", -30000)
        writer.add_int32("t.i32", -(2**31))
        writer.add_uint64("t.u64", 2**63)
        writer.add_int64("t.i64", -(2**62))
        writer.add_float64("t.f64", 1 / 3)
        writer.add_bool("t.bool", True)
        writer.add_string("t.unicode", "ünï 🚀")
        writer.add_array("t.floats", [0.1, -2.5])
        writer.add_array("t.one", [7])
        writer.add_array("t.strings", ["a", "", "ç"])

    tensors, _, _ = tiny_checkpoint("llama")
    path = write_gguf(tmp_path / "types.gguf", "llama", tensors, every_type)
    ours, theirs = read_gguf(path), gguf.GGUFReader(path)
    assert ours.metadata == {
        key: field.contents() for key, field in theirs.fields.items() if not key.startswith("GGUF.")
    }
    assert [(t.name, t.tensor_type, t.shape) for t in ours.tensors] == [
        (t.name, t.tensor_type, tuple(reversed(t.shape.tolist()))) for t in theirs.tensors
    ]
    for mine, reference in zip(ours.tensors, theirs.tensors, strict=True):
        np.testing.assert_array_equal(mine.data.view(np.uint8).ravel(), reference.data.view(np.uint8).ravel())


# --------------------------------------------------------------------------- vs transformers


@pytest.fixture(scope="module")
def torch() -> Any:
    return pytest.importorskip("torch")


def transformers_state_dict(path: Path, torch: Any) -> dict[str, np.ndarray]:
    """transformers' GGUF loader: its tensor-name map needs a model, built on meta."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(os.fspath(path), return_tensors=True, model_to_load=model)["tensors"]
    return {name: tensor.numpy() for name, tensor in tensors.items()}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_state_dict_matches_transformers(tiny_gguf, torch: Any, arch: str) -> None:
    path, _ = tiny_gguf(arch)
    ours, theirs = read_gguf_state_dict(path), transformers_state_dict(path, torch)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def config_difference(path: Path) -> dict[str, tuple[Any, Any]]:
    from transformers import AutoConfig

    ours = read_gguf_config(path).to_dict()
    theirs = AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()
    return {
        key: (ours.get(key), theirs.get(key))
        for key in ours.keys() | theirs.keys()
        if ours.get(key) != theirs.get(key)
    }


def test_tiny_configs_match_transformers(tiny_gguf, torch: Any) -> None:
    assert config_difference(tiny_gguf("llama")[0]) == {}
    config = read_gguf_config(tiny_gguf("llama")[0])
    assert (config.model_type, config.num_key_value_heads, config.head_dim) == ("llama", KV_HEADS, 8)
    assert config.tie_word_embeddings is False
    # The one deliberate difference: transformers drops qwen3's key_length and falls back
    # on Qwen3Config's default head_dim of 128, which is not this file's 16.
    assert config_difference(tiny_gguf("qwen3")[0]) == {"head_dim": (16, 128)}
    assert read_gguf_config(tiny_gguf("qwen3")[0]).tie_word_embeddings is True


def test_mistral_named_llama_file_is_mistral_as_in_transformers(tmp_path: Path, torch: Any) -> None:
    path = write_gguf(tmp_path / "m.gguf", "llama", {}, lambda writer: writer.add_name("mistral"))
    assert read_gguf_config(path).model_type == "mistral"
    assert config_difference(path) == {}


def test_gemma3_27b_attention_scale_as_llama_cpp(tmp_path: Path) -> None:
    path = tmp_path / "gemma27b.gguf"
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_block_count(62)  # how llama.cpp recognizes 27B
    writer.add_embedding_length(5376)
    writer.add_head_count(32)
    writer.add_key_length(128)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # HF's own Gemma 3 27B config says 168 = 5376 / 32; transformers' GGUF config keeps
    # the class default 256 (right for every other size, as the real 270M file checks).
    assert read_gguf_config(path).query_pre_attn_scalar == 168


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_tokenizers_match_transformers(tiny_gguf, torch: Any, arch: str) -> None:
    from transformers import AutoTokenizer

    path, _ = tiny_gguf(arch)
    ours = load_gguf_tokenizer(path)
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert type(ours) is type(theirs)
    assert ours.get_vocab() == theirs.get_vocab()
    assert ours.special_tokens_map == theirs.special_tokens_map
    for text in TEXTS:
        assert ours(text).input_ids == theirs(text).input_ids, text
    assert ours.decode(ours("the theme").input_ids) == theirs.decode(theirs("the theme").input_ids)


def test_runtime_needs_no_torch(tiny_gguf) -> None:
    """transformers' own GGUF config/tokenizer loaders import torch; ours must not."""
    path, _ = tiny_gguf("llama")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from converters.gguf import load_gguf_tokenizer, read_gguf_config, read_gguf_state_dict
        path = {os.fspath(path)!r}
        assert read_gguf_config(path).model_type == "llama"
        assert len(read_gguf_state_dict(path)) == {2 + 1 + 9 * LAYERS}
        assert load_gguf_tokenizer(path)("the").input_ids
        print("ok")
        """
    )
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])},
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_full_load_parses_the_file_once(tiny_gguf, monkeypatch: pytest.MonkeyPatch, arch: str) -> None:
    """Model (config + tensors) and tokenizer share one parsed header: every parse makes
    one reader cursor, so counting cursors counts parses, whatever the entry point."""
    from converters.gguf import reader
    from jaxlin.loading import load_model

    parses = []

    class CountingCursor(reader._Cursor):
        def __init__(self, buffer: np.ndarray) -> None:
            parses.append(buffer.filename)
            super().__init__(buffer)

    monkeypatch.setattr(reader, "_Cursor", CountingCursor)
    path, _ = tiny_gguf(arch)
    loaded = load_model("gguf", path, use_cache=False, progress=False)
    assert loaded.model.config.family == arch and loaded.tokenizer("the").input_ids
    assert len(parses) == 1, parses
    # The count is live: each stage called with a path parses again.
    read_gguf_config(path)
    assert len(parses) == 2


# --------------------------------------------------------------------------- errors and warnings


def test_unsupported_architecture_lists_supported_ones(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "mamba.gguf", "mamba", {})
    for read in (read_gguf_config, read_gguf_state_dict, load_gguf_tokenizer):
        with pytest.raises(GGUFError, match=r"'mamba'.*gemma2, gemma3, gpt2, llama, olmo2, phi3") as error:
            read(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "model.gguf"
    for read in (read_gguf_config, read_gguf_state_dict, load_gguf_tokenizer):
        with pytest.raises(FileNotFoundError, match="nowhere/model.gguf") as error:
            read(path)
        assert isinstance(error.value, GGUFFileNotFoundError) and isinstance(error.value, GGUFError)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFError, match="x.gguf: not a GGUF file"):
        read_gguf_config(tmp_path / "x.gguf")


def test_truncated_file(tiny_gguf, tmp_path: Path) -> None:
    source, _ = tiny_gguf("llama")
    data = source.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(GGUFError, match="runs past the end of the file"):
        read_gguf_state_dict(tmp_path / "cut.gguf")
    (tmp_path / "header.gguf").write_bytes(data[:300])
    with pytest.raises(GGUFError, match="truncated or corrupt GGUF header"):
        read_gguf_config(tmp_path / "header.gguf")


def test_unknown_tensor_name(tmp_path: Path) -> None:
    experts = np.zeros((4, HIDDEN), np.float32)
    path = write_gguf(tmp_path / "moe.gguf", "qwen3", {"blk.0.ffn_gate_exps.weight": (experts, F32)})
    with pytest.raises(GGUFError, match=r"moe.gguf: tensor 'blk.0.ffn_gate_exps.weight' has no known"):
        read_gguf_state_dict(path)


def test_type_gguf_cannot_dequantize(tmp_path: Path) -> None:
    ints = np.zeros((HIDDEN,), np.int32)
    path = write_gguf(tmp_path / "int.gguf", "llama", {"output_norm.weight": (ints, F32)})
    with pytest.raises(GGUFError, match=r"tensor 'output_norm.weight' has type I32"):
        read_gguf_state_dict(path)


def test_unsupported_quantization_type_simulated(tiny_gguf, monkeypatch: pytest.MonkeyPatch) -> None:
    """As if this gguf release could not dequantize Q8_0: named before any work."""
    real = gguf.quants.dequantize

    def without_q8_0(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
        if qtype == Q8_0:
            raise NotImplementedError("Dequantization for Q8_0 is not yet implemented")
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", without_q8_0)
    with pytest.raises(GGUFError, match=r"llama.gguf: tensor 'output.weight' has type Q8_0"):
        read_gguf_state_dict(tiny_gguf("llama")[0])


def gguf_tensor_name(tensor: gguf.MODEL_TENSOR) -> str:
    return f"{gguf.TENSOR_NAMES[tensor]}.weight"


ROPE_FREQS = gguf_tensor_name(gguf.MODEL_TENSOR.ROPE_FREQS)
ROPE_FACTORS_LONG = gguf_tensor_name(gguf.MODEL_TENSOR.ROPE_FACTORS_LONG)
ROPE_FACTORS_SHORT = gguf_tensor_name(gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_generated_rope_tensors_rebuild_the_rope_without_a_warning(tmp_path: Path, arch: str) -> None:
    """Llama 3's rope_freqs and Phi-3's LongRoPE factors (with longrope's attention
    factor, and the rope.scaling.type an older converter might add) have no HF tensor:
    not in the state dict, turned back into the config's RoPE, and no longer warned about."""
    factors = np.array([1.0, 1.5, 3.25, 8.0], np.float32)  # head_dim 8: 4 frequencies
    tensors = {"output_norm.weight": (np.ones(HIDDEN, np.float32), F32)}
    if arch == "llama":
        tensors[ROPE_FREQS] = (factors, F32)
        metadata = None
    else:
        tensors |= {ROPE_FACTORS_LONG: (2 * factors, F32), ROPE_FACTORS_SHORT: (factors, F32)}

        def metadata(writer: gguf.GGUFWriter) -> None:
            writer.add_rope_scaling_attn_factors(1.25)
            writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)

    path = write_gguf(tmp_path / f"{arch}.gguf", arch, tensors, metadata)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rope = read_gguf_config(path).rope_parameters
    if arch == "llama":
        assert rope == {
            "rope_type": "frequency_factors",
            "rope_theta": 10000.0,
            "frequency_factors": [*factors],
        }
    else:
        assert rope["rope_type"] == "longrope" and rope["attention_factor"] == 1.25
        assert rope["short_factor"] == [*factors] and rope["long_factor"] == [*(2 * factors)]
    assert list(read_gguf_state_dict(path)) == ["model.norm.weight"]


def test_generated_rope_tensors_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    ones = np.ones(3, np.float32)
    path = write_gguf(tmp_path / "llama.gguf", "llama", {ROPE_FREQS: (ones, F32)})
    with pytest.raises(GGUFError, match=r"'rope_freqs.weight' has 3 values, expected 4"):
        read_gguf_config(path)
    path = write_gguf(tmp_path / "phi3.gguf", "phi3", {ROPE_FACTORS_LONG: (ones, F32)})
    with pytest.raises(GGUFError, match=r"'rope_factors_long.weight' without 'rope_factors_short.weight'"):
        read_gguf_config(path)


def test_rope_scaling_metadata_warns(tmp_path: Path) -> None:
    def scaled(writer: gguf.GGUFWriter) -> None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(8.0)

    path = write_gguf(tmp_path / "scaled.gguf", "qwen3", {}, scaled)
    with pytest.warns(
        UserWarning, match="qwen3.rope.scaling.type = 'linear'; qwen3.rope.scaling.factor = 8.0"
    ):
        read_gguf_config(path)


# --------------------------------------------------------------------------- the real file


@pytest.fixture(scope="module")
def gemma_state_dict(gemma_gguf_path: Path) -> dict[str, np.ndarray]:
    return read_gguf_state_dict(gemma_gguf_path)


def test_real_gemma_names_shapes_and_norms(gemma_gguf_path: Path, gemma_state_dict: dict) -> None:
    config = read_gguf_config(gemma_gguf_path)
    assert type(config).__name__ == "Gemma3TextConfig" and config.tie_word_embeddings
    hidden, head_dim, layers = config.hidden_size, config.head_dim, config.num_hidden_layers
    shapes = {
        "self_attn.q_proj.weight": (config.num_attention_heads * head_dim, hidden),
        "self_attn.k_proj.weight": (config.num_key_value_heads * head_dim, hidden),
        "self_attn.v_proj.weight": (config.num_key_value_heads * head_dim, hidden),
        "self_attn.o_proj.weight": (hidden, config.num_attention_heads * head_dim),
        "self_attn.q_norm.weight": (head_dim,),
        "self_attn.k_norm.weight": (head_dim,),
        "mlp.gate_proj.weight": (config.intermediate_size, hidden),
        "mlp.up_proj.weight": (config.intermediate_size, hidden),
        "mlp.down_proj.weight": (hidden, config.intermediate_size),
        **{
            f"{norm}.weight": (hidden,)
            for norm in (
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
            )
        },
    }
    expected = {f"model.layers.{i}.{name}": shape for i in range(layers) for name, shape in shapes.items()}
    expected |= {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,)}
    # No lm_head: llama.cpp drops the tied one, as tied HF checkpoints do.
    assert {name: values.shape for name, values in gemma_state_dict.items()} == expected
    assert all(values.dtype == np.float32 for values in gemma_state_dict.values())
    # Norms are stored as 1 + w (F32 in the file): we return w.
    raw = {t.name: t for t in read_gguf(gemma_gguf_path).tensors}["blk.3.post_ffw_norm.weight"].data.view(
        np.float32
    )
    np.testing.assert_array_equal(
        gemma_state_dict["model.layers.3.post_feedforward_layernorm.weight"], raw - 1
    )


def test_real_gemma_config_matches_transformers(gemma_gguf_path: Path, torch: Any) -> None:
    assert config_difference(gemma_gguf_path) == {}


def test_real_gemma_tokenizer(gemma_gguf_path: Path) -> None:
    tokenizer = load_gguf_tokenizer(gemma_gguf_path)
    assert type(tokenizer).__name__ == "GemmaTokenizer"
    # The ids AutoTokenizer.from_pretrained(dir, gguf_file=...) gives (compared in full below).
    assert tokenizer("Hello world  x").input_ids == [2, 9259, 1902, 138, 236781]


@pytest.mark.slow
def test_real_gemma_state_dict_matches_transformers(
    gemma_gguf_path: Path, gemma_state_dict: dict, torch: Any
) -> None:
    theirs = transformers_state_dict(gemma_gguf_path, torch)
    assert sorted(gemma_state_dict) == sorted(theirs)
    for name, values in gemma_state_dict.items():
        np.testing.assert_array_equal(values, theirs[name], err_msg=name)


@pytest.mark.slow
def test_real_gemma_tokenizer_matches_transformers(gemma_gguf_path: Path, torch: Any) -> None:
    from transformers import AutoTokenizer

    ours = load_gguf_tokenizer(gemma_gguf_path)
    theirs = AutoTokenizer.from_pretrained(gemma_gguf_path.parent, gguf_file=gemma_gguf_path.name)
    assert type(ours) is type(theirs) and ours.get_vocab() == theirs.get_vocab()
    assert ours.special_tokens_map == theirs.special_tokens_map
    for text in [*TEXTS, "<start_of_turn>user\nhi<end_of_turn>", "  leading\n\ttabs 数学 🚀"]:
        assert ours(text).input_ids == theirs(text).input_ids, text


@pytest.mark.slow
def test_real_gemma_parser_agrees_with_gguf_reader(gemma_gguf_path: Path) -> None:
    ours, theirs = read_gguf(gemma_gguf_path), gguf.GGUFReader(gemma_gguf_path)
    for key, field in theirs.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == field.contents(), key
    assert [(t.name, t.tensor_type, t.shape) for t in ours.tensors] == [
        (t.name, t.tensor_type, tuple(reversed(t.shape.tolist()))) for t in theirs.tensors
    ]


# --------------------------------------------------------------------------- the other architectures
#
# A tiny random HF model per architecture (transformers' PyTorch class), its tensors and
# metadata written the way llama.cpp's convert_hf_to_gguf.py writes that architecture,
# read back. Vocabulary: the byte-level one above, so the files also have a tokenizer.

NEW_ARCHS = ["qwen2", "gemma2", "phi3", "olmo2", "gpt2"]
BOS, EOS = VOCAB - 2, VOCAB - 1
_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=None,
)
HF_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2": {**_COMMON, "tie_word_embeddings": False, "rope_theta": 1e6},
    # Gemma 2 always ties; llama.cpp scales attention by head_dim below 27B.
    "gemma2": {
        **_COMMON,
        "head_dim": 32,
        "query_pre_attn_scalar": 32,
        "sliding_window": 8,
        "attn_logit_softcapping": 20.0,
        "final_logit_softcapping": 10.0,
    },
    # Phi-4-mini-like: partial RoPE and a sliding window; pad = eos as in Phi-3.
    "phi3": {
        **_COMMON,
        "tie_word_embeddings": False,
        "pad_token_id": EOS,
        "sliding_window": 8,
        "partial_rotary_factor": 0.5,
        "original_max_position_embeddings": 64,
    },
    "olmo2": {**_COMMON, "tie_word_embeddings": False, "rms_norm_eps": 1e-6},
    "gpt2": dict(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=BOS, eos_token_id=EOS
    ),
}


# RoPE scaling llama.cpp's converter stores as tensors: name → (GGUF architecture, HF config).
ROPE_SCALED_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    # Llama 3.1/3.2's llama3 scaling, its thresholds (wavelengths 32 / 1 and 32 / 4) put
    # the frequencies of head_dim 16, theta 1e4 (wavelengths 6.3, 19.9, 62.8, ...) in all
    # three bands: kept, smoothed, divided by 8. original_max_position_embeddings is also
    # set at the top level, where llama.cpp reads it (8192 when absent, which is right for
    # every released Llama 3.x, whose rope_scaling says 8192); HF agrees either way.
    "llama3": (
        "llama",
        {
            **_COMMON,
            "tie_word_embeddings": False,
            "original_max_position_embeddings": 32,
            # the same llama3 scaling as the tiny HF variant
            "rope_parameters": dict(_DEFAULTS["llama3_rope"]["rope_parameters"]),
        },
    ),
    # Phi-3.5-mini / Phi-3-128k style longrope (no "factor", as in those configs: HF and
    # llama.cpp both use max / original = 4), with Phi-4-mini's partial rotary on top:
    # 4 factors for 8 of 16 dims.
    "phi3_longrope": (
        "phi3",
        {
            **_COMMON,
            "tie_word_embeddings": False,
            "pad_token_id": EOS,
            "max_position_embeddings": 64,
            "original_max_position_embeddings": 16,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 100.0,
                "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.1, 1.4, 2.0],
                "long_factor": [1.0, 1.6, 3.0, 5.5],
            },
        },
    ),
}


def tiny_hf_model(
    arch: str, torch: Any, fields: dict[str, Any] | None = None
) -> tuple[Any, dict[str, np.ndarray]]:
    """(an HF model with random weights, norms included, its state dict as float32 numpy);
    config fields `fields`, else HF_CONFIGS[arch]."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(arch, **(fields or HF_CONFIGS[arch]), attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    return model, {name: tensor.numpy().copy() for name, tensor in model.state_dict().items()}


def llama_cpp_convert(arch: str, config: Any, hf: dict[str, np.ndarray]) -> dict:
    """GGUF tensors as llama.cpp's convert script writes them for `arch` (names from gguf's
    own TensorNameMap). Layer 1's matrices F16, the rest F32."""
    name_map = gguf.get_tensor_name_map(ARCH_IDS[arch], config.num_hidden_layers)
    tensors = {}
    for name, values in hf.items():
        # A tied lm_head is not in an HF checkpoint; Gemma2Model skips lm_head regardless.
        if name == "lm_head.weight" and (config.tie_word_embeddings or arch == "gemma2"):
            continue
        if arch == "gemma2" and name.endswith("norm.weight"):  # Gemma2Model.modify_tensors
            values = values + 1
        if arch == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            values = values.T  # GPT2Model.modify_tensors: transpose(1, 0)
        if arch == "llama" and name.endswith(".q_proj.weight"):  # LlamaModel.modify_tensors
            values = llama_cpp_permute(values, config.num_attention_heads, config.num_attention_heads)
        elif arch == "llama" and name.endswith(".k_proj.weight"):
            values = llama_cpp_permute(values, config.num_attention_heads, config.num_key_value_heads)
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        qtype = F16 if values.ndim == 2 and ".1." in name else F32
        tensors[gguf_name] = (np.ascontiguousarray(values, dtype=np.float32), qtype)
    return tensors


def llama_cpp_generate_extra_tensors(
    arch: str, hparams: dict[str, Any], writer: gguf.GGUFWriter
) -> dict[str, np.ndarray]:
    """llama.cpp's generate_extra_tensors for `arch` (convert_hf_to_gguf.py, now
    conversion/llama.py LlamaModel and conversion/phi.py Phi3MiniModel), step for step
    and in torch as there; `hparams` is the config.json dict. Phi-3's also writes the
    attention factor."""
    import torch

    rope_params = hparams.get("rope_parameters") or {}
    if arch == "llama" and rope_params.get("rope_type", "").lower() == "llama3":
        base = rope_params.get("rope_theta", 10000.0)
        if (dim := hparams.get("head_dim")) is None:
            dim = hparams["hidden_size"] // hparams["num_attention_heads"]
        freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        factor = rope_params.get("factor", 8.0)
        low_freq_factor = rope_params.get("low_freq_factor", 1.0)
        high_freq_factor = rope_params.get("high_freq_factor", 4.0)
        old_context_len = hparams.get("original_max_position_embeddings", 8192)  # top level, sic
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        rope_factors = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < high_freq_wavelen:
                rope_factors.append(1)
            elif wavelen > low_freq_wavelen:
                rope_factors.append(factor)
            else:
                smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
                rope_factors.append(1 / ((1 - smooth) / factor + smooth))
        return {"rope_freqs.weight": torch.tensor(rope_factors, dtype=torch.float32).numpy()}
    if arch == "phi3" and (long_factors := rope_params.get("long_factor")):
        n_embd, n_head = hparams["hidden_size"], hparams["num_attention_heads"]
        max_pos_embds = hparams["max_position_embeddings"]
        orig_max_pos_embds = rope_params["original_max_position_embeddings"]
        rope_dims = int(rope_params.get("partial_rotary_factor", 1.0) * n_embd) // n_head
        scale = max_pos_embds / orig_max_pos_embds
        assert rope_params["rope_type"] == "longrope"
        attn_factor = math.sqrt(1 + math.log(scale) / math.log(orig_max_pos_embds)) if scale > 1.0 else 1.0
        writer.add_rope_scaling_attn_factors(attn_factor)
        short_factors = rope_params["short_factor"]
        assert len(long_factors) == len(short_factors) == rope_dims / 2
        return {
            "rope_factors_long.weight": torch.tensor(long_factors, dtype=torch.float32).numpy(),
            "rope_factors_short.weight": torch.tensor(short_factors, dtype=torch.float32).numpy(),
        }
    return {}


def write_llama_cpp_gguf(path: Path, arch: str, config: Any, tensors: dict) -> Path:
    """The metadata llama.cpp's set_gguf_parameters writes for `arch`, and the tensors its
    generate_extra_tensors adds."""
    writer = gguf.GGUFWriter(path, arch)
    if arch == "gpt2":  # GPT2Model.set_gguf_parameters
        writer.add_block_count(config.n_layer)
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
    else:  # TextModel.set_gguf_parameters, and the architecture's additions
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        if arch != "gemma2":
            writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    if arch == "llama":  # LlamaModel.set_gguf_parameters; head_dim is in its config.json
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(config.head_dim)
    if arch == "gemma2":
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
    if arch == "phi3":
        writer.add_rope_scaling_orig_ctx_len(config.original_max_position_embeddings)
        factor = config.rope_parameters.get("partial_rotary_factor", 1.0)
        writer.add_rope_dimension_count(int(factor * config.hidden_size) // config.num_attention_heads)
        writer.add_sliding_window(config.sliding_window or 0)
        writer.add_pad_token_id(config.pad_token_id)
    tokens, merges, token_types = byte_level_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2" if arch == "gpt2" else "qwen2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(token_types)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    for name, values in llama_cpp_generate_extra_tensors(arch, config.to_dict(), writer).items():
        writer.add_tensor(name, values)
    for name, (values, qtype) in tensors.items():
        if qtype in (F32, F16):
            writer.add_tensor(name, values.astype(np.float16) if qtype == F16 else values)
        else:  # already the type's blocks (tests/test_quantized.py)
            writer.add_tensor(name, values, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build_llama_cpp_gguf(
    directory: Path, arch: str, torch: Any, fields: dict[str, Any] | None = None
) -> tuple[Path, Any, dict[str, np.ndarray]]:
    """(GGUF path, the HF model, the HF state dict a reader must recover) for a tiny random
    HF model of `arch` (config `fields`, else HF_CONFIGS[arch]) converted as llama.cpp would."""
    model, hf = tiny_hf_model(arch, torch, fields)
    tensors = llama_cpp_convert(arch, model.config, hf)
    path = write_llama_cpp_gguf(directory / f"{arch}.gguf", arch, model.config, tensors)
    # What survives the file: the F16 round trip; a tied lm_head is not returned.
    hf = {
        name: (values.astype(np.float16).astype(np.float32) if values.ndim == 2 and ".1." in name else values)
        for name, values in hf.items()
        if not (name == "lm_head.weight" and (model.config.tie_word_embeddings or arch == "gemma2"))
    }
    return path, model, hf


@pytest.fixture(scope="module")
def tiny_arch_gguf(tmp_path_factory: pytest.TempPathFactory, torch: Any) -> Callable[[str], tuple]:
    """arch → (GGUF path, the HF model, the HF state dict a reader must recover), built once."""
    built: dict[str, tuple] = {}

    def build(arch: str) -> tuple:
        if arch not in built:
            built[arch] = build_llama_cpp_gguf(tmp_path_factory.mktemp(arch), arch, torch)
        return built[arch]

    return build


@pytest.fixture(scope="module")
def rope_scaled_gguf(tmp_path_factory: pytest.TempPathFactory, torch: Any) -> Callable[[str], tuple]:
    """ROPE_SCALED_CONFIGS name → (GGUF path, HF model holding the file's weights), built once."""
    built: dict[str, tuple] = {}

    def build(name: str) -> tuple:
        if name not in built:
            arch, fields = ROPE_SCALED_CONFIGS[name]
            path, model, expected = build_llama_cpp_gguf(tmp_path_factory.mktemp(name), arch, torch, fields)
            model.load_state_dict({k: torch.from_numpy(v) for k, v in expected.items()}, strict=False)
            built[name] = (path, model)
        return built[name]

    return build


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_new_architectures_round_trip_to_the_hf_state_dict(tiny_arch_gguf, arch: str) -> None:
    path, _, expected = tiny_arch_gguf(arch)
    ours = read_gguf_state_dict(path)
    assert sorted(ours) == sorted(expected)
    for name, values in ours.items():
        assert values.shape == expected[name].shape and values.flags.c_contiguous, name
        if arch == "gemma2" and name.endswith("norm.weight"):  # (w + 1) - 1 in float32
            np.testing.assert_allclose(values, expected[name], rtol=0, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(values, expected[name], err_msg=name)


def test_gpt2_conv1d_layout_and_fused_names(tiny_arch_gguf) -> None:
    path, _, _ = tiny_arch_gguf("gpt2")
    raw = {t.name: t for t in read_gguf(path).tensors}
    assert raw["blk.0.attn_qkv.weight"].shape == (3 * 64, 64)  # llama.cpp: nn.Linear (out, in)
    ours = read_gguf_state_dict(path)
    assert ours["transformer.h.0.attn.c_attn.weight"].shape == (64, 3 * 64)  # Conv1D (in, out)
    assert ours["transformer.h.0.mlp.c_fc.weight"].shape == (64, 4 * 64)
    assert ours["transformer.wpe.weight"].shape == (32, 64)
    assert {"transformer.ln_f.bias", "transformer.h.1.attn.c_attn.bias"} <= set(ours)
    phi3 = read_gguf_state_dict(tiny_arch_gguf("phi3")[0])
    assert phi3["model.layers.0.self_attn.qkv_proj.weight"].shape == ((4 + 2 + 2) * 16, 64)
    assert phi3["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * 96, 64)


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_new_architectures_config_rebuilds_the_same_model(tiny_arch_gguf, torch: Any, arch: str) -> None:
    """Our config + our tensors give the original model's logits (so every field that
    matters was read back): F16 weights loaded into both, eager attention, 24 tokens
    (past the 8-token sliding windows)."""
    from transformers import AutoModelForCausalLM

    path, model, expected = tiny_arch_gguf(arch)
    config = read_gguf_config(path)
    assert config.model_type == arch
    config._attn_implementation = "eager"
    rebuilt = AutoModelForCausalLM.from_config(config).eval()
    loaded = rebuilt.load_state_dict(
        {k: torch.from_numpy(v) for k, v in read_gguf_state_dict(path).items()}, strict=False
    )
    assert not loaded.unexpected_keys and set(loaded.missing_keys) <= {"lm_head.weight"}
    assert ("lm_head.weight" in loaded.missing_keys) == config.tie_word_embeddings
    rebuilt.tie_weights()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in expected.items()}, strict=False)
    model.tie_weights()
    ids = torch.arange(24)[None] * 7 % VOCAB
    with torch.no_grad():
        np.testing.assert_allclose(rebuilt(ids).logits.numpy(), model(ids).logits.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "phi3", "gpt2"])
def test_new_architectures_state_dict_matches_transformers(tiny_arch_gguf, torch: Any, arch: str) -> None:
    path, _, _ = tiny_arch_gguf(arch)
    ours = read_gguf_state_dict(path)
    theirs = transformers_state_dict(path, torch)
    # transformers' gpt2 loader stores output.weight under lm_head itself; none here (tied).
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_new_architectures_configs_vs_transformers(tiny_arch_gguf, torch: Any) -> None:
    """Equal but for the fields llama.cpp writes and transformers' mapping drops."""
    assert config_difference(tiny_arch_gguf("qwen2")[0]) == {}
    assert config_difference(tiny_arch_gguf("gemma2")[0]) == {
        "attn_logit_softcapping": (20.0, 50.0),
        "final_logit_softcapping": (10.0, 30.0),
        "query_pre_attn_scalar": (32, 256),  # llama.cpp: head_dim below 27B
    }
    phi3 = config_difference(tiny_arch_gguf("phi3")[0])
    assert phi3.pop("rope_parameters")[0]["partial_rotary_factor"] == 0.5
    assert phi3 == {
        "sliding_window": (8, None),
        "original_max_position_embeddings": (64, 4096),  # Phi3Config's default
        "partial_rotary_factor": (0.5, None),  # also kept as an attribute
    }
    gpt2 = config_difference(tiny_arch_gguf("gpt2")[0])
    assert gpt2 == {"n_positions": (32, 1024)}


def test_olmo2_has_no_transformers_mapping_ours_is_used(tiny_arch_gguf, torch: Any) -> None:
    from transformers import AutoConfig

    path, model, _ = tiny_arch_gguf("olmo2")
    with pytest.raises(ValueError, match="olmo2"):
        AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    ours, hf = read_gguf_config(path).to_dict(), model.config.to_dict()
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_parameters",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert ours[key] == pytest.approx(hf[key], rel=1e-7), key  # rms_norm_eps: float32 in the file


def test_gemma2_27b_attention_scale_as_llama_cpp(tmp_path: Path) -> None:
    path = tmp_path / "gemma2_27b.gguf"
    writer = gguf.GGUFWriter(path, "gemma2")
    writer.add_block_count(46)  # how llama.cpp recognizes Gemma 2 27B
    writer.add_embedding_length(4608)
    writer.add_head_count(32)
    writer.add_key_length(128)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert read_gguf_config(path).query_pre_attn_scalar == 144  # HF's Gemma 2 27B config


def test_gpt2_tokenizer_matches_transformers(tiny_arch_gguf, torch: Any) -> None:
    from transformers import AutoTokenizer

    path, _, _ = tiny_arch_gguf("gpt2")
    ours, theirs = load_gguf_tokenizer(path), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert type(ours) is type(theirs) and ours.get_vocab() == theirs.get_vocab()
    for text in TEXTS:
        assert ours(text).input_ids == theirs(text).input_ids, text
    assert load_gguf_tokenizer(tiny_arch_gguf("olmo2")[0])("the theme").input_ids


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_jaxlin_port_runs_from_the_gguf(tiny_arch_gguf, torch: Any, arch: str) -> None:
    """End to end: GGUF → jaxlin params → the JAX port's logits equal HF's (float32)."""
    import jax.numpy as jnp

    from converters.gguf_model import load_gguf_model
    from jaxlin import model as model_fns

    path, model, expected = tiny_arch_gguf(arch)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in expected.items()}, strict=False)
    model.tie_weights()
    ids = np.arange(24) * 7 % VOCAB
    with torch.no_grad():
        reference = model(torch.as_tensor(ids)[None]).logits[0].double().numpy()
    ours = load_gguf_model(path, jnp.float32)
    hidden = model_fns.final_hidden(ours.config, ours.params, model_fns.embed(ours.config, ours.params, ids))
    logits = np.asarray(model_fns.logits(ours.config, ours.params, hidden), np.float64)
    assert np.linalg.norm(logits - reference) / np.linalg.norm(reference) <= 1e-5


# --------------------------------------------------------------------------- RoPE scaling from tensors


def relative_error(values: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(values, np.float64) - reference) / np.linalg.norm(reference))


@pytest.mark.parametrize(
    ("name", "lengths"), [("llama3", (24,)), ("phi3_longrope", (12, 24))], ids=["llama3", "phi3_longrope"]
)
def test_rope_scaling_rebuilt_from_llama_cpp_tensors(
    rope_scaled_gguf, torch: Any, name: str, lengths
) -> None:
    """A Llama 3.1-style and a long-context Phi-3 GGUF, generated tensors and all, give
    the original HF model's final hidden state and logits through jaxlin (float32).
    Phi-3 below (12) and past (24) its 16-token original context: short then long factors.
    Plain RoPE would be another model at every length."""
    import dataclasses

    import jax.numpy as jnp

    from converters.gguf_model import load_gguf_model
    from jaxlin import model as model_fns
    from jaxlin._config import ModelConfig, RopeConfig

    path, model = rope_scaled_gguf(name)
    ours = load_gguf_model(path, jnp.float32)
    assert ours.config.rope.rope_type == ("frequency_factors" if name == "llama3" else "longrope")
    assert ModelConfig.from_json(ours.config.to_json()) == ours.config  # what the params cache keeps
    plain = dataclasses.replace(ours.config, rope=RopeConfig(ours.config.rope.theta))
    for length in lengths:
        ids = np.arange(length) * 7 % VOCAB
        with torch.no_grad():  # the decoder's last_hidden_state is after the final norm
            reference_hidden = model.model(torch.as_tensor(ids)[None]).last_hidden_state[0].double().numpy()
            reference_logits = model(torch.as_tensor(ids)[None]).logits[0].double().numpy()
        inputs = model_fns.embed(ours.config, ours.params, ids)
        hidden = np.asarray(model_fns.final_hidden(ours.config, ours.params, inputs), np.float64)
        logits = np.asarray(model_fns.logits(ours.config, ours.params, jnp.asarray(hidden, jnp.float32)))
        assert relative_error(hidden, reference_hidden) <= 1e-5, length
        assert relative_error(logits, reference_logits) <= 1e-5, length
        unscaled = np.asarray(model_fns.final_hidden(plain, ours.params, inputs), np.float64)
        assert relative_error(unscaled, reference_hidden) > 1e-3, length


def test_rebuilt_longrope_config_is_hfs_own(rope_scaled_gguf, torch: Any) -> None:
    """Phi-3's rebuilt config is plain HF longrope: transformers builds the original model
    from it. Llama's explicit factors have no HF type: transformers refuses to build a
    model, rather than build one with plain RoPE."""
    from transformers import AutoModelForCausalLM

    path, model = rope_scaled_gguf("phi3_longrope")
    config = read_gguf_config(path)
    config._attn_implementation = "eager"
    rebuilt = AutoModelForCausalLM.from_config(config).eval()
    rebuilt.load_state_dict({k: torch.from_numpy(v) for k, v in read_gguf_state_dict(path).items()})
    for length in (12, 24):
        ids = torch.arange(length)[None] * 7 % VOCAB
        with torch.no_grad():
            np.testing.assert_allclose(
                rebuilt(ids).logits.numpy(), model(ids).logits.numpy(), rtol=0, atol=1e-5, err_msg=str(length)
            )
    with pytest.raises(KeyError, match="frequency_factors"):
        AutoModelForCausalLM.from_config(read_gguf_config(rope_scaled_gguf("llama3")[0]))


@pytest.mark.parametrize(
    ("factor", "head_dim"), [(8.0, 128), (32.0, 64)], ids=["llama-3.1-8b", "llama-3.2-1b"]
)
def test_llama_cpp_rope_freqs_are_hf_llama3_scaling(torch: Any, factor: float, head_dim: int) -> None:
    """At the real Llama 3.1 8B / 3.2 1B settings (theta 500000, original context 8192,
    low/high freq factors 1/4): transformers' llama3 inverse frequencies are its plain
    ones divided by the factors llama.cpp's converter writes (float32 both: ~1e-7)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from jaxlin._config import FrequencyFactorsRope

    rope_parameters = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    hf_config = LlamaConfig(
        hidden_size=head_dim * 32,
        num_attention_heads=32,
        max_position_embeddings=131072,
        rope_parameters=rope_parameters,
    )
    hparams = {"rope_parameters": rope_parameters, "hidden_size": head_dim * 32, "num_attention_heads": 32}
    factors = llama_cpp_generate_extra_tensors("llama", hparams, gguf.GGUFWriter(None, "llama"))[ROPE_FREQS]
    assert {1.0, factor} < set(factors.tolist())  # every band is populated
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    ours = FrequencyFactorsRope(500000.0, frequency_factors=tuple(factors.tolist()))
    np.testing.assert_allclose(ours.inverse_frequencies(head_dim, 1), hf_inv_freq.double().numpy(), rtol=1e-6)
