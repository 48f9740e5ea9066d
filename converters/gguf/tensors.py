"""GGUF tensors → Hugging Face–named, HF-laid-out numpy arrays: the family's llama.cpp
names (`blk.0.attn_q.weight`) translated, and llama.cpp's conventions undone (Gemma's
`1 + w` norm weights, Llama's q/k row permutation, GPT-2's Conv1D transposes).
Dequantization is `gguf.quants.dequantize`, the library llama.cpp writes these files with;
with `keep_quantized`, quantized matrices stay quantized instead (converters/gguf/quantized.py).
`gguf_tensors` leaves every tensor in the file's memory map (a `LazyTensor`): a slice
dequantizes only the rows it needs (whole rows: a quantized block spans columns)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from converters.gguf.architectures import gguf_family, gguf_names
from converters.gguf.quantized import KEPT_QUANTIZED, quantized_matrix, type_layout
from converters.gguf.reader import GGUFError, GGUFSource, GGUFTensor, parsed
from converters.lazy import Index, LazyTensor, SliceReader
from converters.lazy_quantized import LazyQuantized, is_lazy_quantized
from jaxlin.quantized import QuantizedArray

if TYPE_CHECKING:
    import gguf

    from jaxlin.families import Family
    from jaxlin.families._base import GGUFNames

_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")
_GLOBAL_TENSOR = re.compile(r"^(.+)\.(weight|bias)$")


def check_dequantizable(tensor: GGUFTensor, path: str) -> None:
    """Fail before any real work: dequantize one all-zero block of the tensor's type."""
    import gguf

    _, type_size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), tensor.tensor_type)
    except NotImplementedError:
        raise GGUFError(
            f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which gguf cannot dequantize"
        ) from None


def _hf_name(family: Family, names: GGUFNames, gguf_name: str, path: str) -> tuple[str, bool] | None:
    """(HF name of a GGUF tensor, whether llama.cpp stored it transposed); None for one
    llama.cpp generated (no HF parameter)."""
    if names.rope_tensors is not None and gguf_name in names.rope_tensors.tensors:
        return None
    if match := _LAYER_TENSOR.match(gguf_name):
        layer, leaf, suffix = match.groups()
        if leaf in names.layer_tensors:
            hf_name = f"{family.layer_prefix.format(layer=int(layer))}{names.layer_tensors[leaf]}.{suffix}"
            return hf_name, suffix == "weight" and leaf in names.transposed
    elif (match := _GLOBAL_TENSOR.match(gguf_name)) and match.group(1) in names.global_tensors:
        return f"{names.global_tensors[match.group(1)]}.{match.group(2)}", False
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


def read_gguf_state_dict(
    source: GGUFSource,
    dtype: npt.DTypeLike = np.float32,
    progress: bool = False,
    keep_quantized: bool = False,
) -> dict[str, np.ndarray | QuantizedArray]:
    """All tensors of a GGUF file (a parsed `GGUFFile` or a path), dequantized to `dtype`,
    under HF names and in HF layouts: `gguf_tensors`, each read whole.

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

    `keep_quantized=True`: every matrix of a type in `KEPT_QUANTIZED` comes back as a
    host `QuantizedArray` of the same HF-named, HF-laid-out param (its blocks in file order:
    the q/k unpermute moves whole rows, so whole groups; a transpose is a flag, undone
    after dequantizing), dequantizing to float32; everything else as above.
    """
    tensors = gguf_tensors(source, dtype, keep_quantized)
    items = tensors.items()
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc=f"Reading {Path(parsed(source).path).name}", unit="tensor")
    read = lambda value: value.whole() if is_lazy_quantized(value) else np.ascontiguousarray(value)  # noqa: E731
    return {name: read(value) for name, value in items}


def gguf_tensors(
    source: GGUFSource, dtype: npt.DTypeLike = np.float32, keep_quantized: bool = False
) -> dict[str, LazyTensor | LazyQuantized]:
    """The tensors of `read_gguf_state_dict`, still in the file's memory map: each a
    `LazyTensor` whose slices are dequantized (only the rows the slice needs, in whole
    rows: a quantized block spans columns), with llama.cpp's conventions undone on them;
    with `keep_quantized`, a kept matrix is a `LazyQuantized` whose reads decode only the
    rows asked for. Checked (names, types gguf can dequantize) before anything is read."""

    dtype = np.dtype(dtype)
    if dtype.kind != "f" and dtype.name != "bfloat16":
        raise TypeError(f"dtype must be a floating-point type, got {dtype}")

    file = parsed(source)
    family = gguf_family(file)
    names = gguf_names(file)
    n_head = n_head_kv = 0
    if names.unpermute_qk:
        n_head = file.int_value(f"{names.architecture}.attention.head_count")
        # llama.cpp's loader defaults the KV head count to the head count, and so do we
        # (transformers instead skips the unpermute when it is absent, leaving q/k scrambled).
        n_head_kv = file.int_value(f"{names.architecture}.attention.head_count_kv", default=n_head)

    plan = [(tensor, _hf_name(family, names, tensor.name, file.path)) for tensor in file.tensors]
    first_of_type: dict[gguf.GGMLQuantizationType, GGUFTensor] = {}
    for tensor, target in plan:
        if target is not None:
            first_of_type.setdefault(tensor.tensor_type, tensor)
    for tensor in first_of_type.values():
        check_dequantizable(tensor, file.path)

    tensors: dict[str, LazyTensor | LazyQuantized] = {}
    for tensor, target in plan:
        if target is None:
            continue
        hf_name, transposed = target
        heads = (n_head, n_head_kv)
        if keep_quantized and tensor.tensor_type in KEPT_QUANTIZED and len(tensor.shape) == 2:
            tensors[hf_name] = _quantized(tensor, hf_name, transposed, names, heads, file.path)
            continue
        rows = None  # the stored row of each HF row, where llama.cpp permuted them
        if names.unpermute_qk and ".self_attn.q_proj." in hf_name:
            rows = _unpermute_rows(np.arange(tensor.shape[0]), n_head, tensor.name, file.path)
        elif names.unpermute_qk and ".self_attn.k_proj." in hf_name:
            rows = _unpermute_rows(np.arange(tensor.shape[0]), n_head_kv, tensor.name, file.path)
        offset = names.norm_offset if names.norm_offset and hf_name.endswith("norm.weight") else 0.0
        lazy = LazyTensor.of(tensor.shape, _slice_reader(tensor, rows, offset, dtype))
        tensors[hf_name] = lazy.T if transposed else lazy
    return tensors


def _slice_reader(tensor: GGUFTensor, rows: np.ndarray | None, offset: float, dtype: np.dtype) -> SliceReader:
    """Slices of a GGUF tensor in HF order (`rows[i]`: the stored row of HF row i), read
    from the memory map and dequantized; nothing else of the file is touched."""
    import gguf

    # The offset is subtracted in float32 (what the file stores norms in) or wider, then
    # cast once, so nothing is rounded twice.
    work_dtype = np.float64 if dtype == np.float64 else np.float32

    def read(index: Index) -> np.ndarray:
        if len(tensor.shape) == 1:  # a norm or a bias: small, dequantized whole
            data, shape, rest = tensor.data, tensor.shape, index
        else:
            chosen = index[0] if rows is None else rows[index[0]]
            data = tensor.data[chosen]
            shape = (data.shape[0], *tensor.shape[1:])
            rest = (slice(None), *index[1:])
        values = gguf.quants.dequantize(data, tensor.tensor_type)
        # F32 comes back as a read-only view of the memory map: copy it out of the file.
        if np.may_share_memory(values, tensor.data):
            values = np.array(values, dtype=work_dtype)
        else:
            values = values.astype(work_dtype, copy=False)
        values = values.reshape(shape)[rest]
        if offset:
            values = values - offset
        return values.astype(dtype, copy=False)

    return read


def _quantized(
    tensor: GGUFTensor, hf_name: str, transposed: bool, names: GGUFNames, heads: tuple[int, int], path: str
) -> LazyQuantized:
    """A quantized matrix of the state dict, still in the memory map: llama.cpp's
    conventions undone on its rows (the q/k unpermute moves whole rows, so whole groups;
    a transpose is a flag), each read decoding only the stored rows it needs."""
    n_head, n_head_kv = heads
    rows = None  # the stored row of each HF row, where llama.cpp permuted them
    if names.unpermute_qk and ".self_attn.q_proj." in hf_name:
        rows = _unpermute_rows(np.arange(tensor.shape[0]), n_head, tensor.name, path)
    elif names.unpermute_qk and ".self_attn.k_proj." in hf_name:
        rows = _unpermute_rows(np.arange(tensor.shape[0]), n_head_kv, tensor.name, path)

    def read_rows(part: slice) -> QuantizedArray:
        return quantized_matrix(tensor.data[part if rows is None else rows[part]], tensor.tensor_type)

    matrix = LazyQuantized.of(tensor.shape, type_layout(tensor.tensor_type), read_rows)
    return matrix.T if transposed else matrix
