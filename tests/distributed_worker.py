"""Run by every rank under ``mlx.launch`` for tests/test_distributed.py (or alone, for the
single-process side of a measurement): ``python distributed_worker.py TASK SPEC.json``.

Tasks:
- ``parity``: load the folders of SPEC split by each of SPEC["modes"], and write, per rank,
  the logits of each prompt, 32 greedy tokens from each (mlx-lm's generate_step, EOS
  ignored), a ChatSession's two turns and the cache sizes, to SPEC["out"].rank{R}.npz.
  Then rank 1 gets another prompt than rank 0: the error each rank raised is written too.
- ``stall``: rank 1 freezes while decoding; rank 0's failure guard must end it.
- ``memory``: load SPEC["model"] in float32 (split by each mode when launched with several
  ranks) and write this process's peak memory figures to SPEC["out"].rank{R}.json.

The inputs come from the same functions the test uses for its single-process reference
(``prompt_inputs``), so both sides see identical token ids and pixels.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

# The prompts: images and videos as (kind, height, width[, frames]).
PROMPTS = {
    "image": [("image", 56, 84)],
    "video": [("video", 56, 56, 4)],
    "mixed": [("image", 84, 56), ("video", 56, 84, 4)],
}
QUESTION = "Describe what you see."
TOKENS = 32


def media(items, seed=0):
    """Images (PIL) and videos (lists of PIL frames) for one prompt, the same on every call."""
    from PIL import Image

    images, videos = [], []
    for n, item in enumerate(items):
        rng = np.random.default_rng(seed + 17 * n)
        if item[0] == "image":
            images.append(Image.fromarray(rng.integers(0, 256, (item[1], item[2], 3), dtype=np.uint8)))
        else:
            videos.append([Image.fromarray(rng.integers(0, 256, (item[1], item[2], 3), dtype=np.uint8))
                           for _ in range(item[3])])
    return images, videos


def prompt_inputs(processor, name):
    """Our processor's inputs for prompt ``name``."""
    images, videos = media(PROMPTS[name])
    content = [{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos]
    messages = [{"role": "user", "content": content + [{"type": "text", "text": QUESTION}]}]
    return processor(messages, images=images or None, videos=videos or None)


def vision_kwargs(inputs):
    return {key: inputs.get(key) for key in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                             "video_grid_thw", "second_per_grid_ts")}


def logits_and_tokens(model, inputs):
    """(logits of the whole prompt (1, L, V), TOKENS greedy tokens after it)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    ids = inputs["input_ids"]
    logits = model(ids, cache=model.make_cache(), **vision_kwargs(inputs))
    logits = np.array(logits.astype(mx.float32))
    cache = model.make_cache()
    model.prefill(ids[:, :-1], cache, **vision_kwargs(inputs))
    steps = generate_step(mx.array(ids[0, -1:]), model, max_tokens=TOKENS, prompt_cache=cache,
                          sampler=lambda logprobs: mx.argmax(logprobs, axis=-1))
    return logits, np.array([int(token) for token, _ in steps])


def chat_turns(model, processor):
    """A ChatSession's two turns (an image, then text only): their tokens."""
    from mlx_qwenvl.chat import ChatSession

    images, _ = media(PROMPTS["image"], seed=5)
    session = ChatSession(model, processor)
    first = session.send("What is in this image?", images=images, max_tokens=8, temperature=0.0)
    second = session.send("Say more about it.", max_tokens=8, temperature=0.0)
    return np.array(first.tokens), np.array(second.tokens)


def parity(spec, group, rank):
    """For each parallel mode and folder: logits, greedy tokens, a chat's turns, cache sizes."""
    import mlx.core as mx

    from mlx_qwenvl.loading import load

    out, timings = {}, {}
    for mode in spec["modes"]:
        for label, folder in spec["folders"].items():
            if mode not in spec.get("label_modes", {}).get(label, [mode]):
                continue
            tic = time.perf_counter()
            dtype = {"float32": mx.float32, "checkpoint": None, "auto": "auto"}[spec["dtypes"][label]]
            model, processor = load(folder, dtype=dtype, group=group, parallel=mode)
            key = f"{mode}/{label}"
            for name in spec["prompts"][label]:
                logits, tokens = logits_and_tokens(model, prompt_inputs(processor, name))
                out[f"{key}/{name}/logits"] = logits
                out[f"{key}/{name}/tokens"] = tokens
            if spec.get("chat") == label:
                out[f"{key}/chat/first"], out[f"{key}/chat/second"] = chat_turns(model, processor)
            cache = model.make_cache()
            model.prefill(np.array([[1, 2, 3]]), cache)
            out[f"{key}/cache_layers"] = np.array(len(cache))
            out[f"{key}/cache_heads"] = np.array(cache[0].keys.shape[1])
            timings[key] = time.perf_counter() - tic
    if group is not None:
        out["mismatch"] = np.array(str(mismatch(model, processor, rank)))
    out["timings"] = np.array(json.dumps(timings))
    np.savez(f"{spec['out']}.rank{rank}.npz", **out)


def mismatch(model, processor, rank):
    """Rank 1 given another prompt than rank 0 (one token changed): the error this rank
    raised (every rank must raise one, and none may hang), or None."""
    from mlx_qwenvl.errors import InputError

    inputs = prompt_inputs(processor, "image")
    ids = inputs["input_ids"].copy()
    if rank == 1:
        ids[0, 1] += 1
    try:
        model(ids, cache=model.make_cache(), **vision_kwargs(inputs))
    except InputError as error:
        return str(error)
    return None


def stall(spec, group, rank):
    """Decode with the failure guard armed (SPEC["timeout"] s); rank 1 freezes itself
    (SIGSTOP) after 5 tokens, keeping its connections open: rank 0 must end on its own."""
    import os
    import signal

    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from mlx_qwenvl import distributed
    from mlx_qwenvl.loading import load

    model, processor = load(spec["folder"], dtype=mx.float32, group=group, parallel=spec["modes"][0])
    distributed.barrier(group)
    distributed.FailureGuard(group, stall_timeout=spec["timeout"]).install()
    inputs = prompt_inputs(processor, "image")
    ids = inputs["input_ids"]
    cache = model.make_cache()
    model.prefill(ids[:, :-1], cache, **vision_kwargs(inputs))
    for n, _ in enumerate(generate_step(mx.array(ids[0, -1:]), model, max_tokens=100000, prompt_cache=cache)):
        if n == 5:
            print("decoding", flush=True)
            if rank == 1:
                os.kill(os.getpid(), signal.SIGSTOP)


def memory(spec, group, rank):
    """Peak memory of loading SPEC["model"] in float32, once per mode (the peaks reset between:
    MLX's counter, and VmHWM through /proc/self/clear_refs)."""
    import gc

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_qwenvl.loading import load_model

    results = []
    for mode in spec["modes"] if group is not None else [None]:
        gc.collect()
        mx.clear_cache()
        Path("/proc/self/clear_refs").write_text("5")
        baseline = max_rss()
        mx.reset_peak_memory()
        tic = time.perf_counter()
        model = load_model(spec["model"], dtype=mx.float32, group=group, parallel=mode or "tensor")
        seconds = time.perf_counter() - tic
        results.append({"mode": mode, "rank": rank, "mlx_peak": mx.get_peak_memory(), "rss_peak": max_rss(),
                        "rss_before": baseline, "load_s": seconds,
                        "weights": sum(v.nbytes for _, v in tree_flatten(model.parameters()))})
        del model
    Path(f"{spec['out']}.rank{rank}.json").write_text(json.dumps(results))


def max_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main():
    sys.path.insert(0, str(Path(__file__).parent))
    import mlx_qwenvl  # noqa: F401  (binds the BLAS first)
    from mlx_qwenvl import distributed

    task, spec_file = sys.argv[1], sys.argv[2]
    spec = json.loads(Path(spec_file).read_text())
    group = distributed.world_group()
    rank = group.rank() if group is not None else 0
    {"parity": parity, "memory": memory, "stall": stall}[task](spec, group, rank)
    if group is not None:
        distributed.barrier(group)


if __name__ == "__main__":
    main()
