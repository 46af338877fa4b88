"""Qwen2.5-VL: the vision tower feeding the Qwen2 decoder through placeholder tokens."""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import ModelArgs
from .errors import InputError
from .language import LanguageModel
from .rope_index import get_rope_index
from .vision import VisionModel


class Model(nn.Module):
    """Parameter names follow mlx-vlm's converted folders (``vision_tower.*``, ``language_model.*``).

    Calls follow mlx-lm: ``model(input_ids, cache=...)`` returns logits. A call that carries
    images or videos computes M-RoPE position ids for its tokens and remembers the offset
    between position ids and cache length (``rope_delta``), which every later text-only call
    on the same cache continues from; a call on an empty cache starts afresh.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.vision_tower = VisionModel(args.vision)
        self.language_model = LanguageModel(args.text)
        self._rope_delta = 0

    @property
    def layers(self):
        return self.language_model.layers

    @property
    def rope_delta(self) -> int:
        return self._rope_delta

    def __call__(
        self,
        input_ids,
        cache: Optional[list] = None,
        input_embeddings: Optional[mx.array] = None,
        *,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
    ) -> mx.array:
        offset = cache[0].offset if cache and cache[0] is not None else 0
        if offset == 0:
            self._rope_delta = 0
        start = offset + self._rope_delta
        if input_embeddings is None:
            input_embeddings = self.embed(
                input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
            )
        if image_grid_thw is None and video_grid_thw is None:
            return self.language_model(input_embeddings, cache, position_offset=start)

        ids = np.asarray(input_ids)
        if ids.ndim == 2 and ids.shape[0] != 1:
            raise InputError("prompts with images or videos are processed one at a time (batch size 1)")
        position_ids, next_position = self.position_ids(
            ids, image_grid_thw, video_grid_thw, second_per_grid_ts, start
        )
        self._rope_delta = next_position - (offset + ids.size)
        return self.language_model(input_embeddings, cache, position_ids=mx.array(position_ids)[:, None])

    def position_ids(self, input_ids, image_grid_thw=None, video_grid_thw=None,
                     second_per_grid_ts=None, start: int = 0):
        """(3, L) M-RoPE ids by the original Qwen rule, and the next free id."""
        return get_rope_index(
            input_ids,
            image_grid_thw,
            video_grid_thw,
            second_per_grid_ts,
            image_token_id=self.args.image_token_id,
            video_token_id=self.args.video_token_id,
            spatial_merge_size=self.args.vision.spatial_merge_size,
            tokens_per_second=self.args.vision.tokens_per_second,
            start=start,
        )

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None,
              pixel_values_videos=None, video_grid_thw=None) -> mx.array:
        """Token embeddings with the vision features written over the placeholder rows."""
        ids = np.asarray(input_ids)
        embeddings = self.language_model.model.embed_tokens(mx.array(ids))
        for pixels, grid, token, kind in (
            (pixel_values, image_grid_thw, self.args.image_token_id, "image"),
            (pixel_values_videos, video_grid_thw, self.args.video_token_id, "video"),
        ):
            rows = np.flatnonzero(ids.reshape(-1) == token)
            expected = 0 if grid is None else int(np.prod(np.asarray(grid).reshape(-1, 3), axis=1).sum())
            expected //= self.args.vision.spatial_merge_size**2
            if len(rows) != expected:
                raise InputError(
                    f"the prompt has {len(rows)} {kind} placeholder tokens but the {kind}s give "
                    f"{expected} features"
                )
            if not expected:
                continue
            if pixels is None:
                raise InputError(f"{kind} grids were given without their pixel values")
            features = self.vision_tower(mx.array(pixels), grid)
            flat = embeddings.reshape(-1, embeddings.shape[-1])
            flat[mx.array(rows.astype(np.int32))] = features.astype(flat.dtype)
            embeddings = flat.reshape(embeddings.shape)
        return embeddings
