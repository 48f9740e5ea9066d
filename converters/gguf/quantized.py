"""GGUF quantized blocks → `jaxlin.quantized.QuantizedArray` (codes + float32 scales and
offsets per group), decoded on the host from the file's bytes, in the file's order.

Each decoder follows `gguf.quants`' `dequantize_blocks` for its type step by step, but
stops before the final multiply: the integer codes, and the float32 scales and offsets
gguf multiplies them by (formed the same way, so the same float32 numbers). The device
then computes `scale · code + offset` (jaxlin/quantized.py); tests/test_quantized.py
checks that against `gguf.quants.dequantize` bit for bit on random blocks of each type.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import gguf
import numpy as np

from jaxlin.quantized import Layout, QuantizedArray, layout_of

QK_K = 256
Q = gguf.GGMLQuantizationType
# (codes (n, values), scale (n, groups), offset or None, bits, group, code_offset) of n blocks.
Decoded = tuple[np.ndarray, np.ndarray, np.ndarray | None, int, int, int]


def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray, pack: int) -> np.ndarray:
    """(n, bytes) → (n, 2·bytes) values: byte k of each `pack`-value run holds value k (low
    nibble) and k + pack/2 (high nibble), llama.cpp's layout."""
    n = packed.shape[0]
    runs = packed.reshape(n, -1, 1, pack // 2) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (runs & np.uint8(0x0F)).reshape(n, -1)


def pack_nibbles(values: np.ndarray, group: int) -> np.ndarray:
    """The inverse of `_nibbles` with runs of `group` values (jaxlin.quantized's layout)."""
    runs = values.reshape(*values.shape[:-1], -1, 2, group // 2).astype(np.uint8)
    return (runs[..., 0, :] | (runs[..., 1, :] << np.uint8(4))).reshape(*values.shape[:-1], -1)


def _high_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """Q5_0/Q5_1: the fifth bit of each of the 32 values, from one little-endian uint32."""
    bits = qh.copy().view(np.uint32).reshape(-1, 1) >> np.arange(count, dtype=np.uint32).reshape(1, count)
    return (bits & np.uint32(1)).astype(np.uint8)


def _q8_0(blocks: np.ndarray) -> Decoded:
    d, x = np.split(blocks, [2], axis=1)
    return x.copy().view(np.int8), _f16(d), None, 8, 32, 0


def _q4_0(blocks: np.ndarray) -> Decoded:
    d, qs = np.hsplit(blocks, [2])
    return _nibbles(qs, 32), _f16(d), None, 4, 32, -8


def _q4_1(blocks: np.ndarray) -> Decoded:
    d, m, qs = np.hsplit(blocks, [2, 4])
    return _nibbles(qs, 32), _f16(d), _f16(m), 4, 32, 0


def _q5(blocks: np.ndarray, with_min: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    d, rest = np.hsplit(blocks, [2])
    m = None
    if with_min:
        m, rest = np.hsplit(rest, [2])
    qh, qs = np.hsplit(rest, [4])
    codes = _nibbles(qs, 32) | (_high_bits(qh, 32) << np.uint8(4))
    return codes, _f16(d), None if m is None else _f16(m)


def _q5_0(blocks: np.ndarray) -> Decoded:
    codes, d, _ = _q5(blocks, with_min=False)
    return codes.astype(np.int8) - np.int8(16), d, None, 8, 32, 0


def _q5_1(blocks: np.ndarray) -> Decoded:
    codes, d, m = _q5(blocks, with_min=True)
    return codes.astype(np.int8), d, m, 8, 32, 0


def _k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: (d·sc, dmin·m per 32-value sub-block, the rest of the block)."""
    d, dmin, scales, rest = np.hsplit(blocks, [2, 4, 4 + gguf.quants.Q4_K.K_SCALE_SIZE])
    sc, m = gguf.quants.Q4_K.get_scale_min(scales)
    n = blocks.shape[0]
    scale = (_f16(d) * sc.astype(np.float32)).reshape(n, -1)
    minimum = (_f16(dmin) * m.astype(np.float32)).reshape(n, -1)
    return scale, minimum, rest


def _q4_k(blocks: np.ndarray) -> Decoded:
    scale, minimum, qs = _k_scales(blocks)
    # gguf computes d·q − dm; the offset −dm gives the same number (a − b = a + (−b)).
    return _nibbles(qs, 64), scale, -minimum, 4, 32, 0


def _q5_k(blocks: np.ndarray) -> Decoded:
    scale, minimum, rest = _k_scales(blocks)
    n = blocks.shape[0]
    qh, qs = np.hsplit(rest, [QK_K // 8])
    high = qh.reshape(n, -1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
    high = (high & np.uint8(1)).reshape(n, -1, 32)
    codes = _nibbles(qs, 64).reshape(n, -1, 32) | (high << np.uint8(4))
    return codes.reshape(n, -1).astype(np.int8), scale, -minimum, 8, 32, 0


def _q6_k(blocks: np.ndarray) -> Decoded:
    n = blocks.shape[0]
    ql, qh, scales, d = np.hsplit(blocks, [QK_K // 2, QK_K // 2 + QK_K // 4, QK_K // 2 + QK_K // 4 + 16])
    scale = _f16(d) * scales.copy().view(np.int8).astype(np.float32)
    low = ql.reshape(n, -1, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    low = (low & np.uint8(0x0F)).reshape(n, -1, 32)
    high = qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    high = (high & np.uint8(0x03)).reshape(n, -1, 32)
    codes = (low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)
    return codes.reshape(n, -1), scale, None, 8, 16, 0


DECODERS: dict[gguf.GGMLQuantizationType, Callable[[np.ndarray], Decoded]] = {
    Q.Q8_0: _q8_0,
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
}
# What stays quantized; other types (F32, F16, BF16, and the rarer quants) are dequantized at load.
KEPT_QUANTIZED = frozenset(DECODERS)


def quantized_matrix(data: np.ndarray, tensor_type: gguf.GGMLQuantizationType) -> QuantizedArray:
    """A (rows, bytes per row) tensor of `tensor_type` blocks as a QuantizedArray of the
    same (rows, cols) matrix, still on the host."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
    rows = data.shape[0]
    blocks = np.asarray(data, np.uint8).reshape(-1, type_size)
    codes, scale, offset, bits, group, code_offset = DECODERS[tensor_type](blocks)
    codes = codes.reshape(rows, -1)
    if bits == 4:
        codes = pack_nibbles(codes, group)
    return QuantizedArray(
        codes=codes,
        scale=scale.astype(np.float32).reshape(rows, -1),
        offset=None if offset is None else offset.astype(np.float32).reshape(rows, -1),
        bits=bits,
        group=group,
        code_offset=code_offset,
        transposed=False,
        dtype=np.dtype(np.float32),
    )


@functools.cache
def type_layout(tensor_type: gguf.GGMLQuantizationType) -> Layout:
    """The layout a tensor of `tensor_type` is kept in, known from the type alone (one
    all-zero block decoded): what a plan needs without reading a weight."""
    _, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
    return layout_of(quantized_matrix(np.zeros((1, type_size), np.uint8), tensor_type))
