"""Helpers for the processor tests: a model folder, synthetic videos, the reference rules and processor.

The qwen-vl-utils rules below are written out again from qwen-vl-utils 0.0.10 ``vision_process.py``
(``smart_nframes``, ``fetch_video``) so the tests check the package against an independent copy.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ASSETS = Path(__file__).parent / "assets" / "qwen2_tokenizer"

HUB_PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}


def make_model_dir(path: Path, preprocessor_config: dict | None = HUB_PREPROCESSOR_CONFIG) -> Path:
    """A model folder holding the real Qwen2 tokenizer asset and (optionally) a preprocessor_config.json."""
    path.mkdir(parents=True, exist_ok=True)
    for file in ASSETS.iterdir():
        if file.is_file():
            shutil.copy(file, path / file.name)
    if preprocessor_config is not None:
        (path / "preprocessor_config.json").write_text(json.dumps(preprocessor_config))
    return path


def chat_template() -> str:
    return json.loads((ASSETS / "chat_template.json").read_text())["chat_template"]


def random_image(height: int, width: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed + 7919 * height + width)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def conversation_inputs(processor, ids, images=()) -> dict:
    """A conversation's token ids with every image it holds, in order, as one prompt for an
    empty cache (what a cold run is given)."""
    inputs = {"input_ids": np.array([list(ids)], dtype=np.int64)}
    encoded = [processor.encode("<|vision_start|><|image_pad|><|vision_end|>", images=[image]) for image in images]
    if encoded:
        inputs["pixel_values"] = np.concatenate([one["pixel_values"] for one in encoded])
        inputs["image_grid_thw"] = np.concatenate([one["image_grid_thw"] for one in encoded])
    return inputs


# --------------------------------------------------------------------------------------------
# The transformers reference


def reference_processor(min_pixels: int = 3136, max_pixels: int = 12845056):
    """transformers' Qwen2_5_VLProcessor on the Pillow image path, without a video processor.

    transformers 5.24's Qwen2VLVideoProcessor imports torchvision, which the test environment does
    not have, so the reference is built without one (the class check is skipped for that slot)
    and video token counts are computed from the qwen-vl-utils rule below instead.
    """
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ReferenceProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ReferenceProcessor(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels),
        tokenizer=AutoTokenizer.from_pretrained(ASSETS),
        video_processor=None,
        chat_template=chat_template(),
    )


# --------------------------------------------------------------------------------------------
# qwen-vl-utils 0.0.10, written out again


def ref_smart_nframes(total_frames, video_fps, fps=2.0, min_frames=4, max_frames=None, nframes=None):
    if nframes is not None:
        n = round(nframes / 2) * 2
    else:
        min_frames = math.ceil(min_frames / 2) * 2
        max_frames = math.floor((min(768, total_frames) if max_frames is None else max_frames) / 2) * 2
        n = total_frames / video_fps * fps
        n = min(min(max(n, min_frames), max_frames), total_frames)
        n = math.floor(n / 2) * 2
    assert 2 <= n <= total_frames
    return n


def ref_sampling(total_frames, video_fps, **kwargs):
    """(indices, sample_fps) as qwen-vl-utils' torchvision/decord readers give them."""
    n = ref_smart_nframes(total_frames, video_fps, **kwargs)
    indices = [int(round(x)) for x in np.linspace(0, total_frames - 1, n)]
    return indices, n / max(total_frames, 1e-6) * video_fps


def ref_smart_resize(height, width, factor=28, min_pixels=3136, max_pixels=12845056):
    """transformers' smart_resize, written out again."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError("aspect")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def ref_video_frame_size(height, width, nframes, min_pixels=128 * 28 * 28, max_pixels=None,
                         total_pixels=int(128000 * 28 * 28 * 0.9)):
    cap = max(min(768 * 28 * 28, total_pixels / nframes * 2), int(min_pixels * 1.05))
    cap = cap if max_pixels is None else min(max_pixels, cap)
    return ref_smart_resize(height, width, 28, min_pixels, cap)


def ref_video_grid(total_frames, video_fps, height, width, **kwargs):
    """video_grid_thw row and token count of a video file under the reference rule."""
    n = ref_smart_nframes(total_frames, video_fps, **kwargs)
    h, w = ref_video_frame_size(height, width, n)
    grid = (n // 2, h // 14, w // 14)
    return grid, grid[0] * grid[1] * grid[2] // 4


def ref_video_patches(frames: np.ndarray) -> np.ndarray:
    """Patch rows of normalized frames (T, C, H, W) by explicit loops, as REFERENCE.md 4.2 describes them."""
    t, c, h, w = frames.shape
    rows = []
    for k in range(t // 2):
        for by in range(h // 28):
            for bx in range(w // 28):
                for my in range(2):
                    for mx in range(2):
                        y, x = by * 28 + my * 14, bx * 28 + mx * 14
                        rows.append(frames[2 * k:2 * k + 2, :, y:y + 14, x:x + 14].transpose(1, 0, 2, 3).reshape(-1))
    return np.stack(rows)


# --------------------------------------------------------------------------------------------
# Synthetic videos


def index_frame(i: int, height: int = 48, width: int = 64) -> np.ndarray:
    """A flat frame whose colour encodes its index (R = i % 256, G = i // 256, B = 77)."""
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[..., 0], frame[..., 1], frame[..., 2] = i % 256, i // 256, 77
    return frame


def textured_frame(i: int, height: int = 48, width: int = 64) -> np.ndarray:
    rng = np.random.default_rng(1000 + i)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def frame_index(frame: np.ndarray) -> int:
    """Decode index_frame's colour code from a (resized) frame."""
    return int(frame[..., 0].mean().round()) + 256 * int(frame[..., 1].mean().round())


def write_video(path: Path, frames, fps) -> Path:
    """Write RGB frames losslessly (libx264rgb crf 0, else FFV1) with PyAV; decoding gives them back exactly."""
    import av

    rate = Fraction(fps).limit_denominator(100000)
    frames = list(frames)
    for codec, options in (("libx264rgb", {"crf": "0", "preset": "ultrafast"}), ("ffv1", {})):
        try:
            av.codec.Codec(codec, "w")
        except Exception:  # noqa: BLE001
            continue
        target = path if codec == "libx264rgb" else path.with_suffix(".mkv")
        with av.open(str(target), "w") as container:
            stream = container.add_stream(codec, rate=rate)
            stream.height, stream.width = frames[0].shape[:2]
            stream.pix_fmt = "rgb24" if codec == "libx264rgb" else "bgr0"
            stream.options = options
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return target
    raise RuntimeError("PyAV has neither libx264rgb nor ffv1")


def write_frame_folder(path: Path, frames, prefix: str = "frame_") -> Path:
    """PNG frames named frame_1.png ... frame_N.png (natural order differs from lexicographic)."""
    path.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames, start=1):
        Image.fromarray(frame).save(path / f"{prefix}{i}.png")
    return path


# --------------------------------------------------------------------------------------------
# Network


@pytest.fixture
def local_network(monkeypatch):
    """Requests to 127.0.0.1 bypass any proxy configured in the environment."""
    for key in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(key, "127.0.0.1,localhost")


def closed_port_url(path: str) -> str:
    """An http URL on 127.0.0.1 at a port nothing listens on (connection refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{path}"


@pytest.fixture
def http_folder(tmp_path, local_network):
    """(folder, base URL): a local HTTP server serving a temporary folder."""
    import http.server
    import threading

    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
