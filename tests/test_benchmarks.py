"""Smoke test of benchmarks/: the whole protocol on a tiny random model, in seconds.

No timing is asserted: CI machines vary. What is checked is that every system runs from the same
folder and inputs, that the JSON and tables are complete, and that ours and mlx-vlm (when the
``bench`` extra is installed) decode the same greedy tokens from the same weights.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench.py"
HAS_MLX_VLM = importlib.util.find_spec("mlx_vlm") is not None

sys.path.insert(0, str(ROOT / "benchmarks"))
import checkpoints  # noqa: E402


def bench(*args, timeout=300):
    proc = subprocess.run([sys.executable, str(BENCH), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_real_shapes_have_the_hub_parameter_counts():
    # Qwen2.5-VL-3B-Instruct and -7B-Instruct as published.
    assert checkpoints.parameter_count(checkpoints.shape_config("3B")) == 3_754_622_976
    assert checkpoints.parameter_count(checkpoints.shape_config("7B")) == 8_292_166_656
    thin = checkpoints.shape_config("deep-thin")
    assert (thin["num_hidden_layers"], thin["vision_config"]["depth"]) == (36, 32)


def test_small_vocabulary_keeps_special_tokens_apart():
    config = checkpoints.shape_config("deep-thin")
    ids = checkpoints.remap_ids([[151644, 872, 151652, 151655, 151653, 151645, 150000]], config["vocab_size"])
    assert ids[0, 3] == config["image_token_id"]
    assert ids[0, 2] == config["vision_start_token_id"]
    assert (ids < config["vocab_size"]).all()
    assert not set(ids[0, [1, 6]]) & {config[k] for k in checkpoints.SPECIAL_KEYS}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench_models")
    bench("make", "tiny", "--models", path)
    return path


def test_run_smoke(models, tmp_path):
    systems = "ours,mlx-lm" + (",mlx-vlm" if HAS_MLX_VLM else "")
    out = tmp_path / "tiny.json"
    text = bench("run", "tiny", "--models", models, "--systems", systems, "--vision", "56x56,112x84",
                 "--generate", "112x84", "--warmup", "56x56", "--tokens", "4", "--runs", "2", "--json", out)
    report = json.loads(out.read_text())
    assert set(report["systems"]) == set(systems.split(","))
    ours = report["systems"]["ours"]
    assert ours["blas"]
    assert len(ours["vision"]["112x84"]["seconds"]) == 2
    assert all(t > 0 for t in ours["vision"]["56x56"]["seconds"])
    for name, result in report["systems"].items():
        g = result["generate"]
        assert len(g["tokens"]) == 4 and len(g["decode_tps"]) == 2 and len(g["ttft_s"]) == 2, name
        assert g["prompt_tokens"] == report["inputs"]["112x84"]["prompt_tokens"]
        assert all(p > 0 for p in g["peak_gb"])
    assert "mlx-lm" not in report["summary"]["systems"] or not report["systems"]["mlx-lm"]["vision"]
    assert "decode speed vs mlx-lm (text)" in report["summary"]["ratios"]
    assert "| decode tokens/s (4 tokens) |" in text
    if HAS_MLX_VLM:
        # The same weights and inputs give the same greedy answer in float32.
        assert report["systems"]["mlx-vlm"]["generate"]["tokens"] == ours["generate"]["tokens"]
        assert "vision 112x84 speed-up vs mlx-vlm" in report["summary"]["ratios"]
    assert "| ratio (ours vs …) |" in bench("table", out)


def test_blas_smoke(models, tmp_path):
    out = tmp_path / "blas.json"
    text = bench("blas", "tiny", "--models", models, "--dtypes", "float32", "--vision", "56x56",
                 "--generate", "56x56", "--warmup", "56x56", "--tokens", "2", "--runs", "1", "--json", out)
    result = json.loads(out.read_text())
    configs = [(r["dtype"], r["no_blas"]) for r in result["reports"]]
    assert configs == [("float32", False), ("float32", True)]
    no_blas = result["reports"][1]["systems"]["ours"]["blas"]
    assert no_blas.startswith("reference BLAS")
    assert "MLX_QWENVL_NO_BLAS=1" in text
