"""Qwen2.5-VL: the vision tower feeding the Qwen2 decoder through placeholder tokens."""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache, RotatingKVCache

from .config import ModelArgs
from .errors import InputError
from .language import LanguageModel
from .rope_index import get_rope_index
from .vision import VisionModel


class PromptCache(list):
    """One conversation's state: the per-layer KV caches (a list, as mlx-lm's prompt caches)
    plus the M-RoPE offset between position ids and cache length (``rope_delta``).

    After a call with images or videos, text positions continue from the largest position id
    plus one rather than from the cache length; the difference travels with the cache, so
    one model serves any number of conversations. Each such call is remembered
    (``vision_calls``: first and last+1 offset of its vision tokens, delta before it), so that
    ``trim`` can restore the offset of an earlier prefix.
    """

    def __init__(self, layers=(), vision_token_ids=(151655, 151656)):
        super().__init__(layers)
        self.vision_token_ids = tuple(vision_token_ids)  # image and video placeholders
        self.rope_delta = 0
        self.vision_calls: list = []

    @property
    def offset(self) -> int:
        """Tokens held (the fewest of any layer, should an interruption leave them uneven)."""
        return min((c.offset for c in self), default=0)

    def safe_length(self, length: int) -> int:
        """The longest prefix of at most ``length`` tokens that does not end inside the vision
        tokens of one call (whose positions depend on every image of that call)."""
        for start, end, _ in reversed(self.vision_calls):
            if start < length < end:
                return start
        return length

    def trim(self, length: int) -> None:
        """Keep the first ``length`` tokens in every layer, with their M-RoPE offset.

        Raises:
            ValueError: ``length`` ends inside a call's vision tokens (see ``safe_length``),
                or a layer's cache cannot be trimmed.
        """
        if self.safe_length(length) != length:
            raise ValueError(f"cannot keep {length} tokens: that ends inside an image or video")
        while self.vision_calls and self.vision_calls[-1][0] >= length:
            self.rope_delta = self.vision_calls.pop()[2]
        for layer in self:
            if layer.offset > length:
                if not layer.is_trimmable():
                    raise ValueError(f"a {type(layer).__name__} cannot be trimmed")
                layer.trim(layer.offset - length)

    def record_vision_call(self, offset: int, ids: np.ndarray, delta: int) -> None:
        """Remember a call at ``offset`` whose ``ids`` hold vision tokens, and its new delta."""
        vision = np.flatnonzero(np.isin(ids.reshape(-1), self.vision_token_ids))
        self.vision_calls.append((offset + int(vision[0]), offset + int(vision[-1]) + 1, self.rope_delta))
        self.rope_delta = int(delta)


class Model(nn.Module):
    """Parameter names follow mlx-vlm's converted folders (``vision_tower.*``, ``language_model.*``).

    Calls follow mlx-lm: ``model(input_ids, cache=...)`` returns logits. A call that carries
    images or videos computes M-RoPE position ids for its tokens and stores the offset between
    position ids and cache length in the cache (``PromptCache.rope_delta``), which every later
    text-only call on the same cache continues from; a call on an empty cache starts afresh.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.vision_tower = VisionModel(args.vision)
        self.language_model = LanguageModel(args.text)

    @property
    def layers(self):
        return self.language_model.layers

    def make_cache(self, max_kv_size: Optional[int] = None) -> PromptCache:
        """A new conversation's cache (mlx-lm's ``make_prompt_cache`` calls this): KV caches,
        rotating ones of ``max_kv_size`` tokens (keeping the first 4) when given."""
        if max_kv_size is None:
            layers = [KVCache() for _ in self.layers]
        else:
            layers = [RotatingKVCache(max_size=max_kv_size, keep=4) for _ in self.layers]
        return PromptCache(layers, (self.args.image_token_id, self.args.video_token_id))

    def __call__(
        self,
        input_ids,
        cache: Optional[list] = None,
        input_embeddings: Optional[mx.array] = None,
        **vision_inputs,
    ) -> mx.array:
        """Logits for ``input_ids``, as an mlx-lm model call.

        Args:
            input_ids: (B, L) integer token ids (numpy, list or mx.array); with images or videos,
                B = 1 and every placeholder expanded, as ``Processor`` gives them.
            cache: one KV cache per layer, filled in place (``make_cache``, or mlx-lm's
                ``make_prompt_cache``; a call with vision inputs needs this ``PromptCache``);
                None: no cache, positions from 0.
            input_embeddings: (B, L, hidden_size) used instead of ``embed(input_ids, ...)``
                (``input_ids`` still give the M-RoPE positions).
            **vision_inputs: as ``Processor`` returns them: ``pixel_values`` / ``pixel_values_videos``,
                float (N, 3 * temporal_patch_size * patch_size**2) normalized patch rows;
                ``image_grid_thw`` / ``video_grid_thw``, int (items, 3) (t, h, w) in patches;
                ``second_per_grid_ts``, each video's seconds per temporal grid step (1.0 if absent).

        Positions: text continues at the cache length plus the cache's ``rope_delta``; a call
        with images or videos takes 3D M-RoPE ids by the reference's rule (transformers 4.5x
        ``Qwen2_5_VLModel.get_rope_index``, see rope_index) and stores the new delta in the cache;
        a call on an empty cache starts at 0.

        Returns:
            Logits (B, L, vocab_size) in the model's compute dtype (float32, bfloat16 or
            float16, as loaded).

        Raises:
            InputError: vision inputs with B > 1 or with a cache that is not a ``PromptCache``;
                placeholder tokens that do not match the grids' features; grids without pixels.
            ValueError: the placeholder tokens are not one run per grid item, each as long as
                its features (rope_index; reachable past the count check with split runs, or
                with ``input_embeddings``, which skips it).
        """
        embeddings, position_ids, start = self._prepare(input_ids, cache, input_embeddings, **vision_inputs)
        return self.language_model(embeddings, cache, position_ids=position_ids, position_offset=start)

    def prefill(self, input_ids, cache: list, chunk_size: int = 2048, progress=None, quantize=None,
                **vision_inputs) -> None:
        """Fill ``cache`` with a prompt in chunks, so that attention over a long prompt (a large
        photo is up to 16k tokens) never holds all L x L scores at once.

        ``progress(processed, total)`` is called after each chunk, counting ``input_ids`` plus
        one (the last prompt token, which the decoding loop feeds). ``quantize(cache)``, when
        given, runs after each chunk (mlx-lm's prefill: a quantized KV cache starts as soon as
        it holds quantized_kv_start tokens, not at the first decoding step).
        """
        embeddings, position_ids, start = self._prepare(input_ids, cache, None, **vision_inputs)
        total = embeddings.shape[1] + 1
        for i in range(0, embeddings.shape[1], chunk_size):
            chunk_positions = None if position_ids is None else position_ids[..., i : i + chunk_size]
            self.language_model.model(
                embeddings[:, i : i + chunk_size], cache, chunk_positions, start + i
            )
            if quantize is not None:
                quantize(cache)
            mx.eval([c.state for c in cache])
            if progress is not None:
                progress(min(i + chunk_size, total - 1), total)
            mx.clear_cache()  # the chunk's attention buffers, as mlx-lm's prefill

    def _prepare(self, input_ids, cache, input_embeddings=None, *, pixel_values=None,
                 image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                 second_per_grid_ts=None):
        """Embeddings, M-RoPE position ids (None for text only) and the text start position."""
        offset = cache[0].offset if cache and cache[0] is not None else 0
        if offset == 0 and isinstance(cache, PromptCache):
            cache.rope_delta, cache.vision_calls = 0, []
        start = offset + (getattr(cache, "rope_delta", 0) if offset else 0)
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
        if cache is not None:
            if not isinstance(cache, PromptCache):
                raise InputError("a prompt with images or videos needs the model's own cache "
                                 "(make_cache(model), or mlx-lm's make_prompt_cache(model))")
            cache.record_vision_call(offset, ids, next_position - (offset + ids.size))
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
        """Token embeddings with the vision features written over the placeholder rows.

        ``input_ids``: (B, L) integer ids (numpy, list or mx.array); the vision inputs as
        ``__call__`` takes them. Returns (B, L, hidden_size) in the embedding's dtype: the vision
        tower's features, cast to it, replace the rows of ``image_token_id`` tokens (images in
        order, raster order within each) and of ``video_token_id`` tokens (videos likewise); each
        item gives t*h*w / spatial_merge_size**2 of them. An mx.array without grids (a decoding
        step) is looked up on the device, with no read back to the host.

        Raises:
            InputError: the placeholder tokens of a kind differ in number from the features its
                grids give; grids without their pixel values.
        """
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
