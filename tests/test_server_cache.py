"""The server's conversation cache (issue 18): a conversation resent whole, image included,
prefills only its new turn, never encodes the image again, and answers as a cold run does;
the cache's LRU, prefix copies and image keys on their own."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwenvl.generate import generate, stream_generate
from mlx_qwenvl.loading import load
from mlx_qwenvl.server_cache import ConversationCache, copy_prefix
from mlx_qwenvl.vision import VisionModel
from server_support import QUESTION, data_uri, inprocess_server, post

QUESTIONS = [QUESTION, "What shape is it?", "How many circles are there?"]


@pytest.fixture(scope="module")
def demo():
    return load("demo")


@pytest.fixture
def vision_calls(monkeypatch):
    """Every grid the vision tower encodes, in any thread."""
    calls = []
    original = VisionModel.__call__

    def counting(self, pixels, grid, *args, **kwargs):
        calls.append(np.asarray(grid).tolist())
        return original(self, pixels, grid, *args, **kwargs)

    monkeypatch.setattr(VisionModel, "__call__", counting)
    return calls


def openai_turns(answers: list, image_url: str, **part_options) -> list:
    """The conversation as clients send it: the whole history, the image in turn 1."""
    content = [{"type": "image_url", "image_url": {"url": image_url}, **part_options},
               {"type": "text", "text": QUESTIONS[0]}]
    messages = [{"role": "user", "content": content}]
    for answer, question in zip(answers, QUESTIONS[1:]):
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]
    return messages


def reference_turns(answers: list, image_url: str) -> list:
    """The same conversation in the processor's format, for ``generate()``."""
    messages = [{"role": "user", "content": [{"type": "image", "image": image_url},
                                             {"type": "text", "text": QUESTIONS[0]}]}]
    for answer, question in zip(answers, QUESTIONS[1:]):
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]
    return messages


def cold_runs(model, processor, image_url: str, turns: int, max_tokens: int, **options) -> list:
    """Each turn answered from scratch (a new cache) with the earlier cold answers as history;
    ``(result, first-token logprob)`` per turn."""
    answers, results = [], []
    for _ in range(turns):
        messages = reference_turns(answers, image_url)
        result = generate(model, processor, messages, max_tokens=max_tokens, temperature=0.0, **options)
        first = next(stream_generate(model, processor, messages, max_tokens=1, temperature=0.0, **options))
        results.append((result, first.logprobs[first.token].item()))
        answers.append(result.text)
    return results


def ask(server, messages, max_tokens, **body):
    status, _, answer = post(server, {"model": "x", "messages": messages, "max_tokens": max_tokens,
                                      "temperature": 0, "logprobs": True, **body})
    assert status == 200, answer
    return answer


@pytest.fixture
def pixel_rows(monkeypatch):
    """Every image the server turns into pixel rows."""
    import mlx_qwenvl.server_prompts as prompts

    made = []
    original = prompts.process_images

    def counting(images, *args, **kwargs):
        made.append([image.size for image in images])
        return original(images, *args, **kwargs)

    monkeypatch.setattr(prompts, "process_images", counting)
    return made


def test_three_turns_prefill_only_the_new_turn(demo, vision_calls, pixel_rows):
    """Turns 2 and 3 reuse everything the cache holds (the previous prompt and answer), equal
    the cold runs token for token (and in the first token's log-probability, which a wrong
    M-RoPE offset would move), and the image is encoded once (its pixel rows made once)."""
    model, processor = demo
    url = data_uri()
    cold = cold_runs(model, processor, url, 3, 8)
    assert cold[0][0].text == "red"
    vision_calls.clear()
    with inprocess_server(model, processor) as server:
        answers, previous = [], None
        for turn in range(3):
            answer = ask(server, openai_turns(answers, url), 8)
            (result, first_logprob), usage = cold[turn], answer["usage"]
            text = answer["choices"][0]["message"]["content"]
            assert text == result.text and usage["completion_tokens"] == len(result.tokens)
            assert usage["prompt_tokens"] == result.prompt_tokens
            assert answer["choices"][0]["logprobs"]["content"][0]["logprob"] == pytest.approx(first_logprob, abs=1e-4)
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            if previous is None:
                assert cached == 0
            else:
                # Everything the previous turn left in the cache: its prompt and its answer
                # (ending in <|im_end|>, which the template renders the same way).
                assert cached >= previous["prompt_tokens"] + previous["completion_tokens"] - 1
            previous = usage
            answers.append(text)
        stats = server.app.worker.stats
    assert len(vision_calls) == 1, vision_calls
    assert stats["images_encoded"] == 1 and stats["vision_encodes"] == 1
    assert len(pixel_rows) == 1, pixel_rows


def test_prompts_equal_the_processors(demo):
    """The server's prompts (placeholders expanded from the sizes, rows made apart) are the
    processor's own: same ids, same pixel rows, same grids, with per-image bounds."""
    from mlx_qwenvl.server_prompts import PromptBuilder
    from mlx_qwenvl.server_requests import MediaPolicy, parse_chat_request
    from processor_fixtures import random_image

    model, processor = demo
    big, small = random_image(300, 500, seed=1), random_image(120, 90, seed=2)
    content = [{"type": "image_url", "image_url": {"url": png_uri(big), "detail": "low"}},
               {"type": "text", "text": "Compare"},
               {"type": "image_url", "image_url": {"url": png_uri(small)}, "min_pixels": 50000},
               {"type": "text", "text": "these."}]
    request = parse_chat_request({"messages": [{"role": "user", "content": content}], "max_pixels": 200000}, 8)
    prompt = PromptBuilder(processor, model.args, MediaPolicy()).build(request)
    reference = processor([{"role": "user", "content": [
        {"type": "image", "image": big, "min_pixels": processor.min_pixels, "max_pixels": 200000},
        {"type": "text", "text": "Compare"},
        {"type": "image", "image": small, "min_pixels": 50000, "max_pixels": 200000},
        {"type": "text", "text": "these."}]}])
    np.testing.assert_array_equal(prompt.ids, reference["input_ids"][0])
    inputs = prompt.inputs_after(0)
    np.testing.assert_array_equal(inputs["image_grid_thw"], reference["image_grid_thw"])
    np.testing.assert_array_equal(inputs["pixel_values"], reference["pixel_values"])
    assert [item.start for item in prompt.images] == [
        int(np.flatnonzero(reference["input_ids"][0] == model.args.image_token_id)[0]),
        int(np.flatnonzero(reference["input_ids"][0] == model.args.image_token_id)[prompt.images[0].tokens])]
    assert (prompt.key < 0).sum() == sum(item.tokens for item in prompt.images)


def test_streamed_conversation_as_open_webui(demo, vision_calls):
    """Open WebUI's shape: streaming, include_usage, every turn resending the image."""
    from server_support import sse_events, stream_text

    model, processor = demo
    url = data_uri()
    with inprocess_server(model, processor) as server:
        answers, cached = [], []
        for turn in range(3):
            status, _, data = post(server, {"messages": openai_turns(answers, url), "stream": True,
                                            "stream_options": {"include_usage": True}, "max_tokens": 8})
            assert status == 200
            events, _ = sse_events(data)
            answers.append(stream_text(events))
            cached.append(events[-2]["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert answers[0] == "red"
    assert cached[0] == 0 and cached[1] > 80 and cached[2] > cached[1]
    assert len(vision_calls) == 1


def test_resize_settings_are_part_of_the_key(demo, vision_calls):
    """The same picture at another max_pixels is encoded again and answered as a cold run at
    that size; at the first size again, it is not encoded again."""
    model, processor = demo
    url = data_uri()
    small = 45000
    with inprocess_server(model, processor) as server:
        first = ask(server, openai_turns([], url), 4)
        resized = ask(server, openai_turns([], url, max_pixels=small), 4, top_logprobs=5)
        again = ask(server, openai_turns([], url), 4)
        stats = dict(server.app.worker.stats)
    server_calls = list(vision_calls)  # the server's; generate() below encodes too
    reference = generate(model, processor, reference_turns([], url), max_tokens=4, temperature=0.0,
                         max_pixels=small)
    head = next(stream_generate(model, processor, reference_turns([], url), max_tokens=1, temperature=0.0,
                                max_pixels=small))
    assert resized["usage"]["prompt_tokens"] == reference.prompt_tokens != first["usage"]["prompt_tokens"]
    assert resized["choices"][0]["message"]["content"] == reference.text
    # The resized request continues a copy of the first one's cache cut before its image: the
    # copy must have that prefix's M-RoPE offset, not the offset after the first image. The
    # answer is near certain; the alternatives' log-probabilities show the positions.
    top = resized["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    expected = [head.logprobs[processor.tokenizer.encode(entry["token"])[0]].item() for entry in top]
    assert [entry["logprob"] for entry in top] == pytest.approx(expected, abs=1e-3)
    assert resized["usage"]["prompt_tokens_details"]["cached_tokens"] < 20  # only the system prompt
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
    assert stats["images_encoded"] == 2
    assert len(server_calls) == 2 and server_calls[0] != server_calls[1]  # two sizes, each encoded once


def test_another_image_of_the_same_size_is_encoded(demo, vision_calls):
    """Another picture of the same size at the same place has the same placeholder run: only
    its content id tells it apart, so it is encoded and answered anew (green, not red)."""
    import base64
    import io

    from PIL import Image

    from server_support import RED_CIRCLE

    model, processor = demo
    red, green, blue = Image.open(RED_CIRCLE).convert("RGB").split()
    buffer = io.BytesIO()
    Image.merge("RGB", (green, red, blue)).save(buffer, format="PNG")  # the circle turns green
    green_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    reference = generate(model, processor, reference_turns([], green_url), max_tokens=4, temperature=0.0)
    assert reference.text == "green"
    vision_calls.clear()
    with inprocess_server(model, processor) as server:
        first = ask(server, openai_turns([], data_uri()), 4)
        second = ask(server, openai_turns([], green_url), 4)
        encoded = server.app.worker.stats["images_encoded"]
    assert first["choices"][0]["message"]["content"] == "red"
    assert second["choices"][0]["message"]["content"] == "green"
    assert first["usage"]["prompt_tokens"] == second["usage"]["prompt_tokens"]
    assert encoded == 2 and len(vision_calls) == 2


# --------------------------------------------------------------------------------------------
# The cache on its own


def filled_cache(model, ids):
    cache = model.make_cache()
    model.prefill(mx.array(np.asarray(ids, dtype=np.int32)[None]), cache)
    return cache


def test_copy_prefix_leaves_the_original_untouched(demo):
    """A KV cache writes into its arrays in place: a copy extended after trimming must not
    write into the cache it came from."""
    model, _ = demo
    cache = filled_cache(model, list(range(100, 140)))
    before = [np.array(layer.keys[..., :40, :]) for layer in cache]
    twin = copy_prefix(cache, 10)
    assert twin.offset == 10 and cache.offset == 40
    model.prefill(mx.array(np.arange(500, 530, dtype=np.int32)[None]), twin)
    assert twin.offset == 40
    for layer, keys in zip(cache, before):
        np.testing.assert_array_equal(np.array(layer.keys[..., :40, :]), keys)


def test_copy_prefix_before_an_image_has_that_prefix_offset(demo):
    """A copy cut before a cached image forgets it: M-RoPE offset 0 again, no vision call."""
    from mlx_qwenvl.server_prompts import PromptBuilder
    from mlx_qwenvl.server_requests import MediaPolicy, parse_chat_request

    model, processor = demo
    builder = PromptBuilder(processor, model.args, MediaPolicy())
    prompt = builder.build(parse_chat_request({"messages": openai_turns([], data_uri())}, 8))
    cache = model.make_cache()
    inputs = prompt.inputs_after(0)
    model.prefill(mx.array(prompt.ids[None, :-1]), cache, pixel_values=inputs["pixel_values"],
                  image_grid_thw=inputs["image_grid_thw"])
    assert cache.rope_delta < 0 and len(cache.vision_calls) == 1
    start = prompt.images[0].start
    before = copy_prefix(cache, start)
    assert (before.offset, before.rope_delta, before.vision_calls) == (start, 0, [])
    after = copy_prefix(cache, start + prompt.images[0].tokens + 2)
    assert after.rope_delta == cache.rope_delta and after.vision_calls == cache.vision_calls
    assert cache.rope_delta < 0 and len(cache.vision_calls) == 1  # the original is untouched


def test_fetch_takes_prefixes_and_copies_longer_entries(demo):
    model, _ = demo
    store = ConversationCache(max_entries=4)
    key = np.arange(1000, 1030, dtype=np.int64)
    store.store(key, filled_cache(model, key))
    # A request extending the entry takes it over (no copy).
    longer = np.concatenate([key, [7, 8, 9]])
    cache, kept = store.fetch(longer, model.make_cache)
    assert kept == 30 and len(store) == 0
    store.store(key, cache)
    # A request that branches inside it gets a trimmed copy; the entry stays.
    branch = np.concatenate([key[:20], [5, 6]])
    cache, kept = store.fetch(branch, model.make_cache)
    assert kept == 20 and cache.offset == 20 and len(store) == 1
    # The same prompt again: at least one token is left to feed.
    cache, kept = store.fetch(key, model.make_cache)
    assert kept == 29 and cache.offset == 29
    # Nothing in common: a new cache.
    cache, kept = store.fetch(np.arange(1, 5), model.make_cache)
    assert kept == 0 and cache.offset == 0


def test_bounds_and_prefix_entries(demo):
    model, _ = demo
    store = ConversationCache(max_entries=2)
    keys = [np.arange(start, start + 10, dtype=np.int64) for start in (100, 200, 300)]
    for key in keys:
        store.store(key, filled_cache(model, key))
    assert len(store) == 2
    assert store.fetch(keys[0], model.make_cache)[1] == 0  # the oldest went
    longer = np.concatenate([keys[2], [1, 2, 3]])
    store.store(longer, filled_cache(model, longer))  # its prefix entry is dropped
    assert len(store) == 2 and sorted(len(e.key) for e in store.entries.values()) == [10, 13]
    one = filled_cache(model, keys[0])
    small = ConversationCache(max_entries=10, max_bytes=sum(layer.nbytes for layer in one) * 3 // 2)
    for key in keys:
        small.store(key, filled_cache(model, key))
    assert len(small) == 1 and small.nbytes <= small.max_bytes
    off = ConversationCache(max_entries=0)
    off.store(keys[0], one)
    assert len(off) == 0


def test_kept_prefix_never_ends_inside_an_image(demo):
    """A prompt that shares a prefix ending inside a cached image keeps only what is before it."""
    from mlx_qwenvl.server_prompts import PromptBuilder
    from mlx_qwenvl.server_requests import MediaPolicy, parse_chat_request

    model, processor = demo
    builder = PromptBuilder(processor, model.args, MediaPolicy())
    prompt = builder.build(parse_chat_request({"messages": openai_turns([], data_uri())}, 8))
    image = prompt.images[0]
    cache = model.make_cache()
    inputs = prompt.inputs_after(0)
    model.prefill(mx.array(prompt.ids[None, :-1]), cache, pixel_values=inputs["pixel_values"],
                  image_grid_thw=inputs["image_grid_thw"])
    store = ConversationCache()
    store.store(prompt.key[:-1], cache)
    # The same picture's run, cut short: the request's key shares part of it.
    cut = np.concatenate([prompt.key[:image.start + 5], [42, 43]])
    _, kept = store.fetch(cut, model.make_cache)
    assert kept == image.start
    with pytest.raises(ValueError, match="inside an image"):
        prompt.inputs_after(image.start + 5)
    after = prompt.inputs_after(image.start + image.tokens)
    assert after["pixel_values"] is None and after["input_ids"].shape[1] == len(prompt) - image.start - image.tokens


# --------------------------------------------------------------------------------------------
# Longer answers, penalties, videos, image options


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load(tiny_model_dir, dtype=mx.float32)


def test_random_model_conversation_equals_cold_runs_with_a_penalty(tiny, vision_calls):
    """Twelve-token answers of a random model (any error in positions or cached keys changes
    them) with a repetition penalty, which must see the whole conversation as the cold run's
    does (earlier turns included): three turns equal three cold runs."""
    from processor_fixtures import random_image

    model, processor = tiny
    image = random_image(112, 140, seed=3)
    import io
    import base64

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    cold = cold_runs(model, processor, url, 3, 12, repetition_penalty=1.3)
    vision_calls.clear()
    with inprocess_server(model, processor) as server:
        answers, cached = [], []
        for turn in range(3):
            answer = ask(server, openai_turns(answers, url), 12, repetition_penalty=1.3)
            text = answer["choices"][0]["message"]["content"]
            assert text == cold[turn][0].text, turn
            assert answer["usage"]["completion_tokens"] == len(cold[turn][0].tokens)
            cached.append(answer["usage"]["prompt_tokens_details"]["cached_tokens"])
            answers.append(text)
    assert cached[0] == 0 and cached[1] > 0 and cached[2] > cached[1]
    assert len(vision_calls) == 1


def png_uri(image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_branch_before_an_image_equals_a_cold_run(tiny):
    """A new conversation that shares only the system prompt with a cached one (another
    image right after it) continues a copy cut before the cached image, which must carry the
    M-RoPE offset of that prefix, not the one after the image: a random model's answer shows
    any position error."""
    from processor_fixtures import random_image

    model, processor = tiny
    first, second = png_uri(random_image(112, 140, seed=7)), png_uri(random_image(84, 196, seed=8))
    cold = cold_runs(model, processor, second, 1, 12)[0][0]
    with inprocess_server(model, processor) as server:
        ask(server, openai_turns([], first), 12)
        answer = ask(server, openai_turns([], second), 12)
    assert 0 < answer["usage"]["prompt_tokens_details"]["cached_tokens"] < 30  # the system prompt
    assert answer["choices"][0]["message"]["content"] == cold.text


def frame_uris(count: int) -> list:
    import base64
    import io

    from processor_fixtures import random_image

    uris = []
    for i in range(count):
        buffer = io.BytesIO()
        random_image(84, 112, seed=40 + i).save(buffer, format="PNG")
        uris.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return uris


def test_video_frames_are_encoded_once(demo, vision_calls):
    """A video sent as a list of frame URLs answers as generate() does with those frames, and
    a follow-up turn resending it does not encode it again."""
    model, processor = demo
    frames = frame_uris(4)
    part = {"type": "video", "video": frames}
    first = [{"role": "user", "content": [part, {"type": "text", "text": "What is this?"}]}]
    reference = generate(model, processor, [{"role": "user", "content": [
        {"type": "video", "video": frames}, {"type": "text", "text": "What is this?"}]}], max_tokens=4,
        temperature=0.0)
    vision_calls.clear()
    with inprocess_server(model, processor) as server:
        answer = ask(server, first, 4)
        assert answer["choices"][0]["message"]["content"] == reference.text
        assert answer["usage"]["prompt_tokens"] == reference.prompt_tokens
        follow = first + [{"role": "assistant", "content": reference.text}, {"role": "user", "content": "And now?"}]
        again = ask(server, follow, 4)
        stats = server.app.worker.stats
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= reference.prompt_tokens
    assert stats["videos_encoded"] == 1 and len(vision_calls) == 1


def test_detail_low_and_pixel_bounds(demo):
    """detail=low caps an image at 256 tokens; min/max_pixels apply from the request's top
    level and from the part, the part winning."""
    import base64
    import io

    from mlx_qwenvl.server_prompts import PromptBuilder
    from mlx_qwenvl.server_requests import MediaPolicy, parse_chat_request
    from processor_fixtures import random_image

    model, processor = demo
    buffer = io.BytesIO()
    random_image(700, 900, seed=5).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    builder = PromptBuilder(processor, model.args, MediaPolicy())

    def tokens(part_options=None, **body):
        part = {"type": "image_url", "image_url": {"url": url, **(part_options or {})}}
        request = parse_chat_request({"messages": [{"role": "user", "content": [part]}], **body}, 8)
        return builder.build(request).images[0].tokens

    assert tokens() <= 81  # the demo's own max_pixels, 63504
    assert tokens(max_pixels=1_000_000) == 800  # 700x900 at 28-px patches: 25 x 32
    assert tokens({"detail": "low"}, max_pixels=1_000_000) <= 256
    assert tokens({"max_pixels": 200_000}, max_pixels=1_000_000) <= 256
    assert tokens({"detail": "high"}, max_pixels=1_000_000) == tokens(max_pixels=1_000_000)


def test_quantized_kv_cache_is_kept_and_copied(demo):
    """With --kv-bits the cached layers are quantized ones: continued, and copied when a
    request branches off them (the same question again)."""
    model, processor = demo
    url = data_uri()
    with inprocess_server(model, processor, kv_bits=8, kv_group_size=32, quantized_kv_start=0) as server:
        first = ask(server, openai_turns([], url), 4)
        again = ask(server, openai_turns([], url), 4)
        follow = ask(server, openai_turns(["red"], url), 4)
        layers = {type(layer).__name__ for entry in server.app.worker.cache.entries.values() for layer in entry.cache}
    assert first["choices"][0]["message"]["content"] == again["choices"][0]["message"]["content"] == "red"
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
    assert follow["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["total_tokens"] - 1
    assert layers == {"QuantizedKVCache"}
