"""Videos to Qwen2.5-VL vision inputs, with the frame-sampling rule of qwen-vl-utils 0.0.10.

Sources: a video file (decoded with PyAV, the optional ``video`` extra), a folder of frame images,
or a list of images (or a (T,H,W,C) array). A file or folder is sampled at ``fps`` (2 by default):
``n = total / native_fps * fps`` clamped to [4, min(768, total)] and floored to an even count,
indices ``linspace(0, total-1, n).round()``, ``sample_fps = n / total * native_fps``. Each frame
then gets an even share of the total pixel budget (at most 768 tokens, at least 1.05 x 128 tokens)
and is resized with Pillow bicubic. A list of images follows qwen-vl-utils' list rule instead:
every image is used (image budgets per frame), padded to an even count with the last frame, and
its fps is the given ``fps`` (default 2).

One deliberate difference from qwen-vl-utils: frames are resized with Pillow's bicubic filter
instead of torchvision's antialiased bicubic (the two differ by rounding, about one grey level),
so runtime needs no torch.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError
from .image_processing import (
    IMAGE_FACTOR,
    MAX_PIXELS,
    MIN_PIXELS,
    PatchLayout,
    describe_source,
    explicit_size,
    fetch_url,
    file_url_to_path,
    load_image,
    resize_image,
    smart_resize,
    target_size,
)

FRAME_FACTOR = 2
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * 28 * 28  # 100352
VIDEO_MAX_PIXELS = 768 * 28 * 28  # 602112
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)  # 90316800
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")

# Per-video keys accepted in a content part or as fetch_video keywords (qwen-vl-utils names,
# plus ``frame_rate``: the native frame rate of a folder of frames or of a list to be sampled).
VIDEO_OPTIONS = (
    "fps", "nframes", "min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels",
    "resized_height", "resized_width", "frame_rate",
)


# --------------------------------------------------------------------------------------------
# The sampling rule


def _ceil_even(x: float) -> int:
    return math.ceil(x / FRAME_FACTOR) * FRAME_FACTOR


def _floor_even(x: float) -> int:
    return math.floor(x / FRAME_FACTOR) * FRAME_FACTOR


def smart_nframes(
    total_frames: int,
    video_fps: float,
    *,
    fps: float | None = None,
    nframes: int | None = None,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int | None = None,
    name: str = "video",
) -> int:
    """How many frames to sample (qwen-vl-utils ``smart_nframes``); InputError when impossible."""
    if fps is not None and nframes is not None:
        raise InputError(f"video {name}: give either fps or nframes, not both")
    if total_frames < FRAME_FACTOR:
        raise InputError(f"video {name}: has {total_frames} frame(s), a video needs at least "
                         f"{FRAME_FACTOR} (a single picture is an image)")
    if nframes is not None:
        n = round(nframes / FRAME_FACTOR) * FRAME_FACTOR
    else:
        fps = FPS if fps is None else fps
        if not video_fps or video_fps <= 0 or not fps or fps <= 0:
            raise InputError(f"video {name}: frame rate must be positive (native {video_fps}, sampling {fps})")
        lo = _ceil_even(min_frames)
        hi = _floor_even(min(FPS_MAX_FRAMES, total_frames) if max_frames is None else max_frames)
        n = total_frames / video_fps * fps
        n = _floor_even(min(min(max(n, lo), hi), total_frames))
    if not FRAME_FACTOR <= n <= total_frames:
        raise InputError(
            f"video {name}: cannot sample {n} frames from {total_frames} (need between {FRAME_FACTOR} and the frame count)"
        )
    return int(n)


def frame_indices(total_frames: int, nframes: int) -> np.ndarray:
    """``linspace(0, total-1, n).round()`` (round half to even, as torch does)."""
    return np.round(np.linspace(0, total_frames - 1, nframes)).astype(np.int64)


def frame_max_pixels(
    nframes: int,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int | None = None,
    total_pixels: int = VIDEO_TOTAL_PIXELS,
) -> float:
    """The per-frame pixel cap: an even share of ``total_pixels``, within [1.05*min, 768 tokens]; a user cap may lower it."""
    cap = max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    return cap if max_pixels is None else min(max_pixels, cap)


def video_frame_size(
    height: int,
    width: int,
    nframes: int,
    *,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int | None = None,
    total_pixels: int = VIDEO_TOTAL_PIXELS,
    resized_height: int | None = None,
    resized_width: int | None = None,
    factor: int = IMAGE_FACTOR,
) -> tuple[int, int]:
    """(height, width) each sampled frame of a video file or folder is resized to: ``explicit_size``,
    else ``smart_resize`` within the frame's share of the pixel budget (``frame_max_pixels``)."""
    size = explicit_size(resized_height, resized_width, factor)
    if size is not None:
        return size
    return smart_resize(height, width, factor, min_pixels, frame_max_pixels(nframes, min_pixels, max_pixels, total_pixels))


# --------------------------------------------------------------------------------------------
# Frame sources


def _natural_key(path: Path):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def list_frame_files(folder: Path) -> list[Path]:
    """Image files in a folder (hidden files skipped), in natural order (frame_2 before frame_10)."""
    files = [
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in FRAME_EXTENSIONS
    ]
    return sorted(files, key=_natural_key)


def _import_av(name: str):
    try:
        import av  # noqa: PLC0415 (optional dependency)
    except ImportError as exc:
        raise InputError(
            f"video {name}: reading video files needs PyAV; install it with pip install 'mlx-qwenvl[video]' "
            "(or pass a folder of frames or a list of images)"
        ) from exc
    return av


class _VideoFile:
    """A video file read with PyAV: frame count, average frame rate, and decoding of chosen frames."""

    def __init__(self, path: Path, name: str, temporary: bool = False):
        self.path, self.name, self.temporary = path, name, temporary
        self.av = _import_av(name)
        with self._open() as container:
            stream = self._stream(container)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            try:
                self.total = sum(1 for packet in container.demux(stream) if packet.size > 0)
            except (self.av.error.FFmpegError, OSError) as exc:
                raise InputError(f"video {name}: cannot read the file ({exc})") from exc
            if not rate and stream.duration and stream.time_base:
                rate = self.total / float(stream.duration * stream.time_base)
        self.fps = float(rate) if rate else 0.0
        if self.total == 0:
            raise InputError(f"video {name}: contains no frames")

    def _open(self):
        try:
            return self.av.open(str(self.path))
        except (self.av.error.FFmpegError, OSError, ValueError) as exc:
            raise InputError(f"video {self.name}: not a readable video file ({exc})") from exc

    def _stream(self, container):
        if not container.streams.video:
            raise InputError(f"video {self.name}: has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return stream

    def _decode(self, container):
        try:
            yield from container.decode(self._stream(container))
        except (self.av.error.FFmpegError, OSError) as exc:
            raise InputError(f"video {self.name}: decoding failed ({exc})") from exc

    def read(self, indices: np.ndarray, transform=None, to_end: bool = True):
        """RGB uint8 frames at the given indices (through ``transform``), and how many frames were decoded in all.

        With ``to_end`` False, decoding stops after the last wanted frame.
        """
        wanted = {}
        for pos, index in enumerate(indices.tolist()):
            wanted.setdefault(index, []).append(pos)
        frames: list = [None] * len(indices)
        count, last = 0, max(wanted)
        with self._open() as container:
            for count, frame in enumerate(self._decode(container), start=1):
                if count - 1 in wanted:
                    array = frame.to_ndarray(format="rgb24")
                    array = transform(array) if transform else array
                    for pos in wanted[count - 1]:
                        frames[pos] = array
                if not to_end and count > last:
                    break
        return frames, count

    def close(self) -> None:
        if self.temporary:
            self.path.unlink(missing_ok=True)


class _FrameFolder:
    """A folder of frame images, read as a video with a given native frame rate."""

    def __init__(self, folder: Path, name: str, frame_rate: float):
        self.files, self.name, self.fps = list_frame_files(folder), name, float(frame_rate)
        self.total = len(self.files)
        if self.total == 0:
            raise InputError(f"video {name}: folder has no frame images ({', '.join(FRAME_EXTENSIONS)})")

    def read(self, indices: np.ndarray, transform=None, to_end: bool = True):
        return [_apply(transform, np.asarray(load_image(self.files[i]))) for i in indices.tolist()], self.total

    def close(self) -> None:
        pass


class _FrameList(_FrameFolder):
    """Already-decoded frames (images or a (T,H,W,C) array) read as a video with a native frame rate."""

    def __init__(self, frames, name: str, frame_rate: float):
        self.frames, self.name, self.fps, self.total = frames, name, float(frame_rate), len(frames)
        if self.total == 0:
            raise InputError(f"video {name}: has no frames")

    def read(self, indices: np.ndarray, transform=None, to_end: bool = True):
        return [_apply(transform, np.asarray(load_image(self.frames[i]))) for i in indices.tolist()], self.total


def _apply(transform, frame: np.ndarray) -> np.ndarray:
    return transform(frame) if transform else frame


class _FrameResizer:
    """Resizes every frame to the size the first one asks for (the per-frame budget needs the frame count)."""

    def __init__(self, size_for, nframes: int):
        self.size_for, self.nframes, self.size = size_for, nframes, None

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if self.size is None:
            self.size = self.size_for(frame.shape[0], frame.shape[1], self.nframes)
        height, width = self.size
        return np.asarray(resize_image(Image.fromarray(frame), height, width))


def _video_path(source, name: str) -> tuple[Path, bool]:
    """The local path of a video source, and whether it is a temporary download."""
    if isinstance(source, Path):
        path = source
    elif source.startswith(("http://", "https://")):
        return _download_video(source, name), True
    elif source.startswith("file://"):
        path = file_url_to_path(source)
    else:
        path = Path(source)
    if not path.exists():
        raise InputError(f"video {name}: file not found")
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(f"video {name}: is empty (0 bytes)")
    return path, False


def _download_video(url: str, name: str) -> Path:
    import tempfile  # noqa: PLC0415

    data = fetch_url(url, name, "video")
    suffix = Path(url.split("?", 1)[0]).suffix or ".mp4"
    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as handle:
        handle.write(data)
    return Path(handle.name)


def _open_frames(source, name: str, frame_rate: float | None, fps: float | None):
    """A frame source with ``total``, ``fps``, ``read(indices, transform)`` and ``close()``."""
    if not isinstance(source, (str, Path)):
        return _FrameList(list(source), name, frame_rate)
    path, temporary = _video_path(source, name)
    if path.is_dir():
        return _FrameFolder(path, name, frame_rate if frame_rate is not None else (fps or FPS))
    try:
        video = _VideoFile(path, name, temporary)
    except BaseException:
        if temporary:
            path.unlink(missing_ok=True)
        raise
    if frame_rate is not None:
        video.fps = float(frame_rate)
    return video


# --------------------------------------------------------------------------------------------
# fetch_video


def fetch_video(
    source,
    *,
    fps: float | None = None,
    nframes: int | None = None,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    total_pixels: int = VIDEO_TOTAL_PIXELS,
    resized_height: int | None = None,
    resized_width: int | None = None,
    frame_rate: float | None = None,
    image_min_pixels: int = MIN_PIXELS,
    image_max_pixels: int = MAX_PIXELS,
) -> tuple[np.ndarray, float]:
    """Sampled, resized frames (uint8 (T, H, W, 3), T even) and the fps they were sampled at.

    ``source``: a video file path or URL, a folder of frames, or a list of images / (T,H,W,C) array.
    A list is taken frame by frame (qwen-vl-utils' list rule, image budgets ``image_min_pixels``/
    ``image_max_pixels`` unless ``min_pixels``/``max_pixels`` are given) unless ``frame_rate`` says
    its native rate, in which case it is sampled like a file. A folder's native rate defaults to
    ``fps`` (its frames are taken as already sampled). ``nframes``, when given, wins over ``fps``.
    """
    name = _describe_video(source)
    if _is_frame_list(source) and frame_rate is None:
        return _fetch_frame_list(
            source, name, fps, min_pixels or image_min_pixels, max_pixels or image_max_pixels,
            resized_height, resized_width,
        )

    def count_for(total: int, native_fps: float) -> int:
        return smart_nframes(total, native_fps, fps=None if nframes is not None else fps, nframes=nframes,
                             min_frames=min_frames, max_frames=max_frames, name=name)

    def size_for(height: int, width: int, n: int) -> tuple[int, int]:
        return video_frame_size(height, width, n, min_pixels=min_pixels or VIDEO_MIN_PIXELS, max_pixels=max_pixels,
                                total_pixels=total_pixels, resized_height=resized_height, resized_width=resized_width)

    frames_source = _open_frames(source, name, frame_rate, fps)
    try:
        frames = _read_sampled(frames_source, count_for, size_for, name)
    finally:
        frames_source.close()
    return frames, len(frames) / max(frames_source.total, 1e-6) * frames_source.fps


def _read_sampled(frames_source, count_for, size_for, name: str) -> np.ndarray:
    """Decode and resize the sampled frames. If a file decodes to another frame count than it
    demuxed, sample again on the decoded count."""
    n = count_for(frames_source.total, frames_source.fps)
    frames, decoded = frames_source.read(frame_indices(frames_source.total, n), _FrameResizer(size_for, n))
    if decoded != frames_source.total:
        frames_source.total = decoded
        n = count_for(decoded, frames_source.fps)
        frames, _ = frames_source.read(frame_indices(decoded, n), _FrameResizer(size_for, n))
    if any(frame is None for frame in frames):
        raise InputError(f"video {name}: some sampled frames could not be decoded")
    return np.stack(frames)


def _is_frame_list(source) -> bool:
    return isinstance(source, (list, tuple)) or (isinstance(source, np.ndarray) and source.ndim == 4)


def _describe_video(source) -> str:
    if isinstance(source, (list, tuple)):
        return f"list of {len(source)} frames"
    return describe_source(source)


def _fetch_frame_list(source, name, fps, min_pixels, max_pixels, resized_height, resized_width):
    """qwen-vl-utils' list rule: each image through the image path, padded to an even count."""
    if len(source) == 0:
        raise InputError(f"video {name}: has no frames")
    frames = []
    for image in source:
        image = load_image(image)
        h, w = target_size(image, min_pixels, max_pixels, IMAGE_FACTOR, resized_height, resized_width)
        frames.append(np.asarray(resize_image(image, h, w)))
    if len({f.shape for f in frames}) != 1:
        sizes = sorted({f"{f.shape[0]}x{f.shape[1]}" for f in frames})
        raise InputError(f"video {name}: frames resize to different sizes ({', '.join(sizes)}); give frames of one size")
    if pad := -len(frames) % FRAME_FACTOR:
        frames.extend([frames[-1]] * pad)
    return np.stack(frames), float(FPS if fps is None else fps)


def probe_video(source) -> tuple[int, float]:
    """(frame count, native fps) of a video source, raising InputError if it cannot be read."""
    name = _describe_video(source)
    if _is_frame_list(source):
        if len(source) == 0:
            raise InputError(f"video {name}: has no frames")
        for frame in source:
            load_image(frame)
        return len(source), FPS
    frames_source = _open_frames(source, name, None, None)
    try:
        if frames_source.total < FRAME_FACTOR:
            raise InputError(f"video {name}: has {frames_source.total} frame(s), at least {FRAME_FACTOR} are needed")
        frames, _ = frames_source.read(np.zeros(1, dtype=np.int64), to_end=False)
    finally:
        frames_source.close()
    if frames[0] is None:
        raise InputError(f"video {name}: no frame could be decoded")
    return frames_source.total, frames_source.fps


# --------------------------------------------------------------------------------------------
# Frames to patch rows


def process_videos(videos, **layout) -> tuple[np.ndarray, np.ndarray]:
    """Resized uint8 videos (T, H, W, 3) to ``(pixel_values_videos float32 (N, 1176), video_grid_thw
    int64 (n, 3))``; ``layout``: ``PatchLayout``'s fields, as ``process_images`` takes them.

    Rows run time slice, then merge blocks; each row holds frames 2k and 2k+1 as (C, 2, 14, 14).
    An odd frame count is padded with the last frame.
    """
    return PatchLayout(**layout).rows(videos)
