"""A model folder loaded across a group: the skeleton split (:func:`split_model`: the decoder by
tensor or pipeline, the vision tower on rank 0), then filled with this rank's share only
(:func:`load_model_sharded`)."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .distributed_collectives import barrier, share_seed
from .distributed_guard import beat
from .distributed_read import NUMPY_DTYPES, read_block, read_plan, stored_sources
from .distributed_vision import VisionBroadcast, VisionFromRankZero
from .errors import ModelLoadError

PARALLEL_MODES = ("tensor", "pipeline")


def split_model(model, group, parallel: str) -> None:
    """Make ``model`` (an unloaded skeleton) this rank's part: the decoder split by ``parallel``
    ('tensor' or 'pipeline'), the vision tower kept by rank 0 only (see VisionBroadcast).

    Raises ModelLoadError (one line) when the model cannot be split that way."""
    if parallel not in PARALLEL_MODES:
        raise ModelLoadError(f"parallel (--parallel) must be one of {', '.join(PARALLEL_MODES)}, not {parallel!r}")
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


def load_model_sharded(path, group, parallel: str = "tensor", dtype="auto", config=None) -> nn.Module:
    """This rank's part of a model folder (see ``loading.load_model`` for ``dtype`` and ``config``).

    The model is built unloaded, split (``split_model``), and only then filled: each rank
    reads the tensors of its own layers and, for split layers, only its slice of each (rows or
    columns, straight from the safetensors file), so its peak memory is its share of the
    decoder (plus the vision tower on rank 0), never the whole model. Quantized folders split
    the same way (packed weights, scales and biases alike). ``dtype='auto'`` is decided by
    every rank for its own share, and float32 is used only if it fits on every rank.

    Raises:
        ModelLoadError: as load_model, and for a model that cannot be split over this group.
    """
    from .loading import StoredTensor, choose_dtype, folder_args, model_skeleton

    path, args = folder_args(path, config)
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
