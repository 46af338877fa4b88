"""Qwen2.5-VL across several processes with MLX distributed (``mlx.launch``).

Everything here uses MLX's own collectives (``mx.distributed``: all_sum, all_gather, send,
recv) and mlx-lm's ways of splitting a decoder (``language.LanguageModel.shard`` and
``pipeline``); nothing here talks to the network itself.

- :func:`world_group`: the group ``mlx.launch`` set up, or None for one process.
- :func:`load_model_sharded`: each rank reads only its own tensors and tensor slices.
- The vision tower: rank 0 computes the features and broadcasts them (:class:`VisionBroadcast`,
  :class:`VisionFromRankZero`; the measurement behind that choice is at the classes).
- :func:`share`, :class:`RankZeroProcessor`: inputs made once on rank 0 and sent to the others,
  so that prompt, token ids and M-RoPE positions are the same on every rank (and checked:
  :func:`check_same_prompt`).
- :class:`FailureGuard`: a failure on one rank ends every rank with one line naming the rank,
  never a hang.
"""

import atexit
import json
import math
import os
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from . import errors
from .errors import InputError, ModelLoadError, QwenVLError

PARALLEL_MODES = ("tensor", "pipeline")
STALL_TIMEOUT_ENV = "MLX_QWENVL_STALL_TIMEOUT"  # seconds without progress before a rank gives up
DEFAULT_STALL_TIMEOUT = 600.0
# A path component naming a distributed wrapper's module (VocabParallelEmbedding.inner, ...):
# the checkpoint names the wrapped tensors without it.
WRAPPER = "inner"


# Set by the launchers: mlx.launch (ring, JACCL, NCCL: MLX_RANK), mpirun (Open MPI, MPICH).
LAUNCHER_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def world_group():
    """The group ``mlx.launch`` (ring, JACCL or MPI) set up for this process; None when this is
    the only process, which then behaves exactly as without MLX distributed (without a
    launcher's environment, MLX distributed is not even initialised)."""
    if not any(name in os.environ for name in LAUNCHER_ENV):
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def settle() -> None:
    """Wait until this rank has no computation in flight, before a collective outside the
    model's graph.

    mlx-lm's ``generate_step`` computes one step past the last token it yields
    (``async_eval`` on its own ``generation_stream``); with a group that step holds collectives.
    A collective issued meanwhile on another stream would pair, on the other rank, with one of
    that step's (each stream runs on its own thread), mixing their data: seen as garbage in
    the next prompt's first collective. Waiting for both streams first keeps every rank's
    collectives in one order."""
    from mlx_lm.generate import generation_stream

    mx.synchronize(generation_stream)
    mx.synchronize()


_decode_streams = {}  # thread id -> the Stream that mlx-lm's generation_stream is on that thread


def settle_unless_decoding() -> None:
    """``settle`` unless this call runs in mlx-lm's decoding loop (its generation_stream), where
    the steps follow each other on one stream anyway and waiting would only stall the loop."""
    from mlx_lm.generate import generation_stream

    thread = threading.get_ident()
    if thread not in _decode_streams:
        with mx.stream(generation_stream):
            _decode_streams[thread] = mx.default_stream(mx.default_device())
    if mx.default_stream(mx.default_device()) != _decode_streams[thread]:
        settle()


def barrier(group) -> None:
    """Return once every rank has reached this point (an all_sum of one number)."""
    settle()
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))


# --------------------------------------------------------------------------- sharing from rank 0


def share(value, group, root: int = 0):
    """``value`` as rank ``root`` has it, returned on every rank; other ranks pass anything (None).

    ``value``: JSON data (None, bool, int, float, str, lists, dicts with str keys) and numpy
    arrays anywhere inside it. It travels as bytes in two all_sums (its length, then the bytes
    from ``root`` and zeros from the others: x + 0 is exact), as mlx-lm's server shares its
    requests, but without pickle: a rank only ever decodes JSON and raw array bytes.
    Every rank must call it at the same point (a collective).
    """
    payload = _encode(value) if group.rank() == root else b""
    settle()
    length = mx.distributed.all_sum(mx.array(len(payload), dtype=mx.int64), group=group, stream=mx.cpu)
    length = int(length.item())
    buffer = (mx.array(np.frombuffer(payload, dtype=np.uint8)) if group.rank() == root
              else mx.zeros((length,), dtype=mx.uint8))
    data = np.array(mx.distributed.all_sum(buffer, group=group, stream=mx.cpu))  # evaluated on every rank
    return value if group.rank() == root else _decode(data.tobytes())


def _encode(value) -> bytes:
    """8-byte header length, a JSON header (arrays replaced by their dtype, shape and offset in
    the bytes that follow), then the arrays' bytes."""
    arrays, offset = [], 0

    def encode(item):
        nonlocal offset
        if isinstance(item, np.ndarray):
            item = np.ascontiguousarray(item)
            arrays.append(item)
            spec = {"__array__": offset, "dtype": item.dtype.str, "shape": list(item.shape)}
            offset += item.nbytes
            return spec
        if isinstance(item, dict):
            return {str(k): encode(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [encode(v) for v in item]
        if isinstance(item, (np.integer, np.floating, np.bool_)):
            return item.item()
        return item

    header = json.dumps(encode(value)).encode()
    return len(header).to_bytes(8, "little") + header + b"".join(a.tobytes() for a in arrays)


def _decode(payload: bytes):
    size = int.from_bytes(payload[:8], "little")
    start = 8 + size

    def decode(item):
        if isinstance(item, dict) and "__array__" in item:
            dtype, shape = np.dtype(item["dtype"]), item["shape"]
            array = np.frombuffer(payload, dtype=dtype, count=math.prod(shape), offset=start + item["__array__"])
            return array.reshape(shape).copy()
        if isinstance(item, dict):
            return {k: decode(v) for k, v in item.items()}
        if isinstance(item, list):
            return [decode(v) for v in item]
        return item

    return decode(json.loads(payload[8:start]))


def share_seed(group) -> None:
    """Seed every rank's random generator alike (rank 0's draw), as mlx-lm's server does, so
    that sampling (temperature > 0) picks the same tokens on every rank."""
    seed = int(np.random.default_rng().integers(0, 2**31 - 1)) if group.rank() == 0 else 0
    settle()
    mx.random.seed(int(mx.distributed.all_sum(mx.array(seed), group=group, stream=mx.cpu).item()))


def check_same_prompt(group, length: int, offset: int = 0, ids=None, position_ids=None) -> None:
    """Refuse prompts that differ between ranks before any collective of their size runs.

    Each rank reduces the call's length, text offset, token ids (B, L) and M-RoPE position ids
    (3, B, L) (either may be None) to six integers (wrapping sums of the values and of the values
    times their index: the same ids give the same numbers on any hardware, and a changed or moved
    id changes them), and the ranks compare them (an all_gather of 6 numbers).

    Raises:
        InputError: (on every rank, marked ``everywhere``) a rank's prompt differs from rank 0's.
    """
    def fingerprint(x):
        if x is None:
            return [0, 0]
        flat = x.reshape(-1).astype(mx.uint32)
        weights = mx.arange(1, flat.size + 1, dtype=mx.uint32)
        return [flat.sum(), (flat * weights).sum()]

    parts = [mx.array(length), mx.array(offset), *fingerprint(ids), *fingerprint(position_ids)]
    mine = mx.stack([mx.array(p).astype(mx.uint32) for p in parts])
    settle()  # a prompt call may follow a generation whose extra step is still running
    table = np.array(mx.distributed.all_gather(mine[None], group=group, stream=mx.cpu))
    differ = [rank for rank in range(table.shape[0]) if not np.array_equal(table[rank], table[0])]
    if differ:
        error = InputError(
            f"rank {differ[0]} was given another prompt than rank 0 (token ids, images, videos or "
            f"position): every rank must get the same inputs (see distributed.share)"
        )
        error.everywhere = True
        raise error


# --------------------------------------------------------------------------- the vision tower
#
# Where the vision tower runs: rank 0 computes the features of every image and video of a call
# and broadcasts them (an all_sum with zeros from the other ranks: exact); the other ranks hold no
# vision weights and read no pixels.
#
# Measured here (benchmarks/distributed_bench.py vision: 2 ranks of the ring backend on 127.0.0.1,
# the 3B's vision widths with 8 blocks, two 448x448 images = 512 tokens, float32, one BLAS thread
# per rank; seconds until the slowest rank has the features, median [min-max] of 3, on this
# 2-core machine while other jobs ran):
#     one process (2 threads)                10.1 [9.5-11.5]
#     every rank computes all features       17.3 [16.4-18.0]
#     rank 0 computes and broadcasts         38.7 [26.3-44.9]
#     images split across ranks, gathered    16.1 [14.4-16.5]
# Rank 0 alone is the slowest here because the ranks share the cores and a rank waiting in a ring
# collective polls its socket: 8 s of waiting cost it 5.2 s of CPU (0.8 user, 4.4 system;
# measured with getrusage), taken from rank 0's computation. On separate Macs, the target, that
# cost falls on an idle machine, and the choices compare as follows:
# - every rank computing the same features takes one Mac's vision time, as rank 0 alone does (the
#   decoder waits for the features either way), but needs the pixels and the vision weights on
#   every rank, and two different chips may round the features differently, so that the ranks'
#   copies of the activations drift apart;
# - broadcasting adds one transfer of (tokens x width) values: 1000 tokens at the 72B's width 8192
#   are 16 MB in bfloat16, milliseconds over Thunderbolt against seconds of vision compute; in
#   exchange the features are the same bits on every rank, only rank 0 needs the media files (the
#   chat's /image PATH is a path on rank 0's Mac) and only rank 0 holds the tower (1.4 GB);
# - splitting images across ranks divides the vision time by N, but only for prompts with several
#   images of like sizes (uneven sizes need padding before the gather); one image, or one video
#   (its full-attention blocks span all its frames), cannot be split without sharding the tower.
# So rank 0 broadcasts.


class VisionBroadcast(nn.Module):
    """Rank 0's vision tower: computes the features (``inner``, the real VisionModel) and sends
    them to every rank. Called as VisionModel: (pixel_values, grid_thw) -> (tokens, out_hidden)."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner = inner
        self.group = group

    def __call__(self, pixel_values: mx.array, grid_thw) -> mx.array:
        return broadcast_features(self.inner(pixel_values, grid_thw), self.group)


class VisionFromRankZero(nn.Module):
    """The vision tower of ranks other than 0: no weights; returns rank 0's features (pixel
    values are ignored, and may be a placeholder)."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def __call__(self, pixel_values, grid_thw) -> mx.array:
        return broadcast_features(None, self.group)


FEATURE_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def broadcast_features(features: Optional[mx.array], group) -> mx.array:
    """Rank 0's (tokens, width) ``features`` on every rank (others pass None): a header all_sum
    (dtype, shape), then the values. Both are evaluated here, so that every rank runs its
    collectives in the same order whatever else the caller's graph holds."""
    if features is not None:
        header = [FEATURE_DTYPES.index(features.dtype) + 1, *features.shape]
    else:
        header = [0, 0, 0]
    settle()
    code, rows, width = mx.distributed.all_sum(mx.array(header, dtype=mx.int32), group=group,
                                               stream=mx.cpu).tolist()
    if features is None:
        features = mx.zeros((rows, width), dtype=FEATURE_DTYPES[code - 1])
    features = mx.distributed.all_sum(features, group=group)
    mx.eval(features)
    return features


# --------------------------------------------------------------------------- loading


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
    from .convert import read_safetensors_header
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
    if source.axes is not None:  # only whole tensors are transposed (the patch embedding)
        if axis is not None:
            raise ModelLoadError(f"cannot split the transposed tensor at {source.file.name}")
        return _as_mlx(_read_rows(source, 0, math.prod(shape) * itemsize, 1, 0, math.prod(shape) * itemsize)
                       .view(np_dtype).reshape(shape), view).transpose(source.axes)
    if axis is None:
        total = math.prod(shape) * itemsize
        return _as_mlx(_read_rows(source, 0, total, 1, 0, total).view(np_dtype).reshape(shape), view)
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


def split_model(model, group, parallel: str) -> None:
    """Make ``model`` (an unloaded skeleton) this rank's part: the decoder split by ``parallel``
    ('tensor' or 'pipeline'), the vision tower kept by rank 0 only (see VisionBroadcast).

    Raises ModelLoadError (one line) when the model cannot be split that way."""
    if parallel not in PARALLEL_MODES:
        raise ModelLoadError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, not {parallel!r}")
    try:
        if parallel == "tensor":
            model.language_model.shard(group)
        else:
            model.language_model.pipeline(group)
    except ValueError as error:
        raise ModelLoadError(str(error)) from None
    model.vision_tower = (VisionBroadcast(model.vision_tower, group) if group.rank() == 0
                          else VisionFromRankZero(group))
    model.group = group
    model.parallel = parallel


def load_model_sharded(path, group, parallel: str = "tensor", dtype="auto") -> nn.Module:
    """This rank's part of a model folder (see ``loading.load_model`` for ``dtype``).

    The model is built unloaded, split (``split_model``), and only then filled: each rank
    reads the tensors of its own layers and, for split layers, only its slice of each (rows or
    columns, straight from the safetensors file), so its peak memory is its share of the
    decoder (plus the vision tower on rank 0), never the whole model. Quantized folders split
    the same way (packed weights, scales and biases alike). ``dtype='auto'`` is decided by
    every rank for its own share, and float32 is used only if it fits on every rank.

    Raises:
        ModelLoadError: as load_model, and for a model that cannot be split over this group.
    """
    from .config import ModelArgs
    from .loading import choose_dtype, model_skeleton, read_config, with_mlx_quantization, StoredTensor

    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist")
    config = read_config(path)
    ModelArgs.from_dict(config)
    args = ModelArgs.from_dict(with_mlx_quantization(config, str(path)))
    sources = stored_sources(path, args)
    model = model_skeleton(args, {name: source.shape for name, source in sources.items()})
    split_model(model, group, parallel)
    plan = read_plan(model, sources, group)
    local = {}  # what this rank reads, under the split model's names (as choose_dtype expects)
    for name, (source, axis, _, blocks) in plan.items():
        shape = list(source.shape)
        if axis is not None:
            shape[axis] //= blocks
        itemsize = np.dtype(NUMPY_DTYPES[source.dtype][0]).itemsize
        local[name] = StoredTensor(tuple(shape), source.dtype, math.prod(shape) * itemsize)
    requested = dtype
    dtype, dequantize = choose_dtype(requested, model, local, str(path))
    # 'auto' may keep the checkpoint's dtype on a rank short of memory: then all ranks do.
    wants = int(dtype == mx.float32) if dtype is not None else 0
    agreed = int(mx.distributed.all_sum(mx.array(wants), group=group, stream=mx.cpu).item())
    if 0 < agreed < group.size():
        import warnings

        from .loading import DtypeFallbackWarning

        dtype, dequantize = None, False
        if group.rank() == 0:
            warnings.warn("float32 does not fit on every rank: keeping the checkpoint's weights on all of them",
                          DtypeFallbackWarning, stacklevel=2)
    fill(model, plan, dtype)
    if dequantize:
        dequantize_split(model, dtype)
    elif dtype is not None:
        from .loading import _typed_float_embeddings

        _typed_float_embeddings(model, dtype)
    barrier(group)
    share_seed(group)
    return model


def fill(model: nn.Module, plan: dict, dtype=None) -> None:
    """Read every parameter of ``plan`` into ``model``, cast to ``dtype`` (floating point only;
    None keeps the stored dtype), one module at a time so that at most one module's tensors
    exist twice (stored and cast). Whole tensors come through ``mx.load`` (lazy: each is read
    when its module is evaluated, straight into MLX memory); slices through ``read_block``."""
    by_module, files = {}, {}
    for name, item in plan.items():
        by_module.setdefault(name.rpartition(".")[0], []).append((name, item))
    for items in by_module.values():
        arrays = []
        for name, (source, axis, index, blocks) in items:
            if axis is None:
                if source.file not in files:
                    files[source.file] = mx.load(str(source.file))
                value = files[source.file].pop(source.name)  # nothing else may keep it alive
                if source.axes is not None:
                    value = value.transpose(source.axes)
            else:
                value = read_block(source, axis, index, blocks)
            if dtype is not None and mx.issubdtype(value.dtype, mx.floating):
                value = value.astype(dtype)
            arrays.append((name, value))
        model.load_weights(arrays, strict=False)
        mx.eval([value for _, value in arrays])
        beat()


def dequantize_split(model: nn.Module, dtype=None) -> None:
    """Make every quantized layer dense, weights in ``dtype`` (for float32 on a CPU, as
    load_model does): the split ones (mlx's Quantized*Linear of ``shard_linear``) into their
    dense split classes, the rest with loading.dequantize_layers; one module evaluated at a time."""
    from mlx.nn.layers import distributed as dist

    from .loading import dequantize_layers

    dense = {dist.QuantizedAllToShardedLinear: dist.AllToShardedLinear,
             dist.QuantizedShardedToAllLinear: dist.ShardedToAllLinear}
    replacements = []
    for name, module in model.named_modules():
        cls = dense.get(type(module))
        if cls is None:
            continue
        weight = mx.dequantize(module.weight, module.scales, module.get("biases"), module.group_size,
                               module.bits, mode=getattr(module, "mode", "affine"), dtype=dtype)
        size = module.group.size()
        out_dims, in_dims = weight.shape
        if cls is dist.AllToShardedLinear:
            layer = cls(in_dims, out_dims * size, bias="bias" in module, group=module.group)
        else:
            layer = cls(in_dims * size, out_dims, bias="bias" in module, group=module.group)
        layer.weight = weight
        if "bias" in module:
            layer.bias = module.bias
        replacements.append((name, layer))
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    dequantize_layers(model, dtype)
    for _, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        mx.eval(module.parameters())


# --------------------------------------------------------------------------- inputs from rank 0


class RankZeroProcessor:
    """A Processor for a group: rank 0 reads the images and videos and makes the inputs, the
    other ranks receive them (:func:`share`), so only rank 0 needs the media files, and every
    rank gets the same token ids and grids. Pixel values stay on rank 0, where the vision tower
    runs; other ranks get an empty placeholder. An error on rank 0 is raised on every rank.

    Every rank must call these methods at the same points. Everything else (the tokenizer, the
    chat template) is the wrapped processor's, computed on each rank alike.
    """

    SHARED = ("__call__", "encode", "image_tokens", "check_image", "check_video")
    PIXELS = ("pixel_values", "pixel_values_videos")

    def __init__(self, processor, group):
        self._processor = processor
        self._group = group

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def __call__(self, *args, **kwargs):
        return self._shared("__call__", args, kwargs)

    def encode(self, *args, **kwargs):
        return self._shared("encode", args, kwargs)

    def image_tokens(self, *args, **kwargs):
        return self._shared("image_tokens", args, kwargs)

    def check_image(self, *args, **kwargs):
        return self._shared("check_image", args, kwargs)

    def check_video(self, *args, **kwargs):
        return self._shared("check_video", args, kwargs)

    def _shared(self, method, args, kwargs):
        return from_rank_zero(lambda: getattr(self._processor, method)(*args, **kwargs), self._group,
                              self._without_pixels)

    def _without_pixels(self, result):
        if not isinstance(result, dict):
            return result
        return {key: (np.zeros((0, value.shape[-1]), dtype=value.dtype)
                      if key in self.PIXELS and isinstance(value, np.ndarray) else value)
                for key, value in result.items()}


def from_rank_zero(compute, group, for_others=lambda result: result):
    """``compute()`` run on rank 0 only, its result (as ``for_others`` makes it; JSON data and
    numpy arrays, see ``share``) returned on every rank. An exception on rank 0 is raised on
    every rank (QwenVLError classes as themselves, others as RuntimeError), marked
    ``everywhere`` so that it is reported once. Every rank must call it at the same point."""
    if group.rank() == 0:
        try:
            result = compute()
        except Exception as error:
            share({"error": type(error).__name__, "message": str(error),
                   "qwenvl": isinstance(error, QwenVLError)}, group)
            error.everywhere = True
            raise
        share({"result": for_others(result)}, group)
        return result
    answer = share(None, group)
    if "error" in answer:
        cls = getattr(errors, answer["error"], None) if answer["qwenvl"] else None
        error = (cls(answer["message"]) if isinstance(cls, type) and issubclass(cls, QwenVLError)
                 else RuntimeError(f"{answer['error']}: {answer['message']}"))
        error.everywhere = True
        raise error
    return answer["result"]


# --------------------------------------------------------------------------- failures


_guard = None  # the FailureGuard of this process, if any


def beat() -> None:
    """Progress: the stall watchdog's clock restarts (each forward call, each loaded module)."""
    if _guard is not None:
        _guard.last_beat = time.monotonic()


class _Idle:
    def __enter__(self):
        if _guard is not None:
            _guard.idle += 1

    def __exit__(self, *exc):
        if _guard is not None:
            _guard.idle -= 1
            _guard.last_beat = time.monotonic()


def idle():
    """A context for waits of any length (a user typing): the stall watchdog does not count them."""
    return _Idle()


def is_lost_peer(error: BaseException) -> bool:
    """An MLX error saying a connection to another rank broke (it stopped or its link failed)."""
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "peer was lost" in text or text.startswith(("[ring]", "[jaccl]", "[mpi]")))


def neighbours(rank: int, size: int) -> str:
    """The ranks a ring rank talks to, in words: 'rank 1', 'rank 1 or rank 3'."""
    others = sorted({(rank - 1) % size, (rank + 1) % size} - {rank})
    return " or ".join(f"rank {r}" for r in others)


class FailureGuard:
    """For a command run by every rank of a group (the CLI under mlx.launch): a failure on one
    rank ends every rank, each printing at most one line, never a hang.

    - An error on this rank: ``error: rank R: message`` (``report``), exit 1. An error every
      rank raises alike (marked ``everywhere``: bad input shared from rank 0) is printed once,
      by rank 0, as without distribution.
    - A rank that dies closes its connections: MLX then fails the others' pending collective
      ("connection to a peer was lost"), reported as ``lost contact with rank K``.
      ``mlx.launch`` also ends the other ranks (SIGTERM) when one exits non-zero: the line then
      says so. MLX's own "[ring] ..." lines about the broken socket are filtered from stderr.
    - A rank that stops answering without closing its connections (a frozen process, a cut
      cable) would leave the others waiting in a collective forever: a watchdog thread ends a
      rank that makes no progress (``beat``) for ``MLX_QWENVL_STALL_TIMEOUT`` seconds (default
      600) outside ``idle()`` waits. It also ends a rank whose launcher is gone (the rank was
      reparented), which nothing else would stop.

    Threads do the ending because the main thread may be blocked inside a collective (MLX
    releases the GIL there, so they run), and ``os._exit`` because MLX's teardown can itself
    wait for a peer that is gone.
    """

    TRANSPORT_PREFIXES = (b"[ring]", b"[jaccl]", b"[mpi]")

    def __init__(self, group, stall_timeout: Optional[float] = None):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        if stall_timeout is None:
            stall_timeout = float(os.environ.get(STALL_TIMEOUT_ENV) or DEFAULT_STALL_TIMEOUT)
        self.stall_timeout = stall_timeout
        self.last_beat = time.monotonic()
        self.idle = 0
        self.reported = threading.Lock()
        self.stderr_fd = 2
        self._forwarder = None
        self._wakeup = None

    # -- setup

    def install(self) -> "FailureGuard":
        global _guard
        self._filter_stderr()
        self._watch_signals()
        threading.Thread(target=self._watch, name="mlx-qwenvl-watchdog", daemon=True).start()
        _guard = self
        return self

    def _filter_stderr(self) -> None:
        """fd 2 through a pipe whose reader drops MLX's transport lines ("[ring] Socket 3 was
        closed by the peer", printed from C++ ten times before the error reaches Python)."""
        sys.stderr.flush()
        self.stderr_fd = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)

        def forward():
            pending = b""
            while True:
                try:
                    data = os.read(read_end, 65536)
                except OSError:
                    data = b""
                if not data:
                    break
                lines = (pending + data).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if not line.startswith(self.TRANSPORT_PREFIXES):
                        os.write(self.stderr_fd, line + b"\n")
            if pending and not pending.startswith(self.TRANSPORT_PREFIXES):
                os.write(self.stderr_fd, pending)

        self._forwarder = threading.Thread(target=forward, name="mlx-qwenvl-stderr", daemon=True)
        self._forwarder.start()
        atexit.register(self._restore_stderr)

    def _restore_stderr(self) -> None:
        """fd 2 back to the real stderr; the pipe's last write end closes, so the reader
        forwards what is left and ends."""
        try:
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - a closed stderr must not stop the ending
            pass
        if self._forwarder is not None and self.stderr_fd != 2:
            os.dup2(self.stderr_fd, 2)
            self._forwarder.join(timeout=1)
            self._forwarder = None

    def _watch_signals(self) -> None:
        """SIGTERM (mlx.launch ending this rank because another exited non-zero) reaches the
        watchdog thread through signal.set_wakeup_fd, even while the main thread waits."""
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        # Python runs this handler only when the main thread is between bytecodes; the C-level
        # handler also writes the signal to the wakeup fd, which the watchdog thread reads.
        signal.signal(signal.SIGTERM, lambda *_: self.end(self._terminated_message(), 143))
        signal.set_wakeup_fd(write_end)
        self._wakeup = read_end

    def _terminated_message(self) -> str:
        return (f"terminated by SIGTERM, which mlx.launch sends once another rank "
                f"({neighbours(self.rank, self.size) if self.size == 2 else 'see its warnings'}) has ended")

    def _watch(self) -> None:
        parent = os.getppid()
        while True:
            try:
                ready, _, _ = select.select([self._wakeup], [], [], 0.5)
                if ready and signal.SIGTERM in os.read(self._wakeup, 64):
                    self.end(self._terminated_message(), 143)
                if os.getppid() != parent:  # reparented: the launcher that started this rank is gone
                    self.end("the launcher that started this rank ended", 1)
                if self.idle == 0 and time.monotonic() - self.last_beat > self.stall_timeout:
                    self.end(f"no progress for {self.stall_timeout:.0f} s: {neighbours(self.rank, self.size)} "
                             f"stopped answering ({STALL_TIMEOUT_ENV} sets this limit)", 1)
            except Exception:  # noqa: BLE001 - this thread must outlive any error, or SIGTERM is lost
                time.sleep(0.5)

    # -- ending

    def report(self, message: str, rank_prefix: bool = True) -> bool:
        """Print ``error: rank R: message`` once per process; False if a line was printed already."""
        if not self.reported.acquire(blocking=False):
            return False
        try:
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - stdout may be closed; the line still goes out
            pass
        self._restore_stderr()  # what was printed before comes first
        prefix = f"rank {self.rank}: " if rank_prefix else ""
        os.write(self.stderr_fd, f"error: {prefix}{message}\n".encode())
        return True

    def end(self, message: Optional[str], code: int = 1):
        """Report ``message`` (None: nothing) and end the process now, whatever happens while
        reporting (the launcher, and with it stderr, may be gone: a write then fails)."""
        try:
            if message is not None:
                self.report(message)
            else:
                self._restore_stderr()
        except BaseException:  # noqa: BLE001 - ending is what matters
            pass
        finally:
            os._exit(code)

    def fail(self, error: BaseException):
        """End this rank for ``error`` with its one line (see the class)."""
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if getattr(error, "everywhere", False):
            if self.rank == 0:
                self.report(text, rank_prefix=False)
            else:
                time.sleep(0.5)  # let rank 0 print before the launcher ends it
            self.end(None, 1)
        if is_lost_peer(error):
            self.end(f"lost contact with {neighbours(self.rank, self.size)} (it stopped or the link failed)")
        if not isinstance(error, (QwenVLError, OSError)):
            text = f"{type(error).__name__}: {text}"
        self.end(text)

    def finish(self) -> None:
        """A clean end: wait for every rank's last collectives, so that none exits while another
        still needs it."""
        with idle():
            barrier(self.group)


def current_guard() -> Optional[FailureGuard]:
    return _guard


def read_turn(read, group):
    """Rank 0 calls ``read()`` (the terminal) and every rank gets what it returned (a str, or
    None for end of input); the wait is ``idle`` on every rank."""
    with idle():
        value = read() if group.rank() == 0 else None
        return share(value, group)
