"""Chat templates of a model folder that cannot render images (text-model templates), and templates that fail.

A folder's template is found in chat_template.jinja, chat_template.json or tokenizer_config.json. A
template that treats ``message['content']`` as a string gets text as strings, and prompts with images or
videos fall back to the built-in Qwen2.5-VL template with a one-line notice naming the file. Any error
of a template becomes one line naming the file, in the API and in the CLI (issue 15).
"""

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from processor_fixtures import make_model_dir, random_image, textured_frame

from mlx_qwenvl.errors import InputError, ModelLoadError
from mlx_qwenvl.processor import DEFAULT_CHAT_TEMPLATE, Processor

LOCATIONS = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
NOTICE = "chat template cannot render images or videos; using the built-in Qwen2.5-VL template"

# The issue's template, as text-model fine-tunes ship it: string concatenation, no system prompt.
STRING_TEMPLATE = (
    r"{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    r"'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A string-only template that renders text exactly as the built-in one (same default system prompt).
QWEN_TEXT_TEMPLATE = (
    r"{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    r"{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    r"{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Renders a list without an error but as its Python repr: the image is silently lost.
REPR_TEMPLATE = (
    r"{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}{{ message['content'] }}"
    r"{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Broken templates: (template, the exception expected, a pattern of its message after the file name).
BROKEN = {
    "raise_exception": (r"{{ raise_exception('no chat for you') }}", InputError, r"no chat for you"),
    "undefined": (r"{{ messages[0].nothing.here }}", InputError, r"nothing"),
    "syntax": (r"{% for message in messages %}{{ message['content'] }", ModelLoadError, r"syntax"),
}


def with_template(folder: Path, location: str, template: str) -> Path:
    """Make ``template`` in ``location`` the folder's only chat template."""
    (folder / "chat_template.json").unlink(missing_ok=True)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    if location == "tokenizer_config.json":
        config["chat_template"] = template
    elif location == "chat_template.json":
        (folder / location).write_text(json.dumps({"chat_template": template}))
    else:
        (folder / location).write_text(template)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    """A processor on the real tokenizer and the built-in template: the expected ids."""
    return Processor.from_pretrained(make_model_dir(tmp_path_factory.mktemp("builtin")))


def folder_processor(tmp_path, location, template):
    folder = with_template(make_model_dir(tmp_path / "model"), location, template)
    return Processor.from_pretrained(folder), folder / location


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def text(value):
    return {"type": "text", "text": value}


def notices(caplog):
    return [r.getMessage() for r in caplog.records if "cannot render" in r.getMessage()]


# --------------------------------------------------------------------------------------------
# String-only templates


@pytest.mark.parametrize("location", LOCATIONS)
def test_string_template_renders_text_and_falls_back_for_images(location, builtin, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    processor, file = folder_processor(tmp_path, location, QWEN_TEXT_TEMPLATE)
    image, frames = random_image(56, 84), [textured_frame(i) for i in range(4)]
    text_prompts = ["Describe Paris.", user(text("Describe "), text("Paris.")),
                    [{"role": "system", "content": "Be brief."}, *user(text("Hi"))]]
    for prompt in text_prompts:
        np.testing.assert_array_equal(processor(prompt)["input_ids"], builtin(prompt)["input_ids"])
    assert notices(caplog) == []  # nothing was skipped yet

    vision_calls = [("What is this?", {"images": [image]}), (user({"type": "image", "image": image}, text("Hi")), {}),
                    ("And this?", {"videos": [frames]})]
    for prompt, media in vision_calls:
        out, expected = processor(prompt, **media), builtin(prompt, **media)
        np.testing.assert_array_equal(out["input_ids"], expected["input_ids"])
    assert notices(caplog) == [f"note: {file}'s {NOTICE}"]  # one line, once per processor


def test_the_issue_template_keeps_its_own_text_format(builtin, tmp_path, caplog):
    processor, file = folder_processor(tmp_path, "tokenizer_config.json", STRING_TEMPLATE)
    expected = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert processor.apply_chat_template(user(text("Hi "), text("there"))) == expected
    assert processor.apply_chat_template([{"role": "user", "content": "Hi there"}]) == expected
    messages = user({"type": "image"}, text("Hi"))
    assert processor.apply_chat_template(messages) == builtin.apply_chat_template(messages)
    assert notices(caplog) == [f"note: {file}'s {NOTICE}"]


def test_a_template_that_prints_the_list_cannot_render_images(builtin, tmp_path, caplog):
    processor, file = folder_processor(tmp_path, "chat_template.jinja", REPR_TEMPLATE)
    assert processor.apply_chat_template(user(text("Hi"))) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    image = random_image(56, 56)
    np.testing.assert_array_equal(processor("Hi", images=[image])["input_ids"],
                                  builtin("Hi", images=[image])["input_ids"])
    assert notices(caplog) == [f"note: {file}'s {NOTICE}"]


def test_a_vision_template_of_the_folder_is_used_for_images(tmp_path, caplog):
    own = DEFAULT_CHAT_TEMPLATE.replace("You are a helpful assistant.", "You see things.")
    processor, _ = folder_processor(tmp_path, "chat_template.json", own)
    rendered = processor.apply_chat_template(user({"type": "image"}, text("Hi")))
    assert rendered.startswith("<|im_start|>system\nYou see things.<|im_end|>\n")
    assert "<|vision_start|><|image_pad|><|vision_end|>Hi" in rendered
    assert notices(caplog) == []


def test_only_the_kind_a_template_cannot_render_falls_back(builtin, caplog):
    images_only = DEFAULT_CHAT_TEMPLATE.replace("<|vision_start|><|video_pad|><|vision_end|>", "")
    processor = Processor(builtin.tokenizer, images_only.replace("helpful assistant", "viewer"))
    assert "viewer" in processor.apply_chat_template(user({"type": "image"}, text("Hi")))
    assert notices(caplog) == []
    messages = user({"type": "video"}, text("Hi"))
    assert processor.apply_chat_template(messages) == builtin.apply_chat_template(messages)
    assert notices(caplog) == ["note: the given chat template cannot render videos; using the built-in "
                               "Qwen2.5-VL template"]


# --------------------------------------------------------------------------------------------
# Templates that fail


@pytest.mark.parametrize("location", LOCATIONS)
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_template_errors_are_one_line_naming_the_file(case, location, tmp_path):
    template, error, pattern = BROKEN[case]
    folder = with_template(make_model_dir(tmp_path / "model"), location, template)
    with pytest.raises(error) as caught:
        Processor.from_pretrained(folder)("Hi", images=[random_image(56, 56)])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{folder / location}: ") and re.search(pattern, message)


def test_a_template_given_directly_fails_with_the_package_error(builtin):
    with pytest.raises(ModelLoadError, match=r"^chat template: .*syntax"):
        Processor(builtin.tokenizer, "{% if %}")
    processor = Processor(builtin.tokenizer, BROKEN["raise_exception"][0])
    with pytest.raises(InputError, match=r"^chat template: .*no chat for you"):
        processor("Hi")


# --------------------------------------------------------------------------------------------
# The CLI


def cli(folder, *args):
    command = [sys.executable, "-m", "mlx_qwenvl", "generate", "--model", str(folder), "--max-tokens", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.fixture
def cli_folder(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def test_cli_with_a_string_template(cli_folder, tmp_path):
    folder = with_template(cli_folder, "tokenizer_config.json", STRING_TEMPLATE)
    result = cli(folder, "--prompt", "hi")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    photo = tmp_path / "photo.png"
    random_image(56, 84).save(photo)
    result = cli(folder, "--prompt", "hi", "--image", str(photo))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"note: {folder / 'tokenizer_config.json'}'s {NOTICE}"]


@pytest.mark.parametrize("case, location", [("raise_exception", "chat_template.jinja"),
                                            ("undefined", "chat_template.json"),
                                            ("syntax", "tokenizer_config.json")])
def test_cli_template_errors_are_one_line(case, location, cli_folder):
    folder = with_template(cli_folder, location, BROKEN[case][0])
    result = cli(folder, "--prompt", "hi")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"error: {folder / location}: "), lines[0]
