"""The M-RoPE offset a cache carries after images and videos, against the reference's logits
for the whole sequence at the original rule's positions.

After a call with images or videos, text positions continue from the largest position id plus
one, not from the cache length. The offset must restart at 0 on an empty cache, carry on
through decoding steps after a chunked prefill, and add up over turns with more images.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import trim_prompt_cache

from mlx_qwenvl.generate import make_cache
from mlx_qwenvl.loading import load_model
from reference import reference_logits, rel_error
from test_model_parity import FP32_TOLERANCE, build_prompt, make_inputs, original_rule_positions

END_OF_TURN = [151645, 198, 151644, 872, 198]  # <|im_end|>\n<|im_start|>user\n
ASSISTANT = [151645, 198, 151644, 77091, 198]  # <|im_end|>\n<|im_start|>assistant\n
ANSWER = [785, 2168, 4933, 264, 2518, 12671, 13]  # a few ordinary text tokens
START, END, IMAGE, VIDEO = 151652, 151653, 151655, 151656


@pytest.fixture(scope="module")
def fp32_model(tiny_reference):
    return load_model(tiny_reference[1], dtype=mx.float32)


def vision_block(kind, grid):
    return [START] + [IMAGE if kind == "image" else VIDEO] * (int(np.prod(grid)) // 4) + [END]


def joined_inputs(parts):
    """Pixel inputs of several calls as one prompt's (images, then videos, each in order)."""
    joined = {}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        values = [part[key] for part in parts if key in part]
        if values:
            joined[key] = np.concatenate(values)
    return joined


def steps(model, cache, tokens):
    """Logits of ``tokens`` fed one at a time, as the decoding loop feeds them."""
    return [model(mx.array([[token]]), cache) for token in tokens]


def test_an_emptied_cache_starts_text_positions_at_zero(tiny_reference, fp32_model):
    """An image call moves the offset (negative); a fresh cache, and the same cache emptied by
    mlx-lm's ``trim_prompt_cache`` (which trims the layers only), give text positions 0, 1, ...
    for a prompt and every decoding step after it."""
    items = [("image", (1, 16, 16))]
    image_ids, _ = build_prompt(items)
    text_ids, _ = build_prompt([])
    prompt, decoded = text_ids[:, :-4], text_ids[0, -4:].tolist()
    expected = reference_logits(tiny_reference[0], text_ids, np.tile(np.arange(text_ids.shape[1]), (3, 1)))
    expected = expected[:, : text_ids.shape[1] - 1]

    used = make_cache(fp32_model)
    fp32_model(image_ids, used, **make_inputs(items))
    assert used.rope_delta < 0
    trim_prompt_cache(used, used.offset)
    assert used.offset == 0
    for cache in (make_cache(fp32_model), used):
        ours = [fp32_model(prompt, cache)] + steps(fp32_model, cache, decoded[:-1])
        assert rel_error(mx.concatenate(ours, axis=1), expected) <= FP32_TOLERANCE


def test_decoding_after_a_chunked_image_and_video_prefill(tiny_reference, fp32_model):
    """A prompt with an image and a video prefilled in chunks that split the vision blocks, then
    the last prompt token and ten more fed one at a time: each step's logits against the
    reference's at the same place of the whole sequence."""
    items, seconds = [("image", (1, 8, 12)), ("video", (4, 8, 8))], [0.75]
    ids, _ = build_prompt(items)
    inputs = make_inputs(items, seed=5)
    decoded = ANSWER + [11, 1221, 13]
    sequence = np.concatenate([ids, [decoded]], axis=1)
    positions = original_rule_positions(sequence, items, seconds)
    expected = reference_logits(tiny_reference[0], sequence, positions, inputs, seconds)[:, ids.shape[1] - 1: -1]

    cache = make_cache(fp32_model)
    fp32_model.prefill(ids[:, :-1], cache, chunk_size=16, second_per_grid_ts=seconds, **inputs)
    assert cache.rope_delta < 0
    ours = steps(fp32_model, cache, [int(ids[0, -1])] + decoded[:-1])
    error = rel_error(mx.concatenate(ours, axis=1), expected)
    print(f"decoding after a chunked image+video prefill: rel error {error:.1e}")
    assert error <= FP32_TOLERANCE


def test_offsets_add_up_over_turns_with_images(tiny_reference, fp32_model):
    """Three calls on one cache (an image turn with its answer, a text turn, a turn with an image
    and a video), then decoding steps: the logits of every call against the reference's for the
    whole conversation in one pass."""
    first_items = [("image", (1, 10, 14))]
    first, _ = build_prompt(first_items)
    first = np.concatenate([first, [ANSWER]], axis=1)
    second = np.array([END_OF_TURN + [3838, 525, 279, 7987, 30] + ASSISTANT + ANSWER[:3]])
    third_items, seconds = [("image", (1, 16, 8)), ("video", (3, 8, 12))], [1.0]
    third = END_OF_TURN + [9064, 374, 419, 30]
    for kind, grid in third_items:
        third += vision_block(kind, grid)
    third = np.array([third + [74785, 432, 13] + ASSISTANT])
    decoded = ANSWER[2:]
    first_inputs, third_inputs = make_inputs(first_items, seed=6), make_inputs(third_items, seed=7)

    sequence = np.concatenate([first, second, third, [decoded]], axis=1)
    positions = original_rule_positions(sequence, first_items + third_items, seconds)
    expected = reference_logits(tiny_reference[0], sequence, positions,
                                joined_inputs([first_inputs, third_inputs]), seconds)[:, :-1]

    cache = make_cache(fp32_model)
    ours = [fp32_model(first, cache, **first_inputs), fp32_model(second, cache)]
    delta = cache.rope_delta
    ours.append(fp32_model(third, cache, second_per_grid_ts=seconds, **third_inputs))
    assert cache.rope_delta < delta < 0
    ours += steps(fp32_model, cache, decoded[:-1])
    error = rel_error(mx.concatenate(ours, axis=1), expected)
    print(f"three turns with images and a video: rel error {error:.1e}")
    assert error <= FP32_TOLERANCE
