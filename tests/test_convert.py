"""Converting checkpoints to MLX folders: quantization adds no error of its own, the layout is
mlx-community's, and a failed or interrupted conversion leaves nothing behind."""

import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from mlx_lm.utils import dequantize_model
from safetensors import safe_open
from safetensors.torch import load_file as load_torch

from mlx_qwenvl.convert import ConversionError, ConversionInterrupted, convert
from mlx_qwenvl.errors import ModelLoadError
from mlx_qwenvl.loading import load_model
from reference import make_reference, rel_error, save_reference, tiny_config

convert_module = importlib.import_module("mlx_qwenvl.convert")  # the module, whatever the package exports
convert_plan = importlib.import_module("mlx_qwenvl.convert_plan")
safetensors_io = importlib.import_module("mlx_qwenvl.safetensors_io")
REPO = Path(__file__).resolve().parents[1]
TOKENIZER = Path(__file__).parent / "assets" / "qwen2_tokenizer"
V = 1024  # a small vocabulary (the special ids moved below it) keeps every conversion light


def small_config(**overrides) -> dict:
    """Widths divisible by 128 so every group size applies; the vision MLP's 96 is not
    divisible by 64 or 128, which exercises the skip of indivisible layers."""
    return tiny_config(
        hidden_size=128, intermediate_size=256, vocab_size=V,
        rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
        image_token_id=V - 10, video_token_id=V - 9, vision_start_token_id=V - 8,
        vision_end_token_id=V - 7, vision_token_id=V - 6, bos_token_id=V - 5, eos_token_id=V - 4,
        vision_config=dict(hidden_size=128, intermediate_size=96, out_hidden_size=128),
        **overrides,
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random float32 checkpoint in the hub layout, with tokenizer files beside it."""
    config = small_config()
    folder = save_reference(make_reference(config, seed=3), tmp_path_factory.mktemp("src") / "hub",
                            json.loads(json.dumps(config)))
    for file in TOKENIZER.iterdir():
        shutil.copy(file, folder / file.name)
    (folder / "preprocessor_config.json").write_text(json.dumps({"patch_size": 14}))
    return folder


@pytest.fixture(scope="module")
def q4(source, tmp_path_factory):
    return convert(source, tmp_path_factory.mktemp("q4") / "out", quantize=True, q_bits=4, q_group_size=64)


def logits(model, config):
    image = config["image_token_id"]
    ids = np.array([[11, 22, 33, config["vision_start_token_id"]] + [image] * 4 + [44, 55]])
    pixels = np.random.default_rng(0).standard_normal((16, 1176)).astype(np.float32)
    return np.array(model(ids, pixel_values=pixels, image_grid_thw=np.array([[1, 4, 4]])))


def reference_quantized(source, group_size, bits, vision=False):
    """The source quantized in memory, the way mlx-lm does it (whole tensors at once)."""
    model = load_model(source, dtype=mx.float32)

    def predicate(path, module):
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            return False
        if path.startswith("vision_tower."):
            return vision and not path.startswith("vision_tower.merger.")
        return True

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    return model


def tensors(folder) -> dict:
    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update(mx.load(str(file)))
    return out


def read_json(path):
    return json.loads(Path(path).read_text())


def assert_same_arrays(ours: dict, expected: dict):
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert ours[key].dtype == value.dtype, key
        assert mx.array_equal(ours[key], value).item(), key


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantized_logits_equal_dequantized(source, tmp_path, bits, group_size):
    out = convert(source, tmp_path / "q", quantize=True, q_bits=bits, q_group_size=group_size)
    ours = load_model(out, dtype=mx.float32)
    assert isinstance(ours.language_model.model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    assert isinstance(ours.language_model.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(ours.language_model.lm_head, nn.QuantizedLinear)
    # The stored tensors are exactly mlx-lm's whole-tensor quantization of the source.
    expected = reference_quantized(source, group_size, bits)
    assert_same_arrays(dict(tree_flatten(ours.parameters())), dict(tree_flatten(expected.parameters())))
    # And the logits equal those of the same weights dequantized back.
    config = read_json(source / "config.json")
    dequantize_model(expected)
    error = rel_error(logits(ours, config), logits(expected, config))
    print(f"{bits}-bit group {group_size}: logits vs dequantized {error:.2e}")
    assert error <= 1e-5
    assert rel_error(logits(ours, config), logits(load_model(source, dtype=mx.float32), config)) > 1e-4


def test_vision_tower_stays_unquantized_unless_asked(source, q4, tmp_path):
    original = tensors(convert(source, tmp_path / "f32"))
    stored = tensors(q4)
    vision = [k for k in original if k.startswith("vision_tower.")]
    assert vision and not any(k.startswith("vision_tower.") and k.endswith(".scales") for k in stored)
    for key in vision:
        assert mx.array_equal(stored[key], original[key]).item(), key

    out = convert(source, tmp_path / "qv", quantize=True, q_group_size=64, quantize_vision=True)
    model = load_model(out, dtype=mx.float32)
    block = model.vision_tower.blocks[0]
    for layer in (block.attn.qkv, block.attn.proj, block.mlp.gate_proj, block.mlp.up_proj):
        assert isinstance(layer, nn.QuantizedLinear)
    assert isinstance(block.mlp.down_proj, nn.Linear)  # input 96 is not a multiple of 64
    assert isinstance(model.vision_tower.merger.mlp[0], nn.Linear)
    assert isinstance(model.vision_tower.patch_embed.proj, nn.Conv3d)
    expected = reference_quantized(source, 64, 4, vision=True)
    assert_same_arrays(dict(tree_flatten(model.parameters())), dict(tree_flatten(expected.parameters())))
    dequantize_model(expected)
    config = read_json(source / "config.json")
    assert rel_error(logits(model, config), logits(expected, config)) <= 1e-5


def test_dequantize_round_trips(source, q4, tmp_path):
    quantized = load_model(q4, dtype=mx.float32)
    back = convert(q4, tmp_path / "deq", dequantize=True, dtype="float32")
    config = read_json(back / "config.json")
    assert "quantization" not in config and "quantization_config" not in config
    stored = tensors(back)
    assert not any(k.endswith((".scales", ".biases")) for k in stored)
    layer = quantized.language_model.model.layers[1].self_attn.q_proj
    expected = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=64, bits=4)
    assert mx.array_equal(stored["language_model.model.layers.1.self_attn.q_proj.weight"], expected).item()
    model = load_model(back, dtype=mx.float32)
    assert isinstance(model.language_model.model.layers[0].mlp.up_proj, nn.Linear)
    error = rel_error(logits(model, config), logits(quantized, config))
    assert error <= 1e-5
    # Without --dtype the output is 16-bit (the folder's scales are float32 here: float16).
    half = tensors(convert(q4, tmp_path / "deq16", dequantize=True))
    assert {v.dtype for v in half.values()} == {mx.float16}


def _hub_to_mlx(key, value):
    if key.startswith("visual."):
        key = "vision_tower." + key[len("visual."):]
        if key.endswith("patch_embed.proj.weight"):
            value = value.permute(0, 2, 3, 4, 1)
    elif key.startswith(("model.", "lm_head.")):
        key = "language_model." + key
    return key, value


def test_bfloat16_is_a_bit_exact_cast(source, tmp_path):
    out = convert(source, tmp_path / "bf16", dtype="bfloat16")
    ours = load_torch(out / "model.safetensors")
    expected = dict(_hub_to_mlx(k, v.to(torch.bfloat16)) for k, v in load_torch(source / "model.safetensors").items())
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert ours[key].dtype == torch.bfloat16 and ours[key].shape == value.shape, key
        assert torch.equal(ours[key].view(torch.int16), value.contiguous().view(torch.int16)), key
    assert "quantization" not in read_json(out / "config.json")


def test_layout_is_mlx_community(source, q4):
    files = sorted(p.name for p in q4.iterdir())
    for name in ("config.json", "model.safetensors", "model.safetensors.index.json", "README.md",
                 "tokenizer.json", "tokenizer_config.json", "chat_template.json", "preprocessor_config.json",
                 "generation_config.json"):
        assert name in files
    assert not [name for name in files if name.startswith(".")]
    for name in ("tokenizer.json", "chat_template.json", "preprocessor_config.json"):
        assert (q4 / name).read_bytes() == (source / name).read_bytes()
    assert "library_name: mlx" in (q4 / "README.md").read_text()

    stored = tensors(q4)
    with safe_open(q4 / "model.safetensors", framework="numpy") as f:
        assert f.metadata() == {"format": "mlx"}
    index = read_json(q4 / "model.safetensors.index.json")
    assert index["weight_map"] == {key: "model.safetensors" for key in sorted(stored)}
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in stored.values())

    assert all(k.startswith(("vision_tower.", "language_model.model.", "language_model.lm_head.")) for k in stored)
    assert stored["vision_tower.patch_embed.proj.weight"].shape == (128, 2, 14, 14, 3)  # channels-last
    for path, (rows, width) in {
        "language_model.model.layers.0.self_attn.q_proj": (128, 128),
        "language_model.model.layers.0.mlp.down_proj": (128, 256),
        "language_model.model.embed_tokens": (V, 128),
        "language_model.lm_head": (V, 128),
    }.items():
        assert stored[f"{path}.weight"].dtype == mx.uint32
        assert stored[f"{path}.weight"].shape == (rows, width * 4 // 32)
        assert stored[f"{path}.scales"].shape == stored[f"{path}.biases"].shape == (rows, width // 64)
    assert "language_model.model.layers.0.self_attn.q_proj.bias" in stored
    assert "language_model.model.norm.weight" in stored

    config = read_json(q4 / "config.json")
    source_config = read_json(source / "config.json")
    assert config["quantization"] == config["quantization_config"] == {"group_size": 64, "bits": 4}
    assert config["model_type"] == "qwen2_5_vl" and "torch_dtype" not in config
    assert config["vision_config"] == source_config["vision_config"]
    # mlx-vlm's ModelConfig.from_dict builds its text config from the root keys.
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                "rms_norm_eps", "vocab_size", "num_key_value_heads", "rope_theta", "max_position_embeddings"):
        assert config[key] == config["text_config"][key] == source_config[key], key
    assert config["tie_word_embeddings"] is False
    assert config["rope_scaling"]["type"] in ("mrope", "default")
    assert config["rope_scaling"]["mrope_section"] == [4, 6, 6]


def test_transformers5_nested_source(source, tmp_path):
    """transformers 5 writes sizes only in text_config; mlx-vlm needs them at the root."""
    folder = tmp_path / "nested"
    make_reference(small_config(), seed=3).save_pretrained(folder)
    nested = read_json(folder / "config.json")
    assert "hidden_size" not in nested and "text_config" in nested
    out = convert(folder, tmp_path / "out")
    config = read_json(out / "config.json")
    assert config["hidden_size"] == 128 and config["num_hidden_layers"] == 2 and config["vocab_size"] == V
    assert config["rope_theta"] == 1000000.0 and config["rope_scaling"]["mrope_section"] == [4, 6, 6]
    assert config["rope_scaling"]["type"] in ("mrope", "default")
    assert config["model_type"] == "qwen2_5_vl"
    expected = logits(load_model(source, dtype=mx.float32), read_json(source / "config.json"))
    assert rel_error(logits(load_model(out, dtype=mx.float32), config), expected) == 0.0


def test_mlx_folder_as_source_and_sharding(source, q4, tmp_path, monkeypatch):
    """A 16-bit MLX folder converts like the hub checkpoint; shards, blocks and order do not
    change a single byte of any tensor."""
    plain = convert(source, tmp_path / "plain")
    monkeypatch.setattr(convert_plan, "MAX_SHARD_BYTES", 1_200_000)
    monkeypatch.setattr(safetensors_io, "CHUNK_BYTES", 4096)
    again = convert(plain, tmp_path / "again", quantize=True)
    shards = sorted(again.glob("*.safetensors"))
    assert len(shards) > 2 and all(p.stat().st_size <= 1_200_000 for p in shards)
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = read_json(again / "model.safetensors.index.json")
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert_same_arrays(tensors(again), tensors(q4))


def test_progress_reports_bytes(source, tmp_path):
    calls = []
    convert(source, tmp_path / "p", quantize=True, progress=lambda done, total, name: calls.append((done, total)))
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == calls[-1][1] > 0 and len(calls) > 10


def test_source_errors_come_before_any_work(source, tmp_path):
    target = tmp_path / "out"

    def broken(name, edit):
        folder = tmp_path / name
        shutil.copytree(source, folder)
        edit(folder)
        return folder

    def retype(folder):
        (folder / "config.json").write_text(json.dumps(dict(read_json(source / "config.json"), model_type="llama")))

    with pytest.raises(ModelLoadError, match="model_type 'llama', not 'qwen2_5_vl'"):
        convert(broken("llama", retype), target)

    def reshape(folder):
        (folder / "config.json").write_text(json.dumps(dict(read_json(source / "config.json"), intermediate_size=384)))

    with pytest.raises(ModelLoadError, match=r"weight language_model\.model\.layers\.0\.mlp\.\w+_proj\.weight has shape .*, the config implies"):
        convert(broken("shape", reshape), target)

    def truncate(folder):
        file = folder / "model.safetensors"
        file.write_bytes(file.read_bytes()[:-100])

    with pytest.raises(ModelLoadError, match="truncated"):
        convert(broken("truncated", truncate), target)

    sharded = tmp_path / "sharded"
    make_reference(small_config(), seed=3).save_pretrained(sharded, max_shard_size="1MB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(ModelLoadError, match=f"missing shard.*{shards[-1].name}"):
        convert(sharded, target)

    with pytest.raises(ConversionError, match="not quantized"):
        convert(source, target, dequantize=True)
    with pytest.raises(ConversionError, match="either quantizing .* or dequantizing"):
        convert(source, target, quantize=True, dequantize=True)
    with pytest.raises(ConversionError, match="q_bits"):
        convert(source, target, quantize=True, q_bits=7)
    assert not target.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_interrupt_in_python_leaves_nothing(source, tmp_path):
    def interrupt(done, total, name):
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(ConversionInterrupted, match="interrupted; nothing was written to") as caught:
        convert(source, tmp_path / "a" / "b", quantize=True, progress=interrupt)
    assert isinstance(caught.value, KeyboardInterrupt)
    assert list(tmp_path.iterdir()) == []  # not even the parent folders it created


def test_existing_target_needs_force(source, q4, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty; pass --force"):
        convert(source, target)
    assert (target / "keep.txt").read_text() == "mine"
    convert(source, target, force=True)
    assert not (target / "keep.txt").exists() and (target / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no temporary or old folder
    empty = tmp_path / "empty"
    empty.mkdir()
    convert(source, empty)  # an empty folder is no loss
    with pytest.raises(ConversionError, match="holds the source"):
        convert(q4, q4, force=True)
    with pytest.raises(ConversionError, match="already quantized"):
        convert(q4, tmp_path / "twice", quantize=True)


def default_sigint():
    """A shell that runs the tests in the background starts them with SIGINT ignored, and
    children inherit that: give the command the default, as a terminal would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(*args, env=None, **kwargs):
    return subprocess.Popen(
        [sys.executable, str(REPO / "convert.py"), *args], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
        preexec_fn=default_sigint, **kwargs,
    )


def wait_for_progress(process):
    for line in process.stderr:
        if line.startswith("[convert]"):
            return
    raise AssertionError("no progress line before the command ended")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_conversion_leaves_nothing(source, tmp_path, sig):
    target = tmp_path / "out"
    process = run_cli("--hf-path", str(source), "--mlx-path", str(target), "-q",
                      env={"MLX_QWENVL_CONVERT_SLEEP": "0.05"})
    wait_for_progress(process)
    assert list(tmp_path.glob("out.tmp-*"))  # it is writing
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err.strip().splitlines()[-1] == f"error: conversion interrupted; nothing was written to {target}"
    assert "Traceback" not in err
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_killed_conversion_is_cleaned_up_by_the_next(source, tmp_path):
    target = tmp_path / "out"
    process = run_cli("--hf-path", str(source), "--mlx-path", str(target),
                      env={"MLX_QWENVL_CONVERT_SLEEP": "0.05"})
    wait_for_progress(process)
    process.kill()
    process.communicate(timeout=60)
    assert not target.exists() and len(list(tmp_path.glob("out.tmp-*"))) == 1
    convert(source, target)
    assert list(tmp_path.iterdir()) == [target]


def test_cli_progress_in_a_log_says_percent_and_bytes(source, tmp_path):
    """Off a terminal (a log, CI, 2>file) the progress is a line every 5%, with bytes and time."""
    process = run_cli("--hf-path", str(source), "--mlx-path", str(tmp_path / "out"))
    try:
        _, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    assert process.returncode == 0, err
    lines = [line for line in err.splitlines() if line.startswith("[convert]")]
    percents = [float(re.match(r"\[convert\] +([\d.]+)%  \S+ \S*B / \S+ \S*B  \(\d+ s\)$", line).group(1))
                for line in lines]
    assert len(percents) >= 2 and percents == sorted(percents) and percents[-1] == 100.0, lines


def test_cli_errors_are_one_line(source, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "x").write_text("x")
    process = run_cli("--hf-path", str(source), "--mlx-path", str(target))
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert err == f"error: {target} exists and is not empty; pass --force to replace it\n"
    # Uploading offline fails with one line, after the folder is complete.
    process = run_cli("--hf-path", str(source), "--mlx-path", str(tmp_path / "up"), "--upload-repo", "me/x",
                      env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_test"})
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("error: upload to me/x failed (")
    assert (tmp_path / "up" / "config.json").exists()
