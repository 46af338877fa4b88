"""The Qwen2.5-VL vision tower: patch embedding, 2D rotary, window/full attention blocks, merger.

Everything that depends only on the image grids (rotary positions, the window permutation,
the attention segments) is planned on the host with numpy from ``grid_thw``, which the
processor produced on the host; the tower itself then runs as whole-array MLX work with no
host synchronisation and no per-window Python loop.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import VisionArgs
from .language import MLP, rotate_half

# Attention score elements held at once per call before queries are processed in chunks:
# a 12-megapixel photo has ~62k patches, whose full-attention scores would need ~250 GB.
MAX_SCORE_ELEMENTS = 1 << 28


@dataclass
class SegmentBatch:
    """Segments attended in one call: equal lengths, or padded to the longest and masked."""

    num_segments: int
    length: int
    gather: Optional[mx.array] = None  # (S, length) token index per slot; None: contiguous
    key_mask: Optional[mx.array] = None  # (S, 1, 1, length), True for real tokens
    valid: Optional[mx.array] = None  # the real slots among S * length

    @classmethod
    def pad(cls, starts: np.ndarray, lengths: np.ndarray, contiguous: bool) -> "SegmentBatch":
        length = int(lengths.max())
        if contiguous and (lengths == length).all():
            return cls(len(lengths), length)
        slots = np.arange(length)
        valid = slots[None, :] < lengths[:, None]
        gather = np.where(valid, starts[:, None] + slots[None, :], 0)
        padded = not valid.all()
        return cls(
            len(lengths),
            length,
            gather=mx.array(gather.astype(np.int32)),
            key_mask=mx.array(valid[:, None, None, :]) if padded else None,
            valid=mx.array(np.flatnonzero(valid).astype(np.int32)) if padded else None,
        )

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        """(N, H, D) q/k/v -> (real tokens of this batch, H * D)."""
        q, k, v = (self._to_segments(t) for t in (q, k, v))
        rows = max(1, MAX_SCORE_ELEMENTS // (self.num_segments * q.shape[1] * self.length))
        if rows >= self.length:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=self.key_mask)
        else:
            # Huge images: bound the scores held at once. MLX is lazy, so each chunk is
            # evaluated before the next one is built; otherwise all would coexist.
            chunks = []
            for start in range(0, self.length, rows):
                chunk = mx.fast.scaled_dot_product_attention(
                    q[:, :, start : start + rows], k, v, scale=scale, mask=self.key_mask
                )
                mx.eval(chunk)
                chunks.append(chunk)
            out = mx.concatenate(chunks, axis=2)
        out = out.transpose(0, 2, 1, 3).reshape(self.num_segments * self.length, -1)
        return out if self.valid is None else out[self.valid]

    def _to_segments(self, x: mx.array) -> mx.array:
        """(N, H, D) tokens -> (S, H, length, D)."""
        if self.gather is None:
            x = x.reshape(self.num_segments, self.length, *x.shape[1:])
        else:
            x = x[self.gather]
        return x.transpose(0, 2, 1, 3)


@dataclass
class SegmentLayout:
    """Contiguous, independent attention segments of a token sequence (windows, images, frames).

    Windows (at most 64 patches) are padded to the longest and attended in one batched call.
    Images of very different sizes are grouped by length instead, so one large photo beside
    small ones does not pad every small one to its size.
    """

    batches: list
    restore: Optional[mx.array] = None  # batch outputs (concatenated) -> token order

    @classmethod
    def from_lengths(cls, lengths, max_padding: float = 1.0) -> "SegmentLayout":
        """Pad everything into one batch unless that adds more than ``max_padding`` times the
        real tokens; then one batch per distinct length."""
        lengths = np.asarray(lengths, dtype=np.int64)
        lengths = lengths[lengths > 0]
        starts = np.cumsum(lengths) - lengths
        total = int(lengths.sum())
        if len(lengths) * int(lengths.max()) <= (1 + max_padding) * total:
            return cls([SegmentBatch.pad(starts, lengths, contiguous=True)])
        batches, order = [], []
        for length in np.unique(lengths):
            chosen = lengths == length
            batches.append(SegmentBatch.pad(starts[chosen], lengths[chosen], contiguous=False))
            order.append((starts[chosen][:, None] + np.arange(length)[None, :]).ravel())
        restore = np.argsort(np.concatenate(order))
        return cls(batches, mx.array(restore.astype(np.int32)))

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        """(N, H, D) q/k/v -> (N, H * D), every segment attending only to itself."""
        outs = [batch.attend(q, k, v, scale) for batch in self.batches]
        if self.restore is None:
            return outs[0]
        return mx.concatenate(outs, axis=0)[self.restore]


@dataclass
class VisionPlan:
    """Host-side layout of one vision forward pass."""

    window_index: mx.array  # merged-unit permutation into window order
    reverse_index: mx.array  # its inverse, applied after the merger
    positions: mx.array  # (N, 2) rotary (row, col) ids, already in window order
    windows: SegmentLayout
    full: SegmentLayout  # one segment per image and per video time slice


def rotary_positions(grid_thw: np.ndarray, merge: int) -> np.ndarray:
    """(row, col) of each patch, in the processor's 2x2-merge-block-major row order."""
    positions = []
    for t, h, w in grid_thw:
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        pair = np.stack([rows, cols], axis=-1)
        pair = pair.reshape(h // merge, merge, w // merge, merge, 2).transpose(0, 2, 1, 3, 4)
        positions.append(np.tile(pair.reshape(-1, 2), (t, 1)))
    return np.concatenate(positions)


def window_partition(grid_thw: np.ndarray, merge: int, window_units: int):
    """Merged-unit permutation into window order and the window lengths in patches.

    As the reference pads each frame's merged grid up to whole windows (a full empty window
    row/column when it already divides) and drops the empty windows.
    """
    index, lengths, offset = [], [], 0
    for t, h, w in grid_thw:
        gh, gw = h // merge, w // merge
        units = np.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = window_units - gh % window_units, window_units - gw % window_units
        units = np.pad(units, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-1)
        nh, nw = units.shape[1] // window_units, units.shape[2] // window_units
        units = units.reshape(t, nh, window_units, nw, window_units).transpose(0, 1, 3, 2, 4)
        units = units.reshape(-1, window_units * window_units)
        valid = units >= 0
        index.append(units[valid] + offset)
        lengths.append(valid.sum(axis=1) * merge * merge)
        offset += t * gh * gw
    return np.concatenate(index), np.concatenate(lengths)


def plan_vision(grid_thw, args: VisionArgs) -> VisionPlan:
    grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    merge = args.spatial_merge_size
    unit = merge * merge
    window_index, window_lengths = window_partition(
        grid_thw, merge, args.window_size // merge // args.patch_size
    )
    positions = rotary_positions(grid_thw, merge)
    positions = positions.reshape(-1, unit, 2)[window_index].reshape(-1, 2)
    frame_lengths = np.repeat(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return VisionPlan(
        window_index=mx.array(window_index.astype(np.int32)),
        reverse_index=mx.array(np.argsort(window_index).astype(np.int32)),
        positions=mx.array(positions.astype(np.float32)),
        windows=SegmentLayout.from_lengths(window_lengths, max_padding=np.inf),
        full=SegmentLayout.from_lengths(frame_lengths),
    )


def apply_rotary(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    # The reference rotates in float32 whatever the activation dtype.
    x32 = x.astype(mx.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        kernel = (args.temporal_patch_size, args.patch_size, args.patch_size)
        self.proj = nn.Conv3d(
            args.in_channels, args.hidden_size, kernel_size=kernel, stride=kernel, bias=False
        )

    def __call__(self, pixel_values: mx.array) -> mx.array:
        # Each row is one (C, T, P, P) patch and the kernel covers it exactly, so the
        # convolution is a matrix product with the channels-last weight reordered to match.
        weight = self.proj.weight
        weight = weight.transpose(0, 4, 1, 2, 3).reshape(weight.shape[0], -1)
        return pixel_values.astype(weight.dtype) @ weight.T


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def __call__(self, x, cos, sin, layout: SegmentLayout) -> mx.array:
        qkv = self.qkv(x).reshape(x.shape[0], 3, self.num_heads, -1)
        q = apply_rotary(qkv[:, 0], cos, sin)
        k = apply_rotary(qkv[:, 1], cos, sin)
        return self.proj(layout.attend(q, k, qkv[:, 2], self.scale))


class VisionMLP(MLP):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__(dim, hidden_dim, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return _back_to(super().__call__(_float32_for_float16(x)), x.dtype)


def _float32_for_float16(x: mx.array) -> mx.array:
    # The vision MLP and merger overflow float16 on real images (mlx-vlm #745,
    # transformers #33294): compute them in float32; float16 weights promote.
    return x.astype(mx.float32) if x.dtype == mx.float16 else x


def _back_to(x: mx.array, dtype) -> mx.array:
    if dtype == mx.float16 and x.dtype != dtype:
        limit = float(np.finfo(np.float16).max)
        return mx.clip(x, -limit, limit).astype(dtype)
    return x


class VisionBlock(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.norm1 = nn.RMSNorm(args.hidden_size, eps=1e-6)
        self.norm2 = nn.RMSNorm(args.hidden_size, eps=1e-6)
        self.attn = VisionAttention(args.hidden_size, args.num_heads)
        self.mlp = VisionMLP(args.hidden_size, args.intermediate_size)

    def __call__(self, x, cos, sin, layout: SegmentLayout) -> mx.array:
        x = x + self.attn(self.norm1(x), cos, sin, layout)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.merged = merged = args.hidden_size * args.spatial_merge_size**2
        # The norm acts per patch, before four neighbouring patches are concatenated.
        self.ln_q = nn.RMSNorm(args.hidden_size, eps=1e-6)
        self.mlp = [nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, args.out_hidden_size)]

    def __call__(self, x: mx.array) -> mx.array:
        dtype = x.dtype
        x = _float32_for_float16(self.ln_q(x).reshape(-1, self.merged))
        for layer in self.mlp:
            x = layer(x)
        return _back_to(x, dtype)


class VisionModel(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_embed = PatchEmbed(args)
        self.blocks = [VisionBlock(args) for _ in range(args.depth)]
        self.merger = PatchMerger(args)
        head_dim = args.head_dim
        self._inv_freq = 1.0 / (
            10000.0 ** (mx.arange(0, head_dim // 2, 2, dtype=mx.float32) / (head_dim // 2))
        )
        mx.eval(self._inv_freq)  # usable from any thread (see language.MRoPE)

    def __call__(self, pixel_values: mx.array, grid_thw) -> mx.array:
        """Merged features, one row per LLM placeholder token, items in order, raster order."""
        plan = plan_vision(grid_thw, self.args)
        unit = self.args.spatial_merge_size**2
        x = self.patch_embed(pixel_values)
        x = x.reshape(-1, unit, x.shape[-1])[plan.window_index].reshape(-1, x.shape[-1])

        angles = (plan.positions[..., None] * self._inv_freq).reshape(x.shape[0], -1)
        angles = mx.concatenate([angles, angles], axis=-1)[:, None, :]
        cos, sin = mx.cos(angles), mx.sin(angles)

        full_blocks = set(self.args.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, plan.full if i in full_blocks else plan.windows)
        return self.merger(x)[plan.reverse_index]
