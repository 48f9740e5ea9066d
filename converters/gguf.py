"""GGUF checkpoints (llama.cpp) as Hugging Face–named, HF-laid-out numpy state dicts.

The rest of jaxlin only knows HF safetensors checkpoints, so this module hides every
llama.cpp convention: tensor names (`blk.0.attn_q.weight`), Gemma's `1 + w` norm weights,
the q/k row permutation llama.cpp's converter applies to Llama for its interleaved
RoPE, and the transposes of GPT-2's Conv1D weights. Architectures: gemma2, gemma3, gpt2,
llama, olmo2, phi3, qwen2, qwen3. Mistral has no GGUF architecture of its own (gguf 0.19
knows only "mistral3"/"mistral4"): llama.cpp writes Mistral 7B as "llama", read as such.

Nothing is unpickled and torch is never needed: the flat GGUF header is read with
`struct` (see "reading" below for why not gguf.GGUFReader), while ggml types, block sizes
and dequantization (`gguf.quants.dequantize`) are the `gguf` package's, the library
llama.cpp writes these files with.

The config is transformers' own GGUF metadata mapping (`GGUF_CONFIG_MAPPING`), rebuilt
here because transformers 5.x reaches it only through modules that import torch
(`integrations/gguf/reader.py`, `modeling_gguf_pytorch_utils.load_gguf_checkpoint`), and
jaxlin's runtime must not need torch. The tokenizer is built the same way, from
transformers' own GGUF tokenizer builders. Tests check all three against transformers.

RoPE scaling that llama.cpp's converter turns into tensors (and transformers' mapping
ignores, leaving plain RoPE) is rebuilt into the config from those tensors:
- Llama 3.1/3.2: `rope_scaling` rope_type "llama3" becomes `rope_freqs`, one divisor per
  inverse frequency (LlamaModel.generate_extra_tensors); llama.cpp rotates by
  inv_freq / factor, which is exactly HF's llama3 scaling. No metadata says how the
  factors were made, and transformers has no RoPE type taking them as they are, so the
  config gets jaxlin's own rope_type "frequency_factors" (transformers refuses to build a
  model from it instead of silently building one with plain RoPE).
- Phi-3 long-context: longrope's factors become `rope_factors_long/short` and its
  attention factor `rope.scaling.attn_factor` (Phi3MiniModel.generate_extra_tensors); the
  config gets HF's own longrope parameters back, so transformers builds the same model.
The tensors are not returned by `read_gguf_state_dict` (no HF parameter holds them).
What llama.cpp writes as plain metadata that transformers' mapping drops and that is not
rebuilt (linear/YaRN `rope.scaling.*`, OLMo 3's sliding window) is warned about.

What cannot be undone, and is therefore only documented:
- llama.cpp drops a tied `lm_head.weight` (the file has no `output.weight`); the config
  then says `tie_word_embeddings=True`, exactly like an HF checkpoint of a tied model.
- Gemma 3: llama.cpp cuts the embedding to the tokenizer's length (262208 → 262144 rows
  for the 1B+ models); the config's `vocab_size` is that length, so both agree.
- Gemma 2: llama.cpp never writes `lm_head.weight` (Gemma 2 always ties it).
- The RoPE factor tensors are float32: the rebuilt factors are the HF config's rounded
  to float32 (~1e-7 relative), as in llama.cpp itself.
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from jaxlin.errors import JaxlinError

if TYPE_CHECKING:
    import gguf
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

__all__ = [
    "SUPPORTED_GGUF_ARCHITECTURES",
    "GGUFError",
    "GGUFFileNotFoundError",
    "read_gguf_config",
    "read_gguf_state_dict",
    "load_gguf_tokenizer",
]


class GGUFError(JaxlinError, ValueError):
    """A GGUF file jaxlin cannot read faithfully. One line, naming the file and the
    tensor or metadata field at fault. A JaxlinError too, so the CLI prints it as one line."""


class GGUFFileNotFoundError(GGUFError, FileNotFoundError):
    """The path does not exist: catchable as FileNotFoundError as well as GGUFError."""


# Names outside the layers of the llama-style architectures (all but gpt2).
_GLOBAL_TENSORS: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    # Absent when llama.cpp tied it to token_embd (then no lm_head, like a tied HF checkpoint).
    "output": "lm_head",
}


@dataclasses.dataclass(frozen=True)
class _ArchSpec:
    """Everything llama.cpp's converter does differently from HF for one architecture."""

    # GGUF per-layer leaf name (between `blk.{i}.` and `.weight`/`.bias`) → HF name
    # (between `{layer_prefix}.{i}.` and the same suffix).
    layer_tensors: Mapping[str, str]
    # GGUF name outside the layers (before `.weight`/`.bias`) → HF name.
    global_tensors: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(_GLOBAL_TENSORS))
    layer_prefix: str = "model.layers"
    # llama.cpp stores every `*norm.weight` as `w + norm_offset` (Gemma's RMSNorm scales
    # by `1 + w`; llama.cpp's kernel scales by the stored value).
    norm_offset: float = 0.0
    # llama.cpp's LlamaModel.permute reorders q/k rows per head from HF's rotate-half
    # pairing (i, i + d/2) to its interleaved pairing (2i, 2i + 1).
    unpermute_qk: bool = False
    # GGUF leaves whose `.weight` llama.cpp stores transposed: GPT-2's Conv1D keeps
    # (in, out), llama.cpp writes every matrix as nn.Linear's (out, in).
    transposed: frozenset[str] = frozenset()
    # Tensors llama.cpp generates from the HF config, with no HF parameter: GGUF name →
    # what they hold. Not in the state dict; `read_gguf_config` rebuilds the config from them.
    generated_tensors: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Metadata keys (after `{arch}.`) transformers' GGUF_CONFIG_MAPPING misses although
    # the HF config has the field. Applied on top of transformers' mapping.
    extra_config_keys: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Our own metadata mapping, for an architecture transformers' GGUF_CONFIG_MAPPING lacks.
    config_mapping: Mapping[str, str | None] | None = None


# RoPE scaling as llama.cpp's converter writes it: tensors, not metadata (gguf's
# MODEL_TENSOR.ROPE_FREQS, ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT).
_ROPE_FREQS = "rope_freqs.weight"
_ROPE_FACTORS_LONG = "rope_factors_long.weight"
_ROPE_FACTORS_SHORT = "rope_factors_short.weight"

# The llama-style block every supported architecture but gpt2 starts from.
_DECODER_LAYER_TENSORS: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_QK_NORM_TENSORS: dict[str, str] = {
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
# Gemma's sandwich norms: four per layer. llama.cpp's ffn_norm is HF's
# pre_feedforward_layernorm here, not post_attention_layernorm as for Llama.
_GEMMA_NORM_TENSORS: dict[str, str] = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

# transformers has no GGUF config mapping for olmo2 (it cannot load such a file at all).
# What llama.cpp's Olmo2Model writes (TextModel.set_gguf_parameters) → Olmo2Config fields.
_OLMO2_CONFIG_MAPPING: dict[str, str | None] = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.dimension_count": None,
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}

# Checked against gguf's own HF→GGUF TensorNameMap in tests/test_gguf.py. Conventions
# are those of llama.cpp's convert_hf_to_gguf.py (conversion/*.py): only LlamaModel
# (and Olmo 1, not supported) permutes q/k; every other architecture here uses
# NEOX-style RoPE in llama.cpp, i.e. HF's rotate-half layout, stored unchanged.
_ARCHITECTURES: dict[str, _ArchSpec] = {
    "llama": _ArchSpec(
        # Llama's post_attention_layernorm is the norm *before* the MLP: llama.cpp's ffn_norm.
        layer_tensors={**_DECODER_LAYER_TENSORS, "ffn_norm": "post_attention_layernorm"},
        unpermute_qk=True,
        generated_tensors={_ROPE_FREQS: "llama3 RoPE scaling as one divisor per frequency"},
    ),
    # Qwen2: Llama's names plus q/k/v biases (the `.bias` suffix carries over unchanged).
    "qwen2": _ArchSpec(
        layer_tensors={**_DECODER_LAYER_TENSORS, "ffn_norm": "post_attention_layernorm"},
    ),
    "qwen3": _ArchSpec(
        layer_tensors={
            **_DECODER_LAYER_TENSORS,
            **_QK_NORM_TENSORS,
            "ffn_norm": "post_attention_layernorm",
        },
        # llama.cpp writes Qwen3's explicit head_dim (128 ≠ hidden/heads for Qwen3-0.6B)
        # as key_length; transformers' qwen3 mapping drops it and falls back on
        # Qwen3Config's default 128, right for every released Qwen3 but no other file.
        extra_config_keys={"attention.key_length": "head_dim"},
    ),
    "gemma2": _ArchSpec(
        layer_tensors={**_DECODER_LAYER_TENSORS, **_GEMMA_NORM_TENSORS},
        # llama.cpp's Gemma2Model skips lm_head.weight: the output is always the embedding.
        global_tensors={k: v for k, v in _GLOBAL_TENSORS.items() if k != "output"},
        norm_offset=1.0,
        # Written by llama.cpp's Gemma2Model, used by its graph; transformers' gemma2
        # mapping drops them and keeps Gemma2Config's defaults (50, 30).
        extra_config_keys={
            "attn_logit_softcapping": "attn_logit_softcapping",
            "final_logit_softcapping": "final_logit_softcapping",
        },
    ),
    "gemma3": _ArchSpec(
        layer_tensors={**_DECODER_LAYER_TENSORS, **_QK_NORM_TENSORS, **_GEMMA_NORM_TENSORS},
        norm_offset=1.0,
    ),
    # Phi-3 keeps HF's fused tensors: qkv_proj (rows q, k, v) as attn_qkv and
    # gate_up_proj (rows gate, up) as ffn_up; llama.cpp splits both at run time in the
    # same order, so nothing moves.
    "phi3": _ArchSpec(
        layer_tensors={
            "attn_norm": "input_layernorm",
            "attn_qkv": "self_attn.qkv_proj",
            "attn_output": "self_attn.o_proj",
            "ffn_norm": "post_attention_layernorm",
            "ffn_up": "mlp.gate_up_proj",
            "ffn_down": "mlp.down_proj",
        },
        generated_tensors={
            _ROPE_FACTORS_LONG: "longrope's long_factor",
            _ROPE_FACTORS_SHORT: "longrope's short_factor",
        },
        # Both written by llama.cpp's Phi3MiniModel (sliding_window 0 = none, for Phi-4),
        # both Phi3Config fields, both dropped by transformers' phi3 mapping.
        extra_config_keys={
            "attention.sliding_window": "sliding_window",
            "rope.scaling.original_context_length": "original_max_position_embeddings",
        },
    ),
    "olmo2": _ArchSpec(
        layer_tensors={
            **{k: v for k, v in _DECODER_LAYER_TENSORS.items() if k != "attn_norm"},
            **_QK_NORM_TENSORS,
            # OLMo 2 normalizes after attention and MLP only (no pre-norms).
            "post_attention_norm": "post_attention_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        },
        config_mapping=_OLMO2_CONFIG_MAPPING,
    ),
    "gpt2": _ArchSpec(
        layer_prefix="transformer.h",
        layer_tensors={
            "attn_norm": "ln_1",
            "attn_qkv": "attn.c_attn",
            "attn_output": "attn.c_proj",
            "ffn_norm": "ln_2",
            "ffn_up": "mlp.c_fc",
            "ffn_down": "mlp.c_proj",
        },
        global_tensors={
            "token_embd": "transformer.wte",
            "position_embd": "transformer.wpe",
            "output_norm": "transformer.ln_f",
            "output": "lm_head",
        },
        # llama.cpp's GPT2Model transposes the c_attn, c_proj and c_fc weights (Conv1D).
        transposed=frozenset({"attn_qkv", "attn_output", "ffn_up", "ffn_down"}),
    ),
}

SUPPORTED_GGUF_ARCHITECTURES: tuple[str, ...] = tuple(sorted(_ARCHITECTURES))

# Metadata llama.cpp writes that changes the forward pass but that transformers' GGUF
# config mapping ignores: the config built from the file would silently be another model.
_SEMANTIC_KEYS_HF_IGNORES: tuple[str, ...] = (
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scaling.original_context_length",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    # OLMo 3 files are "olmo2" with sliding-window layers.
    "attention.sliding_window",
)

_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")
_GLOBAL_TENSOR = re.compile(r"^(.+)\.(weight|bias)$")


# --------------------------------------------------------------------------- reading
#
# gguf.GGUFReader would do, but it builds two numpy views per metadata string up front:
# for Gemma 3's 262k-token vocabulary that is 9.5 s and ~600 MB before a single tensor
# is touched (the reason transformers 5 also parses the header itself). The format is a
# flat header, so it is read here with `struct`; types, block sizes and dequantization
# stay gguf's own. tests/test_gguf.py checks this parser against GGUFReader.

# GGUFValueType → struct format of a scalar (string = 8 and array = 9 are variable-size).
_SCALAR_FORMATS: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAGIC = b"GGUF"
# v1 counted in 32 bits and predates every file jaxlin could meet.
_GGUF_VERSIONS = (2, 3)


@dataclasses.dataclass(frozen=True)
class _Tensor:
    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: ggml's dimensions reversed, so (rows, columns)
    data: np.ndarray  # the raw bytes, (rows, bytes per row) uint8, as gguf.quants.dequantize takes them


@dataclasses.dataclass(frozen=True)
class _GGUFFile:
    path: str
    metadata: dict[str, Any]
    tensors: tuple[_Tensor, ...]


class _Cursor:
    """Sequential little-endian reads from the header; struct.error means truncation."""

    def __init__(self, buffer: np.ndarray) -> None:
        self.buffer = buffer
        self.pos = 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        raw = bytes(self.buffer[self.pos : self.pos + length])
        if len(raw) != length:
            raise struct.error("string runs past the end of the file")
        self.pos += length
        return raw.decode("utf-8")  # strict: a silently altered token would be worse

    def value(self, value_type: int) -> Any:
        if value_type in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[value_type])
        if value_type == _GGUF_STRING:
            return self.string()
        if value_type == _GGUF_ARRAY:
            element_type, count = self.scalar("<I"), self.scalar("<Q")
            if element_type in _SCALAR_FORMATS and element_type != 7:
                # Numbers in one go (scores and token types are 100k+ long).
                dtype = np.dtype(_SCALAR_FORMATS[element_type])
                values = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.pos)
                self.pos += dtype.itemsize * count
                return values.tolist()
            return [self.value(element_type) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {value_type}")


def _parse(path: str | os.PathLike) -> _GGUFFile:
    """Metadata (python values) and the tensor table of a GGUF file; tensor data stays
    in the memory map until dequantized."""
    import gguf

    name = os.fspath(path)
    file = Path(path).expanduser()
    if not file.exists():
        raise GGUFFileNotFoundError(f"{name}: no such GGUF file")
    if not file.is_file():
        raise GGUFError(f"{name}: not a file")
    if file.stat().st_size < 24:  # magic, version and the two counts
        raise GGUFError(f"{name}: not a GGUF file (too short)")
    buffer = np.memmap(file, mode="r", dtype=np.uint8)
    if bytes(buffer[:4]) != _GGUF_MAGIC:
        raise GGUFError(f"{name}: not a GGUF file (no GGUF magic bytes)")
    cursor = _Cursor(buffer)
    cursor.pos = 4
    version = cursor.scalar("<I")
    if version & 0xFFFF == 0:
        # gguf.quants assumes little-endian tensor data, so the weights would be garbage.
        raise GGUFError(f"{name}: byte-swapped (big-endian) GGUF files are not supported")
    if version not in _GGUF_VERSIONS:
        raise GGUFError(f"{name}: GGUF version {version} is not supported (only {_GGUF_VERSIONS})")
    try:
        tensor_count, metadata_count = cursor.scalar("<Q"), cursor.scalar("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(metadata_count):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.scalar("<I"))
        table = []
        for _ in range(tensor_count):
            tensor_name = cursor.string()
            dims = [cursor.scalar("<Q") for _ in range(cursor.scalar("<I"))]
            table.append((tensor_name, tuple(reversed(dims)), cursor.scalar("<I"), cursor.scalar("<Q")))
    except (struct.error, ValueError) as error:  # UnicodeDecodeError is a ValueError too
        raise GGUFError(f"{name}: truncated or corrupt GGUF header ({error})") from None

    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{name}: metadata field 'general.alignment' = {alignment!r} is not a power of two")
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = []
    for tensor_name, shape, type_id, offset in table:
        try:
            tensor_type = gguf.GGMLQuantizationType(type_id)
        except ValueError:
            raise GGUFError(f"{name}: tensor {tensor_name!r} has unknown ggml type id {type_id}") from None
        shape = shape or (1,)  # no weight is 0-d; keep the arithmetic below simple
        try:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, tensor_type)
        except ValueError as error:
            raise GGUFError(f"{name}: tensor {tensor_name!r}: {error}") from None
        start = data_start + offset
        size = int(np.prod(byte_shape))
        if start + size > buffer.size:
            raise GGUFError(f"{name}: tensor {tensor_name!r} runs past the end of the file (truncated?)")
        data = buffer[start : start + size].reshape(byte_shape)
        tensors.append(_Tensor(tensor_name, tensor_type, shape, data))
    return _GGUFFile(name, metadata, tuple(tensors))


def _metadata(file: _GGUFFile, key: str, default: Any = ...) -> Any:
    if key not in file.metadata:
        if default is ...:
            raise GGUFError(f"{file.path}: metadata field {key!r} is missing")
        return default
    return file.metadata[key]


def _architecture(file: _GGUFFile) -> str:
    architecture = _metadata(file, "general.architecture")
    if architecture not in _ARCHITECTURES:
        raise GGUFError(
            f"{file.path}: GGUF architecture {architecture!r} (general.architecture) is not "
            f"supported; supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    # A model split by llama-gguf-split keeps most tensors in the other shards.
    split_count = _metadata(file, "split.count", default=1)
    if split_count != 1:
        raise GGUFError(
            f"{file.path}: one shard of a {split_count}-way split GGUF (split.count); "
            "merge the shards first (llama-gguf-split --merge)"
        )
    return architecture


def _int_metadata(file: _GGUFFile, key: str, default: Any = ...) -> int:
    value = _metadata(file, key, default)
    # Per-layer lists (hybrid models) have no single meaning here.
    if isinstance(value, bool) or not isinstance(value, int):
        raise GGUFError(f"{file.path}: metadata field {key!r} = {value!r} is not a single integer")
    return value


# --------------------------------------------------------------------------- config


def _config_value(value: Any) -> Any:
    # transformers' parser collapses a one-element array to its element; so must we.
    return value[0] if isinstance(value, list) and len(value) == 1 else value


# Layer count by which llama.cpp recognizes the 27B model (and its attention scale).
_GEMMA_27B_LAYERS: dict[str, int] = {"gemma2": 46, "gemma3": 62}


def _config_dict(file: _GGUFFile) -> dict[str, Any]:
    """The dict transformers' legacy `load_gguf_checkpoint(..., return_tensors=False)`
    returns as "config", for the supported architectures, without torch."""
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    architecture = _architecture(file)
    spec = _ARCHITECTURES[architecture]
    # transformers' own quirk, kept for parity: llama.cpp writes Mistral models as
    # "llama", and transformers loads one as Mistral when general.name is exactly
    # "mistral" (it tests membership in the one-element list of names).
    name = _metadata(file, "general.name", default=None)
    hf_architecture = "mistral" if architecture == "llama" and name == "mistral" else architecture

    tensor_names = {tensor.name for tensor in file.tensors}
    config: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in tensor_names}
    for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(hf_architecture, {}).items():
        config.setdefault(key, value)

    mapping: dict[str, Mapping[str, Any]] = {
        "general": GGUF_CONFIG_MAPPING["general"],
        "tokenizer": GGUF_CONFIG_MAPPING["tokenizer"],
        architecture: _architecture_config_mapping(hf_architecture, spec),
    }
    for key, value in file.metadata.items():
        prefix, _, rest = key.partition(".")
        hf_key = mapping.get(prefix, {}).get(rest)
        # None and -1 are transformers' "known, deliberately not mapped".
        if hf_key is None or hf_key == -1:
            continue
        config[hf_key] = hf_architecture if key == "general.architecture" else _config_value(value)

    # Gemma 2/3 27B scale attention by hidden/heads (their HF configs: query_pre_attn_scalar
    # 144 and 168), the others by head_dim (256 for every released size, transformers'
    # default). The file does not say; llama.cpp (llama-model.cpp, LLM_ARCH_GEMMA2/3)
    # recognizes 27B by its layer count (46, 62) and uses head_dim otherwise. So do we.
    if (model_type := config.get("model_type")) in _GEMMA_27B_LAYERS:
        if config.get("num_hidden_layers") == _GEMMA_27B_LAYERS[model_type]:
            config["query_pre_attn_scalar"] = config["hidden_size"] // config["num_attention_heads"]
        elif "head_dim" in config:
            config["query_pre_attn_scalar"] = config["head_dim"]
    # transformers maps gpt2's context_length to `n_ctx`, an attribute GPT2Config keeps
    # but does not use; the position table's length (wpe rows) is n_positions.
    if config.get("model_type") == "gpt2" and "n_ctx" in config:
        config["n_positions"] = config["n_ctx"]
    # GGUF's gemma3 is the text model only: HF's text-only config class.
    if config.get("model_type") == "gemma3":
        config["model_type"] = "gemma3_text"
    if config.get("model_type") == "phi3":
        # llama.cpp writes sliding_window 0 for "none" (Phi-4); HF says None.
        if config.get("sliding_window") == 0:
            config["sliding_window"] = None
        # llama.cpp writes int(partial_rotary_factor * hidden) // heads as the RoPE
        # dimension count (Phi-4-mini: 0.75); transformers' phi3 mapping drops it.
        rope_dims = file.metadata.get("phi3.rope.dimension_count")
        if isinstance(rope_dims, int) and "hidden_size" in config and "num_attention_heads" in config:
            head_dim = config["hidden_size"] // config["num_attention_heads"]
            if rope_dims != head_dim:
                config["partial_rotary_factor"] = rope_dims / head_dim
        if (longrope := _phi3_longrope_parameters(file)) is not None:
            config["rope_parameters"] = longrope
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in file.metadata:
        config["vocab_size"] = len(file.metadata["tokenizer.ggml.tokens"])
    return config


def _rope_factors(file: _GGUFFile, name: str) -> list[float] | None:
    """The values of a RoPE factor tensor llama.cpp generated (None if the file has none),
    checked against the RoPE dimension count: one factor per rotated pair."""
    import gguf

    tensor = next((tensor for tensor in file.tensors if tensor.name == name), None)
    if tensor is None:
        return None
    _check_dequantizable(tensor, file.path)
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(-1)
    rope_dims = file.metadata.get(f"{_architecture(file)}.rope.dimension_count")
    if isinstance(rope_dims, int) and len(values) != rope_dims // 2:
        raise GGUFError(
            f"{file.path}: tensor {name!r} has {len(values)} values, expected {rope_dims // 2} "
            f"(half the RoPE dimension count {rope_dims})"
        )
    return [float(value) for value in values]


def _phi3_longrope_parameters(file: _GGUFFile) -> dict[str, Any] | None:
    """HF's longrope `rope_parameters` back from what llama.cpp's Phi3MiniModel writes for
    a long-context Phi-3: the factors as tensors and the attention factor as
    `rope.scaling.attn_factor` (the value HF's default formula gives; files from converters
    that did not write it get that formula from transformers). rope_theta,
    partial_rotary_factor and original_max_position_embeddings are merged in by Phi3Config
    from the fields mapped beside it. None for a file without the factors."""
    long_factor = _rope_factors(file, _ROPE_FACTORS_LONG)
    short_factor = _rope_factors(file, _ROPE_FACTORS_SHORT)
    if long_factor is None and short_factor is None:
        return None
    if long_factor is None or short_factor is None:
        present, missing = (
            (_ROPE_FACTORS_LONG, _ROPE_FACTORS_SHORT)
            if short_factor is None
            else (_ROPE_FACTORS_SHORT, _ROPE_FACTORS_LONG)
        )
        raise GGUFError(f"{file.path}: tensor {present!r} without {missing!r}: longrope needs both")
    parameters: dict[str, Any] = {
        "rope_type": "longrope",
        "long_factor": long_factor,
        "short_factor": short_factor,
    }
    attention_factor = file.metadata.get(f"{_architecture(file)}.rope.scaling.attn_factor")
    if attention_factor is not None:
        parameters["attention_factor"] = float(attention_factor)
    return parameters


def _architecture_config_mapping(hf_architecture: str, spec: _ArchSpec) -> dict[str, Any]:
    """`{arch}.` metadata key → HF config field: transformers' mapping (or ours where it
    has none) plus the keys it misses."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    base = spec.config_mapping if spec.config_mapping is not None else GGUF_CONFIG_MAPPING[hf_architecture]
    return {**base, **spec.extra_config_keys}


def _warn_about_what_the_config_drops(file: _GGUFFile, config: PretrainedConfig) -> None:
    """One warning naming what in the file changes the model but not its HF config. The
    generated RoPE tensors are not among them: `_config` rebuilds the RoPE from them (and a
    `rope.scaling.type` naming the type rebuilt is then no loss either)."""
    architecture = _architecture(file)
    spec = _ARCHITECTURES[architecture]
    mapped = _architecture_config_mapping(architecture, spec)
    rebuilt_rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type")
    keys = [
        f"{key} = {file.metadata[key]!r}"
        for rest in _SEMANTIC_KEYS_HF_IGNORES
        if (key := f"{architecture}.{rest}") in file.metadata
        and mapped.get(rest) in (None, -1)
        and not (rest == "rope.scaling.type" and file.metadata[key] == rebuilt_rope_type)
    ]
    if keys:
        warnings.warn(
            f"{file.path}: {'; '.join(keys)}: changes the model, but transformers' GGUF config mapping "
            "ignores it, so the config describes the model without it",
            stacklevel=3,
        )


def _config(file: _GGUFFile) -> PretrainedConfig:
    from transformers import AutoConfig

    config_dict = _config_dict(file)
    model_type = config_dict.pop("model_type")
    # AutoConfig.from_pretrained(dirname, gguf_file=...) names the directory.
    config = AutoConfig.for_model(model_type, name_or_path=os.fspath(Path(file.path).parent), **config_dict)
    generated = _ARCHITECTURES[_architecture(file)].generated_tensors
    factors = _rope_factors(file, _ROPE_FREQS) if _ROPE_FREQS in generated else None
    if factors is not None:
        # Set after construction: transformers would warn about a rope_type it does not
        # know. It refuses to build a model from it (rather than silently using plain RoPE).
        config.rope_parameters = {
            **config.rope_parameters,
            "rope_type": "frequency_factors",
            "frequency_factors": factors,
        }
    return config


def read_gguf_config(path: str | os.PathLike) -> PretrainedConfig:
    """HF config for the GGUF file: what `AutoConfig.from_pretrained(dirname,
    gguf_file=basename)` builds (transformers' GGUF_CONFIG_MAPPING), rebuilt without torch.

    Raises GGUFError naming the architecture found and the supported ones when
    general.architecture is not in SUPPORTED_GGUF_ARCHITECTURES. Warns when the file holds
    settings that mapping drops and that are not rebuilt (linear/YaRN RoPE scaling
    metadata, OLMo 3's sliding window).
    Deliberate differences from transformers, each a field llama.cpp writes (or infers)
    and transformers drops: qwen3's attention.key_length sets head_dim; Gemma 2/3 get
    query_pre_attn_scalar as llama.cpp computes it (hidden/heads for 27B, else head_dim);
    gemma2's logit soft-capping values; phi3's sliding_window (0 → None),
    original_max_position_embeddings and partial_rotary_factor (from rope.dimension_count);
    gpt2's context_length sets n_positions. olmo2 has no transformers mapping: ours.
    And the RoPE scaling llama.cpp stores as tensors (see the module docstring): llama's
    `rope_freqs` gives rope_parameters {"rope_type": "frequency_factors",
    "frequency_factors": [...]}, phi3's `rope_factors_long/short` and
    rope.scaling.attn_factor give HF's longrope rope_parameters.
    """
    file = _parse(path)
    config = _config(file)
    _warn_about_what_the_config_drops(file, config)
    return config


# --------------------------------------------------------------------------- tensors


def _hf_name(spec: _ArchSpec, gguf_name: str, path: str) -> tuple[str, bool] | None:
    """(HF name of a GGUF tensor, whether llama.cpp stored it transposed); None for one
    llama.cpp generated (no HF parameter)."""
    if gguf_name in spec.generated_tensors:
        return None
    if match := _LAYER_TENSOR.match(gguf_name):
        layer, leaf, suffix = match.groups()
        if leaf in spec.layer_tensors:
            hf_name = f"{spec.layer_prefix}.{int(layer)}.{spec.layer_tensors[leaf]}.{suffix}"
            return hf_name, suffix == "weight" and leaf in spec.transposed
    elif (match := _GLOBAL_TENSOR.match(gguf_name)) and match.group(1) in spec.global_tensors:
        return f"{spec.global_tensors[match.group(1)]}.{match.group(2)}", False
    raise GGUFError(f"{path}: tensor {gguf_name!r} has no known Hugging Face name")


def _unpermute_rows(values: np.ndarray, n_head: int, name: str, path: str) -> np.ndarray:
    """Inverse of llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py):
    `w.reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)`. Only rows move, so
    weights and biases alike."""
    rows = values.shape[0]
    if rows % (2 * n_head):
        raise GGUFError(f"{path}: tensor {name!r} has {rows} rows, not a multiple of 2 × {n_head} heads")
    return (
        values.reshape(n_head, rows // n_head // 2, 2, *values.shape[1:]).swapaxes(1, 2).reshape(values.shape)
    )


def _check_dequantizable(tensor: _Tensor, path: str) -> None:
    """Fail before any real work: dequantize one all-zero block of the tensor's type."""
    import gguf

    _, type_size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), tensor.tensor_type)
    except NotImplementedError:
        raise GGUFError(
            f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which gguf cannot dequantize"
        ) from None


def read_gguf_state_dict(
    path: str | os.PathLike, dtype: npt.DTypeLike = np.float32, progress: bool = False
) -> dict[str, np.ndarray]:
    """All tensors of a GGUF file, dequantized to `dtype`, under HF names and in HF layouts.

    Names: exactly the HF model class's: 'model.embed_tokens.weight',
    'model.layers.{i}.self_attn.q_proj.weight' (.bias for Qwen2), ..., 'model.norm.weight';
    Phi-3's fused 'self_attn.qkv_proj' and 'mlp.gate_up_proj'; GPT-2's 'transformer.wte',
    'transformer.wpe', 'transformer.h.{i}.attn.c_attn', ..., 'transformer.ln_f'. And
    'lm_head.weight' only if the file has `output.weight`.
    Layouts: as HF (nn.Linear weight = (out, in), GPT-2's Conv1D weight = (in, out)).
    llama.cpp's conventions are undone: Gemma 2/3 norm weights (stored as 1 + w), Llama's
    q/k row permutation, GPT-2's Conv1D transposes. Generated tensors without HF
    parameter (Llama 3's `rope_freqs`, Phi-3's `rope_factors_long/short`) are not
    returned: `read_gguf_config` turns them back into the RoPE configuration.

    Raises GGUFError for an unknown tensor name or a type gguf cannot dequantize, before
    dequantizing anything. `progress=True` shows a tqdm bar over tensors.
    """
    import gguf

    dtype = np.dtype(dtype)
    if dtype.kind != "f" and dtype.name != "bfloat16":
        raise TypeError(f"dtype must be a floating-point type, got {dtype}")
    # The offset is subtracted in float32 (what the file stores norms in) or wider, then
    # cast once, so nothing is rounded twice.
    work_dtype = np.float64 if dtype == np.float64 else np.float32

    file = _parse(path)
    architecture = _architecture(file)
    spec = _ARCHITECTURES[architecture]
    n_head = n_head_kv = 0
    if spec.unpermute_qk:
        n_head = _int_metadata(file, f"{architecture}.attention.head_count")
        # llama.cpp's loader defaults the KV head count to the head count, and so do we
        # (transformers instead skips the unpermute when it is absent, leaving q/k scrambled).
        n_head_kv = _int_metadata(file, f"{architecture}.attention.head_count_kv", default=n_head)

    plan = [(tensor, _hf_name(spec, tensor.name, file.path)) for tensor in file.tensors]
    first_of_type: dict[gguf.GGMLQuantizationType, _Tensor] = {}
    for tensor, target in plan:
        if target is not None:
            first_of_type.setdefault(tensor.tensor_type, tensor)
    for tensor in first_of_type.values():
        _check_dequantizable(tensor, file.path)

    state_dict: dict[str, np.ndarray] = {}
    if progress:
        from tqdm.auto import tqdm

        plan = tqdm(plan, desc=f"Reading {Path(file.path).name}", unit="tensor")
    for tensor, target in plan:
        if target is None:
            continue
        hf_name, transposed = target
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        # F32 comes back as a read-only view of the memory map: copy it out of the file.
        if np.may_share_memory(values, tensor.data):
            values = np.array(values, dtype=work_dtype)
        else:
            values = values.astype(work_dtype, copy=False)
        values = values.reshape(tensor.shape)
        if spec.norm_offset and hf_name.endswith("norm.weight"):
            values = values - spec.norm_offset
        if spec.unpermute_qk and ".self_attn.q_proj." in hf_name:
            values = _unpermute_rows(values, n_head, tensor.name, file.path)
        elif spec.unpermute_qk and ".self_attn.k_proj." in hf_name:
            values = _unpermute_rows(values, n_head_kv, tensor.name, file.path)
        if transposed:
            values = np.ascontiguousarray(values.T)
        state_dict[hf_name] = values.astype(dtype, copy=False)
    return state_dict


# --------------------------------------------------------------------------- tokenizer

# Special-token attribute → GGUF id key, as in transformers' get_gguf_tokenizer.
_SPECIAL_TOKEN_IDS: dict[str, str] = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def load_gguf_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The tokenizer `AutoTokenizer.from_pretrained(dirname, gguf_file=basename)` builds,
    assembled without torch from transformers' own GGUF tokenizer pieces: the class
    AutoTokenizer picks for the config's model type, the backend `convert_gguf_tokenizer`
    builds, and the settings `get_gguf_tokenizer` reads. Unlike AutoTokenizer it never
    reads other files lying in the same directory. Falls back to AutoTokenizer itself
    (which needs torch) if a transformers release moves those pieces."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
        from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        from transformers import AutoTokenizer

        file = Path(path)
        if not file.exists():
            raise GGUFFileNotFoundError(f"{os.fspath(path)}: no such GGUF file") from None
        return AutoTokenizer.from_pretrained(
            os.fspath(file.parent), gguf_file=file.name, trust_remote_code=False, local_files_only=True
        )

    file = _parse(path)
    architecture = _architecture(file)
    config = _config(file)

    # transformers' get_gguf_tokenizer, step for step.
    groups = {
        group: {
            name: file.metadata[f"tokenizer.{key}"]
            for key, name in renames.items()
            if f"tokenizer.{key}" in file.metadata
        }
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = groups["tokenizer"], groups["tokenizer_config"]
    tokens = tokenizer_dict.get("tokens")
    if not isinstance(tokens, list):
        raise GGUFError(f"{file.path}: metadata field 'tokenizer.ggml.tokens' is missing")
    tokenizer_type = tokenizer_dict.get("tokenizer_type")
    if tokenizer_type == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
        tokenizer_config.setdefault("add_bos_token", True)
    elif tokenizer_type == "gemma4":
        tokenizer_config["add_bos_token"] = False
    for attribute, key in _SPECIAL_TOKEN_IDS.items():
        token_id = file.metadata.get(f"tokenizer.ggml.{key}")
        tokenizer_config[attribute] = tokens[token_id] if token_id is not None else None

    try:
        backend, extra_kwargs = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except ValueError as error:
        raise GGUFError(f"{file.path}: cannot build its tokenizer ({error})") from None
    tokenizer_class = TOKENIZER_MAPPING.get(type(config), TokenizersBackend) or TokenizersBackend
    return tokenizer_class(
        tokenizer_object=backend,
        name_or_path=os.fspath(Path(file.path).parent),
        **tokenizer_config,
        **extra_kwargs,
    )
