"""generate / stream_generate / ChatSession against the reference's generate()."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwenvl.chat import ChatSession
from mlx_qwenvl.errors import InputError
from mlx_qwenvl.generate import generate, make_cache, stream_generate, stream_tokens
from mlx_qwenvl.loading import load
from processor_fixtures import random_image
from reference import STOP, reference_generate


@pytest.mark.parametrize("with_image", [False, True])
def test_greedy_generate_matches_reference(with_image, loaded, tiny_reference):
    model, processor = loaded
    images = [random_image(84, 140, 1)] if with_image else None
    prompt = "Describe this picture in detail." if with_image else "Write a haiku about the sea."
    result = generate(model, processor, prompt, images=images, max_tokens=24, temperature=0.0)
    expected = reference_generate(tiny_reference[0], processor(prompt, images=images), 24)
    assert result.tokens == expected
    assert result.generation_tokens == len(expected)
    assert result.finish_reason == ("stop" if expected[-1] in STOP else "length")
    assert result.prompt_tokens == processor(prompt, images=images)["input_ids"].shape[1]
    assert result.prompt_tps > 0 and result.generation_tps > 0 and result.peak_memory > 0


def test_stream_pieces_join_to_the_text(loaded):
    model, processor = loaded
    pieces = list(stream_generate(model, processor, "Hello", max_tokens=12, temperature=0.0))
    result = generate(model, processor, "Hello", max_tokens=12, temperature=0.0)
    assert "".join(p.text for p in pieces) == result.text
    assert [p.token for p in pieces] == result.tokens
    assert [p.generation_tokens for p in pieces] == list(range(1, len(pieces) + 1))


def test_multi_turn_prefills_only_new_tokens_and_matches_from_scratch(loaded):
    model, processor = loaded
    first, second = random_image(56, 112, 2), random_image(112, 84, 3)
    session = ChatSession(model, processor)
    turn1 = session.send("What is in this image?", images=[first], max_tokens=10, temperature=0.0)
    held = len(session.tokens)
    assert session.cache[0].offset == held
    turn2 = session.send("And how does this one differ?", images=[second], max_tokens=10, temperature=0.0)

    # Only the second turn's own tokens went through prefill: its text and its image tokens.
    second_image_tokens = (112 // 28) * (84 // 28)
    assert session.last_prefill_tokens == len(session.tokens) - held - len(turn2.tokens)
    assert session.last_prefill_tokens < 40 + second_image_tokens
    assert session.last_prefill_tokens < held

    # From scratch: the same token sequence and both images in one prompt, on an empty cache.
    prompt_ids = np.array([session.tokens[: held + session.last_prefill_tokens]], dtype=np.int32)
    pixels, grids = [], []
    for image in (first, second):
        one = processor.encode("<|vision_start|><|image_pad|><|vision_end|>", images=[image])
        pixels.append(one["pixel_values"])
        grids.append(one["image_grid_thw"])
    inputs = {"input_ids": prompt_ids, "pixel_values": np.concatenate(pixels),
              "image_grid_thw": np.concatenate(grids)}
    scratch = [r.token for r in stream_tokens(model, processor, inputs, make_cache(model),
                                              max_tokens=10, temperature=0.0)]
    assert scratch == turn2.tokens
    assert turn1.tokens  # the first turn answered


def test_stopping_early_keeps_the_session_consistent(loaded):
    model, processor = loaded
    session = ChatSession(model, processor)
    stream = session.stream("Tell me a long story.", max_tokens=50, temperature=0.0)
    received = [next(stream).token for _ in range(3)]
    stream.close()  # what Ctrl-C does in the CLI
    assert session.tokens[-3:] == received
    assert all(c.offset == len(session.tokens) for c in session.cache)
    assert session.messages[-1]["role"] == "assistant"
    answer = session.send("Go on.", max_tokens=5, temperature=0.0)
    assert answer.generation_tokens >= 1 and session.cache[0].offset == len(session.tokens)


def test_clear_forgets_the_conversation(loaded):
    model, processor = loaded
    session = ChatSession(model, processor, system="Be brief.")
    session.send("Hi", max_tokens=3, temperature=0.0)
    session.clear()
    assert session.tokens == [] and session.cache[0].offset == 0
    assert session.messages == [{"role": "system", "content": "Be brief."}]


def test_prompt_over_the_context_is_a_clear_error(loaded):
    model, processor = loaded
    limit = model.args.text.max_position_embeddings
    model.args.text.max_position_embeddings = 32
    try:
        with pytest.raises(InputError, match=r"needs \d+ tokens of context but the model holds 32"):
            generate(model, processor, "word " * 40, max_tokens=4)
    finally:
        model.args.text.max_position_embeddings = limit


def test_stop_strings_and_seeded_sampling(loaded):
    model, processor = loaded
    greedy = generate(model, processor, "Count to ten.", max_tokens=16, temperature=0.0)
    assert len(greedy.text) > 2
    stop = greedy.text[1:3]
    stopped = generate(model, processor, "Count to ten.", max_tokens=16, temperature=0.0, stop=[stop])
    assert stopped.finish_reason == "stop" and stop not in stopped.text
    assert greedy.text.startswith(stopped.text)
    a = generate(model, processor, "Count to ten.", max_tokens=8, temperature=1.0, seed=7)
    b = generate(model, processor, "Count to ten.", max_tokens=8, temperature=1.0, seed=7)
    assert a.tokens == b.tokens


def test_quantized_and_rotating_kv_caches(tmp_path):
    from processor_fixtures import make_model_dir
    from reference import make_reference, save_reference, tiny_config

    # Head dim 32: the smallest that a quantized KV cache (group size 32) accepts.
    config = tiny_config(num_attention_heads=2, num_key_value_heads=1,
                         rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})
    folder = make_model_dir(save_reference(make_reference(config, seed=4), tmp_path / "m", config))
    model, processor = load(folder, dtype=mx.float32)
    images = [random_image(84, 84, 5)]
    base = generate(model, processor, "What is this?", images=images, max_tokens=6, temperature=0.0)
    quantized = generate(model, processor, "What is this?", images=images, max_tokens=6,
                         temperature=0.0, kv_bits=8, kv_group_size=32)
    # 8-bit keys/values perturb the logits slightly; the first greedy choice survives.
    assert quantized.tokens[0] == base.tokens[0]
    rotating = generate(model, processor, "What is this?", images=images, max_tokens=6,
                        temperature=0.0, max_kv_size=4096)
    assert rotating.tokens == base.tokens


def test_quantized_cache_with_rotating_cache_is_refused(loaded):
    model, processor = loaded
    with pytest.raises(InputError, match="cannot be combined with max_kv_size"):
        generate(model, processor, "Hi", max_tokens=2, kv_bits=4, max_kv_size=64)


def test_float16_vision_tower_stays_finite_and_close(tiny_reference):
    """float16 runs the vision MLP and merger in float32 (they overflow float16 on real images)."""
    from mlx_qwenvl.loading import load_model
    from reference import rel_error
    from test_model_parity import make_inputs

    inputs = make_inputs([("image", (1, 10, 14))])
    fp32 = load_model(tiny_reference[1], dtype=mx.float32)
    fp16 = load_model(tiny_reference[1], dtype=mx.float16)
    pixels, grid = mx.array(inputs["pixel_values"]), inputs["image_grid_thw"]
    ours = fp16.vision_tower(pixels, grid)
    assert ours.dtype == mx.float16 and bool(mx.isfinite(ours).all())
    assert rel_error(ours.astype(mx.float32), fp32.vision_tower(pixels, grid)) <= 1e-2
