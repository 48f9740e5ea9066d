"""The GGUF file itself: header, metadata and tensor index, parsed once into a `GGUFFile`
that the config, tensor and tokenizer stages all take.

gguf.GGUFReader would do, but it builds two numpy views per metadata string up front:
for Gemma 3's 262k-token vocabulary that is 9.5 s and ~600 MB before a single tensor is
touched (the reason transformers 5 also parses the header itself). The format is a flat
header, so it is read here with `struct`; types, block sizes and dequantization stay the
`gguf` package's own. tests/test_gguf.py checks this parser against GGUFReader.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxlin.errors import JaxlinError

if TYPE_CHECKING:
    import gguf


class GGUFError(JaxlinError, ValueError):
    """A GGUF file jaxlin cannot read faithfully. One line, naming the file and the
    tensor or metadata field at fault. A JaxlinError too, so the CLI prints it as one line."""


class GGUFFileNotFoundError(GGUFError, FileNotFoundError):
    """The path does not exist: catchable as FileNotFoundError as well as GGUFError."""


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: ggml's dimensions reversed, so (rows, columns)
    data: np.ndarray  # the raw bytes, (rows, bytes per row) uint8, as gguf.quants.dequantize takes them


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF file: metadata as python values, tensor data still in the memory map."""

    path: str
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensor, ...]

    def value(self, key: str, default: Any = ...) -> Any:
        """A metadata value; GGUFError naming the key when it is missing and no default is given."""
        if key not in self.metadata:
            if default is ...:
                raise GGUFError(f"{self.path}: metadata field {key!r} is missing")
            return default
        return self.metadata[key]

    def int_value(self, key: str, default: Any = ...) -> int:
        value = self.value(key, default)
        # Per-layer lists (hybrid models) have no single meaning here.
        if isinstance(value, bool) or not isinstance(value, int):
            raise GGUFError(f"{self.path}: metadata field {key!r} = {value!r} is not a single integer")
        return value

    def tensor(self, name: str) -> GGUFTensor | None:
        return next((tensor for tensor in self.tensors if tensor.name == name), None)


# What the config, tensor and tokenizer stages accept: a parsed file, or a path to parse.
GGUFSource = GGUFFile | str | os.PathLike


def parsed(source: GGUFSource) -> GGUFFile:
    """The parsed file: `source` itself, or `read_gguf(source)` for a path."""
    return source if isinstance(source, GGUFFile) else read_gguf(source)


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


def read_gguf(path: str | os.PathLike) -> GGUFFile:
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
        tensors.append(GGUFTensor(tensor_name, tensor_type, shape, data))
    return GGUFFile(name, metadata, tuple(tensors))
