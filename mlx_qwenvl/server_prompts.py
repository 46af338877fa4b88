"""Validated requests to prompts the worker can continue from a cache (request threads; numpy
and Pillow only, never MLX).

A prompt's ``key`` is its token ids with each image's (and video's) placeholder run replaced by
a content id: a hash of the decoded pixels and the grid they are resized to, so two prompts
share a key prefix exactly when a cache built for one serves the other. Pixel rows are made
only for the images after the prefix the conversation cache already holds (the request thread
asks it first); any the worker finds missing, because the cache changed meanwhile, it makes
itself. Prompts with videos go through ``Processor.encode`` whole.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .errors import InputError
from .image_processing import process_images, target_size
from .processor import IMAGE_TOKEN
from .server_requests import LOW_DETAIL_PIXELS, ChatRequest, MediaPart, bad


@dataclass
class VisionItem:
    """One image or video of a prompt. ``start``/``tokens``: its placeholder run; ``grid``:
    (t, h, w) in patches, so its pixel rows are t*h*w; ``rows``: those rows (float32
    (t*h*w, 3*2*14*14)) once made; ``source``: an image's decoded picture and target
    (height, width), to make them; ``seconds``: a video's seconds per grid step."""

    start: int
    tokens: int
    grid: tuple
    content_id: int
    rows: Optional[np.ndarray] = None
    source: Optional[tuple] = None
    seconds: Optional[float] = None


@dataclass
class Prompt:
    """A request's model inputs: ``ids`` (L,) int32 token ids, ``key`` (L,) int64 the cache
    key, its images and videos in order; ``make_rows(item)`` makes an image's pixel rows."""

    ids: np.ndarray
    key: np.ndarray
    images: list
    videos: list
    make_rows: Callable[[VisionItem], np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)

    def prepare(self, kept: int) -> None:
        """Make the pixel rows of every image from offset ``kept`` on."""
        for item in self.images:
            if item.start >= kept and item.rows is None:
                item.rows = self.make_rows(item)

    def inputs_after(self, kept: int) -> dict:
        """``stream_tokens`` inputs for ``ids[kept:]``: only the images and videos after the
        kept prefix (their rows made now if still missing).

        Raises:
            ValueError: ``kept`` ends inside an image or video.
        """
        out = {"input_ids": self.ids[None, kept:]}
        for items, pixels, grid in ((self.images, "pixel_values", "image_grid_thw"),
                                    (self.videos, "pixel_values_videos", "video_grid_thw")):
            if any(item.start < kept < item.start + item.tokens for item in items):
                raise ValueError(f"cannot keep {kept} tokens: that ends inside an image or video")
            after = [item for item in items if item.start >= kept]
            rows = [item.rows if item.rows is not None else self.make_rows(item) for item in after]
            out[pixels] = np.concatenate(rows) if rows else None
            out[grid] = np.asarray([item.grid for item in after], dtype=np.int64) if after else None
        videos = [item for item in self.videos if item.start >= kept]
        out["second_per_grid_ts"] = [item.seconds for item in videos] if videos else None
        return out


class PromptBuilder:
    """Renders, tokenizes and keys requests for one processor (whose tokenizer and template
    the request threads share, under a lock)."""

    def __init__(self, processor, model_args, policy, min_pixels=None, max_pixels=None):
        self.processor, self.args, self.policy = processor, model_args, policy
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.lock = threading.Lock()

    def build(self, request: ChatRequest, cached_prefix: Optional[Callable[[np.ndarray], int]] = None) -> Prompt:
        """The request's prompt, with pixel rows for the images after ``cached_prefix(key)``
        tokens (what the conversation cache would keep; None: all of them).

        Raises:
            APIError: 400 for unreadable or refused media, pixel bounds that do not fit, a
                template error, or a prompt that does not fit the model's context.
        """
        images = [self.policy.image(part.source, part.where) for part in request.images]
        videos = [self.policy.video(part) for part in request.videos]
        low, high = self._bounds(request)
        bounds = [self._image_bounds(part, low, high) for part in request.images]
        sizes = [self._size(image, part, bound) for image, part, bound in zip(images, request.images, bounds)]
        try:
            with self.lock:
                text = self.processor.apply_chat_template(request.messages)
                if videos:
                    prompt = self._encoded(text, images, bounds, videos, request.videos, low, high)
                else:
                    prompt = self._tokenized(text, images, sizes)
        except InputError as error:
            raise bad(str(error), "messages") from None
        self._check_length(prompt, request)
        prompt.prepare(cached_prefix(prompt.key) if cached_prefix else 0)
        return prompt

    # ---- sizes

    def _bounds(self, request: ChatRequest) -> tuple[int, int]:
        """The request's (min_pixels, max_pixels): its own, else the server's, else the model's."""
        low = request.min_pixels if request.min_pixels is not None else self.min_pixels
        high = request.max_pixels if request.max_pixels is not None else self.max_pixels
        try:
            return self.processor.pixel_bounds(low, high)
        except InputError as error:
            raise bad(str(error), "max_pixels") from None

    @staticmethod
    def _image_bounds(part: MediaPart, low: int, high: int) -> tuple[int, int]:
        """An image's (min_pixels, max_pixels): the part's over the request's, ``detail: low``
        capping it at 256 tokens."""
        low = part.options.get("min_pixels", low)
        high = part.options.get("max_pixels", high)
        if part.options.get("detail") == "low":
            high = min(high, LOW_DETAIL_PIXELS)
            low = min(low, high)
        if low > high:
            raise bad(f"{part.where}: min_pixels {low} is larger than max_pixels {high}", "messages")
        return low, high

    def _size(self, image, part: MediaPart, bounds: tuple[int, int]) -> tuple[int, int]:
        """The (height, width) the image is resized to."""
        try:
            return target_size(image, *bounds, self.processor.config.factor)
        except InputError as error:
            raise bad(f"{part.where}: {error}", "messages") from None

    # ---- prompts

    def _tokenized(self, text: str, images: list, sizes: list) -> Prompt:
        """Token ids with each image placeholder expanded to its grid's token count, as
        ``Processor.encode`` does, without making any pixel rows."""
        found = text.count(IMAGE_TOKEN)
        if found != len(images):
            raise InputError(f"prompt: {found} image placeholder(s) {IMAGE_TOKEN} but {len(images)} image(s) given")
        patch, merge = self.processor.config.patch_size, self.processor.config.merge_size
        grids = [(1, h // patch, w // patch) for h, w in sizes]
        counts = [g[1] * g[2] // merge**2 for g in grids]
        pieces = text.split(IMAGE_TOKEN)
        expanded = pieces[0] + "".join(IMAGE_TOKEN * n + piece for n, piece in zip(counts, pieces[1:]))
        ids = np.asarray(self.processor.tokenizer.encode(expanded), dtype=np.int32)
        items = [VisionItem(0, count, grid, image_content_id(image, grid), source=(image, size))
                 for image, size, grid, count in zip(images, sizes, grids, counts)]
        return self._keyed(ids, items, [])

    def _encoded(self, text, images, bounds, videos, parts, low, high) -> Prompt:
        """A prompt with videos: everything through ``Processor.encode`` (rows included)."""
        specs = [{"image": image, "min_pixels": lo, "max_pixels": hi} for image, (lo, hi) in zip(images, bounds)]
        video_specs = [{"video": frames, **part.options} for frames, part in zip(videos, parts)]
        inputs = self.processor.encode(text, specs, video_specs, min_pixels=low, max_pixels=high)
        ids = np.asarray(inputs["input_ids"]).reshape(-1).astype(np.int32)
        image_items = [VisionItem(0, rows.shape[0] // self.processor.config.merge_size**2, grid,
                                  image_content_id(image, grid), rows=rows)
                       for image, grid, rows in zip(images, *_split_rows(inputs, "pixel_values", "image_grid_thw"))]
        seconds = inputs["second_per_grid_ts"] or []
        video_items = [VisionItem(0, rows.shape[0] // self.processor.config.merge_size**2, grid,
                                  rows_content_id(rows, grid, second), rows=rows, seconds=second)
                       for grid, rows, second in zip(*_split_rows(inputs, "pixel_values_videos", "video_grid_thw"),
                                                     seconds)]
        return self._keyed(ids, image_items, video_items)

    def _keyed(self, ids: np.ndarray, images: list, videos: list) -> Prompt:
        """Place each item on its placeholder run and write its content id into the key."""
        key = ids.astype(np.int64)
        for items, token in ((images, self.args.image_token_id), (videos, self.args.video_token_id)):
            positions, cursor = np.flatnonzero(ids == token), 0
            for item in items:
                item.start = int(positions[cursor])
                key[item.start:item.start + item.tokens] = item.content_id
                cursor += item.tokens
        return Prompt(ids, key, images, videos, self.image_rows)

    def image_rows(self, item: VisionItem) -> np.ndarray:
        """An image's pixel rows (numpy; any thread)."""
        image, size = item.source
        c = self.processor.config
        rows, grid = process_images([image], sizes=[size], resample=c.resample, **c.pixel_options())
        assert tuple(int(v) for v in grid[0]) == item.grid, (grid, item.grid)
        return rows

    def _check_length(self, prompt: Prompt, request: ChatRequest) -> None:
        """The prompt plus one answer token must fit; ``max_tokens`` is clamped to what does."""
        limit = self.args.text.max_position_embeddings
        if len(prompt) + 1 > limit:
            raise bad(f"the prompt is {len(prompt)} tokens but the model's context holds {limit} "
                      "(prompt plus answer)", "messages")
        request.generation["max_tokens"] = min(request.generation["max_tokens"], limit - len(prompt))


def _split_rows(inputs: dict, pixels: str, grid: str) -> tuple[list, list]:
    """Each item's grid (t, h, w) and pixel rows (t*h*w of them) from the processor's arrays."""
    if inputs.get(grid) is None:
        return [], []
    grids = [tuple(int(v) for v in row) for row in np.asarray(inputs[grid]).reshape(-1, 3)]
    bounds = np.cumsum([0] + [t * h * w for t, h, w in grids])
    return grids, [inputs[pixels][a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def image_content_id(image, grid) -> int:
    """A negative id (never a real token) from the decoded RGB pixels and the grid the image is
    resized to: the same picture at another max_pixels gets another id."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{image.mode}:{image.width}x{image.height}:{tuple(grid)}".encode())
    digest.update(image.tobytes())
    return _negative(digest.digest())


def rows_content_id(rows: np.ndarray, grid, seconds: float) -> int:
    """A negative id for a video from its pixel rows, grid and seconds per grid step."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{tuple(grid)}:{float(seconds)!r}".encode())
    digest.update(np.ascontiguousarray(rows).tobytes())
    return _negative(digest.digest())


def _negative(digest: bytes) -> int:
    return -1 - (int.from_bytes(digest, "little") & (2**62 - 1))
