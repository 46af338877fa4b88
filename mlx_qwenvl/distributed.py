"""Qwen2.5-VL across several processes with MLX distributed (``mlx.launch``).

Everything here uses MLX's own collectives (``mx.distributed``: all_sum, all_gather, send,
recv) and mlx-lm's ways of splitting a decoder (``language.LanguageModel.shard`` and
``pipeline``); nothing here talks to the network itself.

- :func:`world_group`: the group ``mlx.launch`` set up, or None for one process.
- :func:`load_model_sharded`: each rank reads only its own tensors and tensor slices
  (``distributed_load``; what a rank reads, and how, in ``distributed_read``).
- The vision tower: rank 0 computes the features and broadcasts them (:class:`VisionBroadcast`,
  :class:`VisionFromRankZero`; the measurement behind that choice is at the classes, in
  ``distributed_vision``).
- :func:`share`, :class:`RankZeroProcessor`: inputs made once on rank 0 and sent to the others,
  so that prompt, token ids and M-RoPE positions are the same on every rank (and checked:
  :func:`check_same_prompt`; the collectives are in ``distributed_collectives``).
- :class:`FailureGuard`: a failure on one rank ends every rank with one line naming the rank,
  never a hang (``distributed_guard``).

This module is the one to import: every name above (and the helpers its callers use) is
reachable from here.
"""

import os

import mlx.core as mx
import numpy as np

from . import errors
from .distributed_collectives import (_decode, _encode, barrier, check_same_prompt, settle,
                                      settle_unless_decoding, share, share_seed)
from .distributed_guard import (DEFAULT_STALL_TIMEOUT, STALL_TIMEOUT_ENV, FailureGuard, beat,
                                current_guard, idle, is_lost_peer, neighbours)
from .distributed_load import PARALLEL_MODES, dequantize_split, fill, load_model_sharded, split_model
from .distributed_read import (NUMPY_DTYPES, READ_CHUNK, WRAPPER, Source, read_block, read_plan,
                               stored_name, stored_sources)
from .distributed_vision import FEATURE_DTYPES, VisionBroadcast, VisionFromRankZero, broadcast_features
from .errors import QwenVLError

__all__ = [
    "LAUNCHER_ENV", "world_group", "RankZeroProcessor", "from_rank_zero", "read_turn",
    # distributed_collectives
    "settle", "settle_unless_decoding", "barrier", "share", "share_seed", "check_same_prompt",
    "_encode", "_decode",
    # distributed_guard
    "STALL_TIMEOUT_ENV", "DEFAULT_STALL_TIMEOUT", "FailureGuard", "beat", "idle", "current_guard",
    "is_lost_peer", "neighbours",
    # distributed_vision
    "VisionBroadcast", "VisionFromRankZero", "FEATURE_DTYPES", "broadcast_features",
    # distributed_read
    "WRAPPER", "Source", "NUMPY_DTYPES", "READ_CHUNK", "stored_sources", "read_block", "stored_name",
    "read_plan",
    # distributed_load
    "PARALLEL_MODES", "split_model", "load_model_sharded", "fill", "dequantize_split",
]

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


def read_turn(read, group):
    """Rank 0 calls ``read()`` (the terminal) and every rank gets what it returned (a str, or
    None for end of input); the wait is ``idle`` on every rank."""
    with idle():
        value = read() if group.rank() == 0 else None
        return share(value, group)
