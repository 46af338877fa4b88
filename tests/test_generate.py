"""generate / stream_generate / ChatSession against the reference's generate()."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_qwenvl.chat import ChatSession
from mlx_qwenvl.errors import InputError
from mlx_qwenvl.generate import generate, make_cache, stream_generate, stream_tokens
from mlx_qwenvl.loading import load
from processor_fixtures import conversation_inputs, make_model_dir, random_image
from reference import (STOP, make_reference, reference_generate, reference_inputs, reference_logits, rel_error,
                       save_reference, script_answer, tiny_config, to_torch)


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
    inputs = conversation_inputs(processor, session.tokens[: held + session.last_prefill_tokens], [first, second])
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


def test_quantized_kv_cache_keeps_the_first_greedy_token(tmp_path):
    # Head dim 32: the smallest that a quantized KV cache (group size 32) accepts.
    config = tiny_config(num_attention_heads=2, num_key_value_heads=1,
                         rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})
    folder = make_model_dir(save_reference(make_reference(config, seed=4), tmp_path / "m", config))
    model, processor = load(folder, dtype=mx.float32)
    images = [random_image(84, 84, 5)]
    base = list(stream_generate(model, processor, "What is this?", images=images, max_tokens=6, temperature=0.0))
    # quantized_kv_start=0: quantized from the first token (mlx-lm's default waits for 5000).
    quantized = list(stream_generate(model, processor, "What is this?", images=images, max_tokens=6,
                                     temperature=0.0, kv_bits=8, kv_group_size=32, quantized_kv_start=0))
    # The first greedy choice is made before the cache is quantized (mlx-lm quantizes after each
    # step) and survives; the next step reads 8-bit keys/values, which perturb its
    # log-probabilities slightly (so the cache was quantized).
    assert quantized[0].token == base[0].token
    error = rel_error(quantized[1].logprobs, base[1].logprobs)
    print(f"8-bit KV cache: second-step logprobs rel error {error:.2e}")
    assert 0 < error <= 1e-2


def centered(logits):
    """Logits or log-probabilities less their mean over the vocabulary: equal for both."""
    logits = np.asarray(logits, dtype=np.float64)
    return logits - logits.mean(axis=-1, keepdims=True)


def test_rotating_kv_cache_equals_the_reference_under_the_same_window(loaded, tiny_reference):
    """max_kv_size keeps mlx-lm's RotatingKVCache(max_size=W, keep=4): keys are stored already
    rotated at their absolute positions, and once W tokens are held each new token overwrites
    the oldest after the first 4. A decoded token at position p >= W therefore attends to
    positions 0-3 and the W - 4 most recent ones (itself included). The reference given the same
    window is transformers on the whole sequence at its M-RoPE positions under exactly that
    attention mask. The prompt fits the window (its prefill is plain causal attention); the
    answer runs past it, so most steps decode on a rotated cache."""
    model, processor = loaded
    ref = tiny_reference[0]
    prompt, images = "Write a long story about this picture.", [random_image(84, 84, 5)]
    inputs = processor(prompt, images=images)
    length = inputs["input_ids"].shape[1]
    window, steps = length + 4, 28
    responses = list(stream_generate(model, processor, prompt, images=images, max_tokens=steps,
                                     temperature=0.0, max_kv_size=window))
    tokens = [r.token for r in responses]
    assert len(tokens) == steps, tokens  # no stop token: every step decoded

    sequence = np.concatenate([inputs["input_ids"][0], tokens[:-1]])[None]
    types = (sequence == 151655).astype(np.int64)
    positions, _ = ref.model.get_rope_index(to_torch(sequence), to_torch(types),
                                            to_torch(inputs["image_grid_thw"]))
    positions = positions[:, 0].cpu().numpy()
    query, key = np.arange(sequence.shape[1])[:, None], np.arange(sequence.shape[1])[None]
    windowed = (key <= query) & ((query < window) | (key < 4) | (query - key < window - 4))
    rotated = np.arange(length - 1, sequence.shape[1]) >= window  # the decoding queries past W
    assert rotated.sum() >= steps - 8

    expected = reference_logits(ref, sequence, positions, inputs, allowed=windowed)[0, length - 1:]
    ours = np.stack([np.array(r.logprobs) for r in responses])
    error = rel_error(centered(ours), centered(expected))
    assert tokens == expected.argmax(axis=-1).tolist()
    assert error <= 1e-4, error

    # The window matters: under plain causal attention the rotated steps' logits differ.
    full = reference_logits(ref, sequence, positions, inputs)[0, length - 1:]
    gap = rel_error(centered(full[rotated]), centered(expected[rotated]))
    print(f"window {window} for {sequence.shape[1]} tokens: rel error {error:.1e} against the windowed "
          f"reference, {gap:.1e} between windowed and full attention")
    assert gap > 100 * error and gap > 1e-3


def test_quantized_cache_with_rotating_cache_is_refused(loaded):
    model, processor = loaded
    with pytest.raises(InputError, match="cannot be combined with max_kv_size"):
        generate(model, processor, "Hi", max_tokens=2, kv_bits=4, max_kv_size=64)


def test_float16_vision_tower_stays_finite_and_close(tmp_path):
    """float16 runs the vision MLP and merger in float32: on real images their hidden
    activations pass float16's largest value, 65504 (mlx-vlm #745, transformers #33294). Here
    one hidden unit of the last block's MLP (gate and up ~300, product ~9e4) and one of the
    merger's first linear (~1e5) do; their outputs fit float16 again. The float32 reference,
    with weights that float16 holds exactly, is the answer."""
    from mlx_qwenvl.loading import load_model
    from test_model_parity import make_inputs

    config = tiny_config()
    ref = make_reference(config, seed=6)
    visual = ref.model.visual
    with torch.no_grad():
        mlp = visual.blocks[-1].mlp
        mlp.gate_proj.bias[0] = mlp.up_proj.bias[0] = 300.0
        mlp.down_proj.weight[:, 0] = 0.0
        mlp.down_proj.weight[0, 0] = 2.0**-9  # ~180 on channel 0 of every patch
        first, last = visual.merger.mlp[0], visual.merger.mlp[2]
        first.weight[0, ::config["vision_config"]["hidden_size"]] = 4000.0  # channel 0 of the 4 merged patches
        last.weight[:, 0] = 0.0
        last.weight[0, 0] = 2.0**-11
        for param in ref.parameters():
            param.copy_(param.half().float())
    peaks = {}

    def peak(name):
        return lambda module, args: peaks.__setitem__(name, float(args[0].abs().max()))

    hooks = [mlp.down_proj.register_forward_pre_hook(peak("mlp")),
             visual.merger.mlp[1].register_forward_pre_hook(peak("merger"))]
    inputs = make_inputs([("image", (1, 10, 14))])
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    with torch.no_grad():
        expected = visual(to_torch(pixels), grid_thw=to_torch(grid)).pooler_output.cpu().numpy()
    for hook in hooks:
        hook.remove()
    assert min(peaks.values()) > 1.2 * float(np.finfo(np.float16).max), peaks
    assert np.abs(expected).max() < 1000

    fp16 = load_model(save_reference(ref, tmp_path / "m", config), dtype=mx.float16)
    ours = fp16.vision_tower(mx.array(pixels), grid)
    assert ours.dtype == mx.float16 and bool(mx.isfinite(ours).all())
    error = rel_error(ours.astype(mx.float32), expected)
    print(f"hidden peaks {peaks}; float16 tower against the float32 reference: {error:.1e}")
    assert error <= 1e-2


# ---- every end-of-sequence token ends an answer

HELLO, WORLD, BANG = 21927, 1879, 0  # " Hello", " world", "!"


@pytest.mark.parametrize("stop", STOP, ids=["im_end", "endoftext"])
def test_each_stop_token_ends_the_answer(stop, tmp_path):
    """A model scripted to answer " Hello", then ``stop``, then " world!": generation ends at
    the stop token, whichever of <|im_end|> and <|endoftext|> it is."""
    config = tiny_config()
    ref = script_answer(make_reference(config, seed=7), [HELLO, stop, WORLD, BANG])
    model, processor = load(make_model_dir(save_reference(ref, tmp_path / "m", config)), dtype=mx.float32)
    inputs = processor("Say hello.")
    with torch.no_grad():  # past the stop token the script goes on
        unstopped = ref.generate(**reference_inputs(inputs), max_new_tokens=4,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
    assert unstopped[0, inputs["input_ids"].shape[1]:].tolist() == [HELLO, stop, WORLD, BANG]
    assert reference_generate(ref, inputs, 8) == [HELLO, stop]

    result = generate(model, processor, "Say hello.", max_tokens=8, temperature=0.0)
    assert result.tokens == [HELLO, stop], result.tokens
    assert result.finish_reason == "stop" and result.text == " Hello"
    session = ChatSession(model, processor)
    assert session.send("Say hello.", max_tokens=8, temperature=0.0).tokens == [HELLO, stop]
