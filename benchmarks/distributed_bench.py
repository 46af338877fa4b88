"""Issue 21: Qwen2.5-VL in 1 process against 2 processes (MLX distributed, ring backend).

    python benchmarks/distributed_bench.py run deep-thin --json benchmarks/results/distributed-deep-thin.json
    python benchmarks/distributed_bench.py run 3B --json benchmarks/results/distributed-3B.json
    python benchmarks/distributed_bench.py vision --json benchmarks/results/distributed-vision.json
    python benchmarks/distributed_bench.py table benchmarks/results/distributed-*.json

``run`` loads the folder (a shape of benchmarks/checkpoints.py, made if missing, or any model
folder) in one process, then with ``mlx.launch --backend ring -n 2`` split by tensor and by
pipeline parallelism, and measures in each: time to first token of an image prompt (vision
tower + prefill + first token), decode tokens/s over N greedy tokens (EOS ignored), MLX's peak
memory per rank (weights included) and the load. Each configuration runs in fresh processes,
``--runs`` timed runs after one untimed warm-up; the table gives medians [min-max]. Inputs are
our processor's ids and pixels, made once (bench.py's ``_prepare``).

``vision`` measures where the vision tower should run across 2 ranks (see
mlx_qwenvl/distributed_vision.py): every rank computing the same features, rank 0 computing and
broadcasting them, or the images split across ranks and the features gathered, against one
process.

On a machine whose ranks share the same cores (2 processes on a 2-core machine, here), the
2-process figures show the cost of the communication and of sharing the cores, not the
speed-up two machines give.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

GB = 1e9
CONFIGS = (("1 process", None), ("2 ranks, tensor", "tensor"), ("2 ranks, pipeline", "pipeline"))


def launch(args: list, processes: int, env: dict, timeout: float, port: int = 32323) -> None:
    """Run ``python distributed_bench.py ARGS`` in one process, or in ``processes`` ranks of the
    ring backend on 127.0.0.1.

    The ranks are started here with the environment mlx.launch gives them (MLX_RANK and a
    hostfile in MLX_HOSTFILE) rather than by mlx.launch itself: its output-forwarding loop
    polls without sleeping (about 40% of a core, measured with ps), which on a 2-core machine
    would be taken from the ranks being measured."""
    command = [sys.executable, str(HERE / "distributed_bench.py"), *args]
    with tempfile.TemporaryDirectory() as tmp:
        hostfile = Path(tmp) / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port + rank}"] for rank in range(processes)]))
        procs = []
        try:
            for rank in range(processes):
                # Each rank one BLAS thread: the ranks share the cores (one process keeps all of them).
                rank_env = (dict({"OPENBLAS_NUM_THREADS": "1"}, **env, MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile))
                            if processes > 1 else env)
                procs.append(subprocess.Popen(command, env=rank_env, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True))
            outputs = [proc.communicate(timeout=timeout) for proc in procs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    for rank, (proc, (out, err)) in enumerate(zip(procs, outputs)):
        if proc.returncode != 0:
            tail = "\n".join((err or out).strip().splitlines()[-15:])
            raise RuntimeError(f"{' '.join(args[:1])}: rank {rank} of {processes} failed:\n{tail}")


def median_range(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    low, mid, high = min(values), statistics.median(values), max(values)
    digits = 2 if mid < 10 else 1
    return f"{mid:.{digits}f} [{low:.{digits}f}–{high:.{digits}f}]"


# --------------------------------------------------------------------------------------------
# run: 1 process vs 2 ranks


def run(args) -> dict:
    from bench import environment, machine, model_folder, prepare

    shape, path = model_folder(args.model, args.models)
    env = environment()
    report = {"model": {"name": shape, "path": str(path)}, "machine": machine(),
              "protocol": {"runs": args.runs, "tokens": args.tokens, "image": args.image, "dtype": "float32",
                           "backend": "ring over 127.0.0.1", "warmup": "one untimed 2-token generation"},
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        npz, info = prepare(path, [args.image], Path(tmp))
        report["inputs"] = info
        for label, parallel in CONFIGS:
            print(f"[{time.strftime('%H:%M:%S')}] {shape}: {label}", flush=True)
            out = Path(tmp) / f"out-{parallel or 'single'}"
            spec = {"model": str(path), "inputs": str(npz), "image": args.image, "runs": args.runs,
                    "tokens": args.tokens, "parallel": parallel, "out": str(out)}
            spec_file = Path(tmp) / "spec.json"
            spec_file.write_text(json.dumps(spec))
            try:
                launch(["_worker", str(spec_file)], 1 if parallel is None else 2, env, args.timeout)
            except RuntimeError as error:  # e.g. a model that cannot be split this way
                report["configs"][label] = {"error": str(error).strip().splitlines()[-1]}
                print(f"  failed: {report['configs'][label]['error']}", flush=True)
                continue
            ranks = sorted(Path(tmp).glob(f"{out.name}.rank*.json"))
            report["configs"][label] = [json.loads(f.read_text()) for f in ranks]
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return report


def worker(spec_file: str) -> None:
    """One configuration in this process (and its siblings under mlx.launch)."""
    import mlx_qwenvl  # noqa: F401  (binds the BLAS before mlx loads)

    import mlx.core as mx
    import numpy as np
    from mlx_lm.generate import generate_step

    from mlx_qwenvl import distributed
    from mlx_qwenvl.loading import load_model
    from worker import max_rss

    spec = json.loads(Path(spec_file).read_text())
    group = distributed.world_group() if spec["parallel"] else None
    rank = group.rank() if group else 0
    inputs = np.load(spec["inputs"])
    name = spec["image"]
    ids, pixels, grid = inputs[f"ids_{name}"], inputs[f"pixels_{name}"], inputs[f"grid_{name}"]

    mx.reset_peak_memory()
    tic = time.perf_counter()
    model = load_model(spec["model"], mx.float32, group=group, parallel=spec["parallel"] or "tensor")
    result = {"rank": rank, "ranks": group.size() if group else 1, "parallel": spec["parallel"],
              "load_s": time.perf_counter() - tic, "load_peak_gb": mx.get_peak_memory() / GB}

    def greedy(logprobs):
        return mx.argmax(logprobs, axis=-1)

    def generate(max_tokens):
        cache = model.make_cache()
        model.prefill(ids[:, :-1], cache, pixel_values=pixels, image_grid_thw=grid)
        return generate_step(mx.array(ids[0, -1:]), model, max_tokens=max_tokens, sampler=greedy,
                             prompt_cache=cache)

    for _ in generate(2):  # warm-up
        pass
    runs = []
    for _ in range(spec["runs"]):
        mx.clear_cache()
        mx.reset_peak_memory()
        tic = time.perf_counter()
        tokens, first = [], None
        for token, _ in generate(spec["tokens"]):
            tokens.append(int(token))
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        runs.append({"ttft_s": first - tic, "decode_tps": (len(tokens) - 1) / (end - first),
                     "peak_gb": mx.get_peak_memory() / GB, "tokens": tokens})
    if group is not None:
        distributed.barrier(group)
    result.update(runs=runs, max_rss_gb=max_rss() / GB, prompt_tokens=int(ids.shape[1]))
    Path(f"{spec['out']}.rank{rank}.json").write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------
# vision: where the tower runs


VISION_PLACEMENTS = ("single", "every rank", "rank 0 broadcasts", "split images")


def vision(args) -> dict:
    from bench import environment, machine

    env = environment()
    report = {"machine": machine(), "protocol": {"depth": args.depth, "images": args.images, "size": args.size,
                                                 "runs": args.runs, "dtype": "float32", "widths": "3B vision tower"},
              "placements": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for placement in VISION_PLACEMENTS:
            print(f"[{time.strftime('%H:%M:%S')}] vision: {placement}", flush=True)
            out = Path(tmp) / "vision.json"
            spec = dict(vars(args), placement=placement, out=str(out))
            spec.pop("func", None)
            spec_file = Path(tmp) / "spec.json"
            spec_file.write_text(json.dumps(spec, default=str))
            launch(["_vision_worker", str(spec_file)], 1 if placement == "single" else 2, env, args.timeout)
            report["placements"][placement] = json.loads(out.read_text())
    return report


def vision_worker(spec_file: str) -> None:
    import mlx_qwenvl  # noqa: F401

    import mlx.core as mx
    import numpy as np

    from mlx_qwenvl import distributed
    from mlx_qwenvl.config import VisionArgs
    from mlx_qwenvl.vision import VisionModel

    spec = json.loads(Path(spec_file).read_text())
    placement = spec["placement"]
    group = None if placement == "single" else distributed.world_group()
    rank = group.rank() if group else 0
    depth = spec["depth"]
    vargs = VisionArgs(depth=depth, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                       fullatt_block_indexes=tuple(range(7, depth, 8)) or (depth - 1,), tokens_per_second=2)
    mx.random.seed(0)
    tower = VisionModel(vargs)
    mx.eval(tower.parameters())
    side = spec["size"] // 14
    grid_one = np.array([[1, side, side]])
    rng = np.random.default_rng(0)
    pixels = [rng.standard_normal((side * side, 1176)).astype(np.float32) for _ in range(spec["images"])]

    def compute():
        if placement in ("single", "every rank"):
            return tower(mx.array(np.concatenate(pixels)), np.repeat(grid_one, len(pixels), axis=0))
        if placement == "rank 0 broadcasts":
            if rank == 0:
                features = tower(mx.array(np.concatenate(pixels)), np.repeat(grid_one, len(pixels), axis=0))
                return distributed.broadcast_features(features, group)
            return distributed.broadcast_features(None, group)
        # split images: rank r encodes images r, r + N, ...; equal sizes here, so one all_gather
        mine = pixels[rank::group.size()]
        features = tower(mx.array(np.concatenate(mine)), np.repeat(grid_one, len(mine), axis=0))
        gathered = mx.distributed.all_gather(features, group=group)
        tokens = features.shape[0] // len(mine)
        # all_gather gives rank 0's images, then rank 1's...: back to image order
        order = [r * len(mine) + k for k in range(len(mine)) for r in range(group.size())]
        return mx.concatenate([gathered[i * tokens:(i + 1) * tokens] for i in order])

    mx.eval(compute())  # warm-up
    seconds = []
    for _ in range(spec["runs"]):
        if group is not None:
            distributed.barrier(group)
        tic = time.perf_counter()
        mx.eval(compute())
        seconds.append(time.perf_counter() - tic)
    if group is not None:
        # every rank's time: the slowest rank is the one the decoder waits for
        times = mx.distributed.all_gather(mx.array(seconds)[None], group=group, stream=mx.cpu)
        seconds_by_rank = np.array(times).tolist()
    else:
        seconds_by_rank = [seconds]
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps({"seconds_by_rank": seconds_by_rank,
                                                 "tokens": spec["images"] * side * side // 4}))


# --------------------------------------------------------------------------------------------
# table


def table(files) -> str:
    lines = []
    for file in files:
        report = json.loads(Path(file).read_text())
        if "placements" in report:
            p = report["protocol"]
            lines += [f"Vision tower placement, 2 ranks ({p['images']} images of {p['size']}x{p['size']}, "
                      f"{p['widths']} with {p['depth']} blocks, float32; seconds, median [min–max] of "
                      f"{p['runs']}; the slowest rank):", "",
                      "| placement | seconds |", "|---|---|"]
            for name, entry in report["placements"].items():
                slowest = [max(values) for values in zip(*entry["seconds_by_rank"])]
                lines.append(f"| {name} | {median_range(slowest)} |")
            lines.append("")
            continue
        model, p = report["model"]["name"], report["protocol"]
        lines += [f"{model} (float32, image {p['image']}, {p['tokens']} greedy tokens, median [min–max] of "
                  f"{p['runs']} runs):", "",
                  "| configuration | first token (s) | decode (tok/s) | peak memory per rank (GB) | load (s) |",
                  "|---|---|---|---|---|"]
        for label, ranks in report["configs"].items():
            if isinstance(ranks, dict):
                lines.append(f"| {label} | failed: {ranks['error']} | | | |")
                continue
            rank0 = next(r for r in ranks if r["rank"] == 0)
            ttft = median_range([run["ttft_s"] for run in rank0["runs"]])
            tps = median_range([run["decode_tps"] for run in rank0["runs"]])
            peaks = " / ".join(f"{max(run['peak_gb'] for run in r['runs']):.2f}"
                               for r in sorted(ranks, key=lambda r: r["rank"]))
            load = " / ".join(f"{r['load_s']:.1f}" for r in sorted(ranks, key=lambda r: r["rank"]))
            lines.append(f"| {label} | {ttft} | {tps} | {peaks} | {load} |")
        same = len({json.dumps(r["runs"][0]["tokens"]) for ranks in report["configs"].values()
                    if isinstance(ranks, list) for r in ranks}) == 1
        lines += ["", f"Greedy tokens identical in every configuration and rank: {'yes' if same else 'NO'}.", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="1 process vs 2 ranks (tensor, pipeline)")
    r.add_argument("model", help="a shape of benchmarks/checkpoints.py (deep-thin, 3B, ...) or a model folder")
    r.add_argument("--models", type=Path, default=HERE / "out" / "models")
    r.add_argument("--image", default="448x448")
    r.add_argument("--tokens", type=int, default=32)
    r.add_argument("--runs", type=int, default=3)
    r.add_argument("--timeout", type=float, default=3600)
    r.add_argument("--json", type=Path)
    v = sub.add_parser("vision", help="where the vision tower runs across 2 ranks")
    v.add_argument("--depth", type=int, default=8)
    v.add_argument("--images", type=int, default=2)
    v.add_argument("--size", type=int, default=448)
    v.add_argument("--runs", type=int, default=3)
    v.add_argument("--timeout", type=float, default=1800)
    v.add_argument("--json", type=Path)
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+")
    w = sub.add_parser("_worker")
    w.add_argument("spec")
    vw = sub.add_parser("_vision_worker")
    vw.add_argument("spec")
    args = parser.parse_args()
    if args.command == "_worker":
        return worker(args.spec)
    if args.command == "_vision_worker":
        return vision_worker(args.spec)
    if args.command == "table":
        print(table(args.files))
        return
    report = run(args) if args.command == "run" else vision(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(table([args.json]))
    else:
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
