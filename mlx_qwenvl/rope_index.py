"""3D position ids for M-RoPE by the original Qwen2.5-VL rule (transformers 4.5x, vLLM).

Text tokens advance every row by one. A vision block of merged grid (T, H, W) gives its
tokens (s + floor(k * interval), s + row, s + col) in raster order, where the interval is 0
for images and ``second_per_grid_t * tokens_per_second`` for videos; the next free id is the
block's largest id plus one. transformers 5.x resumes after a video at ``s + max(H, W)``,
ignoring the temporal extent: that is a bug this port does not copy.
"""

import numpy as np


def vision_block_positions(grid_thw, merge: int, start: int, interval: float) -> np.ndarray:
    """(3, T*H*W/merge^2) position ids for one image or video starting at ``start``."""
    t, h, w = (int(v) for v in grid_thw)
    h, w = h // merge, w // merge
    # As the reference: float32 products, truncated toward zero.
    temporal = (np.arange(t, dtype=np.float32) * np.float32(interval)).astype(np.int64)
    tt, hh, ww = np.meshgrid(temporal, np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + start


def get_rope_index(
    input_ids,
    image_grid_thw=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    tokens_per_second: float,
    start: int = 0,
):
    """Position ids (3, L) for one sequence and the next free position id after it.

    ``start`` is the first id to use: 0 for a new prompt, or the position of the next token
    when the sequence continues a cached conversation.
    """
    ids = np.asarray(input_ids).reshape(-1)
    grids = {
        image_token_id: iter(np.asarray(image_grid_thw).reshape(-1, 3) if image_grid_thw is not None else ()),
        video_token_id: iter(np.asarray(video_grid_thw).reshape(-1, 3) if video_grid_thw is not None else ()),
    }
    video_seconds = iter(second_per_grid_ts if second_per_grid_ts is not None else ())

    pieces, position, i = [], start, 0
    while i < len(ids):
        token = int(ids[i])
        if token not in grids:
            end = i + 1
            while end < len(ids) and int(ids[end]) not in grids:
                end += 1
            pieces.append(np.broadcast_to(np.arange(position, position + end - i), (3, end - i)))
            position += end - i
            i = end
            continue
        grid = next(grids[token], None)
        if grid is None:
            raise ValueError("the prompt has more vision placeholders than image/video grids")
        interval = 0.0
        if token == video_token_id:
            seconds = next(video_seconds, 1.0)
            interval = float(np.float32(seconds) * np.float32(tokens_per_second))
        block = vision_block_positions(grid, spatial_merge_size, position, interval)
        length = block.shape[1]
        if not (ids[i : i + length] == token).all() or i + length > len(ids):
            raise ValueError(f"a vision block of grid {tuple(int(v) for v in grid)} needs {length} "
                             "consecutive placeholder tokens")
        pieces.append(block)
        position = int(block.max()) + 1
        i += length
    positions = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
    return positions.astype(np.int64), position
