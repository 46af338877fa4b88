"""Text generation from image/video prompts, reusing mlx-lm's decoding loop, samplers and caches."""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .errors import InputError

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass
class GenerationResponse:
    """One streamed piece, with running figures as mlx-lm reports them."""

    text: str
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: Optional[str] = None


@dataclass
class GenerationResult:
    text: str
    tokens: List[int]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: Optional[str]


@dataclass
class SamplingDefaults:
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    repetition_penalty: Optional[float] = None
    eos_token_ids: set = field(default_factory=set)

    @classmethod
    def from_folder(cls, path) -> "SamplingDefaults":
        """Defaults from ``generation_config.json``; greedy when it is absent or says so."""
        file = Path(path) / "generation_config.json" if path else None
        if file is None or not file.is_file():
            return cls()
        config = json.loads(file.read_text())
        eos = config.get("eos_token_id")
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if not config.get("do_sample", False):
            return cls(eos_token_ids=eos, repetition_penalty=config.get("repetition_penalty"))
        return cls(
            temperature=float(config.get("temperature", 1.0)),
            top_p=float(config.get("top_p", 0.0) or 0.0),
            top_k=int(config.get("top_k", 0) or 0),
            repetition_penalty=config.get("repetition_penalty"),
            eos_token_ids=eos,
        )


def stop_token_ids(processor) -> set:
    """Every end-of-sequence id: the tokenizer's, generation_config's, <|im_end|> and <|endoftext|>."""
    tokenizer = processor.tokenizer
    ids = set(tokenizer.eos_token_ids) | processor.sampling_defaults.eos_token_ids
    vocab = tokenizer.get_vocab()
    ids |= {vocab[token] for token in STOP_TOKENS if token in vocab}
    return ids


def _sampling(processor, temperature, top_p, top_k, min_p, repetition_penalty):
    defaults = processor.sampling_defaults
    sampler = make_sampler(
        temp=defaults.temperature if temperature is None else temperature,
        top_p=defaults.top_p if top_p is None else top_p,
        top_k=defaults.top_k if top_k is None else top_k,
        min_p=min_p,
    )
    penalty = defaults.repetition_penalty if repetition_penalty is None else repetition_penalty
    processors = make_logits_processors(repetition_penalty=penalty) if penalty and penalty != 1.0 else None
    return sampler, processors


def with_prompt_context(processors, prompt_ids, keep: int = 256):
    prefix = mx.array(prompt_ids[-keep:].astype(np.int32))
    return [lambda tokens, logits, p=p: p(mx.concatenate([prefix, tokens]), logits) for p in processors]


def context_length(model) -> int:
    return model.args.text.max_position_embeddings


def stream_tokens(
    model,
    processor,
    inputs: dict,
    prompt_cache: list,
    *,
    max_tokens: int = 256,
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    min_p: float = 0.0,
    repetition_penalty: Optional[float] = None,
    seed: Optional[int] = None,
    stop: Optional[List[str]] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    prefill_step_size: int = 2048,
) -> Iterator[GenerationResponse]:
    """Continue ``prompt_cache`` with processed ``inputs`` and stream the answer."""
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
    if seed is not None:
        mx.random.seed(seed)
    sampler, logits_processors = _sampling(processor, temperature, top_p, top_k, min_p, repetition_penalty)
    if logits_processors:
        # mlx-lm's loop only sees the last prompt token: let the penalties see the prompt too.
        logits_processors = with_prompt_context(logits_processors, ids[0, :-1])
    stop_ids = stop_token_ids(processor)
    detokenizer = processor.tokenizer.detokenizer
    detokenizer.reset()
    mx.reset_peak_memory()

    tic = time.perf_counter()
    # Vision and M-RoPE positions are handled here; mlx-lm's loop then decodes from the last
    # prompt token, each step taking the text path at cache length + rope delta.
    if ids.shape[1] > 1:
        model.prefill(ids[:, :-1], prompt_cache, chunk_size=prefill_step_size, **vision)
    steps = generate_step(
        mx.array(ids[0, -1:]),
        model,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=logits_processors,
        prompt_cache=prompt_cache,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=0,
    )
    prompt_tokens = ids.shape[1]
    prompt_tps = generation_tic = None
    text = ""
    for n, (token, _) in enumerate(steps):
        token = int(token)
        if n == 0:
            prompt_tps = prompt_tokens / (time.perf_counter() - tic)
            generation_tic = time.perf_counter()
        finish = None
        if token in stop_ids:
            finish = "stop"
        elif n + 1 >= max_tokens:
            finish = "length"
        piece = ""
        if token not in stop_ids:
            detokenizer.add_token(token)
            piece = detokenizer.last_segment
        if finish:
            detokenizer.finalize()
            piece += detokenizer.last_segment
        text += piece
        hit = next((s for s in stop or () if s in text), None)
        if hit:
            cut = text.index(hit)
            piece = piece[: max(0, len(piece) - (len(text) - cut))]
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
        )
        if finish:
            break


def make_cache(model, max_kv_size: Optional[int] = None) -> list:
    return make_prompt_cache(model, max_kv_size=max_kv_size)


def stream_generate(
    model,
    processor,
    prompt,
    images=None,
    videos=None,
    *,
    max_kv_size: Optional[int] = None,
    min_pixels: Optional[int] = None,
    max_pixels: Optional[int] = None,
    **kwargs,
) -> Iterator[GenerationResponse]:
    """Stream an answer to ``prompt`` (a string or chat messages) with optional images/videos.

    Keyword arguments: max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed,
    stop, kv_bits, kv_group_size, prefill_step_size.
    """
    inputs = processor(prompt, images=images, videos=videos, min_pixels=min_pixels, max_pixels=max_pixels)
    yield from stream_tokens(model, processor, inputs, make_cache(model, max_kv_size), **kwargs)


def collect(responses) -> GenerationResult:
    text, tokens, last = "", [], None
    for last in responses:
        text += last.text
        tokens.append(last.token)
    if last is None:
        raise InputError("no tokens were generated (max_tokens must be at least 1)")
    return GenerationResult(
        text=text,
        tokens=tokens,
        prompt_tokens=last.prompt_tokens,
        prompt_tps=last.prompt_tps,
        generation_tokens=last.generation_tokens,
        generation_tps=last.generation_tps,
        peak_memory=last.peak_memory,
        finish_reason=last.finish_reason,
    )


def generate(model, processor, prompt, images=None, videos=None, **kwargs) -> GenerationResult:
    """The whole answer with its figures; see ``stream_generate`` for the arguments."""
    return collect(stream_generate(model, processor, prompt, images, videos, **kwargs))
