"""One system measured in a fresh process: ``python benchmarks/worker.py SPEC.json OUT.json``.

Systems: ``ours`` (mlx_qwenvl), ``mlx-vlm`` and ``mlx-lm`` (text-only decoding of the same
language weights). ``mlx_qwenvl`` is imported first in every one of them, so that on Linux all
three run on the same BLAS (it binds OpenBLAS before anything loads libmlx; with
``MLX_QWENVL_NO_BLAS=1`` all three keep the wheel's reference BLAS).

Every system gets the same token ids and pixel values (our processor's output, prepared once by
bench.py) and is timed at its generator level: ours is ``Model.prefill`` then mlx-lm's
``generate_step`` (what ``mlx_qwenvl.stream_generate`` runs), mlx-vlm is its ``generate_step``
(what its ``stream_generate`` runs), mlx-lm is its ``generate_step``. None of them stops at EOS.
"""

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import mlx_qwenvl  # noqa: F401  (first: binds the BLAS before mlx is loaded)
from mlx_qwenvl._blas import blas_info

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

GB = 1e9


def greedy(logprobs):
    return mx.argmax(logprobs, axis=-1)


def cast_floating(model, dtype):
    def cast(p):
        return p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p

    model.update(tree_map(cast, model.parameters()))


def quantize(module, bits):
    nn.quantize(module, group_size=64, bits=bits)


def apply_dtype(model, language_model, dtype: str):
    """'float32' casts every weight; 'bfloat16' keeps the checkpoint's; 'q4'/'q8' quantizes the
    language model's Linear and Embedding layers (group 64) as mlx-vlm's converter does, the
    rest stays bfloat16."""
    if dtype == "float32":
        cast_floating(model, mx.float32)
    elif dtype in ("q4", "q8"):
        quantize(language_model, int(dtype[1:]))
    elif dtype != "bfloat16":
        raise ValueError(f"unknown dtype {dtype}")
    mx.eval(model.parameters())


class Ours:
    name = "ours"
    vision = True

    def __init__(self, path, dtype):
        from mlx_qwenvl.loading import load_model

        self.model = load_model(path, dtype=mx.float32 if dtype == "float32" else None)
        apply_dtype(self.model, self.model.language_model, dtype)

    def encode(self, pixels, grid):
        return self.model.vision_tower(mx.array(pixels), grid)

    def generate(self, ids, pixels, grid, max_tokens):
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        self.model.prefill(ids[:, :-1], cache, pixel_values=pixels, image_grid_thw=grid)
        return generate_step(mx.array(ids[0, -1:]), self.model, max_tokens=max_tokens, sampler=greedy,
                             prompt_cache=cache)


class MlxVlm:
    name = "mlx-vlm"
    vision = True

    def __init__(self, path, dtype):
        from mlx_vlm.utils import load_model

        self.model = load_model(Path(path))
        apply_dtype(self.model, self.model.language_model, dtype)
        self.dtype = self.model.vision_tower.patch_embed.proj.weight.dtype

    def encode(self, pixels, grid):
        return self.model.vision_tower(mx.array(pixels).astype(self.dtype), mx.array(grid))

    def generate(self, ids, pixels, grid, max_tokens):
        from mlx_vlm.generate import generate_step

        if pixels is None:
            return generate_step(mx.array(ids), self.model, None, None, max_tokens=max_tokens, temperature=0.0)
        return generate_step(mx.array(ids), self.model, mx.array(pixels), None,
                             image_grid_thw=mx.array(grid), max_tokens=max_tokens, temperature=0.0)


class MlxLm:
    name = "mlx-lm"
    vision = False  # text only: the image placeholders are decoded as ordinary tokens

    def __init__(self, path, dtype):
        from mlx_lm.utils import load_model

        self.model, _ = load_model(Path(path))
        apply_dtype(self.model, self.model, dtype)

    def generate(self, ids, pixels, grid, max_tokens):
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        return generate_step(mx.array(ids[0]), self.model, max_tokens=max_tokens, sampler=greedy,
                             prompt_cache=make_prompt_cache(self.model))


SYSTEMS = {cls.name: cls for cls in (Ours, MlxVlm, MlxLm)}


def max_rss() -> int:
    """The process's peak resident memory in bytes (VmHWM: this process image only)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def weights_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def timed_encode(system, pixels, grid):
    mx.clear_cache()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    mx.eval(system.encode(pixels, grid))
    return time.perf_counter() - tic, mx.get_peak_memory() / GB


def timed_generate(system, ids, pixels, grid, max_tokens):
    """(time to first token, decode tokens/s over the remaining tokens, peak GB, tokens)."""
    mx.clear_cache()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    tokens, first = [], None
    for token, _ in system.generate(ids, pixels, grid, max_tokens):
        tokens.append(int(token))
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    decode_tps = (len(tokens) - 1) / (end - first) if len(tokens) > 1 else None
    return first - tic, decode_tps, mx.get_peak_memory() / GB, tokens


def main(spec_file, out_file):
    spec = json.loads(Path(spec_file).read_text())
    if spec.get("memory_cap_gb"):
        # A safety net on shared machines: an allocation past the cap fails in this process
        # instead of the kernel's OOM killer picking a victim.
        cap = int(spec["memory_cap_gb"] * GB)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    inputs = np.load(spec["inputs"])
    cls = SYSTEMS[spec["system"]]
    result = {"system": cls.name, "dtype": spec["dtype"], "blas": blas_info(), "pid": os.getpid()}

    mx.reset_peak_memory()
    tic = time.perf_counter()
    system = cls(spec["model"], spec["dtype"])
    result["load_s"] = time.perf_counter() - tic
    result["load_peak_gb"] = mx.get_peak_memory() / GB
    result["weights_gb"] = weights_bytes(system.model) / GB

    def item(name):
        if inputs[f"grid_{name}"].shape[0] == 0:  # a text-only prompt
            return inputs[f"ids_{name}"], None, None
        return inputs[f"ids_{name}"], inputs[f"pixels_{name}"], inputs[f"grid_{name}"]

    vision_sizes = spec.get("vision_sizes", []) if cls.vision else []
    gen = spec.get("generate")
    # Warm-up (untimed): one encode of the warm-up image and a 2-token generation from it.
    warm = spec.get("warmup")
    if warm:
        ids, pixels, grid = item(warm)
        if cls.vision and pixels is not None:
            mx.eval(system.encode(pixels, grid))
        if gen:
            for _ in system.generate(ids, pixels, grid, 2):
                pass

    result["vision"] = {name: {"seconds": [], "peak_gb": [], "patches": int(inputs[f"pixels_{name}"].shape[0])}
                        for name in vision_sizes}
    if gen:
        ids = inputs[f"ids_{gen['image']}"]
        result["generate"] = {"image": gen["image"], "prompt_tokens": int(ids.shape[1]),
                              "decode_tokens": gen["tokens"], "ttft_s": [], "prompt_tps": [],
                              "decode_tps": [], "peak_gb": [], "tokens": None}
    for _ in range(spec.get("runs", 3)):
        for name in vision_sizes:
            seconds, peak = timed_encode(system, *item(name)[1:])
            result["vision"][name]["seconds"].append(seconds)
            result["vision"][name]["peak_gb"].append(peak)
        if gen:
            g = result["generate"]
            ttft, tps, peak, tokens = timed_generate(system, *item(gen["image"]), gen["tokens"])
            g["ttft_s"].append(ttft)
            g["prompt_tps"].append(g["prompt_tokens"] / ttft)
            g["decode_tps"].append(tps)
            g["peak_gb"].append(peak)
            g["tokens"] = tokens
    result["max_rss_gb"] = max_rss() / GB
    result["python"] = platform.python_version()
    Path(out_file).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
