"""What one rank reads of a model folder: where each stored tensor's bytes are (:class:`Source`,
from the safetensors headers only), a block of a tensor read without the rest
(:func:`read_block`), and which block each parameter of a split model takes (:func:`read_plan`)."""

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .errors import ModelLoadError

# A path component naming a distributed wrapper's module (VocabParallelEmbedding.inner, ...):
# the checkpoint names the wrapped tensors without it.
WRAPPER = "inner"


@dataclass(frozen=True)
class Source:
    """Where a stored tensor's bytes are: file, absolute offset, stored shape and dtype, and a
    transpose sanitize asked for (PyTorch's patch embedding). ``shape`` is after that transpose."""

    file: Path
    start: int
    stored_shape: tuple
    dtype: str
    name: str = ""  # as stored in the file
    axes: Optional[tuple] = None

    @property
    def shape(self) -> tuple:
        if self.axes is None:
            return self.stored_shape
        return tuple(self.stored_shape[a] for a in self.axes)

    def transpose(self, *axes):
        return replace(self, axes=tuple(axes))


# safetensors dtype -> (numpy dtype to read the bytes as, MLX view to apply)
NUMPY_DTYPES = {
    "BOOL": (np.bool_, None), "U8": (np.uint8, None), "I8": (np.int8, None), "U16": (np.uint16, None),
    "I16": (np.int16, None), "U32": (np.uint32, None), "I32": (np.int32, None), "U64": (np.uint64, None),
    "I64": (np.int64, None), "F16": (np.float16, None), "F32": (np.float32, None),
    "BF16": (np.uint16, mx.bfloat16),  # numpy has no bfloat16: read the bits, view them in MLX
}
READ_CHUNK = 64 << 20  # bytes of whole rows read at once when taking a column slice


def stored_sources(path: Path, args) -> dict:
    """MLX name -> Source for every weight of a folder, from the safetensors headers only.

    Raises ModelLoadError for a shard missing from the index or a truncated file, and for an
    unsupported dtype."""
    from .safetensors_io import read_safetensors_header
    from .loading import sanitize, weight_files

    sources = {}
    for file in weight_files(path):
        with open(file, "rb") as f:
            data_start = 8 + int.from_bytes(f.read(8), "little")
        for name, entry in read_safetensors_header(file).items():
            if entry["dtype"] not in NUMPY_DTYPES:
                raise ModelLoadError(f"{file.name}: tensor {name} has unsupported dtype {entry['dtype']}")
            sources[name] = Source(file, data_start + entry["data_offsets"][0], tuple(entry["shape"]),
                                   entry["dtype"], name)
    return sanitize(sources, args)


def read_block(source: Source, axis: Optional[int] = None, index: int = 0, parts: int = 1) -> mx.array:
    """Block ``index`` of ``parts`` equal blocks of a stored tensor along ``axis`` (None: all of
    it), reading only those bytes (whole rows of at most READ_CHUNK at a time for an inner
    axis). Returns an MLX array in the stored dtype."""
    np_dtype, view = NUMPY_DTYPES[source.dtype]
    itemsize = np.dtype(np_dtype).itemsize
    shape = source.stored_shape
    if source.axes is not None and axis is not None:  # only whole tensors are transposed (patch embedding)
        raise ModelLoadError(f"cannot split the transposed tensor at {source.file.name}")
    if axis is None:
        total = math.prod(shape) * itemsize
        whole = _as_mlx(_read_rows(source, 0, total, 1, 0, total).view(np_dtype).reshape(shape), view)
        return whole if source.axes is None else whole.transpose(source.axes)
    axis %= len(shape)
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1:]) * itemsize
    block = shape[axis] // parts
    row = shape[axis] * inner
    raw = _read_rows(source, 0, row, outer, index * block * inner, (index + 1) * block * inner)
    local = list(shape)
    local[axis] = block
    return _as_mlx(raw.view(np_dtype).reshape(local), view)


def _read_rows(source: Source, first: int, row_bytes: int, rows: int, lo: int, hi: int) -> np.ndarray:
    """Bytes [lo, hi) of each of ``rows`` rows of ``row_bytes`` (from row ``first``), as uint8."""
    out = np.empty((rows, hi - lo), dtype=np.uint8)
    with open(source.file, "rb", buffering=0) as f:
        if rows == 1 or (lo == 0 and hi == row_bytes):  # one contiguous range
            f.seek(source.start + first * row_bytes + lo)
            _read_into(f, out.reshape(-1))
            return out
        step = max(1, READ_CHUNK // row_bytes)
        chunk = np.empty((step, row_bytes), dtype=np.uint8)
        for r in range(0, rows, step):
            n = min(step, rows - r)
            f.seek(source.start + (first + r) * row_bytes)
            _read_into(f, chunk[:n].reshape(-1))
            out[r:r + n] = chunk[:n, lo:hi]
    return out


def _read_into(f, buffer: np.ndarray) -> None:
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise ModelLoadError(f"{f.name} ended early: the file is truncated")
        done += n


def _as_mlx(array: np.ndarray, view) -> mx.array:
    result = mx.array(array)
    return result.view(view) if view is not None else result


def stored_name(name: str) -> str:
    """The checkpoint's name of a parameter of a split model (wrappers' ``inner`` dropped)."""
    return ".".join(part for part in name.split(".") if part != WRAPPER)


def read_plan(model: nn.Module, sources: dict, group) -> dict:
    """Parameter name -> (Source, axis or None, block index, blocks): what this rank reads for
    each of the split model's parameters. A parameter 1/k of its stored tensor along one axis is
    block r * k // N of the k equal blocks there: rank r's own block when k = N (how
    ``shard_linear`` and ``shard_inplace`` split), the block a run of ranks shares when k < N
    (key/value heads fewer than the ranks)."""
    plan = {}
    size, rank = group.size(), group.rank()
    for name, param in tree_flatten(model.parameters()):
        source = sources[stored_name(name)]
        full, local = tuple(source.shape), tuple(param.shape)
        if full == local:
            plan[name] = (source, None, 0, 1)
            continue
        axes = [a for a in range(len(full)) if full[a] != local[a]] if len(full) == len(local) else []
        blocks = full[axes[0]] // local[axes[0]] if len(axes) == 1 and local[axes[0]] else 0
        if not blocks or full[axes[0]] != local[axes[0]] * blocks or size % blocks:
            raise ModelLoadError(f"cannot split {stored_name(name)} {full} into {local} over {size} ranks")
        plan[name] = (source, axes[0], rank * blocks // size, blocks)
    return plan
