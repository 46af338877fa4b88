"""The Processor: model folder loading, chat prompts and input_ids against transformers' Qwen2_5_VLProcessor."""

import json

import numpy as np
import pytest
from processor_fixtures import (
    chat_template,
    make_model_dir,
    random_image,
    ref_sampling,
    ref_smart_resize,
    ref_video_grid,
    reference_processor,
    textured_frame,
    write_video,
)

from mlx_qwenvl.errors import InputError, ModelLoadError
from mlx_qwenvl.image_processing import grid_token_counts
from mlx_qwenvl.processor import DEFAULT_CHAT_TEMPLATE, PreprocessorConfig, Processor

IMAGE_PAD, VIDEO_PAD = 151655, 151656


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def processor(model_dir):
    return Processor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def reference():
    return reference_processor()


def reference_ids(reference, messages, images=None, add_vision_id=False, expand=None):
    """input_ids from transformers: its own chat template rendering, then its processor call.

    ``expand`` optionally replaces each <|video_pad|> with the given counts first (no video processor).
    """
    text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         add_vision_id=add_vision_id)
    for count in expand or []:
        text = text.replace("<|video_pad|>", "<|placeholder|>" * count, 1)
    text = text.replace("<|placeholder|>", "<|video_pad|>")
    if expand is None:
        return reference(text=[text], images=images or None, return_tensors="np")
    # With no videos passed, transformers refuses video placeholders; unset its video token so the
    # already expanded run is tokenized as plain text (each <|video_pad|> is one special token).
    reference.video_token = None
    try:
        return reference(text=[text], images=images or None, return_tensors="np")
    finally:
        reference.video_token = "<|video_pad|>"


def strip_sources(messages):
    """The same messages with image parts emptied, as transformers takes them (images passed separately)."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{"type": p["type"]} if p["type"] in ("image", "video") else p for p in content]
        out.append({**message, "content": content})
    return out


# --------------------------------------------------------------------------------------------
# Tokenizer and folder


def test_real_qwen2_tokenizer_through_mlx_lm(processor):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    tokenizer = processor.tokenizer
    assert isinstance(tokenizer, TokenizerWrapper)
    assert tokenizer.encode("Hello world") == [9707, 1879]
    assert tokenizer.encode("<|im_start|>user\n") == [151644, 872, 198]
    assert tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|im_end|>"]) == [
        IMAGE_PAD, VIDEO_PAD, 151645]
    assert processor.image_token_id == IMAGE_PAD and processor.video_token_id == VIDEO_PAD


def test_preprocessor_config_forms(tmp_path):
    assert PreprocessorConfig.from_dict({}).max_pixels == 12845056
    v5 = PreprocessorConfig.from_dict({"size": {"shortest_edge": 1000, "longest_edge": 200000}})
    assert (v5.min_pixels, v5.max_pixels) == (1000, 200000)
    both = PreprocessorConfig.from_dict({"min_pixels": 5, "max_pixels": 6, "size": {"shortest_edge": 1, "longest_edge": 2}})
    assert (both.min_pixels, both.max_pixels) == (5, 6)
    with pytest.raises(ModelLoadError, match="min_pixels"):
        PreprocessorConfig.from_dict({"min_pixels": 10, "max_pixels": 5})
    folder = make_model_dir(tmp_path / "bare", preprocessor_config=None)
    (folder / "chat_template.json").unlink()
    bare = Processor.from_pretrained(folder)
    assert (bare.min_pixels, bare.max_pixels) == (3136, 12845056)
    assert bare.chat_template == json.loads((folder / "tokenizer_config.json").read_text()).get(
        "chat_template", DEFAULT_CHAT_TEMPLATE)
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert Processor.from_pretrained(folder).apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"
    with pytest.raises(ModelLoadError, match="not found"):
        Processor.from_pretrained(tmp_path / "nowhere")


def test_default_template_is_the_hub_template():
    assert DEFAULT_CHAT_TEMPLATE == chat_template()


# --------------------------------------------------------------------------------------------
# input_ids parity


def test_text_only(processor, reference):
    messages = [{"role": "user", "content": "Hello world, what is 2+2?"}]
    out = processor(messages)
    expected = reference_ids(reference, messages)
    np.testing.assert_array_equal(out["input_ids"], expected["input_ids"])
    assert out["input_ids"].dtype == np.int32 and out["input_ids"].shape[0] == 1
    assert out["pixel_values"] is None and out["image_grid_thw"] is None
    assert out["pixel_values_videos"] is None and out["video_grid_thw"] is None and out["second_per_grid_ts"] is None
    parts = processor([{"role": "user", "content": [{"type": "text", "text": "Hello world, what is 2+2?"}]}])
    np.testing.assert_array_equal(parts["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(processor("Hello world, what is 2+2?")["input_ids"], expected["input_ids"])


def test_one_image(processor, reference):
    image = random_image(300, 500)
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "Describe this image."}]}]
    out = processor(messages)
    expected = reference_ids(reference, strip_sources(messages), [image])
    np.testing.assert_array_equal(out["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(out["image_grid_thw"], [[1, 22, 36]])
    np.testing.assert_allclose(out["pixel_values"], expected["pixel_values"], rtol=0, atol=1e-6)
    assert (out["input_ids"] == IMAGE_PAD).sum() == 198 == grid_token_counts(out["image_grid_thw"])[0]
    ids = out["input_ids"][0].tolist()
    start = ids.index(151652)
    assert ids[start + 1:start + 199] == [IMAGE_PAD] * 198 and ids[start + 199] == 151653


def test_two_images_and_a_plain_string_prompt(processor, reference):
    images = [random_image(300, 500), random_image(97, 1001, seed=3)]
    messages = [{"role": "user", "content": [{"type": "image", "image": images[0]},
                                             {"type": "image", "image": images[1]},
                                             {"type": "text", "text": "What differs?"}]}]
    expected = reference_ids(reference, strip_sources(messages), images)
    for out in (processor(messages), processor("What differs?", images=images),
                processor(strip_sources(messages), images=images)):
        np.testing.assert_array_equal(out["input_ids"], expected["input_ids"])
        np.testing.assert_array_equal(out["image_grid_thw"], expected["image_grid_thw"])
        np.testing.assert_allclose(out["pixel_values"], expected["pixel_values"], rtol=0, atol=1e-6)


def test_multi_turn_with_a_system_prompt(processor, reference):
    images = [random_image(56, 56), random_image(200, 120, seed=9)]
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "Mostly grey."},
        {"role": "user", "content": [{"type": "text", "text": "And this one? "}, {"type": "image", "image": images[1]}]},
    ]
    out = processor(messages)
    expected = reference_ids(reference, strip_sources(messages), images)
    np.testing.assert_array_equal(out["input_ids"], expected["input_ids"])
    text = processor.apply_chat_template(messages)
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n") and "helpful assistant" not in text
    assert text.endswith("<|im_start|>assistant\n")
    assert not processor.apply_chat_template(messages, add_generation_prompt=False).endswith("assistant\n")


def test_add_vision_id(processor, reference):
    images = [random_image(64, 64), random_image(90, 30, seed=2)]
    messages = [{"role": "user", "content": [{"type": "image", "image": images[0]},
                                             {"type": "image", "image": images[1]},
                                             {"type": "text", "text": "Compare."}]}]
    out = processor(messages, add_vision_id=True)
    expected = reference_ids(reference, strip_sources(messages), images, add_vision_id=True)
    np.testing.assert_array_equal(out["input_ids"], expected["input_ids"])
    text = processor.apply_chat_template(messages, add_vision_id=True)
    assert "Picture 1: <|vision_start|>" in text and "Picture 2: <|vision_start|>" in text


def test_image_and_video(processor, reference, tmp_path):
    """transformers 5.24's video processor needs torchvision (absent here), so the expected ids come from
    its image path plus the video placeholder expanded by the qwen-vl-utils rule (grid from the
    independent copy in processor_fixtures)."""
    total, rate = 40, 10
    video = write_video(tmp_path / "clip.mp4", (textured_frame(i, 60, 100) for i in range(total)), rate)
    image = random_image(120, 90)
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "video", "video": str(video)},
                                             {"type": "text", "text": "What happens?"}]}]
    for add_vision_id in (False, True):
        out = processor(messages, add_vision_id=add_vision_id)
        grid, tokens = ref_video_grid(total, rate, 60, 100)
        expected = reference_ids(reference, strip_sources(messages), [image], add_vision_id, expand=[tokens])
        np.testing.assert_array_equal(out["input_ids"], expected["input_ids"])
        np.testing.assert_array_equal(out["video_grid_thw"], [grid])
        np.testing.assert_allclose(out["pixel_values"], expected["pixel_values"], rtol=0, atol=1e-6)
    _, sample_fps = ref_sampling(total, rate)
    assert out["second_per_grid_ts"] == [pytest.approx(2 / sample_fps)]
    assert out["pixel_values_videos"].shape == (grid[0] * grid[1] * grid[2], 1176)
    assert out["pixel_values_videos"].dtype == np.float32 and out["video_grid_thw"].dtype == np.int64
    assert (out["input_ids"] == VIDEO_PAD).sum() == tokens


def test_video_options_per_call_and_per_part(processor, tmp_path):
    video = write_video(tmp_path / "clip.mp4", (textured_frame(i) for i in range(120)), 30)
    base = processor("Go.", videos=[video])
    assert base["video_grid_thw"][0][0] == 4  # 8 frames at 2 fps
    faster = processor("Go.", videos=[video], video_fps=4.0)
    assert faster["video_grid_thw"][0][0] == 8
    assert faster["second_per_grid_ts"] == [pytest.approx(2 / (16 / 120 * 30))]
    capped = processor("Go.", videos=[video], video_fps=4.0, video_max_frames=6)
    assert capped["video_grid_thw"][0][0] == 3
    part = processor([{"role": "user", "content": [{"type": "video", "video": str(video), "nframes": 4}]}])
    assert part["video_grid_thw"][0][0] == 2
    frames = processor("Go.", videos=[[random_image(64, 64, seed=i) for i in range(3)]])
    assert frames["video_grid_thw"].tolist() == [[2, 4, 4]] and frames["second_per_grid_ts"] == [1.0]


def test_pixel_budget_per_call_and_per_image(processor):
    image = random_image(1080, 1920)
    assert processor("x", images=[image])["image_grid_thw"].tolist() == [[1, 78, 138]]
    capped = processor("x", images=[image], max_pixels=1003520)
    assert capped["image_grid_thw"].tolist() == [[1, 52, 94]]
    per_image = processor([{"role": "user", "content": [
        {"type": "image", "image": image, "max_pixels": 200704},
        {"type": "image", "image": image, "resized_height": 280, "resized_width": 300},
    ]}])
    assert per_image["image_grid_thw"].tolist() == [[1, 24, 42], [1, 20, 22]]
    assert ref_smart_resize(1080, 1920, max_pixels=200704) == (24 * 14, 42 * 14)
    assert ref_smart_resize(280, 300) == (20 * 14, 22 * 14)
    assert processor.image_tokens(image) == 2691
    assert processor.image_tokens(image, max_pixels=1003520) == 1222
    with pytest.raises(InputError, match="max_pixels"):
        processor("x", images=[image], max_pixels=0)


def test_encode_takes_a_rendered_prompt(processor):
    image = random_image(300, 500)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}])
    out = processor.encode(text, images=[image])
    full = processor([{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}])
    np.testing.assert_array_equal(out["input_ids"], full["input_ids"])
    with pytest.raises(InputError, match=r"1 image placeholder\(s\) .* but 2 image\(s\) given"):
        processor.encode(text, images=[image, image])


def test_bad_prompts_raise_input_error(processor, tmp_path):
    image = random_image(30, 30)
    cases = [
        ([{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]}], r"message 0, part 0: unknown content part type 'audio'"),
        ([{"role": "user", "content": ["just a string"]}], r"part 0: a content part must be a dict"),
        ([{"content": "no role"}], r"message 0: expected a dict with a 'role'"),
        ([], r"non-empty list"),
        ([{"role": "user", "content": [{"type": "image"}]}], r"more image parts without a source"),
        ([{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "gone.jpg")}]}], r"gone\.jpg.*file not found"),
    ]
    for messages, message in cases:
        with pytest.raises(InputError, match=message):
            processor(messages)
    with pytest.raises(InputError, match=r"1 image\(s\) given but no image part"):
        processor([{"role": "user", "content": "hi"}], images=[image])
    processor.check_image(image)
    with pytest.raises(InputError, match="not a recognized image"):
        processor.check_image(b"GIF89a-not-really")
    with pytest.raises(InputError, match="file not found"):
        processor.check_video(str(tmp_path / "nope.mp4"))
