"""Images to Qwen2.5-VL vision inputs: loading, the mode policy, smart_resize and patch rows.

Matches transformers' Qwen2-VL image processor on its Pillow path (``Qwen2VLImageProcessorPil``):
Pillow bicubic resize on uint8, rescale by 1/255 (float64, then float32), normalize with the CLIP
mean/std in float32, and rows in 2x2 merge-block order, each row laid out (C, T, 14, 14) with the
frame duplicated into both temporal slots. Runtime code uses numpy and Pillow only.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError, first_line

# preprocessor_config.json values of every Qwen2.5-VL checkpoint on the hub
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
IMAGE_FACTOR = PATCH_SIZE * MERGE_SIZE  # 28
MIN_PIXELS = 4 * 28 * 28  # 3136: 4 tokens
MAX_PIXELS = 16384 * 28 * 28  # 12845056: 16384 tokens
MAX_RATIO = 200
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE_FACTOR = 1 / 255

URL_TIMEOUT_S = 30
MAX_DOWNLOAD_BYTES = 512 * 1024 * 1024
_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Leading bytes of the formats a bare base64 string is accepted in (PNG, JPEG, GIF, WebP, BMP, TIFF, ICO,
# JPEG 2000; AVIF/HEIF are recognized by 'ftyp' at offset 4)
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*", b"\x00\x00\x01\x00",
                b"\x00\x00\x00\x0cjP", b"\xff\x4f\xff\x51")
_BASE64_RE = re.compile(r"^[A-Za-z0-9+/_\-\s]+={0,2}\s*$")


# --------------------------------------------------------------------------------------------
# Sizes


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """The target (height, width): multiples of ``factor``, area within [min_pixels, max_pixels].

    Same arithmetic as transformers' ``smart_resize`` (Python's round-half-even for the first guess,
    ``max(factor, ...)`` only in the shrinking branch), so sides under 14 px match transformers.
    Raises InputError when the aspect ratio is above 200 (exactly 200 is allowed).
    """
    if height <= 0 or width <= 0:
        raise InputError(f"image size {height}x{width} (height x width): both sides must be at least 1 px")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        raise InputError(
            f"image size {height}x{width} (height x width): aspect ratio {ratio:.1f} is above the limit of {MAX_RATIO}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_token_count(
    height: int,
    width: int,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    patch_size: int = PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
) -> int:
    """How many ``<|image_pad|>`` tokens an image of this size costs in the prompt."""
    factor = patch_size * merge_size
    h, w = smart_resize(height, width, factor, min_pixels, max_pixels)
    return (h // factor) * (w // factor)


def grid_token_counts(grid_thw, merge_size: int = MERGE_SIZE) -> list[int]:
    """Placeholder tokens per image or video: t*h*w / merge_size**2 for each grid row."""
    if grid_thw is None:
        return []
    return [int(t * h * w) // (merge_size**2) for t, h, w in np.asarray(grid_thw).tolist()]


def check_pixel_bounds(min_pixels, max_pixels, what: str = "image") -> tuple[int, int]:
    """Validate a (min_pixels, max_pixels) pair; returns them as ints."""
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer)) or value <= 0:
            raise InputError(f"{what} {name}={value!r}: must be a positive number of pixels")
    if min_pixels > max_pixels:
        raise InputError(f"{what} min_pixels={min_pixels} is larger than max_pixels={max_pixels}")
    return int(min_pixels), int(max_pixels)


# --------------------------------------------------------------------------------------------
# Loading


def describe_source(source) -> str:
    """A short, printable name for an image or video source, for error messages."""
    if isinstance(source, Path):
        return repr(str(source))
    if isinstance(source, str):
        if source.startswith("data:"):
            return f"data URI ({len(source)} chars)"
        if len(source) > 200:
            return f"string of {len(source)} chars starting {source[:40]!r}"
        return repr(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"bytes ({len(source)} bytes)"
    if isinstance(source, Image.Image):
        return f"PIL image ({source.mode}, {source.width}x{source.height})"
    if isinstance(source, np.ndarray):
        return f"array (shape {source.shape}, {source.dtype})"
    return f"{type(source).__name__} object"


def load_image(source, *, apply_exif: bool = True) -> Image.Image:
    """Open any supported image source and return an RGB ``PIL.Image`` under the mode policy.

    Sources: a file path (str or Path), a ``file://`` or http(s) URL, a ``data:`` URI, a base64
    string, bytes, a binary file object, a ``PIL.Image`` or a numpy array (H,W), (H,W,C) or (C,H,W).
    Raises InputError naming the source on anything unreadable.
    """
    name = describe_source(source)
    if isinstance(source, np.ndarray):
        return array_to_rgb(source, name)
    if isinstance(source, Image.Image):
        image = source
    else:
        image = _open(source, name)
    try:
        if apply_exif and image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)
        return to_rgb(image, name)
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"image {name}: cannot decode ({first_line(exc)})") from exc


def _open(source, name: str) -> Image.Image:
    """Open a non-PIL, non-array source with Pillow and decode it fully."""
    data = _read_source(source, name)
    if isinstance(data, (bytes, bytearray, memoryview)) and len(data) == 0:
        raise InputError(f"image {name}: is empty (0 bytes)")
    fp = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fp)
            image.load()
    except Image.DecompressionBombError as exc:
        raise InputError(f"image {name}: too many pixels, refused as a possible decompression bomb ({first_line(exc)})") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"image {name}: not a recognized image file") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InputError(f"image {name}: corrupt or truncated image ({first_line(exc)})") from exc
    return image


def _read_source(source, name: str):
    """Bytes (or a readable file object) for a path, URL, data URI, base64 string or bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if hasattr(source, "read"):
        return source.read()
    if isinstance(source, dict):  # OpenAI-style {"url": ...}
        if "url" not in source:
            raise InputError(f"image {name}: a dict source needs a 'url' key")
        return _read_source(source["url"], describe_source(source["url"]))
    if isinstance(source, Path):
        return _read_file(source, name)
    if not isinstance(source, str):
        raise InputError(f"image {name}: unsupported image source type {type(source).__name__}")
    if source.startswith(("http://", "https://")):
        return fetch_url(source, name, "image")
    if source.startswith("data:"):
        return _decode_data_uri(source, name)
    if source.startswith("file://"):
        return _read_file(file_url_to_path(source), name)
    if os.path.exists(source) or not _looks_like_base64(source):
        return _read_file(Path(source), name)
    try:
        data = _b64decode(source)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"image {name}: neither an existing file nor valid base64 data") from exc
    if not (data.startswith(_IMAGE_MAGIC) or data[4:8] == b"ftyp"):
        raise InputError(f"image {name}: neither an existing file nor base64 image data")
    return data


def file_url_to_path(url: str) -> Path:
    """``file:///a/b%20c.png`` to a Path; tries the raw text first (as qwen-vl-utils does)."""
    raw = Path(url[len("file://"):])
    if raw.exists():
        return raw
    return Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))


def _read_file(path: Path, name: str) -> bytes:
    if not path.exists():
        raise InputError(f"image {name}: file not found")
    if path.is_dir():
        raise InputError(f"image {name}: is a directory, not an image file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"image {name}: cannot read file ({first_line(exc)})") from exc


def fetch_url(url: str, name: str, what: str = "image") -> bytes:
    """Download a URL (timeout, size cap); InputError on any network or HTTP failure."""
    request = urllib.request.Request(url, headers={"User-Agent": "mlx-qwenvl"})
    try:
        # a fresh opener reads the proxy settings of the environment at each call
        with urllib.request.build_opener().open(request, timeout=URL_TIMEOUT_S) as response:
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise InputError(f"{what} {name}: HTTP error {exc.code} ({exc.reason})") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InputError(f"{what} {name}: URL unreachable ({reason})") from exc
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise InputError(f"{what} {name}: download larger than {MAX_DOWNLOAD_BYTES // 2**20} MiB")
    return data


def _decode_data_uri(uri: str, name: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise InputError(f"image {name}: malformed data URI (no comma)")
    try:
        if header.endswith(";base64"):
            return _b64decode(payload)
        return urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"image {name}: data URI has invalid base64 ({first_line(exc)})") from exc


def _looks_like_base64(text: str) -> bool:
    return len(text) >= 32 and bool(_BASE64_RE.match(text))


def _b64decode(text: str) -> bytes:
    text = "".join(text.split())
    if "-" in text or "_" in text:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


# --------------------------------------------------------------------------------------------
# Mode policy


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB under the project's mode policy.

    Transparency (alpha bands, palette or tRNS transparency) is composited onto white; 16-bit and
    32-bit integer and float images are scaled to 0..255 (not saturated); palette, grayscale, CMYK,
    YCbCr, LAB and HSV go through Pillow's own conversion.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return array_to_rgb(np.asarray(image), name)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise InputError(f"image {name}: cannot convert mode {mode!r} to RGB ({first_line(exc)})") from exc


def array_to_rgb(array: np.ndarray, name: str = "array") -> Image.Image:
    """A numpy image (H,W), (H,W,C) or (C,H,W) with C in 1..4 to an RGB PIL image (mode policy)."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] not in (1, 2, 3, 4) and a.shape[0] in (1, 2, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[-1] not in (1, 2, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise InputError(f"image {name}: expected an array of shape (H,W), (H,W,C) or (C,H,W) with 1-4 channels")
    a = _to_uint8(a, name)
    channels = a.shape[-1]
    if channels in (2, 4):
        color, alpha = a[..., :-1].astype(np.float64), a[..., -1:].astype(np.float64) / 255.0
        a = np.round(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(a))


def _to_uint8(a: np.ndarray, name: str) -> np.ndarray:
    """Scale any numeric dtype to uint8: 16-bit by /257, floats in [0,1] by x255, others clipped."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16 or a.dtype.str.endswith("u2") or a.dtype.str.endswith("i2"):
        return np.round(np.clip(a.astype(np.float64), 0, 65535) / 257.0).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        top = a.max()
        scale = 1.0 if top <= 255 else 257.0
        return np.round(np.clip(a.astype(np.float64) / scale, 0, 255)).astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        f = a.astype(np.float64)
        if not np.all(np.isfinite(f)):
            raise InputError(f"image {name}: float image contains NaN or infinity")
        scale = 255.0 if f.max() <= 1.0 else 1.0
        return np.round(np.clip(f * scale, 0, 255)).astype(np.uint8)
    raise InputError(f"image {name}: unsupported pixel type {a.dtype}")


# --------------------------------------------------------------------------------------------
# Pixels to patch rows


def resize_image(image: Image.Image, height: int, width: int, resample: int = Image.BICUBIC) -> Image.Image:
    """Pillow resize to (height, width); a no-op copy at the same size, as in Pillow."""
    return image.resize((width, height), resample=resample)


def normalize(
    pixels: np.ndarray,
    mean=CLIP_MEAN,
    std=CLIP_STD,
    rescale_factor: float = RESCALE_FACTOR,
) -> np.ndarray:
    """uint8 (..., H, W, 3) to float32 (..., 3, H, W): x/255 (float64 then float32), then (x-mean)/std in float32."""
    x = (pixels.astype(np.float64) * rescale_factor).astype(np.float32)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.moveaxis(x, -1, -3)


def normalize_table(mean=CLIP_MEAN, std=CLIP_STD, rescale_factor: float = RESCALE_FACTOR) -> np.ndarray:
    """(3, 256) float32: ``normalize`` of every uint8 value per channel, bit for bit the same arithmetic."""
    x = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)
    return (x[None, :] - np.asarray(mean, dtype=np.float32)[:, None]) / np.asarray(std, dtype=np.float32)[:, None]


def patchify(
    frames: np.ndarray,
    patch_size: int = PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(T, C, H, W) to rows (gt*gh*gw, C*tp*p*p) in merge-block order (same dtype), and (gt, gh, gw).

    T is padded to a multiple of ``temporal_patch_size`` by repeating the last frame (an image,
    T=1, is duplicated). Rows run t, block row, block col, row in block, col in block; each row is
    laid out (C, tp, p, p).
    """
    if pad := -frames.shape[0] % temporal_patch_size:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
    t, c, h, w = frames.shape
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(
        gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size
    )
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    rows = x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size)
    return np.ascontiguousarray(rows), (gt, gh, gw)


def pixels_to_rows(
    frames: np.ndarray,
    table: np.ndarray | None = None,
    patch_size: int = PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 frames (T, H, W, 3) to normalized float32 patch rows and (gt, gh, gw).

    Patchifies the bytes first, then maps them through ``normalize_table`` (exactly ``normalize``,
    a quarter of the memory traffic).
    """
    table = normalize_table() if table is None else table
    rows, grid = patchify(np.asarray(frames, dtype=np.uint8).transpose(0, 3, 1, 2), patch_size, merge_size,
                          temporal_patch_size)
    out = np.empty(rows.shape, dtype=np.float32)
    per_channel = rows.shape[1] // table.shape[0]
    for channel in range(table.shape[0]):
        columns = slice(channel * per_channel, (channel + 1) * per_channel)
        out[:, columns] = np.take(table[channel], rows[:, columns])
    return out, grid


def explicit_size(resized_height, resized_width, factor: int = IMAGE_FACTOR) -> tuple[int, int] | None:
    """An explicit resized_height/resized_width rounded as qwen-vl-utils rounds it (``smart_resize``
    with its default bounds, whatever min/max_pixels say), for images and video frames alike; None
    when neither is given. Raises InputError when only one is."""
    if (resized_height is None) != (resized_width is None):
        raise InputError("resized_height and resized_width must be given together")
    if resized_height is None:
        return None
    return smart_resize(int(resized_height), int(resized_width), factor, MIN_PIXELS, MAX_PIXELS)


def target_size(
    image: Image.Image,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    factor: int = IMAGE_FACTOR,
    resized_height: int | None = None,
    resized_width: int | None = None,
) -> tuple[int, int]:
    """The (height, width) an image is resized to: ``explicit_size``, else ``smart_resize`` within the bounds."""
    size = explicit_size(resized_height, resized_width, factor)
    return size if size is not None else smart_resize(image.height, image.width, factor, min_pixels, max_pixels)


@dataclass
class PatchLayout:
    """How resized uint8 frames become patch rows (hub values): process_images/process_videos' options."""

    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    rescale_factor: float = RESCALE_FACTOR
    patch_size: int = PATCH_SIZE
    merge_size: int = MERGE_SIZE
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE

    def rows(self, clips) -> tuple[np.ndarray, np.ndarray]:
        """uint8 clips (T, H, W, 3), each at its final size (multiples of patch_size * merge_size), to
        ``(pixel_values float32 (N, 3 * temporal_patch_size * patch_size**2), grid_thw int64 (n, 3))``:
        every clip's rows in order (see ``pixels_to_rows``) and its (t, h, w) grid in patches."""
        table = normalize_table(self.mean, self.std, self.rescale_factor)
        all_rows, grids = [], []
        for frames in clips:
            rows, grid = pixels_to_rows(frames, table, self.patch_size, self.merge_size, self.temporal_patch_size)
            all_rows.append(rows)
            grids.append(list(grid))
        if not all_rows:
            return np.zeros((0, 3 * self.temporal_patch_size * self.patch_size**2), np.float32), np.zeros((0, 3), np.int64)
        pixel_values = all_rows[0] if len(all_rows) == 1 else np.concatenate(all_rows, axis=0)
        return pixel_values, np.asarray(grids, dtype=np.int64)


def process_images(
    images,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    *,
    sizes=None,
    resample: int = Image.BICUBIC,
    **layout,
) -> tuple[np.ndarray, np.ndarray]:
    """RGB PIL images (or ``load_image`` sources) to ``(pixel_values float32 (N, 1176), image_grid_thw
    int64 (n, 3))``, each image one temporal slice (t = 1, the frame in both temporal slots).

    ``sizes`` optionally gives each image's target (height, width) (multiples of 28); otherwise
    ``smart_resize`` with ``min_pixels``/``max_pixels`` picks it. ``layout``: ``PatchLayout``'s
    fields (mean, std, rescale_factor, patch_size, merge_size, temporal_patch_size).
    """
    layout = PatchLayout(**layout)
    factor = layout.patch_size * layout.merge_size

    def resized(i: int, image) -> np.ndarray:
        image = to_rgb(image, f"#{i}") if isinstance(image, Image.Image) else load_image(image)
        h, w = sizes[i] if sizes is not None else smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
        return np.asarray(resize_image(image, h, w, resample), dtype=np.uint8)[None]

    return layout.rows(resized(i, image) for i, image in enumerate(images))
