"""Conversation state lives in the cache (issue 18): one model serves interleaved
conversations, and trimming a cache restores the M-RoPE offset of the prefix it keeps."""

import pytest

from mlx_qwenvl.generate import generate, make_cache, stream_generate
from mlx_qwenvl.model import PromptCache
from processor_fixtures import random_image


def test_interleaved_conversations_on_one_model(loaded):
    """Two image prompts decoded step by step in turns give each its own answer."""
    model, processor = loaded
    prompts = [("Describe this picture.", [random_image(84, 140, 21)]), ("What is here?", [random_image(140, 56, 22)])]
    alone = [generate(model, processor, text, images=images, max_tokens=16, temperature=0.0).tokens
             for text, images in prompts]
    streams = [stream_generate(model, processor, text, images=images, max_tokens=16, temperature=0.0)
               for text, images in prompts]
    interleaved = [[], []]
    for _ in range(16):
        for i, stream in enumerate(streams):
            response = next(stream, None)
            if response is not None:
                interleaved[i].append(response.token)
    assert interleaved == alone
    assert alone[0] != alone[1]


def test_trim_restores_the_offset_of_the_prefix(loaded):
    model, processor = loaded
    cache = make_cache(model)
    assert isinstance(cache, PromptCache) and cache.rope_delta == 0
    text = processor("Hello there, how are you?")
    image = processor("What is this?", images=[random_image(112, 168, 23)])
    model.prefill(text["input_ids"], cache)
    before = cache.offset
    model.prefill(image["input_ids"], cache, pixel_values=image["pixel_values"],
                  image_grid_thw=image["image_grid_thw"])
    assert cache.rope_delta < 0  # a 4x6 merged grid advances positions by 6, not 24
    start, end, _ = cache.vision_calls[-1]
    assert before < start < end < cache.offset
    assert cache.safe_length(start + 3) == start and cache.safe_length(end + 1) == end + 1
    with pytest.raises(ValueError, match="inside an image"):
        cache.trim(start + 3)
    cache.trim(end + 2)
    assert cache.offset == end + 2 and cache.rope_delta < 0
    cache.trim(start)
    assert cache.offset == start and cache.rope_delta == 0 and cache.vision_calls == []
    assert all(layer.offset == start for layer in cache)


@pytest.mark.slow  # loads the model twice (~6 s)
def test_a_model_loaded_on_one_thread_answers_on_another(tiny_model_dir):
    """MLX runs a lazy array on the stream of the thread that made it: every array the model
    holds is evaluated at load, so a server's worker thread (or an app's) can use it."""
    import threading

    import mlx.core as mx

    from mlx_qwenvl.loading import load

    model, processor = load(tiny_model_dir, dtype=mx.float32)
    here = generate(model, processor, "What is this?", images=[random_image(56, 84, 24)], max_tokens=4,
                    temperature=0.0)
    model, processor = load(tiny_model_dir, dtype=mx.float32)  # fresh: nothing run on this thread
    results, errors = [], []

    def worker():
        try:
            results.append(generate(model, processor, "What is this?", images=[random_image(56, 84, 24)],
                                    max_tokens=4, temperature=0.0).tokens)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(120)
    assert not errors, errors
    assert results == [here.tokens]
