"""Peak memory and time of ``convert`` in each quantization mode, on a 3B-shaped checkpoint
(issue 20, item 5: conversion keeps streaming in every mode).

The checkpoint is benchmarks/convert_memory.py's: the hub's Qwen2.5-VL-3B-Instruct shapes,
names, bfloat16 and sharding, random values (``--layers`` scales it down). Each setting runs
``convert.py`` in a fresh process ``--repeats`` times (peak resident memory as the process's
VmHWM, wall time), and the median is reported with the range. ``--awq`` also writes an
AWQ-layout copy of the same shapes (AutoAWQ GEMM packing, group 128, float16, random values)
and times its exact conversion.

    python benchmarks/convert_modes.py --workdir /tmp/cm --repeats 3 [--awq] [--report out.md]
"""

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import mlx_qwenvl  # noqa: E402,F401  (binds the BLAS before mlx.core is imported)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from convert_memory import config_for, create_checkpoint, hub_tensors, drop_workdir, publish, run_measured  # noqa: E402
from mlx_qwenvl.safetensors_io import SafetensorsWriter  # noqa: E402

SETTINGS = [
    ("affine 4-bit, g64", ["-q"]),
    ("affine 8-bit, g64", ["-q", "--q-bits", "8"]),
    ("mxfp4", ["-q", "--q-mode", "mxfp4"]),
    ("nvfp4", ["-q", "--q-mode", "nvfp4"]),
    ("mxfp8", ["-q", "--q-mode", "mxfp8"]),
    ("mixed_3_6", ["-q", "--quant-predicate", "mixed_3_6"]),
]
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUP = 128


def create_awq_checkpoint(folder: Path, config: dict) -> int:
    """The same shapes in AutoAWQ's GEMM layout (decoder Linear layers 4-bit, group 128; the
    rest float16), random values, one shard; returns its bytes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries, makers = [], {}
    for name, shape in hub_tensors(config):
        layer = name[: -len(".weight")]
        if name.startswith("model.layers.") and layer.endswith(LINEAR) and name.endswith(".weight"):
            out, inp = shape
            for part, dtype, part_shape in (("qweight", mx.int32, (inp, out // 8)),
                                            ("qzeros", mx.int32, (inp // GROUP, out // 8)),
                                            ("scales", mx.float16, (inp // GROUP, out))):
                entries.append((f"{layer}.{part}", dtype, part_shape))
        else:
            entries.append((name, mx.float16, shape))
    for name, dtype, shape in entries:
        makers[name] = (dtype, shape)
    writer = SafetensorsWriter(folder / "model.safetensors", entries, metadata={"format": "pt"})
    for name, (dtype, shape) in makers.items():
        rows = shape[0] if len(shape) > 1 else 1
        row = math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape)
        step = max(1, (32 << 20) // (row * 4))
        for start in range(0, rows, step):
            n = min(step, rows - start)
            if dtype == mx.int32:
                block = rng.integers(0, 2**32, (n, row), dtype=np.uint32).view(np.int32)
            elif name.endswith(".scales"):
                block = (rng.random((n, row), dtype=np.float32) * 0.004 + 1e-4).astype(np.float16)
            else:
                block = (rng.standard_normal((n, row), dtype=np.float32) * 0.02).astype(np.float16)
            writer.write(name, mx.array(block.reshape((n, *shape[1:]) if len(shape) > 1 else shape)),
                         start if len(shape) > 1 else 0)
    writer.close()
    awq = dict(config, torch_dtype="float16",
               quantization_config={"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm",
                                    "zero_point": True, "modules_to_not_convert": ["visual"]})
    (folder / "config.json").write_text(json.dumps(awq, indent=2))
    return sum(math.prod(shape) * dtype.size for _, dtype, shape in entries)


def measure(label: str, checkpoint: Path, options: list, repeats: int, workdir: Path) -> dict:
    runs, output_bytes = [], 0
    for i in range(repeats):
        out = workdir / f"out-{i}"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        run = run_measured([str(REPO / "convert.py"), "--hf-path", str(checkpoint), "--mlx-path", str(out),
                            *options])
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU time too: on a shared machine the wall time also counts other processes' turns.
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        output_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        runs.append((run["seconds"], run["peak"], cpu))
        shutil.rmtree(out, ignore_errors=True)
    seconds, peaks, cpus = [r[0] for r in runs], [r[1] for r in runs], [r[2] for r in runs]
    result = {"setting": label, "options": options, "seconds": seconds, "peak_rss_bytes": peaks,
              "cpu_seconds": cpus, "median_cpu_seconds": round(statistics.median(cpus), 1),
              "median_seconds": round(statistics.median(seconds), 1),
              "median_peak_rss_bytes": int(statistics.median(peaks)), "output_bytes": output_bytes}
    print(json.dumps(result), flush=True)
    return result


def gb(n) -> str:
    return f"{n / 1e9:.2f} GB"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="an existing 3B-shaped checkpoint")
    parser.add_argument("--layers", type=int, default=None, help="text layers and vision depth (scaled-down runs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--awq", action="store_true", help="also convert an AWQ-layout checkpoint of the same shapes")
    parser.add_argument("--only", nargs="*", default=None, help="these settings only (labels)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--report", type=Path, default=None, help="append the table to this markdown file")
    args = parser.parse_args()

    text_layers, vision_depth = (args.layers, args.layers) if args.layers else (36, 32)
    config = config_for("3B", text_layers, vision_depth)
    workdir = Path(tempfile.mkdtemp(prefix="convert-modes-", dir=args.workdir))
    try:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = workdir / "checkpoint"
            create_checkpoint(checkpoint, config)
        checkpoint_bytes = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
        baseline = run_measured(["-c", "import mlx_qwenvl.convert"])["peak"]
        results = [measure(label, checkpoint, options, args.repeats, workdir)
                   for label, options in SETTINGS if not args.only or label in args.only]
        sources = {label: checkpoint_bytes for label, _ in SETTINGS}
        if args.awq:
            awq = workdir / "awq"
            sources["AWQ → MLX 4-bit, g128 (exact)"] = create_awq_checkpoint(awq, config)
            results.append(measure("AWQ → MLX 4-bit, g128 (exact)", awq, [], args.repeats, workdir))
        lines = [f"Qwen2.5-VL-3B shapes ({text_layers} text layers, vision depth {vision_depth}), random weights; "
                 f"bfloat16 source {gb(checkpoint_bytes)}; {platform.system()} {platform.machine()}, "
                 f"mlx {mx.__version__}, {args.repeats} runs each, median [min–max]; "
                 f"importing mlx_qwenvl alone: {gb(baseline)} RSS; {os.cpu_count()} CPUs, 1-minute load "
                 f"average {os.getloadavg()[0]:.1f} at the end (other processes included).", "",
                 "| setting | source | output | peak RSS | time | CPU time |", "|---|---|---|---|---|---|"]
        for r in results:
            peaks, secs = r["peak_rss_bytes"], r["seconds"]
            lines.append(f"| {r['setting']} | {gb(sources[r['setting']])} | {gb(r['output_bytes'])} | "
                         f"{gb(r['median_peak_rss_bytes'])} [{gb(min(peaks))[:-3]}–{gb(max(peaks))}] | "
                         f"{r['median_seconds']:.1f} s [{min(secs):.1f}–{max(secs):.1f}] | "
                         f"{r['median_cpu_seconds']:.1f} s |")
        table = "\n".join(lines)
        publish(table, args.report, "convert_modes", results)
    finally:
        drop_workdir(workdir, args.keep)


if __name__ == "__main__":
    main()
