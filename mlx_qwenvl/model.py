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
        """Position id minus cache length for the next token; restore it to switch caches."""
        return self._rope_delta

    @rope_delta.setter
    def rope_delta(self, value: int) -> None:
        self._rope_delta = int(value)

    def __call__(
        self,
        input_ids,
        cache: Optional[list] = None,
        input_embeddings: Optional[mx.array] = None,
        **vision_inputs,
    ) -> mx.array:
        """Logits for ``input_ids``; vision inputs are ``pixel_values``, ``image_grid_thw``,
        ``pixel_values_videos``, ``video_grid_thw`` and ``second_per_grid_ts``."""
        embeddings, position_ids, start = self._prepare(input_ids, cache, input_embeddings, **vision_inputs)
        return self.language_model(embeddings, cache, position_ids=position_ids, position_offset=start)

    def prefill(self, input_ids, cache: list, chunk_size: int = 2048, progress=None,
                **vision_inputs) -> None:
        """Fill ``cache`` with a prompt in chunks, so that attention over a long prompt (a large
        photo is up to 16k tokens) never holds all L x L scores at once.

        ``progress(processed, total)`` is called after each chunk, counting ``input_ids`` plus
        one (the last prompt token, which the decoding loop feeds).
        """
        embeddings, position_ids, start = self._prepare(input_ids, cache, None, **vision_inputs)
        total = embeddings.shape[1] + 1
        for i in range(0, embeddings.shape[1], chunk_size):
            chunk_positions = None if position_ids is None else position_ids[..., i : i + chunk_size]
            self.language_model.model(
                embeddings[:, i : i + chunk_size], cache, chunk_positions, start + i
            )
            mx.eval([c.state for c in cache])
            if progress is not None:
                progress(min(i + chunk_size, total - 1), total)

    def _prepare(self, input_ids, cache, input_embeddings=None, *, pixel_values=None,
                 image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                 second_per_grid_ts=None):
        """Embeddings, M-RoPE position ids (None for text only) and the text start position."""
        offset = cache[0].offset if cache and cache[0] is not None else 0
        if offset == 0:
            self._rope_delta = 0
        start = offset + self._rope_delta
        if input_embeddings is None:
            input_embeddings = self.embed(
                input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
            )
        if image_grid_thw is None and video_grid_thw is None:
            return input_embeddings, None, start

        ids = np.asarray(input_ids)
        if ids.ndim == 2 and ids.shape[0] != 1:
            raise InputError("prompts with images or videos are processed one at a time (batch size 1)")
        position_ids, next_position = self.position_ids(
            ids, image_grid_thw, video_grid_thw, second_per_grid_ts, start
        )
        self._rope_delta = next_position - (offset + ids.size)
        return input_embeddings, mx.array(position_ids)[:, None], start

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
        embed_tokens = self.language_model.model.embed_tokens
        if isinstance(input_ids, mx.array) and image_grid_thw is None and video_grid_thw is None:
            # Decoding steps: ids already on the device; reading them back would stall the loop.
            return embed_tokens(input_ids)
        ids = np.asarray(input_ids)
        embeddings = embed_tokens(mx.array(ids))
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
