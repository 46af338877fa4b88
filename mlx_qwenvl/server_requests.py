"""OpenAI chat requests as the server accepts them, checked on the HTTP request threads (no
MLX here): every field validated, images read under the server's media policy. The prompts
they become are built in ``server_prompts``.

Every refusal is an ``APIError`` carrying the HTTP status, a one-line message and the field
(``param``) at fault, as OpenAI's error objects do.
"""

from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import InputError
from .image_processing import _IMAGE_MAGIC, load_image
from .video_processing import VIDEO_OPTIONS

LOW_DETAIL_PIXELS = 256 * 28 * 28  # detail "low": at most 256 tokens per image
REMOTE_TIMEOUT_S = 20
REMOTE_MAX_BYTES = 64 * 2**20
LOCAL_MAX_BYTES = 256 * 2**20
MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
INTEGER_FIELDS = ("top_k", "seed")  # the sampling fields that take whole numbers only
# Content types a remote image may come with; object stores often say octet-stream.
REMOTE_TYPES = ("image/", "application/octet-stream", "binary/octet-stream")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
TEXT_TYPES = ("text", "input_text")
IMAGE_TYPES = ("image_url", "input_image", "image")
VIDEO_TYPES = ("video", "video_url")


class APIError(Exception):
    """A request the server answers with an error object instead of a completion."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, kind: Optional[str] = None):
        super().__init__(" ".join(str(message).split()))  # always one line
        self.status, self.param, self.code = status, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param)


def busy(waiting: int) -> APIError:
    return APIError(503, f"the server is busy ({waiting} requests waiting); retry later",
                    code="server_busy")


def dead() -> APIError:
    return APIError(503, "the generation worker has stopped; restart the server", code="worker_dead")


# --------------------------------------------------------------------------------------------
# Fields


@dataclass
class ChatRequest:
    """A validated request. ``generation`` holds ``stream_tokens``' keyword arguments;
    ``messages`` are template messages whose image/video parts hold placeholders, the media
    themselves in ``images``/``videos`` in prompt order."""

    messages: list
    images: list = field(default_factory=list)   # MediaPart
    videos: list = field(default_factory=list)   # MediaPart
    generation: dict = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None


@dataclass
class MediaPart:
    """An image (``source`` a string) or video (a list of frame strings, or one string) and
    its options as the request gave them; ``where`` names it in errors."""

    source: object
    options: dict
    where: str


def _typed(body: dict, name: str, kinds, what: str):
    """The field's value if it is of one of ``kinds`` (never a bool for a number); an explicit
    null counts as absent, as clients send them often."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise bad(f"'{name}' must be {what}, got {type(value).__name__}", name)
    return value


def _integer(body, name, low=None, high=None):
    value = _typed(body, name, (int,), "an integer")
    if value is not None and ((low is not None and value < low) or (high is not None and value > high)):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise bad(f"'{name}' must be {bounds}, got {value}", name)
    return value


def _number(body, name):
    value = _typed(body, name, (int, float), "a number")
    return None if value is None else float(value)


def _flag(body, name) -> bool:
    return bool(_typed(body, name, (bool,), "true or false"))


def _stop(body) -> Optional[list]:
    stop = body.get("stop")
    if stop is None:
        return None
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("'stop' must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise bad(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop")
    return [s for s in stop if s] or None


def refuse_unsupported(body: dict) -> None:
    """Features a client relies on must never be ignored silently: each is refused by name."""
    if body.get("n") not in (None, 1):
        raise bad(f"n={body['n']!r} is not supported: this server returns one choice (n=1)", "n")
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad(f"'{name}' (function calling) is not supported by this server", name)
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise bad("'tool_choice' is not supported by this server (it has no tools)", "tool_choice")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        kind = response_format.get("type") if isinstance(response_format, dict) else response_format
        raise bad(f"response_format {kind!r} is not supported; only plain text is", "response_format")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise bad(f"'{name}' is not supported; use repetition_penalty", name)
    if body.get("logit_bias"):
        raise bad("'logit_bias' is not supported by this server", "logit_bias")


def parse_chat_request(body, default_max_tokens: int) -> ChatRequest:
    """Validate an OpenAI chat request body (already JSON-decoded).

    Raises:
        APIError: 400 naming the first field that is missing, of the wrong type, out of range
            or not supported.
    """
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    refuse_unsupported(body)
    _typed(body, "model", (str,), "a string")
    request = ChatRequest(messages=[])
    request.messages, request.images, request.videos = parse_messages(body.get("messages"))
    request.stream = _flag(body, "stream")
    options = _typed(body, "stream_options", (dict,), "an object") or {}
    request.include_usage = bool(_typed(options, "include_usage", (bool,), "true or false"))
    request.logprobs = _flag(body, "logprobs")
    request.top_logprobs = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    if request.top_logprobs and not request.logprobs:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    request.min_pixels = _integer(body, "min_pixels", 1)
    request.max_pixels = _integer(body, "max_pixels", 1)
    request.generation = generation_options(body, default_max_tokens)
    return request


def generation_options(body: dict, default_max_tokens: int) -> dict:
    """``stream_tokens`` keyword arguments from the request's sampling fields."""
    from .generate import SAMPLING_RULES  # noqa: PLC0415 (mlx-lm: seconds to import, not for --help)

    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    options = {name: (_integer if name in INTEGER_FIELDS else _number)(body, name) for name in SAMPLING_RULES}
    for name, (_, ok, rule) in SAMPLING_RULES.items():
        if options[name] is not None and not ok(options[name]):
            raise bad(f"'{name}' {rule}, got {options[name]}", name)
    if options.get("min_p") is None:
        options["min_p"] = 0.0
    options.update(max_tokens=max_tokens or default_max_tokens, stop=_stop(body))
    return options


# --------------------------------------------------------------------------------------------
# Messages


def parse_messages(messages) -> tuple[list, list, list]:
    """Template messages with placeholder parts, and the images and videos in prompt order.

    Raises:
        APIError: 400 for a missing or empty list, a message that is not an object, an unknown
            role, content of the wrong type, or an unknown part type.
    """
    if messages is None:
        raise bad("'messages' is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of message objects", "messages")
    rendered, images, videos = [], [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"{where} must be an object, got {type(message).__name__}", "messages")
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", "messages")
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""  # an assistant turn that only called tools
        if isinstance(content, str):
            rendered.append({"role": ROLES[role], "content": content})
            continue
        if not isinstance(content, list):
            raise bad(f"{where}.content must be a string or a list of parts", "messages")
        parts = [_part(part, f"{where}.content[{j}]", images, videos) for j, part in enumerate(content)]
        rendered.append({"role": ROLES[role], "content": parts})
    return rendered, images, videos


def _part(part, where: str, images: list, videos: list) -> dict:
    """One content part as the chat template sees it; media go to ``images``/``videos``."""
    if not isinstance(part, dict):
        raise bad(f"{where} must be an object, got {type(part).__name__}", "messages")
    kind = part.get("type")
    if kind in TEXT_TYPES or (kind is None and "text" in part):
        if not isinstance(part.get("text"), str):
            raise bad(f"{where}: a text part needs a 'text' string", "messages")
        return {"type": "text", "text": part["text"]}
    if kind in IMAGE_TYPES:
        images.append(_image_part(part, kind, where))
        return {"type": "image", "image": "<image>"}
    if kind in VIDEO_TYPES:
        videos.append(_video_part(part, kind, where))
        return {"type": "video", "video": "<video>"}
    raise bad(f"{where}: unknown content part type {kind!r} (expected text, image_url, "
              "input_image or video)", "messages")


def _image_part(part: dict, kind: str, where: str) -> MediaPart:
    """``image_url`` as an object or a bare string, ``input_image``, Qwen's ``image``;
    ``detail`` and ``min_pixels``/``max_pixels`` on the part or inside its ``image_url``."""
    value = part.get("image_url", part.get("image")) if kind != "image" else part.get("image")
    inner = value if isinstance(value, dict) else {}
    url = inner.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise bad(f"{where}: an image part needs a URL string (image_url.url)", "messages")
    options = {}
    for name in ("min_pixels", "max_pixels"):
        value = part.get(name, inner.get(name))
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise bad(f"{where}: {name} must be a positive integer, got {value!r}", "messages")
            options[name] = value
    detail = part.get("detail", inner.get("detail"))
    if detail not in (None, "auto", "low", "high"):
        raise bad(f"{where}: detail must be auto, low or high, got {detail!r}", "messages")
    options["detail"] = detail
    return MediaPart(url, options, where)


def _video_part(part: dict, kind: str, where: str) -> MediaPart:
    """A video as a list of frame URLs (``video`` or ``video_url.url``), or a local file or
    folder under --media-path; numeric options (fps, max_frames, ...) on the part."""
    value = part.get(kind)
    if isinstance(value, dict):
        value = value.get("url")
    frames_ok = isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)
    if not (frames_ok or (isinstance(value, str) and value)):
        raise bad(f"{where}: a video part needs a list of frame URLs", "messages")
    options = {}
    for name in VIDEO_OPTIONS:
        if name in part and part[name] is not None:
            if isinstance(part[name], bool) or not isinstance(part[name], (int, float)) or part[name] <= 0:
                raise bad(f"{where}: {name} must be a positive number", "messages")
            options[name] = part[name]
    return MediaPart(value, options, where)


# --------------------------------------------------------------------------------------------
# Media policy


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (never to ftp: or file:)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlparse(newurl).scheme not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, "redirect to a non-http URL refused", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


@dataclass
class MediaPolicy:
    """Where images may come from: data URIs and base64 always; http(s) URLs unless
    ``allow_remote`` is off (with a timeout, a size cap and a content-type check); local files
    only under ``media_path`` (None: never), after resolving symlinks and with no ``..``."""

    media_path: Optional[Path] = None
    allow_remote: bool = True
    timeout: float = REMOTE_TIMEOUT_S
    max_remote_bytes: int = REMOTE_MAX_BYTES

    def __post_init__(self):
        self.root = Path(self.media_path).resolve() if self.media_path is not None else None

    def image(self, source: str, where: str):
        """The RGB PIL image a source names. Raises APIError 400 for a refused or unreadable one."""
        try:
            if source.startswith("data:"):
                _check_data_uri(source, where)
                return load_image(source)
            if source.startswith(("http://", "https://")):
                return load_image(self.fetch(source, where))
            data = _base64_image(source)
            return load_image(data if data is not None else self.local_file(source, where))
        except InputError as error:
            raise bad(f"{where}: {error}", "messages") from None

    def fetch(self, url: str, where: str) -> bytes:
        """Download an image URL: refused with --no-remote-images; timeout, size cap and a
        content type that can be an image."""
        if not self.allow_remote:
            raise bad(f"{where}: image URLs are disabled on this server (--no-remote-images); "
                      "send the image as a data URI", "messages")
        opener = urllib.request.build_opener(_HTTPOnlyRedirects)
        request = urllib.request.Request(url, headers={"User-Agent": "mlx-qwenvl-server"})
        try:
            with opener.open(request, timeout=self.timeout) as response:
                kind = response.headers.get_content_type() or ""
                if not kind.startswith(REMOTE_TYPES):
                    raise bad(f"{where}: {_short(url)} is {kind}, not an image", "messages")
                data = response.read(self.max_remote_bytes + 1)
        except urllib.error.HTTPError as error:
            raise bad(f"{where}: {_short(url)} answered HTTP {error.code} ({error.reason})", "messages") from None
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            raise bad(f"{where}: cannot fetch {_short(url)} ({reason})", "messages") from None
        if len(data) > self.max_remote_bytes:
            raise bad(f"{where}: {_short(url)} is larger than {self.max_remote_bytes // 2**20} MiB", "messages")
        return data

    def local_path(self, text: str, where: str) -> Path:
        """A path inside --media-path (relative paths are taken from it).

        Raises:
            APIError: 400 when local files are off, the path has ``..``, or it resolves
                (through symlinks) outside the folder.
        """
        if self.root is None:
            raise bad(f"{where}: local file paths are not allowed on this server (start it with "
                      "--media-path DIR to allow files under DIR)", "messages")
        if text.startswith("file://"):
            text = urllib.request.url2pathname(urllib.parse.urlparse(text).path)
        path = Path(text)
        if ".." in path.parts:
            raise bad(f"{where}: '..' is not allowed in a file path", "messages")
        resolved = (path if path.is_absolute() else self.root / path).resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise bad(f"{where}: {text!r} is outside the server's --media-path", "messages")
        return resolved

    def local_file(self, text: str, where: str) -> bytes:
        path = self.local_path(text, where)
        if not path.is_file():
            raise bad(f"{where}: no file {text!r} under --media-path", "messages")
        if path.stat().st_size > LOCAL_MAX_BYTES:
            raise bad(f"{where}: {text!r} is larger than {LOCAL_MAX_BYTES // 2**20} MiB", "messages")
        return path.read_bytes()

    def video(self, part: MediaPart):
        """Frames (a list of PIL images), or the resolved path of a local video or folder."""
        if isinstance(part.source, list):
            return [self.image(frame, f"{part.where} frame {i}") for i, frame in enumerate(part.source)]
        if part.source.startswith(("http://", "https://", "data:")):
            raise bad(f"{part.where}: a video is sent as a list of frame images; video files are "
                      "read only from --media-path", "messages")
        return self.local_path(part.source, part.where)


def _check_data_uri(uri: str, where: str) -> None:
    """Any image/* subtype, ``data:image;base64`` and untyped data; refuse other types."""
    kind = uri[5:].partition(",")[0].split(";")[0].strip().lower()
    if kind and not kind.startswith("image") and kind != "application/octet-stream":
        raise bad(f"{where}: a data URI of type {kind} is not an image", "messages")


def _base64_image(text: str) -> Optional[bytes]:
    """The bytes of a bare base64 image, or None when ``text`` is not one (then it is a path)."""
    compact = "".join(text.split())
    if len(compact) < 32 or not all(c.isalnum() or c in "+/=-_" for c in compact):
        return None
    try:
        if "-" in compact or "_" in compact:
            data = base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4))
        else:
            data = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    # A long path of letters and slashes is valid base64 too: only image bytes count.
    return data if data.startswith(_IMAGE_MAGIC) or data[4:8] == b"ftyp" else None


def _short(url: str) -> str:
    return url if len(url) <= 120 else url[:117] + "..."
