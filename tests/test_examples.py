"""The examples run end to end and print the right content: the shipped demo model's answers
(the library's answer to the same question about the same media, and the picture's colour or
shape where the demo was trained to tell it), and as many boxes drawn as the answer holds."""

import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlx_qwenvl import ChatSession, generate, load
from processor_fixtures import make_model_dir, ref_smart_resize
from reference import make_reference, save_reference, script_answer, tiny_config

ROOT = Path(__file__).parent.parent
EXAMPLES, IMAGES = ROOT / "examples", ROOT / "examples" / "images"
sys.path.insert(0, str(ROOT / "tools"))

from demo_tasks import one_shape  # noqa: E402

STATS = re.compile(r"^\[(\d+) prompt tokens, ")
pytestmark = pytest.mark.slow  # each example is a fresh process loading a model (5-10 s)


@pytest.fixture(scope="module")
def demo():
    return load("demo")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    one_shape(random.Random(5), "square", "blue").save(root / "blue_square.png")
    frames = root / "frames"
    frames.mkdir()
    for i in range(4):
        Image.fromarray(np.full((48, 64, 3), 60 * i, dtype=np.uint8)).save(frames / f"{i:03d}.png")
    return root


def run_example(name, *args) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return result.stdout


def answer_and_prompt_tokens(out: str):
    """(answer text, prompt tokens) from an example that prints the answer, then a [figures] line."""
    text, figures = out.rstrip("\n").rsplit("\n", 1)
    return text.rstrip("\n"), int(STATS.match(figures).group(1))


@pytest.mark.parametrize("picture, colour", [(IMAGES / "red_circle.png", "red"), ("blue_square.png", "blue")],
                         ids=["red_circle", "blue_square"])
def test_describe_image_prints_the_demos_answer(picture, colour, demo, media):
    model, processor = demo
    picture = media / picture if isinstance(picture, str) else picture
    out = run_example("describe_image.py", picture, "--model", "demo")
    text, prompt_tokens = answer_and_prompt_tokens(out)
    prompt = "Describe this image in detail."
    expected = generate(model, processor, prompt, images=[str(picture)], max_tokens=300, max_pixels=1003520)
    assert text == expected.text == colour
    assert prompt_tokens == expected.prompt_tokens


def test_compare_images_prints_the_demos_answer(demo, media):
    model, processor = demo
    first, second = IMAGES / "red_circle.png", media / "blue_square.png"
    out = run_example("compare_images.py", first, second, "--model", "demo")
    messages = [{"role": "user", "content": [
        {"type": "image", "image": str(first)},
        {"type": "image", "image": str(second)},
        {"type": "text", "text": "What are the differences between these two pictures?"},
    ]}]
    expected = generate(model, processor, messages, max_tokens=300, max_pixels=602112).text
    assert expected and out == expected + "\n"


def test_summarize_video_prints_the_demos_answer(demo, media):
    model, processor = demo
    out = run_example("summarize_video.py", media / "frames", "--model", "demo", "--fps", "2")
    text, prompt_tokens = answer_and_prompt_tokens(out)
    messages = [{"role": "user", "content": [
        {"type": "video", "video": str(media / "frames"), "fps": 2.0, "max_frames": 64},
        {"type": "text", "text": "Summarise what happens in this video, in order."},
    ]}]
    expected = generate(model, processor, messages, max_tokens=400)
    assert expected.text and text == expected.text
    assert prompt_tokens == expected.prompt_tokens


def test_multi_turn_chat_prints_the_demos_answers(demo):
    model, processor = demo
    picture = IMAGES / "red_circle.png"
    out = run_example("multi_turn_chat.py", picture, "--model", "demo")
    turns = re.findall(r">> (.*)\n(.*)\n   \[prefilled (\d+) new tokens\]", out)
    chat = ChatSession(model, processor, system="You are a concise assistant.")
    expected = []
    for question, images in (("What is in this picture?", [str(picture)]), ("What colours dominate it?", []),
                             ("Write a one-line caption for it.", [])):
        answer = chat.send(question, images=images, max_tokens=150).text
        expected.append((question, answer, str(chat.last_prefill_tokens)))
    assert turns == expected
    assert turns[0][1] == "circle"
    prefills = [int(n) for _, _, n in turns]
    assert prefills[1] < prefills[0] and prefills[2] < prefills[0]


# ---- grounding: a model scripted to answer one box, and the demo, which answers none

BOX_ANSWER = '{"bbox_2d":[10,34 ,56,\n78]}'  # every token distinct, as a scripted answer needs


@pytest.fixture(scope="module")
def box_model(tmp_path_factory):
    """A tiny model whose greedy answer to any question is BOX_ANSWER."""
    from transformers import AutoTokenizer

    from processor_fixtures import ASSETS

    ids = AutoTokenizer.from_pretrained(ASSETS).encode(BOX_ANSWER, add_special_tokens=False)
    config = tiny_config()
    ref = script_answer(make_reference(config, seed=9), ids + [151645])
    return make_model_dir(save_reference(ref, tmp_path_factory.mktemp("boxes") / "model", config))


def drawn_pixels(before: Image.Image, after: Image.Image) -> np.ndarray:
    changed = np.any(np.asarray(before.convert("RGB")) != np.asarray(after.convert("RGB")), axis=-1)
    return np.argwhere(changed)  # (row, column) pairs


def test_grounding_draws_the_box_of_the_answer(box_model, tmp_path):
    picture, drawn = tmp_path / "white.png", tmp_path / "boxes.png"
    Image.new("RGB", (150, 120), "white").save(picture)
    out = run_example("grounding.py", picture, "the cat", "--model", box_model, "--out", drawn)
    # The model saw the picture resized to multiples of 28; its box maps back to 150 x 120.
    height, width = ref_smart_resize(120, 150)
    box = [round(10 * 150 / width, 1), round(34 * 120 / height, 1), round(56 * 150 / width, 1),
           round(78 * 120 / height, 1)]
    assert out == f"{BOX_ANSWER}\n1 box(es) drawn on {drawn}: [{box}]\n"
    rows, columns = drawn_pixels(Image.open(picture), Image.open(drawn)).T
    assert abs(columns.min() - box[0]) <= 1 and abs(columns.max() - box[2]) <= 1
    assert abs(rows.min() - box[1]) <= 1 and abs(rows.max() - box[3]) <= 1
    assert Image.open(drawn).getpixel((int(box[0]), int((box[1] + box[3]) / 2))) == (255, 0, 0)
    assert Image.open(drawn).getpixel((int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2))) == (255, 255, 255)


def test_grounding_without_boxes_draws_nothing(demo, tmp_path):
    model, processor = demo
    picture, drawn = IMAGES / "three_circles.png", tmp_path / "boxes.png"
    out = run_example("grounding.py", picture, "the circles", "--model", "demo", "--out", drawn)
    prompt = "Locate the circles in the image and output the bounding boxes in JSON format."
    expected = generate(model, processor, prompt, images=[str(picture)], max_tokens=400).text
    assert out == f"{expected}\n0 box(es) drawn on {drawn}: []\n"
    assert len(drawn_pixels(Image.open(picture), Image.open(drawn))) == 0
