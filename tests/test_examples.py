"""The examples run end to end against a small model folder."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (90, 120)), ("b.png", (120, 90))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / name)
    frames = root / "frames"
    frames.mkdir()
    for i in range(4):
        Image.fromarray(np.full((48, 64, 3), 60 * i, dtype=np.uint8)).save(frames / f"{i:03d}.png")
    return root


def run_example(name, *args):
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_describe_image(tiny_model_dir, media):
    out = run_example("describe_image.py", media / "a.png", "--model", tiny_model_dir)
    assert "prompt tokens" in out and "tokens/s" in out


def test_compare_images(tiny_model_dir, media):
    assert run_example("compare_images.py", media / "a.png", media / "b.png", "--model", tiny_model_dir)


def test_summarize_video(tiny_model_dir, media):
    out = run_example("summarize_video.py", media / "frames", "--model", tiny_model_dir, "--fps", "2")
    assert "prompt tokens, peak memory" in out


def test_multi_turn_chat(tiny_model_dir, media):
    out = run_example("multi_turn_chat.py", media / "a.png", "--model", tiny_model_dir)
    prefills = [int(n) for n in __import__("re").findall(r"prefilled (\d+) new tokens", out)]
    assert len(prefills) == 3 and prefills[1] < prefills[0] and prefills[2] < prefills[0]


def test_grounding(tiny_model_dir, media, tmp_path):
    out = run_example("grounding.py", media / "a.png", "the cat", "--model", tiny_model_dir,
                      "--out", tmp_path / "boxes.png")
    assert "box(es) drawn on" in out and (tmp_path / "boxes.png").exists()
