"""First-token latency of an Open-WebUI-style conversation through OpenAI-compatible servers
(issue 18): ``mlx-qwenvl server`` against ``mlx_vlm.server`` 0.7.10 with its default settings
and with its prompt cache (APC) enabled.

    python benchmarks/server_bench.py run                      # 3 runs, every system, a table
    python benchmarks/server_bench.py run --runs 3 --json benchmarks/results/server.json
    python benchmarks/server_bench.py run --vlm-python /tmp/vlmvenv/bin/python
    python benchmarks/server_bench.py table benchmarks/results/server.json

The conversation is what Open WebUI sends: three streaming turns, each resending the whole
history, the 1288x728 image of turn 1 included as a PNG data URI, each turn's history holding
the answers that server gave. The time to first token of a turn runs from sending the request
to the first streamed chunk with text, measured by this client on loopback.

The model is ``server-deep-thin``: the real 3B layer and block counts (36 text layers, 32
vision blocks) with the tiny widths of bench.py's deep-thin, so that per-layer overhead rather
than arithmetic dominates, but with the real 151,936-token vocabulary (a server tokenizes the
text itself, so deep-thin's remapped 8,192-token vocabulary cannot be used) and float32
weights on disk (both servers then compute in float32, the CPU's fast path; mlx-vlm keeps a
checkpoint's dtype). Each system runs in a fresh process per run (cold caches at turn 1); the
systems take turns. Both processes import mlx_qwenvl first, so both get the OpenBLAS it binds
(as in bench.py). Answers are random-weight text, max_tokens tokens long (greedy).
"""

import argparse
import base64
import http.client
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import checkpoints  # noqa: E402

MODEL_DIR = HERE / "out" / "models" / "server-deep-thin"
IMAGE_SIZE = (1288, 728)  # width, height
QUESTIONS = ["Describe this image in detail.", "What stands out the most?", "Summarize that in one sentence."]
SYSTEMS = ("mlx-qwenvl", "mlx-vlm", "mlx-vlm-apc")
START_TIMEOUT_S = 600
TURN_TIMEOUT_S = 900


# --------------------------------------------------------------------------------------------
# The model folder and the conversation


def model_config() -> dict:
    """deep-thin's shapes (benchmarks/checkpoints.py) with the full vocabulary."""
    config = checkpoints.hub_config(
        dict(hidden_size=256, intermediate_size=512, num_hidden_layers=36, num_attention_heads=2,
             num_key_value_heads=1, tie_word_embeddings=True),
        dict(hidden_size=160, intermediate_size=432, num_heads=2, out_hidden_size=256),
    )
    config["torch_dtype"] = "float32"
    return config


def write_model(path: Path = MODEL_DIR) -> Path:
    """The random-weight folder (float32, one shard, hub layout, the real tokenizer); reused
    when already complete."""
    import mlx_qwenvl  # noqa: F401  (binds the BLAS before mlx loads)
    import mlx.core as mx

    config = model_config()
    stamp = {"shape": "server-deep-thin", "parameters": checkpoints.parameter_count(config), "dtype": "float32"}
    done = path / "bench_model.json"
    if done.is_file() and json.loads(done.read_text()) == stamp:
        return path
    path.mkdir(parents=True, exist_ok=True)
    weights = {}
    for name, shape in checkpoints.weight_shapes(config):
        weights[name] = checkpoints.random_weight(name, shape).astype(mx.float32)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    index = {"metadata": {"total_size": 4 * stamp["parameters"]},
             "weight_map": {name: "model.safetensors" for name in weights}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps(checkpoints.GENERATION_CONFIG, indent=2))
    (path / "preprocessor_config.json").write_text(json.dumps(checkpoints.HUB_PREPROCESSOR_CONFIG, indent=2))
    for file in checkpoints.TOKENIZER_ASSETS.iterdir():
        if file.is_file():
            (path / file.name).write_bytes(file.read_bytes())
    done.write_text(json.dumps(stamp))
    return path


def image_uri(width: int, height: int) -> str:
    """A smooth picture with some noise (as bench.py's), as a PNG data URI."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(width * 7919 + height)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                     (x + y) * 255 // max(width + height - 2, 1)], axis=-1)
    pixels = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def turn_messages(image: str, answers: list) -> list:
    """Open WebUI's request for the next turn: text then image in turn 1, the whole history."""
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTIONS[0]},
                                             {"type": "image_url", "image_url": {"url": image}}]}]
    for answer, question in zip(answers, QUESTIONS[1:]):
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]
    return messages


# --------------------------------------------------------------------------------------------
# Servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(system: str, model: Path, port: int, vlm_python: str) -> tuple[list, dict]:
    """The command and environment that start ``system`` on 127.0.0.1:``port``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if system == "mlx-qwenvl":
        return [sys.executable, "-m", "mlx_qwenvl", "server", "--model", str(model), "--port", str(port),
                "--max-tokens", "512"], env
    # mlx_qwenvl imported first: the same OpenBLAS binding (from this checkout, no install).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if system == "mlx-vlm-apc":
        env["APC_ENABLED"] = "1"
        env["APC_DISK_PATH"] = tempfile.mkdtemp(prefix="apc-")
    launcher = ("import sys, runpy, mlx_qwenvl; "
                f"sys.argv = ['mlx_vlm.server', '--model', {str(model)!r}, '--host', '127.0.0.1', "
                f"'--port', '{port}']; runpy.run_module('mlx_vlm.server', run_name='__main__')")
    return [vlm_python, "-c", launcher], env


class Server:
    def __init__(self, system: str, model: Path, vlm_python: str):
        self.system, self.port = system, free_port()
        command, env = server_command(system, model, self.port, vlm_python)
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        tic = time.monotonic()
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() - tic > START_TIMEOUT_S:
                self.log.seek(0)
                tail = "".join(self.log.readlines()[-20:])
                self.close()
                raise RuntimeError(f"{system} did not start:\n{tail}")
            time.sleep(0.5)
        self.start_s = time.monotonic() - tic

    def ready(self) -> bool:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            connection.request("GET", "/v1/models")
            return connection.getresponse().status == 200
        except OSError:
            return False

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.log.close()


def stream_turn(port: int, model: str, messages: list, max_tokens: int) -> dict:
    """One streaming request: time to the first chunk with text, to the end, the text, usage.
    ``model`` names the folder (mlx-vlm's server loads the model a request names)."""
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TURN_TIMEOUT_S)
    tic = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
    first, text, usage = None, [], None
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("error"):
            raise RuntimeError(f"error event: {event['error']}")
        for choice in event.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") or ""
            if piece and first is None:
                first = time.perf_counter() - tic
            text.append(piece)
        usage = event.get("usage") or usage
    total = time.perf_counter() - tic
    connection.close()
    return {"ttft_s": first if first is not None else total, "total_s": total, "text": "".join(text),
            "usage": usage}


def conversation(system: str, model: Path, image: str, max_tokens: int, vlm_python: str) -> dict:
    """A fresh server, three turns, the server stopped."""
    server = Server(system, model, vlm_python)
    try:
        turns, answers = [], []
        for _ in QUESTIONS:
            turn = stream_turn(server.port, str(model), turn_messages(image, answers), max_tokens)
            answers.append(turn["text"])
            turns.append(turn)
        return {"system": system, "start_s": server.start_s, "turns": turns}
    finally:
        server.close()


# --------------------------------------------------------------------------------------------
# Runs and tables


def run(args) -> dict:
    model = write_model()
    image = image_uri(*IMAGE_SIZE)
    report = {"machine": machine(args.vlm_python), "model": str(model), "config": {k: model_config()[k] for k in
              ("num_hidden_layers", "hidden_size", "vocab_size")}, "image": list(IMAGE_SIZE),
              "max_tokens": args.tokens, "runs": {system: [] for system in args.systems}}
    for run_index in range(args.runs):
        for system in args.systems:  # the systems take turns
            result = conversation(system, model, image, args.tokens, args.vlm_python)
            report["runs"][system].append(result)
            ttfts = ", ".join(f"{t['ttft_s']:.2f}" for t in result["turns"])
            print(f"run {run_index + 1} {system}: first token per turn {ttfts} s", file=sys.stderr, flush=True)
    return report


def machine(vlm_python: str = sys.executable) -> dict:
    """The machine and the versions each side runs (mlx-vlm's from its own Python)."""
    versions = {}
    for name, python in (("mlx", sys.executable), ("mlx_lm", sys.executable), ("mlx_vlm", vlm_python)):
        found = subprocess.run([python, "-c", f"from importlib.metadata import version; print(version({name.replace('_', '-')!r}))"],
                               capture_output=True, text=True)
        versions[name] = found.stdout.strip() or None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "versions": versions, "commit": commit.stdout.strip()}


def summary(values: list) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def table(report: dict) -> str:
    """Median [min-max] first-token seconds per turn and system; ratios as "theirs / ours"
    (above 1: ours is faster)."""
    systems = list(report["runs"])
    turns = len(QUESTIONS)
    stats = {s: [summary([r["turns"][t]["ttft_s"] for r in report["runs"][s]]) for t in range(turns)]
             for s in systems}
    lines = ["| turn | " + " | ".join(f"{s} first token (s)" for s in systems)
             + "".join(f" | {s} / mlx-qwenvl" for s in systems if s != "mlx-qwenvl") + " |",
             "|---" * (1 + len(systems) + len(systems) - 1) + "|"]
    for t in range(turns):
        cells = [fmt(stats[s][t]) for s in systems]
        ratios = [ratio(report, s, t) for s in systems if s != "mlx-qwenvl"]
        lines.append(f"| {t + 1} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def fmt(s: dict) -> str:
    return f"{s['median']:.2f} [{s['min']:.2f}–{s['max']:.2f}]"


def ratio(report: dict, system: str, turn: int) -> str:
    """The ratio of medians, with the range of the per-run ratios (runs paired in order)."""
    ours = [r["turns"][turn]["ttft_s"] for r in report["runs"]["mlx-qwenvl"]]
    theirs = [r["turns"][turn]["ttft_s"] for r in report["runs"][system]]
    paired = [b / a for a, b in zip(ours, theirs)]
    return f"{statistics.median(theirs) / statistics.median(ours):.1f}× [{min(paired):.1f}–{max(paired):.1f}]"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run the conversation on every system")
    run_parser.add_argument("--runs", type=int, default=3)
    run_parser.add_argument("--tokens", type=int, default=16, help="max_tokens of each answer")
    run_parser.add_argument("--systems", default=",".join(SYSTEMS),
                            type=lambda text: [s for s in text.split(",") if s])
    run_parser.add_argument("--vlm-python", default=sys.executable,
                            help="a Python with mlx-vlm 0.7.10 installed (default: this one)")
    run_parser.add_argument("--json", type=Path, default=None, help="write every run's figures here")
    table_parser = commands.add_parser("table", help="print the table of a --json file")
    table_parser.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    if args.command == "table":
        print(table(json.loads(args.file.read_text())))
        return
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown or "mlx-qwenvl" not in args.systems:
        parser.error(f"--systems: mlx-qwenvl and any of {', '.join(SYSTEMS[1:])}")
    report = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    print(table(report))


if __name__ == "__main__":
    threading.current_thread().name = "server-bench"
    main()
