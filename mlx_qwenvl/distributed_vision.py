"""The vision tower under a group: rank 0 computes the features and broadcasts them
(:class:`VisionBroadcast`, :class:`VisionFromRankZero`, :func:`broadcast_features`)."""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .distributed_collectives import settle

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
