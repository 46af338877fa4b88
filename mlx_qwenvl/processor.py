"""Chat messages, images and videos to Qwen2.5-VL model inputs, as ``Qwen2_5_VLProcessor`` builds them.

The prompt is rendered with the model folder's chat template (jinja2, configured as transformers
configures it; a text-model template that cannot render images gets text as strings, and prompts with
images or videos use the built-in Qwen2.5-VL template instead); every ``<|image_pad|>`` /
``<|video_pad|>`` is expanded to t*h*w/4 copies; the text is tokenized with the tokenizer mlx-lm
loads. Pixels come from image_processing / video_processing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

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
IMAGE_OPTIONS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
# What a template must render for one image / video part, for the model to see it.
VISION_PLACEHOLDERS = {
    "image": "<|vision_start|><|image_pad|><|vision_end|>",
    "video": "<|vision_start|><|video_pad|><|vision_end|>",
}

log = logging.getLogger(__name__)

# The Qwen2.5-VL chat template (chat_template.json of the hub checkpoints), used when a model folder
# carries no template, and for images and videos when the folder's template cannot render them.
DEFAULT_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --------------------------------------------------------------------------------------------
# preprocessor_config.json


@dataclass
class PreprocessorConfig:
    """The image settings of a model folder (hub values by default)."""

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

    @classmethod
    def from_folder(cls, path) -> "PreprocessorConfig":
        file = Path(path) / "preprocessor_config.json"
        if not file.is_file():
            return cls()
        return cls.from_dict(_read_json(file))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{file}: cannot read JSON ({exc})") from exc


# --------------------------------------------------------------------------------------------
# Chat template


def find_chat_template(path, tokenizer=None) -> str:
    """The template of a model folder: chat_template.jinja, chat_template.json, tokenizer_config.json, else the built-in one."""
    return locate_chat_template(path, tokenizer)[0]


def locate_chat_template(path, tokenizer=None) -> tuple[str, str | None]:
    """``(template, source)``: the folder's template as ``find_chat_template`` picks it, and the file it
    came from (the folder for the tokenizer's own template, None for the built-in one).

    Raises ModelLoadError if a template file cannot be read.
    """
    path = Path(path)
    if (file := path / "chat_template.jinja").is_file():
        return _read_text(file), str(file)
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (file := path / name).is_file():
            template = _named_template(_read_json(file).get("chat_template"))
            if template:
                return template, str(file)
    template = _named_template(getattr(tokenizer, "chat_template", None))
    if template:
        return template, str(path)
    return DEFAULT_CHAT_TEMPLATE, None


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{file}: cannot read the chat template ({exc})") from exc


def _named_template(template):
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        return named.get("default")
    return template if isinstance(template, str) else None


def compile_template(template: str, source: str | None = None):
    """A jinja2 template set up as transformers does (sandboxed, trim/lstrip blocks, loopcontrols, tojson).

    Raises ModelLoadError, naming ``source`` (the template's file), if the template has a syntax error.
    """
    import jinja2  # noqa: PLC0415  (a dependency of mlx-lm)
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        problem = f"syntax error at line {exc.lineno}: {_one_line(exc.message or exc)}"
        raise ModelLoadError(_template_error(source, problem)) from exc


def render_template(template, source: str | None, messages, **context) -> str:
    """``template`` rendered for ``messages``.

    Raises InputError naming ``source`` for any failure of the template (a TypeError of a template that
    expects string content, an undefined attribute, its own raise_exception, ...).
    """
    import jinja2  # noqa: PLC0415

    try:
        return template.render(messages=messages, **context)
    except Exception as exc:  # noqa: BLE001  (a template can fail with any Python error)
        reason = _one_line(exc)
        if not isinstance(exc, jinja2.exceptions.TemplateError):
            reason = f"{type(exc).__name__}: {reason}"
        raise InputError(_template_error(source, f"error: {reason}")) from exc


def _template_error(source: str | None, problem: str) -> str:
    """'<file>: chat template <problem>', or 'chat template: <problem>' for a template given as a string."""
    return f"{source}: chat template {problem}" if source else f"chat template: {problem}"


def _one_line(message) -> str:
    # Errors are shown as one line (the CLI prints the first line only): fold jinja2's multi-line ones.
    return " ".join(str(message).split())


def probe_template(template) -> tuple[frozenset, bool]:
    """``(kinds, join_text)``: the vision kinds ('image', 'video') a template renders as their Qwen2.5-VL
    placeholders, and whether text-only content is better passed to it as one string.

    Strings are passed where they render the same as the list of text parts, and to a template that
    renders no vision at all (a text-model template expects strings). A template that fails even for a
    plain string is left as it is, so that its error shows on the real prompt, naming its file.
    """
    plain = _try_render(template, [{"role": "user", "content": "probe"}])
    if plain is None:
        return frozenset(VISION_PLACEHOLDERS), False
    kinds = frozenset(
        kind for kind, placeholder in VISION_PLACEHOLDERS.items()
        if (_try_render(template, _probe_messages(kind)) or "").count(placeholder) == 1
    )
    listed = _try_render(template, [{"role": "user", "content": [_text_part("pro"), _text_part("be")]}])
    return kinds, listed == plain or not kinds


def _probe_messages(kind: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": kind, kind: "probe"}, _text_part("probe")]}]


def _text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def _try_render(template, messages) -> str | None:
    try:
        return template.render(messages=messages, add_generation_prompt=True, add_vision_id=False)
    except Exception:  # noqa: BLE001  (a probe: any failure means "cannot render this")
        return None


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
                 sampling_defaults=None, template_source: str | None = None):
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
        self.sampling_defaults = sampling_defaults if sampling_defaults is not None else _default_sampling()
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)

    @classmethod
    def from_pretrained(cls, path) -> "Processor":
        path = Path(path)
        if not path.is_dir():
            raise ModelLoadError(f"{path}: model folder not found")
        tokenizer = load_tokenizer(path)
        template, source = locate_chat_template(path, tokenizer)
        return cls(tokenizer, template, PreprocessorConfig.from_folder(path), _default_sampling(path),
                   template_source=source)

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
        c = self.config
        pixel_values, grid = process_images(
            images, sizes=sizes, mean=c.image_mean, std=c.image_std, rescale_factor=c.rescale_factor,
            patch_size=c.patch_size,
            merge_size=c.merge_size, temporal_patch_size=c.temporal_patch_size, resample=c.resample,
        )
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
        c = self.config
        pixel_values, grid = process_videos(
            videos, mean=c.image_mean, std=c.image_std, rescale_factor=c.rescale_factor, patch_size=c.patch_size,
            merge_size=c.merge_size, temporal_patch_size=c.temporal_patch_size,
        )
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


def _default_sampling(path=None):
    try:
        from .generate import SamplingDefaults  # noqa: PLC0415
    except ImportError:
        return None
    return SamplingDefaults.from_folder(path) if path is not None else SamplingDefaults()


__all__ = [
    "DEFAULT_CHAT_TEMPLATE", "PreprocessorConfig", "Processor", "check_messages", "compile_template",
    "find_chat_template", "locate_chat_template", "probe_template", "render_template", "image_token_count",
    "load_image", "process_images", "smart_resize", "fetch_video", "process_videos",
]
