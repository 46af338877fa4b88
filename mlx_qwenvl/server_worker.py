"""The server's worker thread: it owns the model and makes every MLX call (MLX streams are per
thread), serving queued jobs one at a time and reporting each job's progress, tokens and end
as events on the job's own queue.

An exception in one job is that job's error event; the worker goes on. Should the worker
itself die, every waiting job gets an error event and ``alive`` turns false (``/health`` 503).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import numpy as np

from .errors import InputError
from .generate import stop_token_ids, stream_tokens
from .server_cache import ConversationCache
from .server_prompts import Prompt
from .server_requests import APIError, busy, dead

log = logging.getLogger("mlx_qwenvl.server")


class Cancelled(Exception):
    """Raised inside generation when the job's client has gone."""


@dataclass
class Token:
    """One generated token as the HTTP side needs it: its text (possibly empty), whether it
    ended the answer as an end-of-sequence id, and its log-probability with the top
    alternatives ``[(id, logprob), ...]`` when asked for."""

    text: str
    token: int
    eos: bool
    finish_reason: Optional[str]
    logprob: Optional[float] = None
    top: list = field(default_factory=list)


@dataclass
class Job:
    """A request for the worker. ``events`` receives ``("progress", done, total)``,
    ``("token", Token)``, then ``("done", finish_reason, usage)`` or ``("error", APIError)``."""

    prompt: Prompt
    generation: dict
    logprobs: bool = False
    top_logprobs: int = 0
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Set by the worker: waiting, running, done, cancelled or failed; tokens generated so far.
    outcome: str = "waiting"
    generated: int = 0
    cached_tokens: int = 0

    def summary(self) -> dict:
        return {"outcome": self.outcome, "prompt_tokens": len(self.prompt),
                "cached_tokens": self.cached_tokens, "generated_tokens": self.generated}


@dataclass
class WorkerOptions:
    kv_bits: Optional[int] = None
    kv_group_size: Optional[int] = None
    quantized_kv_start: int = 5000
    prefill_step_size: int = 2048
    max_queue: int = 16


def evaluate_all(root) -> int:
    """Evaluate every array reachable from ``root`` (modules and the plain objects they hold),
    on the calling thread; returns how many.

    MLX runs an array's pending computation on the stream of the thread that created it, and
    a thread's streams are its own: an array left lazy by the loading thread (the M-RoPE
    frequencies of ``language.MRoPE`` and ``vision``, which are not parameters) fails with
    "There is no Stream(cpu, N) in current thread" when the worker thread first uses it.
    """
    arrays, seen, stack = [], set(), [root]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, mx.array):
            arrays.append(item)
            continue
        if isinstance(item, dict):  # nn.Module is a dict of its parameters and children
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        if hasattr(item, "__dict__") and type(item).__module__.startswith(("mlx_qwenvl", "mlx.nn", "mlx_lm")):
            stack.extend(vars(item).values())
    mx.eval(arrays)
    return len(arrays)


class Worker:
    """The thread that owns the model: takes jobs in order, at most ``max_queue`` waiting,
    and continues each prompt from the conversation cache."""

    def __init__(self, model, processor, cache: ConversationCache, options: WorkerOptions):
        """Must be created on the thread that loaded ``model`` (see ``evaluate_all``)."""
        self.model, self.processor, self.cache, self.options = model, processor, cache, options
        evaluate_all(model)
        self.stop_ids = stop_token_ids(processor)
        self._pending: collections.deque = collections.deque()
        self._condition = threading.Condition()
        self._stopping = False
        self._dead = False
        self.failure: Optional[BaseException] = None
        self.last_job: Optional[Job] = None
        # Counters for /health and the tests (read from other threads; ints only).
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "failed": 0,
                      "vision_encodes": 0, "images_encoded": 0, "videos_encoded": 0,
                      "prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0}
        self.thread = threading.Thread(target=self._run, name="mlx-qwenvl-worker", daemon=True)

    # ---- request threads

    def start(self) -> None:
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self._dead

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> None:
        """Queue ``job``.

        Raises:
            APIError: 503 when ``max_queue`` jobs already wait or the worker has died.
        """
        with self._condition:
            if not self.alive:
                raise dead()
            if len(self._pending) >= self.options.max_queue:
                raise busy(len(self._pending))
            self._pending.append(job)
            self._condition.notify()

    def stop(self, timeout: float = 10.0) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self.thread.join(timeout)

    # ---- the worker thread

    def _run(self) -> None:
        try:
            while True:
                job = self._next_job()
                if job is None:
                    return
                self._serve(job)
        except BaseException as error:  # noqa: BLE001 - recorded; /health turns 503
            self.failure = error
            log.exception("the generation worker died")
        finally:
            with self._condition:
                self._dead = True
                pending, self._pending = list(self._pending), collections.deque()
            for job in pending:
                job.events.put(("error", dead()))

    def _next_job(self) -> Optional[Job]:
        with self._condition:
            while not self._pending and not self._stopping:
                self._condition.wait()
            return None if self._stopping else self._pending.popleft()

    def _serve(self, job: Job) -> None:
        """One job; its failure is its error event (an out-of-memory image, a bad input)."""
        self.stats["requests"] += 1
        self.last_job = job
        job.outcome = "running"
        try:
            if job.cancelled.is_set():  # the client left while the job waited
                raise Cancelled()
            self._generate(job)
        except Cancelled:
            job.outcome = "cancelled"
        except Exception as error:  # noqa: BLE001 - one request's failure never ends the worker
            job.outcome = "failed"
            job.events.put(("error", as_api_error(error)))
        finally:
            counter = {"done": "completed", "cancelled": "cancelled", "failed": "failed"}.get(job.outcome)
            if counter:  # none when something the worker does not survive is on its way up
                self.stats[counter] += 1
            mx.clear_cache()  # give back the buffers of this job's temporaries

    def _generate(self, job: Job) -> None:
        prompt = job.prompt
        cache, kept = self.cache.fetch(prompt.key, self.model.make_cache)
        job.cached_tokens = kept
        inputs = prompt.inputs_after(kept)
        self._count_vision(inputs, len(prompt), kept)
        answer, finish = [], None

        def progress(done: int, total: int) -> None:
            if job.cancelled.is_set():
                raise Cancelled()
            job.events.put(("progress", done, total))

        tic = time.perf_counter()
        try:
            for response in stream_tokens(self.model, self.processor, inputs, cache,
                                          history=prompt.ids[:kept], prompt_progress_callback=progress,
                                          **self._options(job)):
                answer.append(response.token)
                job.generated = len(answer)
                finish = response.finish_reason
                job.events.put(("token", self._token(response, job)))
                if job.cancelled.is_set():
                    raise Cancelled()
        except Cancelled:
            self._keep(cache, prompt, answer)
            raise
        # A failed computation can leave unevaluable arrays in the cache: only a clean end or
        # a cancellation between steps stores it.
        self._keep(cache, prompt, answer)
        self.stats["generated_tokens"] += len(answer)
        usage = {"prompt_tokens": len(prompt), "completion_tokens": len(answer),
                 "cached_tokens": kept, "seconds": time.perf_counter() - tic}
        job.outcome = "done"
        job.events.put(("done", finish or "length", usage))

    def _options(self, job: Job) -> dict:
        o = self.options
        return dict(job.generation, kv_bits=o.kv_bits, kv_group_size=o.kv_group_size,
                    quantized_kv_start=o.quantized_kv_start, prefill_step_size=o.prefill_step_size)

    def _count_vision(self, inputs: dict, prompt_tokens: int, kept: int) -> None:
        images = 0 if inputs["image_grid_thw"] is None else len(inputs["image_grid_thw"])
        videos = 0 if inputs["video_grid_thw"] is None else len(inputs["video_grid_thw"])
        self.stats["vision_encodes"] += int(images + videos > 0)
        self.stats["images_encoded"] += images
        self.stats["videos_encoded"] += videos
        self.stats["prompt_tokens"] += prompt_tokens
        self.stats["cached_tokens"] += kept

    def _token(self, response, job: Job) -> Token:
        token = Token(response.text, response.token, response.token in self.stop_ids,
                      response.finish_reason)
        if job.logprobs:
            logprobs = response.logprobs
            chosen = logprobs[response.token]
            top = values = None
            if job.top_logprobs:
                k = min(job.top_logprobs, logprobs.shape[-1])
                top = mx.argpartition(-logprobs, kth=k - 1)[:k]
                values = logprobs[top]
            mx.eval(chosen, top, values)  # one wait; .tolist() reads bfloat16 too (NumPy cannot)
            token.logprob = chosen.item()
            if top is not None:
                token.top = sorted(zip(top.tolist(), values.tolist()), key=lambda pair: -pair[1])
        return token

    def _keep(self, cache, prompt: Prompt, answer: list) -> None:
        """Store the cache under the tokens it holds: the prompt and the answer so far (an
        interruption during prefill can leave it inside an image: trim to a safe length)."""
        key = np.concatenate([prompt.key, np.asarray(answer, dtype=np.int64)])
        held = cache.safe_length(min(cache.offset, len(key)))
        cache.trim(held)
        self.cache.store(key[:held], cache)


def as_api_error(error: Exception) -> APIError:
    """A worker-side failure as the request's error: bad input is 400, anything else 500."""
    if isinstance(error, APIError):
        return error
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, InputError):
        return APIError(400, message)
    if isinstance(error, MemoryError) or "alloc" in message.lower():
        return APIError(500, f"out of memory: {message}", code="out_of_memory")
    return APIError(500, f"{type(error).__name__}: {message}")
