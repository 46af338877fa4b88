"""Chat templates: finding a model folder's, compiling it as transformers does, rendering it,
and probing which vision parts it can render (the built-in Qwen2.5-VL template takes the rest).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from .config import read_json
from .errors import InputError, ModelLoadError

# What a template must render for one image / video part, for the model to see it.
VISION_PLACEHOLDERS = {
    "image": "<|vision_start|><|image_pad|><|vision_end|>",
    "video": "<|vision_start|><|video_pad|><|vision_end|>",
}

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
            template = _named_template(read_json(file).get("chat_template"))
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
