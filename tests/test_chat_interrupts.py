"""Ctrl-C inside a forward pass: ``ChatSession`` trims every layer's cache to the conversation.

An interruption between tokens leaves every layer holding the same tokens; one raised inside a
forward pass leaves the layers before it holding more than the layers after it. Here it is
raised from inside the last decoder layer (the earlier layers have already taken the tokens),
in a prefill chunk, on the last prompt token and while decoding. Afterwards every layer must
hold exactly the session's tokens, and the next turn must equal a cold run of the whole
conversation on an empty cache.
"""

import numpy as np
import pytest

from mlx_qwenvl.chat import ChatSession
from mlx_qwenvl.generate import make_cache, stream_tokens
from processor_fixtures import conversation_inputs, random_image
from reference import rel_error

OPTIONS = dict(max_tokens=8, temperature=0.0, prefill_step_size=8)


def interrupt_inside_the_last_layer(patch, model, session, several_tokens: bool, nth: int) -> list:
    """Raise KeyboardInterrupt in the last decoder layer, before it runs, on its ``nth`` call
    with a prompt chunk (``several_tokens``) or with one token. Returns the list that receives
    every layer's cache offset at that moment."""
    layer_class = type(model.layers[-1])
    original = layer_class.__call__
    calls, uneven = [], []

    def call(self, x, *args, **kwargs):
        if self is model.layers[-1] and (x.shape[1] > 1) == several_tokens:
            calls.append(x.shape[1])
            if len(calls) == nth:
                uneven.append([layer.offset for layer in session.cache])
                raise KeyboardInterrupt
        return original(self, x, *args, **kwargs)

    patch.setattr(layer_class, "__call__", call)
    return uneven


def cold_run(model, processor, tokens, images):
    """The answer to ``tokens`` (a whole conversation with its ``images``) on an empty cache."""
    return list(stream_tokens(model, processor, conversation_inputs(processor, tokens, images),
                              make_cache(model), **OPTIONS))


def assert_equals_cold_run(model, processor, session, answer, images):
    held = len(session.tokens) - len(answer)
    cold = cold_run(model, processor, session.tokens[:held], images)
    assert [r.token for r in answer] == [r.token for r in cold]
    ours, theirs = (np.stack([np.array(r.logprobs, dtype=np.float64) for r in rs]) for rs in (answer, cold))
    ours, theirs = ours - ours.mean(-1, keepdims=True), theirs - theirs.mean(-1, keepdims=True)
    assert rel_error(ours, theirs) <= 1e-4


@pytest.mark.parametrize("several_tokens, nth", [(True, 2), (False, 1)],
                         ids=["in-a-prefill-chunk", "on-the-last-prompt-token"])
def test_interrupted_prefill_undoes_the_turn_in_every_layer(several_tokens, nth, loaded, monkeypatch):
    model, processor = loaded
    first, second = random_image(56, 112, 31), random_image(112, 84, 32)
    session = ChatSession(model, processor)
    session.send("What is in this image?", images=[first], **OPTIONS)
    tokens, messages, delta = list(session.tokens), list(session.messages), session.cache.rope_delta

    with monkeypatch.context() as patch:
        uneven = interrupt_inside_the_last_layer(patch, model, session, several_tokens, nth)
        received = []
        with pytest.raises(KeyboardInterrupt):
            for response in session.stream("And how does this one differ?", images=[second], **OPTIONS):
                received.append(response.token)
    assert received == [] and len(set(uneven[0])) > 1, uneven  # stopped mid-pass, before the answer
    assert session.tokens == tokens and session.messages == messages
    assert [layer.offset for layer in session.cache] == [len(tokens)] * len(model.layers)
    assert session.cache.rope_delta == delta

    answer = list(session.stream("And how does this one differ?", images=[second], **OPTIONS))
    assert_equals_cold_run(model, processor, session, answer, [first, second])


def test_interrupted_decoding_keeps_the_answer_so_far_in_every_layer(loaded, monkeypatch):
    model, processor = loaded
    first, second = random_image(84, 84, 33), random_image(56, 140, 34)
    session = ChatSession(model, processor)
    session.send("What is in this image?", images=[first], **OPTIONS)
    before = len(session.tokens)

    with monkeypatch.context() as patch:
        uneven = interrupt_inside_the_last_layer(patch, model, session, several_tokens=False, nth=4)
        received = []
        with pytest.raises(KeyboardInterrupt):
            for response in session.stream("Compare it with this one.", images=[second], **OPTIONS):
                received.append(response.token)
    assert len(received) >= 1 and len(set(uneven[0])) > 1, (received, uneven)
    assert session.tokens[-len(received):] == received and len(session.tokens) > before + len(received)
    assert [layer.offset for layer in session.cache] == [len(session.tokens)] * len(model.layers)
    assert session.messages[-1]["role"] == "assistant"

    answer = list(session.stream("Go on.", **OPTIONS))
    assert_equals_cold_run(model, processor, session, answer, [first, second])
