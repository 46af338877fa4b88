"""Safetensors read from their headers and written in slices, so that no tensor is held whole.

``read_safetensors_header`` and ``read_stored_tensors`` know a folder's tensors (name, dtype,
shape, bytes) without reading any data; ``SafetensorsWriter`` plans a file's header from the
output's shapes, then takes each tensor in blocks of rows (``row_blocks``) in any order.
"""

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from .errors import ConversionError, ModelLoadError, short_list

CHUNK_BYTES = 64 << 20  # rows converted and written at a time

# safetensors dtype names <-> MLX dtypes.
ST_DTYPES = {
    "BOOL": mx.bool_, "U8": mx.uint8, "I8": mx.int8, "U16": mx.uint16, "I16": mx.int16,
    "U32": mx.uint32, "I32": mx.int32, "U64": mx.uint64, "I64": mx.int64,
    "F16": mx.float16, "BF16": mx.bfloat16, "F32": mx.float32,
}
ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}
# numpy has no bfloat16: its bytes are written through a same-size integer view.
BYTE_VIEWS = {mx.bfloat16: mx.uint16}


def tensor_bytes(dtype: mx.Dtype, shape: tuple) -> int:
    """Bytes of a tensor of this MLX dtype and shape."""
    return math.prod(shape) * dtype.size


@dataclass(frozen=True)
class StoredTensor:
    """A tensor known from its safetensors header; ``loading.sanitize`` renames and transposes it
    for free."""

    shape: tuple
    dtype: str  # safetensors' name: "BF16", "U32", ...
    nbytes: int
    file: Optional[Path] = None  # where it is stored (None: a tensor to be written)

    @classmethod
    def of(cls, shape: tuple, dtype: mx.Dtype) -> "StoredTensor":
        """A tensor of this shape and MLX dtype, as it would be stored."""
        return cls(tuple(shape), ST_NAMES[dtype], tensor_bytes(dtype, shape))

    def transpose(self, *axes):
        return StoredTensor(tuple(self.shape[a] for a in axes), self.dtype, self.nbytes, self.file)

    @property
    def floating(self) -> bool:
        return self.dtype.startswith(("F", "BF"))

    @property
    def mx_dtype(self) -> Optional[mx.Dtype]:
        """Its MLX dtype; None for one MLX cannot hold (float64, 8-bit floats, ...)."""
        return ST_DTYPES.get(self.dtype)


def read_safetensors_header(file: Path) -> dict:
    """``{name: {"dtype", "shape", "data_offsets"}}`` from the header, checking the file is complete.

    Raises ModelLoadError for a file too short, truncated or with an unreadable header."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{file} is not a safetensors file (only {size} bytes)")
        length = struct.unpack("<Q", head)[0]
        if length > 100_000_000 or 8 + length > size:
            raise ModelLoadError(f"{file} is truncated or not a safetensors file")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelLoadError(f"{file} has an unreadable safetensors header") from None
    header.pop("__metadata__", None)
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + length + end > size:
        raise ModelLoadError(
            f"{file} is truncated: its header describes {8 + length + end} bytes, the file has {size}"
        )
    return header


def read_stored_tensors(files: list) -> dict:
    """Stored name -> StoredTensor for every tensor of ``files``, file by file in the order of
    their data (so that reading them in this order reads each file front to back).

    Raises ModelLoadError as read_safetensors_header, and for a tensor stored in two files."""
    tensors = {}
    for file in files:
        header = read_safetensors_header(file)
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            if name in tensors:
                raise ModelLoadError(f"tensor {name} is in both {tensors[name].file.name} and {file.name}")
            start, end = entry["data_offsets"]
            tensors[name] = StoredTensor(tuple(entry["shape"]), entry["dtype"], end - start, file)
    return tensors


class SafetensorsWriter:
    """A safetensors file whose header is written first and whose tensors are then filled in
    any order, block of rows by block of rows, so no tensor needs to be held whole.

    ``entries``: ``[(name, mx.Dtype, shape)]`` in the order of their data."""

    def __init__(self, path: Path, entries: list, metadata: Optional[dict] = None):
        self.path = path
        self.entries = {}
        header = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, dtype, shape in entries:
            nbytes = tensor_bytes(dtype, shape)
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self.entries[name] = (offset, nbytes, shape)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.data_start = 8 + len(raw)
        self.size = self.data_start + offset
        self.written = dict.fromkeys(self.entries, 0)
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.file.truncate(self.size)

    def write(self, name: str, array: mx.array, row: int = 0) -> None:
        """Write ``array`` as rows ``row:`` of tensor ``name`` (all of it when it has no rows)."""
        offset, nbytes, shape = self.entries[name]
        if len(shape):
            offset += row * (nbytes // shape[0])
        view = BYTE_VIEWS.get(array.dtype)
        data = np.ascontiguousarray(array.view(view) if view is not None else array)
        if offset + data.nbytes > self.entries[name][0] + nbytes:
            raise ConversionError(f"internal error: {name} overflows its place in {self.path.name}")
        self.file.seek(self.data_start + offset)
        self.file.write(data.data.cast("B"))
        self.written[name] += data.nbytes

    def close(self) -> None:
        """Close the file; ConversionError when a tensor was not written whole."""
        self.file.close()
        short = [name for name, (_, nbytes, _) in self.entries.items() if self.written[name] != nbytes]
        if short:
            raise ConversionError(f"internal error: {short_list(short)} incompletely written")

    def abort(self) -> None:
        self.file.close()


def row_blocks(shape: tuple, itemsize: int, align: int = 1):
    """``(start, stop)`` row ranges of about CHUNK_BYTES (at ``itemsize`` bytes an element),
    starting at multiples of ``align``; a single None for tensors without rows."""
    if len(shape) < 2:
        yield None
        return
    row_bytes = max(1, math.prod(shape[1:]) * itemsize)
    step = max(align, CHUNK_BYTES // row_bytes // align * align)
    for start in range(0, shape[0], step):
        yield start, min(start + step, shape[0])
