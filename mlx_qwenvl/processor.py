"""Chat messages, images and videos to Qwen2.5-VL model inputs, as ``Qwen2_5_VLProcessor`` builds them.

The prompt is rendered with the model folder's chat template (chat_template.py: jinja2, configured as
transformers configures it; a text-model template that cannot render images gets text as strings, and prompts with
images or videos use the built-in Qwen2.5-VL template instead); every ``<|image_pad|>`` /
``<|video_pad|>`` is expanded to t*h*w/4 copies; the text is tokenized with the tokenizer mlx-lm
loads. Pixels come from image_processing / video_processing.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .chat_template import (
    DEFAULT_CHAT_TEMPLATE,
    VISION_PLACEHOLDERS,
    compile_template,
    find_chat_template,
    locate_chat_template,
    probe_template,
    render_template,
)
from .config import SamplingDefaults, read_folder_json
from .errors import InputError, ModelLoadError
from .image_processing import (
    CLIP_MEAN,
    CLIP_STD,
    MAX_PIXELS,
    MERGE_SIZE,
    MIN_PIXELS,
    PATCH_SIZE,
    RESCALE_FACTOR,
    TEMPORAL_PATCH_SIZE,
    PatchLayout,
    check_pixel_bounds,
    grid_token_counts,
    image_token_count,
    load_image,
    process_images,
    smart_resize,
    target_size,
)
from .video_processing import VIDEO_OPTIONS, fetch_video, probe_video, process_videos

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# preprocessor_config.json


@dataclass
class PreprocessorConfig:
    """The image settings of a model folder (hub values by default), under
    preprocessor_config.json's names: the images' pixel bounds, how pixels become patch rows
    (``pixel_options``) and the resize filter."""

    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    patch_size: int = PATCH_SIZE
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE
    merge_size: int = MERGE_SIZE
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    rescale_factor: float = RESCALE_FACTOR
    resample: int = 3  # PIL bicubic

    @classmethod
    def from_dict(cls, config: dict) -> "PreprocessorConfig":
        """Read v4 (``min_pixels``/``max_pixels``) and v5 (``size.shortest_edge``/``longest_edge``, both pixel counts) forms."""
        size = config.get("size") or {}
        min_pixels = config.get("min_pixels", size.get("shortest_edge", size.get("min_pixels", MIN_PIXELS)))
        max_pixels = config.get("max_pixels", size.get("longest_edge", size.get("max_pixels", MAX_PIXELS)))
        try:
            min_pixels, max_pixels = check_pixel_bounds(min_pixels, max_pixels, "preprocessor_config.json")
        except InputError as exc:
            raise ModelLoadError(str(exc)) from None
        return cls(
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            patch_size=int(config.get("patch_size", PATCH_SIZE)),
            temporal_patch_size=int(config.get("temporal_patch_size", TEMPORAL_PATCH_SIZE)),
            merge_size=int(config.get("merge_size", MERGE_SIZE)),
            image_mean=tuple(config.get("image_mean", CLIP_MEAN)),
            image_std=tuple(config.get("image_std", CLIP_STD)),
            rescale_factor=float(config.get("rescale_factor", RESCALE_FACTOR)),
            resample=int(config.get("resample", 3)),
        )

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_folder(cls, path) -> "PreprocessorConfig":
        """The settings of a folder's preprocessor_config.json (hub values when it has none)."""
        return cls.from_dict(read_folder_json(path, "preprocessor_config.json") or {})

    def pixel_options(self) -> dict:
        """The keyword options of ``process_images``/``process_videos`` (``PatchLayout``'s fields)."""
        return asdict(PatchLayout(self.image_mean, self.image_std, self.rescale_factor, self.patch_size,
                                  self.merge_size, self.temporal_patch_size))


# --------------------------------------------------------------------------------------------
# Messages


def part_kind(part, where: str) -> str:
    """'image', 'video' or 'text' for a content part, decided as the chat template decides."""
    if not isinstance(part, dict):
        raise InputError(f"{where}: a content part must be a dict, got {type(part).__name__}")
    kind = part.get("type")
    if kind in ("image", "image_url") or "image" in part or "image_url" in part:
        return "image"
    if kind == "video" or "video" in part:
        return "video"
    if kind == "text" or (kind is None and "text" in part):
        if not isinstance(part.get("text"), str):
            raise InputError(f"{where}: a text part needs a 'text' string")
        return "text"
    raise InputError(f"{where}: unknown content part type {kind!r} (expected 'image', 'video' or 'text')")


def check_messages(messages) -> list[tuple[str, dict]]:
    """Validate reference-format messages; returns the vision parts (kind, part) in prompt order."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages: expected a non-empty list of {'role': ..., 'content': ...} dicts")
    vision = []
    for i, message in enumerate(messages):
        where = f"message {i}"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise InputError(f"{where}: expected a dict with a 'role' string and 'content'")
        content = message["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise InputError(f"{where}: 'content' must be a string or a list of parts")
        for j, part in enumerate(content):
            kind = part_kind(part, f"{where}, part {j}")
            if kind != "text":
                vision.append((kind, part))
    return vision


def _part_source(kind: str, part: dict):
    if kind == "image":
        source = part.get("image", part.get("image_url"))
        return source.get("url") if isinstance(source, dict) and "url" in source else source
    return part.get("video")


def _fill_sources(vision, images, videos) -> tuple[list[dict], list[dict]]:
    """Image and video specs in prompt order; parts without a source take the next item of images/videos."""
    queues = {"image": list(images or []), "video": list(videos or [])}
    specs = {"image": [], "video": []}
    for kind, part in vision:
        source = _part_source(kind, part)
        if source is None:
            if not queues[kind]:
                raise InputError(f"messages: more {kind} parts without a source than {kind}s given")
            spec = _as_spec(kind, queues[kind].pop(0))
        else:
            spec = {**part, kind: source}
        specs[kind].append(spec)
    for kind, left in queues.items():
        if left:
            raise InputError(f"messages: {len(left)} {kind}(s) given but no {kind} part to place them in")
    return specs["image"], specs["video"]


def _as_spec(kind: str, item) -> dict:
    """An item of images=/videos=: a source, or a dict part with per-item options."""
    if isinstance(item, dict) and kind in item:
        return item
    if kind == "image" and isinstance(item, dict) and "image_url" in item:
        return {**item, "image": _part_source("image", item)}
    return {kind: item}


def _joined_text(message: dict) -> dict:
    """The message with a content of only text parts as one string (as text-model templates expect)."""
    content = message["content"]
    if isinstance(content, str) or any(part_kind(part, "") != "text" for part in content):
        return message
    return {**message, "content": "".join(part["text"] for part in content)}


def _text_messages(text: str, images, videos) -> list[dict]:
    content = [{"type": "image", **_as_spec("image", image)} for image in images or []]
    content += [{"type": "video", **_as_spec("video", video)} for video in videos or []]
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]


# --------------------------------------------------------------------------------------------
# Processor


class Processor:
    """``processor(messages_or_text, images=None, videos=None, ...)`` gives the model's inputs as numpy arrays."""

    def __init__(self, tokenizer, chat_template: str | None = None, config: PreprocessorConfig | None = None,
                 sampling_defaults: SamplingDefaults | None = None, template_source: str | None = None):
        """``template_source``: the file ``chat_template`` came from, named in its errors and notices.

        Raises ModelLoadError if the chat template has a syntax error.
        """
        self.tokenizer = tokenizer
        self.config = config or PreprocessorConfig()
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        self.template_source = template_source
        self._template = compile_template(self.chat_template, template_source)
        if self.chat_template == DEFAULT_CHAT_TEMPLATE:
            self._builtin = self._template
            self._vision_kinds, self._join_text = frozenset(VISION_PLACEHOLDERS), True
        else:  # the built-in template takes the images and videos the folder's cannot render
            self._builtin = compile_template(DEFAULT_CHAT_TEMPLATE)
            self._vision_kinds, self._join_text = probe_template(self._template)
        self._fallback_noted = False
        self.sampling_defaults = sampling_defaults if sampling_defaults is not None else SamplingDefaults()
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)

    @classmethod
    def from_pretrained(cls, path, *, preprocessor_config: dict | None = None,
                        generation_config: dict | None = None) -> "Processor":
        """The processor of a model folder: its tokenizer, chat template, image settings
        (preprocessor_config.json) and sampling defaults (generation_config.json).

        ``preprocessor_config``/``generation_config`` are those files' contents when the caller
        has read them; when None, the file is read here (an absent one gives the hub's image
        settings, greedy sampling).

        Raises ModelLoadError: no such folder, no readable tokenizer, an unreadable JSON file or
        chat template, or pixel bounds that preprocessor_config.json gets wrong.
        """
        path = Path(path)
        if not path.is_dir():
            raise ModelLoadError(f"{path}: model folder not found")
        tokenizer = load_tokenizer(path)
        template, source = locate_chat_template(path, tokenizer)
        if preprocessor_config is None:
            preprocessor_config = read_folder_json(path, "preprocessor_config.json") or {}
        if generation_config is None:
            generation_config = read_folder_json(path, "generation_config.json")
        return cls(tokenizer, template, PreprocessorConfig.from_dict(preprocessor_config),
                   SamplingDefaults.from_dict(generation_config), template_source=source)

    # ---- sizes

    @property
    def min_pixels(self) -> int:
        return self.config.min_pixels

    @property
    def max_pixels(self) -> int:
        return self.config.max_pixels

    def pixel_bounds(self, min_pixels=None, max_pixels=None) -> tuple[int, int]:
        """The image (min_pixels, max_pixels) for a call: the given values over the model's."""
        return check_pixel_bounds(
            self.config.min_pixels if min_pixels is None else min_pixels,
            self.config.max_pixels if max_pixels is None else max_pixels,
        )

    def image_tokens(self, source, *, min_pixels=None, max_pixels=None) -> int:
        """How many vision tokens an image (any source) costs under these bounds."""
        image = load_image(source)
        low, high = self.pixel_bounds(min_pixels, max_pixels)
        return image_token_count(image.height, image.width, low, high, self.config.patch_size, self.config.merge_size)

    def check_image(self, source) -> None:
        """Raise InputError if the image cannot be read or its size is unusable."""
        image = load_image(source)
        smart_resize(image.height, image.width, self.config.factor, *self.pixel_bounds())

    def check_video(self, source) -> None:
        """Raise InputError if the video (file, folder of frames or list of images) cannot be read."""
        probe_video(source)

    # ---- prompts

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, add_vision_id: bool = False) -> str:
        """The prompt text of ``messages``, rendered by the folder's template (the built-in one for images or
        videos that template cannot render).

        Raises InputError for malformed messages, or naming the template's file when rendering fails.
        """
        kinds = {kind for kind, _ in check_messages(messages)}
        if not kinds <= self._vision_kinds:
            self._note_fallback()
            template, source = self._builtin, None
        else:
            template, source = self._template, self.template_source
            if self._join_text:
                messages = [_joined_text(message) for message in messages]
        return render_template(template, source, messages, add_generation_prompt=add_generation_prompt,
                               add_vision_id=add_vision_id)

    def _note_fallback(self) -> None:
        """Say once per processor that the folder's template is skipped, and why."""
        if self._fallback_noted:
            return
        self._fallback_noted = True
        missing = " or ".join(f"{kind}s" for kind in VISION_PLACEHOLDERS if kind not in self._vision_kinds)
        where = f"{self.template_source}'s" if self.template_source else "the given"
        log.warning("note: %s chat template cannot render %s; using the built-in Qwen2.5-VL template",
                    where, missing)

    def __call__(self, messages_or_text, images=None, videos=None, *, min_pixels=None, max_pixels=None,
                 add_generation_prompt: bool = True, add_vision_id: bool = False, video_fps=None,
                 video_max_frames=None) -> dict:
        """The model's inputs for a prompt, as transformers' ``Qwen2_5_VLProcessor`` with qwen-vl-utils'
        ``process_vision_info`` give them (video frames resized with Pillow, not torchvision: see
        video_processing).

        ``messages_or_text``: a question (one user message: the images, the videos, then the text), or
        messages in the reference format, ``[{"role": ..., "content": str | [part, ...]}]`` with parts
        ``{"type": "image" | "image_url" | "video" | "text", ...}``. A part without a source takes the
        next item of ``images``/``videos``, in order. Items: image sources (path, URL, data URI,
        base64, bytes, PIL image, numpy array) or video sources (file, URL, folder of frames, list of
        images, (T, H, W, C) array), or dicts ``{"image": source, "min_pixels": ...}`` /
        ``{"video": source, "fps": ...}`` with per-item options.

        ``min_pixels``/``max_pixels``: the area bounds in pixels of each image (and each frame of a
        video given as a list of images) in this call, over preprocessor_config.json's, under an
        item's own; each is resized by ``smart_resize`` to sides that are multiples of 28 px
        (patch_size * merge_size) within them, or from an explicit ``resized_height``/``resized_width``.
        ``video_fps``: frames sampled per second of a video file or folder (qwen-vl-utils' default 2;
        for a list of images, its frame rate); ``video_max_frames``: the most frames sampled; a
        part's own ``fps``/``max_frames`` win, and its ``nframes`` replaces both.
        ``add_vision_id`` prefixes each item with "Picture n: " / "Video n: ".

        Returns a dict of numpy arrays (the vision entries None when the prompt has none):
        ``input_ids`` int32 (1, L), each placeholder expanded to t*h*w / merge_size**2 tokens;
        ``pixel_values`` float32 (N, 3 * temporal_patch_size * patch_size**2), i.e. (N, 1176): the
        normalized patch rows of every image in order; ``image_grid_thw`` int64 (images, 3): each
        image's (t, h, w) in patches, t = 1; ``pixel_values_videos`` and ``video_grid_thw`` likewise
        for videos; ``second_per_grid_ts``: a list of floats, each video's seconds per temporal grid
        step (temporal_patch_size / the fps its frames were sampled at).

        Raises InputError (one line naming the item): malformed messages; more or fewer
        images/videos than parts to place them in; an unreadable or unusable image or video (empty,
        too few frames, aspect ratio above 200); pixel bounds out of range; the chat template fails.
        """
        if isinstance(messages_or_text, str):
            messages = _text_messages(messages_or_text, images, videos)
            images = videos = None
        else:
            messages = messages_or_text
        image_specs, video_specs = _fill_sources(check_messages(messages), images, videos)
        text = self.apply_chat_template(messages, add_generation_prompt, add_vision_id)
        return self.encode(text, image_specs, video_specs, min_pixels=min_pixels, max_pixels=max_pixels,
                           video_fps=video_fps, video_max_frames=video_max_frames)

    def encode(self, text: str, images=None, videos=None, *, min_pixels=None, max_pixels=None, video_fps=None,
               video_max_frames=None) -> dict:
        """Inputs for an already rendered prompt whose placeholders take ``images``/``videos`` in order.

        Items are sources, or dicts ``{"image": source, "max_pixels": ...}`` / ``{"video": source, "fps": ...}``.
        """
        image_specs = [_as_spec("image", item) for item in images or []]
        video_specs = [_as_spec("video", item) for item in videos or []]
        _check_placeholders(text, IMAGE_TOKEN, len(image_specs), "image")
        _check_placeholders(text, VIDEO_TOKEN, len(video_specs), "video")
        bounds = self.pixel_bounds(min_pixels, max_pixels)
        out = self._images(image_specs, bounds)
        out.update(self._videos(video_specs, bounds, video_fps, video_max_frames))
        text = _expand(text, IMAGE_TOKEN, grid_token_counts(out["image_grid_thw"], self.config.merge_size))
        text = _expand(text, VIDEO_TOKEN, grid_token_counts(out["video_grid_thw"], self.config.merge_size))
        out["input_ids"] = np.asarray([self.tokenizer.encode(text)], dtype=np.int32)
        return out

    # ---- pixels

    def _images(self, specs: list[dict], bounds: tuple[int, int]) -> dict:
        if not specs:
            return {"pixel_values": None, "image_grid_thw": None}
        images, sizes = [], []
        for spec in specs:
            image = load_image(spec["image"])
            low, high = check_pixel_bounds(spec.get("min_pixels", bounds[0]), spec.get("max_pixels", bounds[1]))
            sizes.append(target_size(image, low, high, self.config.factor,
                                     spec.get("resized_height"), spec.get("resized_width")))
            images.append(image)
        pixel_values, grid = process_images(images, sizes=sizes, resample=self.config.resample,
                                            **self.config.pixel_options())
        return {"pixel_values": pixel_values, "image_grid_thw": grid}

    def _videos(self, specs: list[dict], bounds, video_fps, video_max_frames) -> dict:
        if not specs:
            return {"pixel_values_videos": None, "video_grid_thw": None, "second_per_grid_ts": None}
        videos, seconds = [], []
        for spec in specs:
            options = {key: spec[key] for key in VIDEO_OPTIONS if spec.get(key) is not None}
            if "nframes" not in options:
                options.setdefault("fps", video_fps)
                options.setdefault("max_frames", video_max_frames)
            frames, sample_fps = fetch_video(
                spec["video"], image_min_pixels=bounds[0], image_max_pixels=bounds[1], **options
            )
            videos.append(frames)
            seconds.append(float(self.config.temporal_patch_size / sample_fps))
        pixel_values, grid = process_videos(videos, **self.config.pixel_options())
        return {"pixel_values_videos": pixel_values, "video_grid_thw": grid, "second_per_grid_ts": seconds}


def _check_placeholders(text: str, token: str, count: int, kind: str) -> None:
    found = text.count(token)
    if found != count:
        raise InputError(f"prompt: {found} {kind} placeholder(s) {token} but {count} {kind}(s) given")


def _expand(text: str, token: str, counts: list[int]) -> str:
    """Replace the i-th ``token`` with counts[i] copies of it."""
    if not counts:
        return text
    pieces = text.split(token)
    out = [pieces[0]]
    for count, piece in zip(counts, pieces[1:]):
        out += [token * count, piece]
    return "".join(out)


def load_tokenizer(path: Path):
    """mlx-lm's TokenizerWrapper for a local model folder."""
    from mlx_lm.tokenizer_utils import load  # noqa: PLC0415

    if not (path / "tokenizer.json").is_file() and not (path / "vocab.json").is_file():
        raise ModelLoadError(f"{path}: no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    # transformers reads config.json on the way and warns that the hub's mrope ``rope_scaling``
    # is not its standard form; true for every official checkpoint and irrelevant to a tokenizer.
    transformers_log = logging.getLogger("transformers")
    level = transformers_log.level
    transformers_log.setLevel(logging.ERROR)
    try:
        return load(path)
    except Exception as exc:  # noqa: BLE001  (transformers raises many types)
        raise ModelLoadError(f"{path}: cannot load the tokenizer ({exc})") from exc
    finally:
        transformers_log.setLevel(level)


__all__ = [
    "DEFAULT_CHAT_TEMPLATE", "PreprocessorConfig", "Processor", "check_messages", "compile_template",
    "find_chat_template", "locate_chat_template", "probe_template", "render_template", "image_token_count",
    "load_image", "process_images", "smart_resize", "fetch_video", "process_videos",
]
