"""Issue 15 faults in generation: the repetition penalty over the whole sequence, stop strings
that span tokens, the exact answer text, out-of-range sampling options, quantized KV caches
the model cannot use, and media left attached after a turn undone by Ctrl-C."""

import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_qwenvl import cli
from mlx_qwenvl.chat import ChatSession
from mlx_qwenvl.errors import InputError
from mlx_qwenvl.generate import AnswerText, generate, make_penalty, stream_generate
from processor_fixtures import conversation_inputs, random_image
from reference import STOP, reference_inputs

COMMAND = [sys.executable, "-m", "mlx_qwenvl"]


def reference_tokens(ref, inputs, max_new_tokens, **options) -> list:
    with torch.no_grad():
        out = ref.generate(**reference_inputs(inputs), max_new_tokens=max_new_tokens, do_sample=False,
                           eos_token_id=STOP, pad_token_id=151643, **options)
    return out[0, inputs["input_ids"].shape[1]:].cpu().tolist()


# ---- 1. the repetition penalty sees the whole prompt and the whole answer

def test_penalty_logits_equal_transformers_over_a_long_sequence():
    """Every distinct id of a 3000-id sequence is penalized, as transformers does; mlx-lm's
    default would cover only the last 20."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, 3000)
    logits = rng.normal(0, 2, (1, 1000)).astype(np.float32)
    expected = RepetitionPenaltyLogitsProcessor(1.05)(torch.from_numpy(ids[None]), torch.from_numpy(logits))
    penalty = make_penalty(1.05, ids[:-10])  # the prompt part; the loop hands over the rest
    ours = penalty(mx.array(ids[-10:].astype(np.int32)), mx.array(logits))
    assert np.abs(np.array(ours) - expected.numpy()).max() <= 1e-6
    assert not np.allclose(np.array(ours), logits)  # the penalty did something


def test_penalty_context_size_limits_to_the_last_ids():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    ids = np.arange(50)
    logits = np.linspace(-3, 3, 100, dtype=np.float32)[None]
    penalty = make_penalty(1.3, ids[:-1], context_size=20)
    ours = np.array(penalty(mx.array(ids[-1:].astype(np.int32)), mx.array(logits)))
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.from_numpy(ids[None, -20:]), torch.from_numpy(logits))
    assert np.abs(ours - expected.numpy()).max() <= 1e-6


@pytest.mark.slow  # 100-token greedy runs of the reference
@pytest.mark.parametrize("penalty", [1.05, 1.3])
def test_penalized_greedy_matches_reference_over_100_tokens(penalty, loaded, tiny_reference):
    model, processor = loaded
    images = [random_image(84, 140, 11)]
    prompt = "Describe this picture in great detail, please."
    result = generate(model, processor, prompt, images=images, max_tokens=110, temperature=0.0,
                      repetition_penalty=penalty)
    expected = reference_tokens(tiny_reference[0], processor(prompt, images=images), 110,
                                repetition_penalty=penalty)
    assert len(expected) >= 100
    assert result.tokens == expected
    print(f"penalty {penalty}: {len(expected)} greedy tokens equal the reference's")


@pytest.mark.slow  # 100-token greedy runs of the reference
def test_penalty_from_generation_config_reaches_stream_generate(loaded, tiny_reference):
    model, processor = loaded
    prompt = "Write a long poem about rivers."
    saved = processor.sampling_defaults.repetition_penalty
    processor.sampling_defaults.repetition_penalty = 1.3
    try:
        tokens = [r.token for r in stream_generate(model, processor, prompt, max_tokens=100, temperature=0.0)]
    finally:
        processor.sampling_defaults.repetition_penalty = saved
    expected = reference_tokens(tiny_reference[0], processor(prompt), 100, repetition_penalty=1.3)
    assert len(expected) >= 100 and tokens == expected
    print(f"generation_config penalty 1.3: {len(expected)} tokens equal")


@pytest.mark.slow  # 100-token greedy runs of the reference
def test_penalized_chat_second_turn_sees_the_earlier_turns(loaded, tiny_reference):
    model, processor = loaded
    first, second = random_image(56, 112, 12), random_image(112, 84, 13)
    session = ChatSession(model, processor)
    session.send("What is in this image?", images=[first], max_tokens=30, temperature=0.0,
                 repetition_penalty=1.3)
    held = len(session.tokens)
    turn2 = session.send("And this one?", images=[second], max_tokens=60, temperature=0.0,
                         repetition_penalty=1.3)
    # The reference is given the whole conversation in one prompt, both images included.
    inputs = conversation_inputs(processor, session.tokens[: held + session.last_prefill_tokens], [first, second])
    expected = reference_tokens(tiny_reference[0], inputs, 60, repetition_penalty=1.3)
    assert len(expected) >= 50
    assert turn2.tokens == expected
    print(f"chat turn 2, penalty 1.3: {len(expected)} tokens equal")


# ---- 2. stop strings never leak, whatever tokens they span

def cut_at_first(text, stops):
    found = [text.find(s) for s in stops if s in text]
    return text[: min(found)] if found else text


@pytest.fixture(scope="module")
def greedy_answer(loaded):
    model, processor = loaded
    result = generate(model, processor, "Tell me a story about a cat.", max_tokens=40, temperature=0.0)
    tokens = [t for t in result.tokens if t not in STOP]
    pieces = [processor.tokenizer.decode([t]) for t in tokens]
    return result, pieces


def stop_cases(pieces):
    """Stop strings over two and three tokens, inside one token, absent, and a prefix of another."""
    clean = [i for i, p in enumerate(pieces) if len(p) >= 3 and "\ufffd" not in p]
    pairs = [i for i in clean if i + 1 in clean]
    triples = [i for i in pairs if i + 2 in clean]
    assert pairs and triples, pieces
    i, j = pairs[len(pairs) // 2], triples[0]
    two = pieces[i][-2:] + pieces[i + 1][:2]
    three = pieces[j][-1] + pieces[j + 1] + pieces[j + 2][:1]
    inside = pieces[clean[-1]][1:-1]
    return {
        "two tokens": [two],
        "three tokens": [three],
        "inside a token": [inside],
        "never occurs": ["\x07never\x07"],
        "prefix of another": [three, three[:2]],
    }


def test_stop_strings_spanning_tokens_never_leak(loaded, greedy_answer):
    model, processor = loaded
    full, pieces = greedy_answer
    assert full.text == "".join(pieces)
    for name, stops in stop_cases(pieces).items():
        streamed = list(stream_generate(model, processor, "Tell me a story about a cat.", max_tokens=40,
                                        temperature=0.0, stop=stops))
        text = "".join(r.text for r in streamed)
        collected = generate(model, processor, "Tell me a story about a cat.", max_tokens=40,
                             temperature=0.0, stop=stops)
        expected = cut_at_first(full.text, stops)
        assert text == collected.text == expected, name
        assert collected.finish_reason == (full.finish_reason if name == "never occurs" else "stop"), name


def test_text_that_cannot_begin_a_stop_string_is_not_delayed(loaded, greedy_answer):
    model, processor = loaded
    plain = [r.text for r in stream_generate(model, processor, "Tell me a story about a cat.",
                                             max_tokens=40, temperature=0.0)]
    held = [r.text for r in stream_generate(model, processor, "Tell me a story about a cat.",
                                            max_tokens=40, temperature=0.0, stop=["\x07never"])]
    assert held == plain


def test_answer_text_holds_only_what_may_begin_a_stop_string(loaded):
    tokenizer = loaded[1].tokenizer
    ids = tokenizer.encode(" The quick brown fox", add_special_tokens=False)
    text = AnswerText(tokenizer, stop=[" brown cow"])
    released = [text.add(t) for t in ids]
    # " brown" may begin the stop string until " fox" settles it.
    assert released[:2] == [" The", " quick"] and released[2] == ""
    assert released[3] == " brown fox" and not text.stopped


# ---- 6. the answer text equals tokenizer.decode of the answer's ids

def test_text_keeps_the_first_tokens_leading_space(loaded):
    tokenizer = loaded[1].tokenizer
    ids = tokenizer.encode(" Hello world", add_special_tokens=False)
    text = AnswerText(tokenizer)
    streamed = "".join(text.add(t) for t in ids) + text.add(None, final=True)
    assert streamed == tokenizer.decode(ids) == " Hello world"


def test_generated_text_equals_decode_of_its_tokens(loaded):
    model, processor = loaded
    spaced = 0
    for prompt in ("Hi", "Tell me a story about a cat.", "Count to ten.", "What is 2+2?", "Name a colour"):
        result = generate(model, processor, prompt, max_tokens=12, temperature=0.0)
        tokens = [t for t in result.tokens if t not in STOP]
        assert result.text == processor.tokenizer.decode(tokens), prompt
        spaced += processor.tokenizer.decode(tokens[:1]).startswith(" ")
    assert spaced  # at least one answer starts with a space: the case that was trimmed


@pytest.mark.parametrize("option, value, pattern", [
    ("temperature", -1.0, r"temperature \(--temp\) must be 0 \(greedy\) or more, got -1.0"),
    ("top_p", 0.0, r"top_p \(--top-p\) must be in \(0, 1\]"),
    ("top_p", 1.5, r"top_p \(--top-p\) must be in \(0, 1\]"),
    ("top_k", -3, r"top_k \(--top-k\) must be 0 \(off\) or more"),
    ("min_p", 1.5, r"min_p \(--min-p\) must be in \[0, 1\]"),
    ("min_p", -0.1, r"min_p \(--min-p\) must be in \[0, 1\]"),
    ("repetition_penalty", -1.0, r"repetition_penalty \(--repetition-penalty\) must be more than 0"),
])
def test_out_of_range_sampling_options_are_refused(option, value, pattern, loaded):
    model, processor = loaded
    with pytest.raises(InputError, match=pattern):
        generate(model, processor, "Hi", max_tokens=2, **{option: value})


def test_top_k_above_the_vocabulary_keeps_every_token(loaded):
    """transformers' TopKLogitsWarper clamps top_k to the vocabulary: nothing is filtered."""
    model, processor = loaded
    vocab = model.args.text.vocab_size
    wide = generate(model, processor, "Hi", max_tokens=8, temperature=1.0, seed=3, top_k=vocab + 100)
    plain = generate(model, processor, "Hi", max_tokens=8, temperature=1.0, seed=3, top_k=0)
    assert wide.tokens == plain.tokens


def test_kv_bits_on_a_head_size_it_cannot_split(loaded):
    model, processor = loaded  # head size 16: no group size of a quantized cache divides it
    with pytest.raises(InputError, match=r"must divide the model's head size 16: this model cannot"):
        generate(model, processor, "Hi", max_tokens=2, kv_bits=4)


@pytest.mark.parametrize("args, pattern", [
    (["--temp", "-1"], r"^error: temperature \(--temp\) must be 0 \(greedy\) or more, got -1.0$"),
    (["--top-p", "0"], r"^error: top_p \(--top-p\) must be in \(0, 1\], got 0.0$"),
    (["--kv-bits", "4"], r"^error: kv_bits \(--kv-bits\) quantizes .* head size 16: this model cannot use"),
])
def test_cli_names_the_option_in_one_line(args, pattern, tiny_model_dir):
    import re

    result = subprocess.run([*COMMAND, "generate", "--model", str(tiny_model_dir), "--prompt", "hi",
                             "--max-tokens", "2", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), result.stderr


# ---- 6. media attached to a turn that Ctrl-C undid during prefill

CHAT_OPTIONS = dict(max_tokens=4, temperature=0.0, top_p=None, top_k=None, min_p=0.0,
                    repetition_penalty=None, seed=None, stop=(), kv_bits=None, kv_group_size=64,
                    quantized_kv_start=5000, prefill_step_size=2048)


def test_ctrl_c_during_prefill_says_the_image_is_still_attached(loaded, monkeypatch, capsys, tmp_path):
    model, processor = loaded
    photo = tmp_path / "photo.png"
    random_image(56, 56, 14).save(photo)
    session = ChatSession(model, processor)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    pending = {"images": [str(photo)], "videos": []}
    with monkeypatch.context() as patch:
        patch.setattr(model, "prefill", interrupted)
        cli.answer_turn(session, "What is this?", pending, CHAT_OPTIONS)
    out = capsys.readouterr().out
    assert "(stopped)" in out and "(1 image still attached to your next question" in out
    assert pending["images"] == [str(photo)] and session.messages == [] and session.tokens == []

    # The next question takes it, and then it is gone.
    cli.answer_turn(session, "And now?", pending, CHAT_OPTIONS)
    assert pending["images"] == [] and "still attached" not in capsys.readouterr().out
    assert session.messages[0]["content"][0] == {"type": "image", "image": str(photo)}


def test_a_failed_turn_says_its_media_were_dropped(loaded, capsys, tmp_path):
    model, processor = loaded
    photo = tmp_path / "photo.png"
    random_image(56, 56, 15).save(photo)
    session = ChatSession(model, processor)
    pending = {"images": [str(photo), str(photo)], "videos": []}
    cli.answer_turn(session, "What is this?", pending, dict(CHAT_OPTIONS, kv_bits=4))
    captured = capsys.readouterr()
    assert "error: kv_bits (--kv-bits) quantizes" in captured.err
    assert "(2 images dropped; attach again with /image or /video)" in captured.out
    assert pending["images"] == []
