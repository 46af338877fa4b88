"""Text generation from image/video prompts, reusing mlx-lm's decoding loop, samplers and caches."""

import functools
import inspect
import time
from dataclasses import dataclass, fields
from typing import Callable, Iterator, List, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.generate import (DEFAULT_QUANTIZED_KV_START, generate_step, generation_stream, maybe_quantize_kv_cache,
                             wired_limit)
from mlx_lm.models.cache import RotatingKVCache
from mlx_lm.sample_utils import make_repetition_penalty, make_sampler
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

from .config import SamplingDefaults
from .errors import InputError

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass
class GenerationResponse:
    """One streamed piece, with running figures, as mlx-lm's ``GenerationResponse``.

    ``logprobs`` is the (vocab,) float array of log-probabilities the token was chosen from
    (after the repetition penalty, before temperature and filters, as in mlx-lm);
    ``cached_tokens`` is how many prompt tokens came from the cache (earlier chat turns).
    Rates are tokens per second; ``peak_memory`` is in GB.
    """

    text: str
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: Optional[str] = None
    logprobs: Optional[mx.array] = None
    from_draft: bool = False
    cached_tokens: int = 0


@dataclass
class GenerationResult:
    """A whole answer: its text, token ids and the last response's figures."""

    text: str
    tokens: List[int]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: Optional[str]
    cached_tokens: int = 0


def stop_token_ids(processor) -> set:
    """Every end-of-sequence id: the tokenizer's, generation_config's, <|im_end|> and <|endoftext|>."""
    tokenizer = processor.tokenizer
    ids = set(tokenizer.eos_token_ids) | processor.sampling_defaults.eos_token_ids
    # One lookup per token: get_vocab() builds a 151k-entry dict (~0.08 s) on every call.
    found = [tokenizer.convert_tokens_to_ids(token) for token in STOP_TOKENS]
    return ids | {i for i in found if i is not None and i != tokenizer.unk_token_id}


# Each sampling option: its CLI flag, what it accepts and the rule in words.
SAMPLING_RULES = {
    "temperature": ("--temp", lambda v: v >= 0, "must be 0 (greedy) or more"),
    "top_p": ("--top-p", lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "top_k": ("--top-k", lambda v: v >= 0, "must be 0 (off) or more"),
    "min_p": ("--min-p", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "repetition_penalty": ("--repetition-penalty", lambda v: v > 0, "must be more than 0"),
    "seed": ("--seed", lambda v: 0 <= v < 2**64, "must be a whole number from 0 to 2**64 - 1"),
}


def check_sampling(**values) -> None:
    """Refuse values that mlx-lm's samplers would take silently (a negative temperature samples
    from the inverted distribution) or fail on obscurely; None means unset.

    Raises:
        InputError: the first value outside its range, naming the option.
    """
    for name, value in values.items():
        flag, ok, rule = SAMPLING_RULES[name]
        if value is not None and not ok(value):
            raise InputError(f"{name} ({flag}) {rule}, got {value}")


def make_penalty(penalty: Optional[float], context_ids: Sequence[int],
                 context_size: Optional[int] = None):
    """transformers' repetition penalty, by default over the whole sequence.

    transformers' ``RepetitionPenaltyLogitsProcessor`` divides (multiplies, when negative) the
    logit of every distinct id in ``input_ids``: the whole prompt, earlier turns included, and
    the answer so far. mlx-lm's loop hands its processors only the last prompt token and the
    answer, so ``context_ids`` (every id before the last prompt token) is prepended on the
    device; distinct ids only, so a long prompt costs at most one gather over the vocabulary.
    ``context_size`` limits the penalty to the last that many ids, as mlx-lm's option.

    Returns None when there is no penalty (None or 1.0).
    """
    if penalty is None or penalty == 1.0:
        return None
    ids = np.asarray(context_ids, dtype=np.int32).reshape(-1)
    if context_size is None:
        prefix, size = np.unique(ids), None
    else:
        prefix, size = ids[max(0, len(ids) - context_size):], context_size
    prefix = mx.array(prefix)
    # A context size beyond any sequence: mlx-lm's processor then keeps every id it is given.
    penalize = make_repetition_penalty(penalty, context_size=size or 2**31 - 1)

    def processor(tokens, logits):
        return penalize(mx.concatenate([prefix, tokens]), logits)

    return processor


def _sampling(processor, model, temperature, top_p, top_k, min_p):
    defaults: SamplingDefaults = processor.sampling_defaults
    temperature = defaults.temperature if temperature is None else temperature
    top_p = defaults.top_p if top_p is None else top_p
    top_k = defaults.top_k if top_k is None else top_k
    check_sampling(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    # transformers' TopKLogitsWarper keeps min(top_k, vocabulary): a larger top_k filters nothing.
    if top_k >= model.args.text.vocab_size:
        top_k = 0
    return make_sampler(temp=temperature, top_p=top_p, top_k=top_k, min_p=min_p)


KV_GROUP_SIZES = (32, 64, 128)  # what MLX's affine quantization takes


def kv_group_size_for(model, kv_bits: Optional[int], kv_group_size: Optional[int]) -> int:
    """The KV cache's quantization group size: as given, else mlx-lm's 64 where it divides the
    head size (keys and values are quantized along it), else the largest size that does.

    Raises:
        InputError: ``kv_bits`` is set and the group size does not divide the head size.
    """
    head_dim = model.args.text.head_dim
    fits = [size for size in KV_GROUP_SIZES if head_dim % size == 0]
    if kv_group_size is None:
        kv_group_size = 64 if 64 in fits or not fits else fits[-1]
    if kv_bits is None or head_dim % kv_group_size == 0:
        return kv_group_size
    advice = (f"use kv_group_size (--kv-group-size) {fits[-1]}" if fits
              else "this model cannot use a quantized KV cache; leave kv_bits (--kv-bits) unset")
    raise InputError(
        f"kv_bits (--kv-bits) quantizes keys and values in groups of kv_group_size "
        f"(--kv-group-size) {kv_group_size}, which must divide the model's head size {head_dim}: {advice}"
    )


def exact_detokenizer(tokenizer):
    """mlx-lm's streaming detokenizer without its trim of the first token's leading space, so
    the streamed text equals ``tokenizer.decode`` of the same ids."""
    detokenizer = tokenizer.detokenizer  # a fresh copy per access
    if hasattr(detokenizer, "trim_space"):  # SPM
        detokenizer.trim_space = False
    if isinstance(detokenizer, BPEStreamingDetokenizer):
        detokenizer._maybe_trim_space = lambda text: text
    return detokenizer


class AnswerText:
    """The answer's text as it may be released: exact detokenization, and never a character
    of a stop string. Text that could still begin a stop string is held until the next
    tokens settle it; any other text is released at once."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.detokenizer = exact_detokenizer(tokenizer)
        self.stop = [s for s in stop or () if s]
        self.held = ""
        self.stopped = False  # a stop string completed

    def add(self, token: Optional[int], final: bool = False) -> str:
        """Add ``token`` (None: no text, e.g. an end-of-sequence id) and return the text it
        releases; ``final`` releases everything that is not part of a stop string."""
        if token is not None:
            self.detokenizer.add_token(token)
        if final:
            self.detokenizer.finalize()
        self.held += self.detokenizer.last_segment
        found = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if found:
            self.stopped = True
            released, self.held = self.held[: min(found)], ""
            return released
        keep = 0 if final else _stop_prefix_length(self.held, self.stop)
        released, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep:]
        return released


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of ``text`` that begins some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def context_length(model) -> int:
    return model.args.text.max_position_embeddings


def stream_tokens(
    model,
    processor,
    inputs: dict,
    prompt_cache: list,
    *,
    history: Sequence[int] = (),
    max_tokens: int = 256,
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    min_p: float = 0.0,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: Optional[int] = None,
    seed: Optional[int] = None,
    stop: Optional[List[str]] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: Optional[int] = None,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
    prefill_step_size: int = 2048,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
) -> Iterator[GenerationResponse]:
    """Continue ``prompt_cache`` with processed ``inputs`` and stream the answer.

    ``history`` is the ids ``prompt_cache`` already holds (earlier turns): the repetition
    penalty sees them, as the reference does when given the whole conversation.
    ``kv_bits`` quantizes the KV cache once it holds ``quantized_kv_start`` tokens (mlx-lm's
    default 5000). ``prompt_progress_callback(processed, total)`` is called as the new prompt
    tokens are prefilled, as in mlx-lm.

    Raises:
        InputError: the prompt is empty, ends in an image or video, or does not fit the
            context; a sampling option is out of range; kv_bits cannot be used here.
    """
    ids = np.asarray(inputs["input_ids"]).reshape(1, -1)
    offset = prompt_cache[0].offset
    total = offset + ids.shape[1]
    if total >= context_length(model):
        raise InputError(
            f"the prompt needs {total} tokens of context but the model holds {context_length(model)}"
        )
    if ids.shape[1] == 0:
        raise InputError("the prompt is empty")
    vision = {k: inputs.get(k) for k in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                         "video_grid_thw", "second_per_grid_ts")}
    if ids[0, -1] in (model.args.image_token_id, model.args.video_token_id):
        raise InputError("the prompt must end with text after its last image or video")
    if kv_bits is not None and any(isinstance(c, RotatingKVCache) for c in prompt_cache):
        raise InputError("a quantized KV cache (kv_bits) cannot be combined with max_kv_size")
    kv_group_size = kv_group_size_for(model, kv_bits, kv_group_size)
    sampler = _sampling(processor, model, temperature, top_p, top_k, min_p)
    if repetition_penalty is None:
        repetition_penalty = processor.sampling_defaults.repetition_penalty
    check_sampling(repetition_penalty=repetition_penalty, seed=seed)
    # mlx-lm's loop only sees the last prompt token: the penalty gets the rest from here.
    context_ids = np.concatenate([np.asarray(history, dtype=np.int64), ids[0, :-1]])
    penalty = make_penalty(repetition_penalty, context_ids, repetition_context_size)
    if seed is not None:
        mx.random.seed(seed)
    stop_ids = stop_token_ids(processor)
    text = AnswerText(processor.tokenizer, stop)
    mx.reset_peak_memory()

    with wired_limit(model, [generation_stream]):
        yield from _decode(model, ids, vision, prompt_cache, text, stop_ids, max_tokens=max_tokens,
                           sampler=sampler, logits_processors=[penalty] if penalty else None,
                           kv_bits=kv_bits, kv_group_size=kv_group_size,
                           quantized_kv_start=quantized_kv_start, prefill_step_size=prefill_step_size,
                           progress=prompt_progress_callback or (lambda *_: None))


def _decode(model, ids, vision, prompt_cache, text, stop_ids, *, max_tokens, prefill_step_size,
            progress, **step_options) -> Iterator[GenerationResponse]:
    """Prefill all but the last prompt token here (vision and M-RoPE positions), then let
    mlx-lm's loop decode from the last one, each step on the text path at cache length +
    rope delta."""
    prompt_tokens, cached_tokens = ids.shape[1], prompt_cache[0].offset
    tic = time.perf_counter()
    progress(0, prompt_tokens)
    if ids.shape[1] > 1:
        quantize = functools.partial(maybe_quantize_kv_cache, quantized_kv_start=step_options["quantized_kv_start"],
                                     kv_group_size=step_options["kv_group_size"], kv_bits=step_options["kv_bits"])
        model.prefill(ids[:, :-1], prompt_cache, chunk_size=prefill_step_size, progress=progress, quantize=quantize,
                      **vision)
    steps = generate_step(mx.array(ids[0, -1:]), model, max_tokens=max_tokens,
                          prompt_cache=prompt_cache, **step_options)
    prompt_tps = generation_tic = None
    for n, (token, logprobs) in enumerate(steps):
        token = int(token)
        if n == 0:
            progress(prompt_tokens, prompt_tokens)
            prompt_tps = prompt_tokens / (time.perf_counter() - tic)
            generation_tic = time.perf_counter()
        end = token in stop_ids
        finish = "stop" if end else "length" if n + 1 >= max_tokens else None
        piece = text.add(None if end else token, final=finish is not None)
        if text.stopped:
            finish = "stop"
        elapsed = time.perf_counter() - generation_tic
        yield GenerationResponse(
            text=piece,
            token=token,
            prompt_tokens=prompt_tokens,
            prompt_tps=prompt_tps,
            generation_tokens=n + 1,
            generation_tps=(n + 1) / elapsed if elapsed > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
            logprobs=logprobs,
            cached_tokens=cached_tokens,
        )
        if finish:
            break


def make_cache(model, max_kv_size: Optional[int] = None):
    """A new conversation's ``PromptCache`` (KV caches plus its M-RoPE offset); rotating
    caches of ``max_kv_size`` tokens when given."""
    return model.make_cache(max_kv_size)


# A prompt already rendered by a chat template (mlx-vlm's apply_chat_template) is encoded as is.
RENDERED_MARK = "<|im_start|>"


def stream_generate(
    model,
    processor,
    prompt,
    images=None,
    videos=None,
    *,
    image=None,
    video=None,
    max_kv_size: Optional[int] = None,
    min_pixels: Optional[int] = None,
    max_pixels: Optional[int] = None,
    video_fps: Optional[float] = None,
    video_max_frames: Optional[int] = None,
    **kwargs,
) -> Iterator[GenerationResponse]:
    """Stream an answer to ``prompt`` with optional images/videos, as mlx-lm's ``stream_generate``.

    ``prompt`` is a question, chat messages (the reference format), or a prompt already rendered
    by the chat template (containing ``<|im_start|>``, as mlx-vlm's ``apply_chat_template``
    gives), encoded as is. ``images``/``videos``: sources as ``Processor.__call__`` takes them
    (paths, URLs, PIL images, ...); mlx-vlm's ``image=``/``video=``, one item or a list, are
    accepted too. ``min_pixels``/``max_pixels`` (area per image, in pixels), ``video_fps``
    (frames sampled per second) and ``video_max_frames``: see ``Processor.__call__``.
    ``max_kv_size``: a rotating KV cache of that many tokens (keeping the first 4), as mlx-lm's.

    Keyword options (``stream_tokens``'): max_tokens (256); temperature (or mlx-vlm's ``temp``),
    top_p, top_k and min_p (0) for mlx-lm's sampler (a top_k of at least the vocabulary filters
    nothing, as transformers' ``TopKLogitsWarper``); repetition_penalty (transformers'
    ``RepetitionPenaltyLogitsProcessor`` over the prompt and answer, see ``make_penalty``),
    repetition_context_size (None: the whole sequence); each unset one of temperature, top_p,
    top_k and repetition_penalty comes from generation_config.json (greedy without it); seed;
    stop (strings that end the answer, left out of its text); kv_bits, kv_group_size,
    quantized_kv_start (a quantized KV cache, as mlx-lm's); prefill_step_size (prompt tokens per
    prefill chunk); prompt_progress_callback(processed, total).

    Yields one ``GenerationResponse`` per generated token: ``text`` (the text it releases, maybe
    ""), ``token`` (int id), ``prompt_tokens``, ``prompt_tps`` and ``generation_tps`` (tokens per
    second), ``generation_tokens`` (so far), ``peak_memory`` (GB), ``logprobs`` (mx.array
    (vocab_size,) in the logits' dtype), ``cached_tokens`` (0: a fresh cache) and
    ``finish_reason``: None until the last, then "stop" (an end-of-sequence id: <|im_end|>,
    <|endoftext|>, the tokenizer's or generation_config.json's; or a stop string) or "length".

    Raises:
        InputError: unusable media, prompt or option (one line naming it); a prompt that does
            not fit the model's context.
        TypeError: an unknown keyword option.
    """
    images = media_list(images, image, "images", "image")
    videos = media_list(videos, video, "videos", "video")
    kwargs = generation_options(kwargs, "stream_generate")
    media = dict(min_pixels=min_pixels, max_pixels=max_pixels, video_fps=video_fps,
                 video_max_frames=video_max_frames)
    if isinstance(prompt, str) and RENDERED_MARK in prompt:
        inputs = processor.encode(prompt, images, videos, **media)
    else:
        inputs = processor(prompt, images=images, videos=videos, **media)
    yield from stream_tokens(model, processor, inputs, make_cache(model, max_kv_size), **kwargs)


def media_list(ours, theirs, name: str, alias: str) -> Optional[list]:
    """``images=`` or mlx-vlm's ``image=``, each one item or a list, as a list (None: neither).

    Raises:
        InputError: both were given.
    """
    if ours is not None and theirs is not None:
        raise InputError(f"pass either {name}= or {alias}=, not both")
    items = ours if ours is not None else theirs
    if items is None or isinstance(items, (list, tuple)):
        return items
    return [items]


def generation_options(options: dict, caller: str) -> dict:
    """``stream_tokens``' keyword options, with mlx-vlm's ``temp`` read as ``temperature``.

    Raises:
        TypeError: an option ``stream_tokens`` does not take, naming ``caller`` (the function
            the user called) as Python would.
    """
    options = dict(options)
    if "temp" in options:
        options.setdefault("temperature", options.pop("temp"))
    unknown = sorted(set(options) - _STREAM_OPTIONS)
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
    return options


def collect(responses) -> GenerationResult:
    text, tokens, last = "", [], None
    for last in responses:
        text += last.text
        tokens.append(last.token)
    if last is None:
        raise InputError("no tokens were generated (max_tokens must be at least 1)")
    figures = {f.name: getattr(last, f.name) for f in fields(GenerationResult) if f.name not in ("text", "tokens")}
    return GenerationResult(text=text, tokens=tokens, **figures)


def generate(model, processor, prompt, images=None, videos=None, *, verbose: bool = False,
             **kwargs) -> GenerationResult:
    """The whole answer with its figures, as mlx-lm's ``generate``; arguments as ``stream_generate``.

    ``verbose=True`` streams the text to stdout and then prints mlx-lm's statistics lines.

    Returns a ``GenerationResult``: ``text`` (stop strings left out), ``tokens`` (every generated
    id, the end-of-sequence id included when the answer ended on one), ``prompt_tokens``,
    ``generation_tokens``, ``prompt_tps`` and ``generation_tps`` (tokens per second),
    ``peak_memory`` (GB), ``finish_reason`` ("stop" or "length") and ``cached_tokens`` (0).

    Raises:
        InputError: as ``stream_generate``; also when no token was generated (max_tokens 0).
        TypeError: an unknown keyword option.
    """
    return collect_verbose(stream_generate(model, processor, prompt, images, videos, **kwargs), verbose)


def collect_verbose(responses, verbose: bool) -> GenerationResult:
    """``collect``; with ``verbose``, as mlx-lm's ``generate(verbose=True)`` prints: the text
    as it streams between two rules, then the statistics lines."""
    if not verbose:
        return collect(responses)
    print("=" * 10)
    result = collect(_echo(responses))
    print()
    print("=" * 10)
    print(statistics(result))
    return result


def _echo(responses):
    for response in responses:
        print(response.text, end="", flush=True)
        yield response


def statistics(response) -> str:
    """mlx-lm's three statistics lines, in its words, so scripts that parse them parse ours."""
    return (
        f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec\n"
        f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec\n"
        f"Peak memory: {response.peak_memory:.3f} GB"
    )


# The options every entry point passes through to stream_tokens (keyword-only, but ``history``,
# which belongs to the conversation).
_STREAM_OPTIONS = {name for name, parameter in inspect.signature(stream_tokens).parameters.items()
                   if parameter.kind is inspect.Parameter.KEYWORD_ONLY} - {"history"}
