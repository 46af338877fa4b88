"""Peak memory of converting a real-shape Qwen2.5-VL checkpoint to 4-bit.

Creates a random checkpoint with the exact shapes, names, dtype (bfloat16) and sharding
(~4 GB shards with an index) of the hub's Qwen2.5-VL-3B-Instruct, tensor by tensor so
that creating it needs little memory, then runs ``convert.py -q`` on it in a subprocess
and reports the child's peak resident memory against the checkpoint's size. The issue's
bar: the peak stays under 40% of the checkpoint (a 7.5 GB 3B checkpoint: under 3 GB).

    python benchmarks/convert_memory.py                 # the full 3B (7.5 GB on disk, a few minutes)
    python benchmarks/convert_memory.py --layers 2      # a scaled-down smoke run (~1 GB)
    python benchmarks/convert_memory.py --report benchmarks/convert_memory.md

It prints one JSON line, then a table. The checkpoint and the output go to a temporary
folder (``--workdir`` to choose it), removed at the end unless ``--keep``.
"""

import argparse
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mlx_qwenvl  # noqa: E402,F401  (binds the BLAS before mlx.core is imported)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlx_qwenvl.config import ModelArgs  # noqa: E402
from mlx_qwenvl.safetensors_io import SafetensorsWriter  # noqa: E402
from mlx_qwenvl.model import Model  # noqa: E402

SHARD_BYTES = 4_000_000_000  # the hub's 3B has two shards of 3.98 and 3.53 GB
BLOCK_BYTES = 64 << 20


def config_for(size: str, text_layers: int, vision_depth: int) -> dict:
    """The hub config.json of Qwen2.5-VL-3B/7B-Instruct (flat layout), with a layer count."""
    widths = {
        "3B": dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16,
                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
        "7B": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                   num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    }[size]
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        **widths,
        "num_hidden_layers": text_layers,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 128000,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "hidden_act": "silu",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "max_window_layers": text_layers,
        "attention_dropout": 0.0,
        "torch_dtype": "bfloat16",
        "vision_config": {
            "depth": vision_depth,
            "hidden_act": "silu",
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_chans": 3,
            "out_hidden_size": widths["hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [i for i in (7, 15, 23, 31) if i < vision_depth],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
    }


def hub_tensors(config: dict) -> list:
    """``[(hub name, shape)]`` from the model skeleton (no memory: nothing is evaluated)."""
    out = []
    for name, value in tree_flatten(Model(ModelArgs.from_dict(config)).parameters()):
        shape = tuple(value.shape)
        if name.startswith("vision_tower."):
            name = "visual." + name[len("vision_tower."):]
            if name == "visual.patch_embed.proj.weight":
                shape = (shape[0], shape[4], shape[1], shape[2], shape[3])  # channels-first
        elif name.startswith("language_model.model."):
            name = "model." + name[len("language_model.model."):]
        elif name.startswith("language_model.lm_head."):
            name = name[len("language_model."):]
        out.append((name, shape))
    return out


def create_checkpoint(folder: Path, config: dict) -> int:
    """Random bfloat16 tensors in the hub layout, written block by block; returns its bytes."""
    folder.mkdir(parents=True)
    tensors = hub_tensors(config)
    shards, current, size = [], [], 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * 2
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)

    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(BLOCK_BYTES // 2 + 4096, dtype=np.float32) * 0.02)
    pool = (pool.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 bits
    ones = np.full(1 << 16, 0x3F80, dtype=np.uint16)  # 1.0 in bfloat16, for the norms
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        writer = SafetensorsWriter(folder / file, [(n, mx.bfloat16, s) for n, s in shard],
                                   metadata={"format": "pt"})
        for name, shape in shard:
            count = math.prod(shape)
            row = math.prod(shape[1:]) if len(shape) > 1 else count
            rows = max(1, (BLOCK_BYTES // 2) // row)
            for start in range(0, shape[0] if len(shape) > 1 else 1, rows):
                n = min(rows, (shape[0] if len(shape) > 1 else 1) - start) * row
                if "norm" in name or "ln_q" in name:
                    values = np.resize(ones, n)
                else:
                    offset = int(rng.integers(0, 4096))
                    values = pool[offset:offset + n] if n <= pool.size - offset else np.resize(pool, n)
                writer.write(name, mx.array(values), start if len(shape) > 1 else 0)
            weight_map[name] = file
        writer.close()
    total = sum(math.prod(s) * 2 for _, s in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total


# The child reports its own peak. Not getrusage: a child's ru_maxrss also counts the
# parent's memory it was forked from (Linux keeps the pre-exec high-water mark), whereas
# VmHWM belongs to the process image after exec.
WRAPPER = r"""
import atexit, platform, resource, runpy, sys
def report():
    peak = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except OSError:  # macOS: ru_maxrss is in bytes there
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sys.stderr.write("\nPEAK_RSS_BYTES=%d\n" % peak)
atexit.register(report)
if sys.argv[1] == "-c":
    exec(sys.argv[2])
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def publish(table: str, report, name: str, data) -> None:
    """Print the Markdown table; with ``report``, append a dated section with it and the raw JSON."""
    print(table)
    if report:
        with open(report, "a") as f:
            f.write(f"\n## {name} ({time.strftime('%Y-%m-%d')})\n\n{table}\n\n```json\n{json.dumps(data)}\n```\n")


def drop_workdir(workdir: Path, keep: bool) -> None:
    """The benchmark's scratch folder removed, unless ``keep`` (then its path is printed)."""
    if keep:
        print(f"kept {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def run_measured(args: list) -> dict:
    """Run ``python <args>`` under the wrapper; its peak resident memory and time."""
    start = time.time()
    process = subprocess.run([sys.executable, "-c", WRAPPER, *args], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    peaks = [line for line in process.stdout.splitlines() if line.startswith("PEAK_RSS_BYTES=")]
    if process.returncode != 0 or not peaks:
        sys.stderr.write(process.stdout)
        raise SystemExit(f"command failed ({process.returncode}): python {' '.join(args)}")
    return {"seconds": seconds, "peak": int(peaks[-1].split("=")[1]), "output": process.stdout}


def gb(n):
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["3B", "7B"], default="3B")
    parser.add_argument("--layers", type=int, default=None, help="text layers and vision depth (scaled-down runs)")
    parser.add_argument("--text-layers", type=int, default=None)
    parser.add_argument("--vision-depth", type=int, default=None)
    parser.add_argument("--q-bits", type=int, default=4)
    parser.add_argument("--q-group-size", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the output")
    parser.add_argument("--report", type=Path, default=None, help="append the table to this markdown file")
    args = parser.parse_args()

    full = {"3B": (36, 32), "7B": (28, 32)}[args.size]
    text_layers = args.text_layers or args.layers or full[0]
    vision_depth = args.vision_depth or args.layers or full[1]
    config = config_for(args.size, text_layers, vision_depth)

    workdir = Path(tempfile.mkdtemp(prefix="convert-memory-", dir=args.workdir))
    try:
        checkpoint, output = workdir / "checkpoint", workdir / "mlx-4bit"
        start = time.time()
        checkpoint_bytes = create_checkpoint(checkpoint, config)
        created = time.time() - start
        baseline = run_measured(["-c", "import mlx_qwenvl.convert"])
        run = run_measured([str(REPO / "convert.py"), "--hf-path", str(checkpoint),
                            "--mlx-path", str(output), "-q", "--q-bits", str(args.q_bits),
                            "--q-group-size", str(args.q_group_size)])
        peak = run["peak"]
        output_bytes = sum(p.stat().st_size for p in output.glob("*.safetensors"))
        result = {
            "benchmark": "convert_memory",
            "model": f"Qwen2.5-VL-{args.size} shapes (random bf16)",
            "text_layers": text_layers,
            "vision_depth": vision_depth,
            "bits": args.q_bits,
            "group_size": args.q_group_size,
            "checkpoint_bytes": checkpoint_bytes,
            "checkpoint_shards": len(list(checkpoint.glob("*.safetensors"))),
            "output_bytes": output_bytes,
            "peak_rss_bytes": peak,
            "import_baseline_rss_bytes": baseline["peak"],
            "peak_fraction_of_checkpoint": round(peak / checkpoint_bytes, 4),
            "under_40_percent": peak < 0.4 * checkpoint_bytes,
            "convert_seconds": round(run["seconds"], 1),
            "create_seconds": round(created, 1),
            "platform": f"{platform.system()} {platform.machine()}, mlx {mx.__version__}, "
                        f"device {mx.default_device()}",
        }
        print(json.dumps(result))
        rows = [
            ("checkpoint", f"Qwen2.5-VL-{args.size} shapes, {text_layers} text layers, vision depth {vision_depth}, "
                           f"bf16, {result['checkpoint_shards']} shard(s)"),
            ("checkpoint size", gb(checkpoint_bytes)),
            (f"output ({args.q_bits}-bit, group {args.q_group_size})", gb(output_bytes)),
            ("peak RSS of the conversion", gb(peak)),
            ("peak / checkpoint", f"{100 * peak / checkpoint_bytes:.1f}% (bar: < 40%)"),
            ("RSS of importing mlx_qwenvl alone", gb(result["import_baseline_rss_bytes"])),
            ("conversion time", f"{run['seconds']:.1f} s"),
            ("platform", result["platform"]),
        ]
        width = max(len(k) for k, _ in rows)
        table = "\n".join([f"| {'measure':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
                          + [f"| {k:<{width}} | {v} |" for k, v in rows])
        publish(table, args.report, "convert_memory", result)
    finally:
        drop_workdir(workdir, args.keep)


if __name__ == "__main__":
    main()
