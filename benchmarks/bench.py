"""Benchmarks: mlx_qwenvl against mlx-vlm and mlx-lm on the same machine, weights and dtype.

    python benchmarks/bench.py make deep-thin                 # random-weight folder (hub layout)
    python benchmarks/bench.py run deep-thin --dtype float32  # the whole protocol, every system
    python benchmarks/bench.py blas 3B-slice                  # issue 7: with/without OpenBLAS
    python benchmarks/bench.py table benchmarks/results/*.json

``run`` measures, for each system in its own fresh process (one system in memory at a time):
vision encode time per image size, time to first token / prompt tokens per second for an image
prompt, decode tokens per second (EOS ignored) and MLX's peak memory per workload, each repeated
``--runs`` times after an untimed warm-up; it prints a table of medians [min-max] and ratios and
writes JSON. See benchmarks/README.md.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from checkpoints import SHAPES, parameter_count, remap_ids, shape_config, write_model  # noqa: E402

DEFAULT_MODELS = HERE / "out" / "models"
VISION_SIZES = ("448x448", "672x448", "1288x728")
PROMPT = "Describe this image in detail."
BIG_PHOTO = "4032x3024"  # a 12-megapixel photo: ~15,500 vision tokens at the hub's max_pixels


# --------------------------------------------------------------------------------------------
# inputs


TEXT = "text"  # a prompt without an image, for decode-only measurements


def parse_size(name: str):
    if name == TEXT:
        return 0, 0
    width, height = (int(v) for v in name.lower().split("x"))
    return width, height


def prepare_inputs(model_dir, sizes, out_file):
    """Our processor's token ids, pixel values and grids for one image prompt per size (npz)."""
    import mlx_qwenvl  # noqa: F401
    import numpy as np
    from PIL import Image

    from mlx_qwenvl.processor import Processor

    processor = Processor.from_pretrained(model_dir)
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    arrays, info = {}, {}
    for name in sizes:
        if name == TEXT:
            out = processor.encode(f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n")
            arrays[f"ids_{name}"] = remap_ids(out["input_ids"], vocab).astype(np.int32)
            arrays[f"pixels_{name}"] = np.zeros((0, 1176), np.float32)
            arrays[f"grid_{name}"] = np.zeros((0, 3), np.int32)
            info[name] = {"prompt_tokens": int(out["input_ids"].shape[1])}
            continue
        width, height = parse_size(name)
        rng = np.random.default_rng(width * 7919 + height)
        # A smooth picture with some noise: content does not change the cost.
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                         (x + y) * 255 // max(width + height - 2, 1)], axis=-1)
        image = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
        messages = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(image)},
                                                 {"type": "text", "text": PROMPT}]}]
        tic = time.perf_counter()
        out = processor(messages)
        seconds = time.perf_counter() - tic
        arrays[f"ids_{name}"] = remap_ids(out["input_ids"], vocab).astype(np.int32)
        arrays[f"pixels_{name}"] = out["pixel_values"].astype(np.float32)
        arrays[f"grid_{name}"] = np.asarray(out["image_grid_thw"], dtype=np.int32)
        grid = arrays[f"grid_{name}"]
        info[name] = {"grid_thw": grid.tolist(), "patches": int(grid.prod(axis=1).sum()),
                      "vision_tokens": int(grid.prod(axis=1).sum()) // 4,
                      "prompt_tokens": int(out["input_ids"].shape[1]), "processor_s": seconds}
    np.savez(out_file, **arrays)
    return info


# --------------------------------------------------------------------------------------------
# running the systems


def run_worker(spec: dict, env=None, timeout=None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_file.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, str(HERE / "worker.py"), str(spec_file), str(out_file)],
                              env=env, timeout=timeout, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"{spec['system']} ({spec['dtype']}) failed with exit code {proc.returncode}"
                               f"{' (killed: out of memory?)' if proc.returncode < 0 else ''}:\n{tail}")
        return json.loads(out_file.read_text())


def merge_runs(results: list) -> dict:
    """Results of several fresh processes of one system: lists concatenated, the rest max/first."""
    merged = json.loads(json.dumps(results[0]))
    for other in results[1:]:
        for name, entry in other.get("vision", {}).items():
            for key in ("seconds", "peak_gb"):
                merged["vision"][name][key] += entry[key]
        if "generate" in other:
            for key in ("ttft_s", "prompt_tps", "decode_tps", "peak_gb"):
                merged["generate"][key] += other["generate"][key]
        for key in ("load_s", "load_peak_gb", "max_rss_gb"):
            merged[key] = max(merged[key], other[key])
    return merged


def environment(no_blas=False) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if no_blas:
        env["MLX_QWENVL_NO_BLAS"] = "1"
    else:
        env.pop("MLX_QWENVL_NO_BLAS", None)
    return env


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("mlx", "mlx-lm", "mlx-vlm", "mlx-qwenvl"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            cpu = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                 text=True).stdout.strip() or cpu
        except OSError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE).stdout.strip() or None
    except OSError:
        commit = None
    info = {"system": platform.system(), "machine": platform.machine(), "cpu": cpu, "commit": commit,
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version(), **versions()}
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError):
        pass
    return info


def model_folder(shape_or_path: str, models_dir: Path) -> tuple:
    """(shape name, folder), creating a random-weight folder for a known shape when needed."""
    if shape_or_path in SHAPES:
        path = Path(models_dir) / shape_or_path
        stamp = {"shape": shape_or_path, "seed": 0, "parameters": parameter_count(shape_config(shape_or_path))}
        done = path / "bench_model.json"
        if not (done.is_file() and json.loads(done.read_text()) == stamp):
            print(f"creating the random-weight {shape_or_path} folder in {path} ...", flush=True)
            subprocess.run([sys.executable, str(HERE / "bench.py"), "make", shape_or_path, "--models",
                            str(models_dir)], check=True, env=environment())
        return shape_or_path, path
    path = Path(shape_or_path)
    return path.name, path


def image_sizes(args) -> list:
    vision = [s for s in args.vision.split(",") if s]
    extra = ([args.generate] if args.generate else []) + ([args.warmup] if args.warmup else [])
    return sorted(set(vision + extra), key=lambda s: parse_size(s)[0] * parse_size(s)[1])


def prepare(path: Path, sizes, tmp: Path, no_blas=False):
    """Inputs for every size, made once by our processor in a subprocess: (npz, info)."""
    npz, info_file = tmp / "inputs.npz", tmp / "info.json"
    subprocess.run([sys.executable, str(HERE / "bench.py"), "_prepare", str(path), str(npz), str(info_file),
                    *sizes], check=True, env=environment(no_blas))
    return npz, json.loads(info_file.read_text())


def run(args, prepared=None) -> dict:
    shape, path = model_folder(args.model, args.models)
    if prepared is None:
        with tempfile.TemporaryDirectory() as tmp:
            return run(args, prepare(path, image_sizes(args), Path(tmp), args.no_blas))
    npz, inputs = prepared
    config = json.loads((path / "config.json").read_text())
    systems = [s for s in args.systems.split(",") if s]
    if "mlx-vlm" in systems and not installed("mlx_vlm"):
        print("mlx-vlm is not installed (pip install -e '.[bench]'): skipping it", file=sys.stderr)
        systems.remove("mlx-vlm")
    vision = [s for s in args.vision.split(",") if s]
    gen_image = args.generate or None
    report = {
        "model": {"name": shape, "path": str(path), "parameters": parameter_count(config) if shape in SHAPES else None,
                  "text_layers": config.get("num_hidden_layers"), "hidden_size": config.get("hidden_size"),
                  "vision_blocks": config["vision_config"]["depth"],
                  "vision_hidden_size": config["vision_config"]["hidden_size"],
                  "vocab_size": config.get("vocab_size")},
        "dtype": args.dtype,
        "no_blas": args.no_blas,
        "machine": machine(),
        "protocol": {"runs_per_process": args.runs, "processes": args.processes, "warmup": args.warmup,
                     "vision_sizes": vision, "generate_image": gen_image, "decode_tokens": args.tokens,
                     "inputs": "our processor's token ids and pixel values, identical for every system",
                     "timing": "generator level (prefill + decode), no detokenization, EOS ignored"},
        "inputs": inputs,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "systems": {},
    }
    specs = {system: {"system": system, "model": str(path), "dtype": args.dtype, "inputs": str(npz),
                      "vision_sizes": vision, "runs": args.runs, "warmup": args.warmup,
                      "memory_cap_gb": args.memory_cap_gb,
                      "generate": {"image": gen_image, "tokens": args.tokens} if gen_image else None}
             for system in systems}
    results = {system: [] for system in systems}
    # With several processes per system, the systems take turns, so that a change in the
    # machine's load falls on all of them alike.
    for p in range(args.processes):
        for system in systems:
            print(f"[{time.strftime('%H:%M:%S')}] {shape} {args.dtype}{' no-BLAS' if args.no_blas else ''}: "
                  f"{system} (process {p + 1}/{args.processes})", flush=True)
            results[system].append(run_worker(specs[system], environment(args.no_blas)))
    report["systems"] = {system: merge_runs(results[system]) for system in systems}
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    report["summary"] = summarize(report)
    return report


# --------------------------------------------------------------------------------------------
# summaries and tables


def stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratio(ours: dict, theirs: dict, higher_is_better: bool):
    """Speed-up of ours over theirs from medians, with the range the extremes allow."""
    if not ours or not theirs:
        return None
    if higher_is_better:  # throughputs: ours / theirs
        return {"median": ours["median"] / theirs["median"], "min": ours["min"] / theirs["max"],
                "max": ours["max"] / theirs["min"]}
    return {"median": theirs["median"] / ours["median"], "min": theirs["min"] / ours["max"],
            "max": theirs["max"] / ours["min"]}


def plain_ratio(ours: dict, theirs: dict):
    """ours / theirs for quantities where lower is better (TTFT, memory)."""
    if not ours or not theirs:
        return None
    return {"median": ours["median"] / theirs["median"], "min": ours["min"] / theirs["max"],
            "max": ours["max"] / theirs["min"]}


def summarize(report: dict) -> dict:
    systems = report["systems"]
    out = {"systems": {}, "ratios": {}}
    for name, r in systems.items():
        s = {"load_s": r["load_s"], "weights_gb": r["weights_gb"], "max_rss_gb": r["max_rss_gb"], "vision": {}}
        for size, v in r.get("vision", {}).items():
            s["vision"][size] = {"seconds": stats(v["seconds"]), "peak_gb": stats(v["peak_gb"]), "patches": v["patches"]}
        if r.get("generate"):
            g = r["generate"]
            s["generate"] = {k: stats(g[k]) for k in ("ttft_s", "prompt_tps", "decode_tps", "peak_gb")}
            s["generate"]["prompt_tokens"] = g["prompt_tokens"]
        out["systems"][name] = s
    ours, vlm, lm = (out["systems"].get(k) for k in ("ours", "mlx-vlm", "mlx-lm"))
    ratios = out["ratios"]
    if ours and vlm:
        for size in ours["vision"]:
            if size in vlm["vision"]:
                ratios[f"vision {size} speed-up vs mlx-vlm"] = ratio(ours["vision"][size]["seconds"],
                                                                       vlm["vision"][size]["seconds"], False)
                ratios[f"vision {size} peak memory / mlx-vlm"] = plain_ratio(ours["vision"][size]["peak_gb"],
                                                                            vlm["vision"][size]["peak_gb"])
        if ours.get("generate") and vlm.get("generate"):
            ratios["TTFT / mlx-vlm"] = plain_ratio(ours["generate"]["ttft_s"], vlm["generate"]["ttft_s"])
            ratios["decode speed vs mlx-vlm"] = ratio(ours["generate"]["decode_tps"], vlm["generate"]["decode_tps"], True)
            ratios["generate peak memory / mlx-vlm"] = plain_ratio(ours["generate"]["peak_gb"], vlm["generate"]["peak_gb"])
    if "ours" in systems and "mlx-vlm" in systems and systems["ours"].get("generate") \
            and systems["mlx-vlm"].get("generate"):
        a, b = systems["ours"]["generate"]["tokens"], systems["mlx-vlm"]["generate"]["tokens"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        out["checks"] = {"greedy tokens equal to mlx-vlm's": f"{same} of {len(a)}"}
    if ours and lm and ours.get("generate") and lm.get("generate"):
        ratios["decode speed vs mlx-lm (text)"] = ratio(ours["generate"]["decode_tps"], lm["generate"]["decode_tps"], True)
    return out


def fmt(s, digits=3, scale=1.0):
    if not s:
        return "–"
    m, lo, hi = s["median"] * scale, s["min"] * scale, s["max"] * scale
    return f"{m:.{digits}g} [{lo:.{digits}g}–{hi:.{digits}g}]"


def table(report: dict) -> str:
    """Markdown: per-system medians [min-max] and the ratios."""
    summary = summarize(report)
    systems = summary["systems"]
    names = list(systems)
    title = f"{report['model']['name']}, {report['dtype']}{', reference BLAS' if report.get('no_blas') else ''}"
    lines = [f"**{title}** ({report['machine'].get('cpu')}, {report['machine'].get('cpus')} CPUs; "
             f"{report['protocol']['runs_per_process'] * report['protocol']['processes']} runs)", "",
             "| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def row(label, getter, digits=3):
        cells = []
        for n in names:
            try:
                cells.append(fmt(getter(systems[n]), digits))
            except (KeyError, TypeError):
                cells.append("–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    sizes = []
    for n in names:
        sizes += [s for s in systems[n].get("vision", {}) if s not in sizes]
    for size in sizes:
        row(f"vision encode {size} (s)", lambda s, size=size: s["vision"][size]["seconds"])
        row(f"peak memory, encode {size} (GB)", lambda s, size=size: s["vision"][size]["peak_gb"])
    gen = report["protocol"].get("generate_image")
    if gen:
        row(f"time to first token, {gen} prompt (s)", lambda s: s["generate"]["ttft_s"])
        row("prompt tokens/s", lambda s: s["generate"]["prompt_tps"])
        row(f"decode tokens/s ({report['protocol']['decode_tokens']} tokens)", lambda s: s["generate"]["decode_tps"])
        row("peak memory, generation (GB)", lambda s: s["generate"]["peak_gb"])
    lines.append("| weights in memory (GB) | " + " | ".join(f"{systems[n]['weights_gb']:.3g}" for n in names) + " |")
    lines.append("")
    for label, value in summary.get("checks", {}).items():
        lines += [f"Check: ours' greedy tokens equal to mlx-vlm's (same weights and inputs): {value}.", ""]
    if summary["ratios"]:
        lines += ["| ratio (ours vs …) | median [range] |", "|---|---|"]
        for label, r in summary["ratios"].items():
            lines.append(f"| {label} | {fmt(r, 3)} |")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# issue 7: the BLAS binding and float32 vs bfloat16


def blas(args) -> dict:
    reports = []
    _, path = model_folder(args.model, args.models)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare(path, image_sizes(args), Path(tmp))
        for dtype in args.dtypes.split(","):
            for no_blas in (False, True):
                if no_blas and dtype != "float32" and not args.all:
                    continue  # bfloat16 and quantized products never go through BLAS
                sub = argparse.Namespace(**vars(args))
                sub.dtype, sub.no_blas, sub.systems = dtype, no_blas, "ours"
                reports.append(run(sub, prepared))
    return {"kind": "blas", "reports": reports}


def blas_table(result: dict) -> str:
    rows = []
    head = None
    for r in result["reports"]:
        s = r["summary"]["systems"]["ours"]
        label = f"{r['dtype']}, {'reference BLAS (MLX_QWENVL_NO_BLAS=1)' if r['no_blas'] else 'OpenBLAS binding'}"
        cells = []
        cols = []
        for size, v in s["vision"].items():
            cols.append(f"vision encode {size} (s)")
            cells.append(fmt(v["seconds"]))
        if s.get("generate"):
            g = s["generate"]
            cols += [f"time to first token (s)", "prompt tokens/s", "decode tokens/s"]
            cells += [fmt(g["ttft_s"]), fmt(g["prompt_tps"]), fmt(g["decode_tps"])]
        head = cols
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    r0 = result["reports"][0]
    return "\n".join([f"**{r0['model']['name']}** (ours; {r0['machine'].get('cpu')}, {r0['machine'].get('cpus')} CPUs)", "",
                      "| configuration | " + " | ".join(head) + " |", "|---|" + "---|" * len(head), *rows, ""])


# --------------------------------------------------------------------------------------------
# converting to 4-bit: ours (convert.py) against mlx-vlm's converter


# The child reports its own high-water mark (VmHWM) at exit: the peak of the process image
# after exec, whatever the parent held.
PEAK_WRAPPER = r"""
import atexit, resource, runpy, sys
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
import mlx_qwenvl  # the same BLAS for both
kind, target = sys.argv[1], sys.argv[2]
sys.argv = [target] + sys.argv[3:]
if kind == "module":
    runpy.run_module(target, run_name="__main__")
else:
    runpy.run_path(target, run_name="__main__")
"""


def measure_convert(kind, target, argv) -> dict:
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, kind, target, *argv], capture_output=True,
                          text=True, env=environment(), cwd=HERE.parent)
    seconds = time.perf_counter() - tic
    peaks = [line for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_BYTES=")]
    if proc.returncode != 0 or not peaks:
        raise RuntimeError(f"{target} failed:\n{(proc.stderr or proc.stdout)[-3000:]}")
    return {"seconds": seconds, "peak_rss_gb": int(peaks[-1].split("=")[1]) / 1e9}


def convert(args) -> dict:
    shape, path = model_folder(args.model, args.models)
    converters = {
        "ours": ("path", str(HERE.parent / "convert.py"), ["--hf-path", str(path), "-q", "--q-bits", str(args.bits)]),
        "mlx-vlm": ("module", "mlx_vlm.convert", ["--hf-path", str(path), "-q", "--q-bits", str(args.bits)]),
    }
    if not installed("mlx_vlm"):
        converters.pop("mlx-vlm")
    checkpoint = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    result = {"kind": "convert", "model": {"name": shape, "path": str(path), "checkpoint_gb": checkpoint / 1e9},
              "bits": args.bits, "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "systems": {name: {"seconds": [], "peak_rss_gb": [], "output_gb": None} for name in converters}}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for run_index in range(args.runs):
            for name, (kind, target, argv) in converters.items():
                out = Path(tmp) / f"{name}-{run_index}"
                print(f"[{time.strftime('%H:%M:%S')}] convert {shape} to {args.bits}-bit: {name} "
                      f"(run {run_index + 1}/{args.runs})", flush=True)
                m = measure_convert(kind, target, argv + ["--mlx-path", str(out)])
                entry = result["systems"][name]
                entry["seconds"].append(m["seconds"])
                entry["peak_rss_gb"].append(m["peak_rss_gb"])
                entry["output_gb"] = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9
                import shutil

                shutil.rmtree(out, ignore_errors=True)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return result


def convert_table(result: dict) -> str:
    names = list(result["systems"])
    lines = [f"**convert {result['model']['name']} ({result['model']['checkpoint_gb']:.2f} GB bf16) to "
             f"{result['bits']}-bit** ({result['machine'].get('cpu')}, {result['machine'].get('cpus')} CPUs)", "",
             "| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label in (("seconds", "time (s)"), ("peak_rss_gb", "peak resident memory (GB)")):
        lines.append(f"| {label} | " + " | ".join(fmt(stats(result["systems"][n][key])) for n in names) + " |")
    lines.append("| output (GB) | " + " | ".join(f"{result['systems'][n]['output_gb']:.3g}" for n in names) + " |")
    if "mlx-vlm" in names and "ours" in names:
        ours, vlm = result["systems"]["ours"], result["systems"]["mlx-vlm"]
        lines += ["", "| ratio (ours / mlx-vlm) | median [range] |", "|---|---|",
                  f"| time | {fmt(plain_ratio(stats(ours['seconds']), stats(vlm['seconds'])))} |",
                  f"| peak memory | {fmt(plain_ratio(stats(ours['peak_rss_gb']), stats(vlm['peak_rss_gb'])))} |"]
    return "\n".join(lines + [""])


# --------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    make = sub.add_parser("make", help="create a random-weight model folder")
    make.add_argument("shape", choices=SHAPES)
    make.add_argument("--models", type=Path, default=DEFAULT_MODELS)

    def common(p):
        p.add_argument("model", help=f"a shape ({', '.join(SHAPES)}) or a model folder")
        p.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="where shapes' folders are created")
        p.add_argument("--vision", default=",".join(VISION_SIZES), help="image sizes WxH to encode (comma-separated)")
        p.add_argument("--generate", default="672x448", help="image of the generation prompt ('' for none)")
        p.add_argument("--warmup", default="448x448", help="image size of the untimed warm-up")
        p.add_argument("--tokens", type=int, default=64, help="decode tokens")
        p.add_argument("--runs", type=int, default=3, help="timed runs per process")
        p.add_argument("--processes", type=int, default=1, help="fresh processes per system")
        p.add_argument("--json", type=Path, help="write the results here")
        p.add_argument("--memory-cap-gb", type=float, default=None,
                       help="address-space limit per worker (a failed allocation instead of the OOM killer)")

    r = sub.add_parser("run", help="measure ours, mlx-vlm and mlx-lm")
    common(r)
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "q4", "q8"])
    r.add_argument("--systems", default="ours,mlx-vlm,mlx-lm")
    r.add_argument("--no-blas", action="store_true", help="MLX_QWENVL_NO_BLAS=1 for every system")

    b = sub.add_parser("blas", help="issue 7: ours with and without the OpenBLAS binding, float32 vs bfloat16")
    common(b)
    b.add_argument("--dtypes", default="float32,bfloat16")
    b.add_argument("--all", action="store_true", help="also run non-float32 dtypes without the binding")

    c = sub.add_parser("convert", help="time and peak memory of converting to 4-bit: ours vs mlx-vlm")
    c.add_argument("model", help=f"a shape ({', '.join(SHAPES)}) or a model folder")
    c.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    c.add_argument("--bits", type=int, default=4)
    c.add_argument("--runs", type=int, default=3)
    c.add_argument("--workdir", type=Path, default=None, help="where the outputs are written (then removed)")
    c.add_argument("--json", type=Path)

    t = sub.add_parser("table", help="print the tables of result files")
    t.add_argument("files", nargs="+", type=Path)

    p = sub.add_parser("_prepare")
    p.add_argument("model")
    p.add_argument("npz")
    p.add_argument("info")
    p.add_argument("sizes", nargs="+")

    args = parser.parse_args(argv)
    if args.command == "make":
        import mlx_qwenvl  # noqa: F401

        path = write_model(args.shape, Path(args.models) / args.shape)
        print(path)
    elif args.command == "_prepare":
        Path(args.info).write_text(json.dumps(prepare_inputs(args.model, args.sizes, args.npz)))
    elif args.command == "table":
        for file in args.files:
            result = json.loads(file.read_text())
            kind = result.get("kind")
            print(blas_table(result) if kind == "blas" else convert_table(result) if kind == "convert" else table(result))
    elif args.command == "convert":
        result = convert(args)
        print(convert_table(result))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))
    else:
        result = run(args) if args.command == "run" else blas(args)
        text = blas_table(result) if args.command == "blas" else table(result)
        print(text)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
