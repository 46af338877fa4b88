"""AWQ and GPTQ checkpoints converted exactly into MLX affine weights (issue 20, item 3), and
the formats that have no exact MLX form refused in one line before any work.

The checkpoints are made here: random integer weights, zero points and float16 scales, packed
as AutoAWQ (GEMM: ``qweight`` [in, out/8], nibbles in the order 0 2 4 6 1 3 5 7) and AutoGPTQ
(``qweight`` [in/8, out], nibbles in order; zero points stored minus one in the "gptq" format)
pack them. The packing below follows those libraries' own packing code, not the converter."""

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx_lm.utils import load_model as mlx_lm_load_model
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from mlx_qwenvl.convert import ConversionError, convert
from mlx_qwenvl.errors import ModelLoadError
from mlx_qwenvl.loading import load_model
from reference import make_reference, rel_error, save_reference
from test_convert import TOKENIZER, logits, read_json, small_config, tensors

convert_module = importlib.import_module("mlx_qwenvl.convert")  # the package exports a function of that name
convert_plan = importlib.import_module("mlx_qwenvl.convert_plan")
safetensors_io = importlib.import_module("mlx_qwenvl.safetensors_io")
REPO = Path(__file__).resolve().parents[1]
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's order_map: nibble i holds column AWQ_ORDER[i]
GROUP = 128


def pack_awq(values: np.ndarray, bits: int = 4) -> np.ndarray:
    """AutoAWQ WQLinear_GEMM.from_linear: [rows, cols] ints -> int32 [rows, cols / 8]."""
    per = 32 // bits
    packed = np.zeros((values.shape[0], values.shape[1] // per), dtype=np.uint32)
    for col in range(packed.shape[1]):
        for i in range(per):
            packed[:, col] |= values[:, col * per + AWQ_ORDER[i]].astype(np.uint32) << (i * bits)
    return packed.view(np.int32)


def pack_gptq_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ QuantLinear.pack (qweight): [in, out] ints -> int32 [in * bits / 32, out], each
    word holding 32 / bits consecutive input rows, the first in the lowest bits."""
    per = 32 // bits
    packed = np.zeros((values.shape[0] // per, values.shape[1]), dtype=np.uint32)
    for row in range(packed.shape[0]):
        for j in range(per):
            packed[row] |= values[row * per + j].astype(np.uint32) << (bits * j)
    return packed.view(np.int32)


def pack_gptq_columns(values: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ QuantLinear.pack (qzeros): [groups, out] -> int32 [groups, out * bits / 32]."""
    return np.ascontiguousarray(pack_gptq_rows(values.T.copy(), bits).T)


def awq_layer(rng, out: int, inp: int):
    """(tensors, float32 weight [out, in] by AWQ's formula (q - zero) * scale)."""
    q = rng.integers(0, 16, (inp, out))
    zeros = rng.integers(0, 16, (inp // GROUP, out))
    scales = (rng.random((inp // GROUP, out)) * 0.02 + 1e-3).astype(np.float16)
    rows = np.arange(inp) // GROUP
    dense = (q - zeros[rows]).astype(np.float32) * scales[rows].astype(np.float32)
    tensors = {"qweight": pack_awq(q), "qzeros": pack_awq(zeros), "scales": scales}
    return tensors, dense.T


def gptq_layer(rng, out: int, inp: int, bits: int, checkpoint_format: str):
    """(tensors, float32 weight [out, in] by GPTQ's formula (q - zero) * scale), the "gptq"
    format storing zero - 1 (AutoGPTQ's v1 checkpoints), "gptq_v2" the zero itself."""
    top = 1 << bits
    q = rng.integers(0, top, (inp, out))
    stored = rng.integers(0, top, (inp // GROUP, out))
    zeros = stored + (1 if checkpoint_format == "gptq" else 0)
    scales = (rng.random((inp // GROUP, out)) * 0.02 + 1e-3).astype(np.float16)
    rows = np.arange(inp) // GROUP
    dense = (q - zeros[rows]).astype(np.float32) * scales[rows].astype(np.float32)
    tensors = {"qweight": pack_gptq_rows(q, bits), "qzeros": pack_gptq_columns(stored, bits), "scales": scales,
               "g_idx": rows.astype(np.int32)}
    return tensors, dense.T


AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm", "zero_point": True,
              "modules_to_not_convert": ["visual"]}


def gptq_config(bits=4, checkpoint_format="gptq", desc_act=False):
    return {"quant_method": "gptq", "bits": bits, "group_size": GROUP, "desc_act": desc_act, "sym": False,
            "checkpoint_format": checkpoint_format}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A random float checkpoint in the hub layout, with tokenizer files."""
    config = small_config()
    folder = save_reference(make_reference(config, seed=7), tmp_path_factory.mktemp("hub") / "hub",
                            json.loads(json.dumps(config)))
    for file in TOKENIZER.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


def make_quantized(hub: Path, folder: Path, quantization_config: dict, layer) -> dict:
    """``hub`` with every decoder Linear replaced by ``layer(rng, out, in)``'s packed tensors, the
    other tensors in float16 (as the published AWQ checkpoints); returns MLX weight name ->
    the float32 weight the format's own formula gives."""
    shutil.copytree(hub, folder)
    rng = np.random.default_rng(11)
    stored, dense = {}, {}
    for name, value in load_torch(hub / "model.safetensors").items():
        layer_path = name[: -len(".weight")]
        if name.startswith("model.layers.") and layer_path.endswith(LINEAR) and name.endswith(".weight"):
            packed, weight = layer(rng, *value.shape)
            stored.update({f"{layer_path}.{key}": torch.from_numpy(array) for key, array in packed.items()})
            dense[f"language_model.{name}"] = weight
        else:
            stored[name] = value.half()
    save_torch(stored, folder / "model.safetensors", metadata={"format": "pt"})
    config = dict(read_json(hub / "config.json"), torch_dtype="float16", quantization_config=quantization_config)
    (folder / "config.json").write_text(json.dumps(config))
    return dense


def assert_exact(hub, folder, out, dense, bits):
    """Every converted layer dequantizes to the format's own float32 weight bit for bit; every
    other tensor is the source's (float16) as stored; the folder loads and computes with them."""
    config = read_json(out / "config.json")
    assert config["quantization"] == config["quantization_config"] == {"group_size": GROUP, "bits": bits}
    stored = tensors(out)
    source = {("vision_tower." + k[len("visual."):]) if k.startswith("visual.") else "language_model." + k: v
              for k, v in load_torch(folder / "model.safetensors").items()}
    for name, weight in dense.items():
        path = name[: -len(".weight")]
        assert stored[f"{path}.scales"].dtype == stored[f"{path}.biases"].dtype == mx.float32
        ours = mx.dequantize(stored[name], stored[f"{path}.scales"], stored[f"{path}.biases"],
                             group_size=GROUP, bits=bits)
        assert np.array_equal(np.array(ours), weight), name
    plain = {k: v for k, v in stored.items() if not k.endswith((".scales", ".biases")) and k not in dense}
    for name, value in plain.items():
        expected = source[name]
        if name == "vision_tower.patch_embed.proj.weight":
            expected = expected.permute(0, 2, 3, 4, 1)
        assert value.dtype == mx.float16, name
        assert np.array_equal(np.array(value), expected.numpy()), name
    assert set(plain) | set(dense) | {k for k in stored if k.endswith((".scales", ".biases"))} == set(stored)

    # The folder loads; its logits are those of the formula's weights (float32, 1e-5).
    model = load_model(out, dtype=mx.float32)
    assert isinstance(model.language_model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(model.language_model.lm_head, nn.Linear)
    reference = load_model(hub, dtype=mx.float32)
    reference.load_weights([(k, v.astype(mx.float32)) for k, v in plain.items()], strict=False)
    reference.load_weights([(k, mx.array(v)) for k, v in dense.items()], strict=False)
    hub_config = read_json(hub / "config.json")
    error = rel_error(logits(model, hub_config), logits(reference, hub_config))
    print(f"logits vs the formula's weights: {error:.1e}")
    assert error <= 1e-5


def test_awq_converts_exactly(hub, tmp_path):
    folder = tmp_path / "awq"
    dense = make_quantized(hub, folder, AWQ_CONFIG, awq_layer)
    # The loader refuses the folder itself, and says how to convert it.
    with pytest.raises(ModelLoadError, match=f"mlx-qwenvl convert --hf-path {folder}") as caught:
        load_model(folder)
    assert "\n" not in str(caught.value)
    out = convert(folder, tmp_path / "mlx")
    assert_exact(hub, folder, out, dense, 4)
    # mlx-lm (text) loads the converted folder too, with the same layers quantized.
    theirs, _ = mlx_lm_load_model(out)
    layer = theirs.language_model.model.layers[1].mlp.down_proj
    assert (layer.bits, layer.group_size, layer.mode) == (4, GROUP, "affine")
    assert not hasattr(theirs.language_model, "lm_head") or isinstance(theirs.language_model.lm_head, nn.Linear)


@pytest.mark.parametrize("bits, checkpoint_format", [(4, "gptq"), (4, "gptq_v2"), (8, "gptq")])
def test_gptq_converts_exactly(hub, tmp_path, bits, checkpoint_format):
    folder = tmp_path / "gptq"
    dense = make_quantized(hub, folder, gptq_config(bits, checkpoint_format),
                           lambda rng, out, inp: gptq_layer(rng, out, inp, bits, checkpoint_format))
    out = convert(folder, tmp_path / "mlx")
    assert_exact(hub, folder, out, dense, bits)


def test_awq_conversion_streams_in_blocks(hub, tmp_path, monkeypatch):
    """Row blocks of a few rows (and shards) change no byte of the result."""
    folder = tmp_path / "awq"
    make_quantized(hub, folder, AWQ_CONFIG, awq_layer)
    whole = tensors(convert(folder, tmp_path / "whole"))
    monkeypatch.setattr(safetensors_io, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(convert_plan, "MAX_SHARD_BYTES", 1_200_000)
    out = convert(folder, tmp_path / "blocks")
    assert len(list(out.glob("*.safetensors"))) > 1
    blocks = tensors(out)
    assert set(blocks) == set(whole)
    for key, value in whole.items():
        assert mx.array_equal(blocks[key], value).item(), key


def test_awq_options_that_do_not_apply(hub, tmp_path):
    folder = tmp_path / "awq"
    make_quantized(hub, folder, AWQ_CONFIG, awq_layer)
    with pytest.raises(ConversionError, match="already quantized") as caught:
        convert(folder, tmp_path / "o", quantize=True)
    assert "\n" not in str(caught.value)
    with pytest.raises(ConversionError, match="dequantize") as caught:
        convert(folder, tmp_path / "o", dequantize=True)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- refusals


def fp8(weight):
    out, inp = weight.shape
    return {"weight": weight.to(torch.float8_e4m3fn),
            "weight_scale_inv": torch.rand((out + 127) // 128, (inp + 127) // 128)}


def bitsandbytes(weight):
    n = weight.numel()
    return {"weight": torch.randint(0, 255, (n // 2, 1), dtype=torch.uint8),
            "weight.absmax": torch.rand(n // 64), "weight.quant_map": torch.rand(16)}


REFUSED = {
    "gptq-act-order": ("GPTQ", gptq_config(desc_act=True), "act-order"),
    "fp8": ("FP8", {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}, None),
    "compressed-tensors": ("compressed-tensors", {"quant_method": "compressed-tensors",
                                                  "format": "float-quantized"}, None),
    "bitsandbytes": ("bitsandbytes", {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                      "bnb_4bit_quant_type": "nf4"}, None),
    "awq-gemv": ("AWQ", dict(AWQ_CONFIG, version="gemv"), "gemv"),
    "awq-3bit": ("AWQ", dict(AWQ_CONFIG, bits=3), "3-bit"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unmappable_formats_refused_before_any_work(hub, tmp_path, name, monkeypatch):
    label, quantization_config, detail = REFUSED[name]
    folder = tmp_path / name
    folder.mkdir()
    for file in hub.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, folder / file.name)
    # 7B widths in the config: the message names the 16-bit original and its AWQ release.
    config = dict(read_json(hub / "config.json"), hidden_size=3584, quantization_config=quantization_config)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"not read")
    monkeypatch.setattr(safetensors_io, "read_safetensors_header",
                        lambda *a: pytest.fail("a weight file was read"))
    with pytest.raises(ConversionError) as caught:
        convert(folder, tmp_path / "out")
    message = str(caught.value)
    print(message)
    assert "\n" not in message and label in message
    if detail:
        assert detail in message
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in message and "-q" in message
    assert "Qwen/Qwen2.5-VL-7B-Instruct-AWQ" in message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_gptq_with_scattered_groups_is_refused(hub, tmp_path):
    """desc_act false but a g_idx that is not row // group_size: refused before writing."""
    folder = tmp_path / "gptq"
    make_quantized(hub, folder, gptq_config(), lambda rng, out, inp: gptq_layer(rng, out, inp, 4, "gptq"))
    stored = load_torch(folder / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.g_idx"
    stored[name] = torch.flip(stored[name], [0]).contiguous()
    save_torch(stored, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"g_idx") as caught:
        convert(folder, tmp_path / "out")
    assert "\n" not in str(caught.value) and "language_model.model.layers.1.mlp.down_proj" in str(caught.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_cli_refusal_is_one_line(hub, tmp_path):
    folder = tmp_path / "fp8"
    shutil.copytree(hub, folder)
    config = dict(read_json(hub / "config.json"), quantization_config=REFUSED["fp8"][1])
    (folder / "config.json").write_text(json.dumps(config))
    process = subprocess.run([sys.executable, str(REPO / "convert.py"), "--hf-path", str(folder),
                              "--mlx-path", str(tmp_path / "out")], cwd=REPO, text=True, capture_output=True,
                             timeout=120)
    assert process.returncode == 1
    assert process.stderr.count("\n") == 1 and process.stderr.startswith("error: ") and "FP8" in process.stderr


def test_hub_refusal_comes_before_the_download(tmp_path, monkeypatch):
    """A hub id: only its config.json is fetched before the refusal; the weights never are."""
    import huggingface_hub

    folder = tmp_path / "snapshot"
    folder.mkdir()
    config = dict(small_config(), hidden_size=2048, quantization_config=gptq_config(desc_act=True))
    (folder / "config.json").write_text(json.dumps(config))
    fetched = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        fetched.append((repo_id, allow_patterns))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(convert_module, "resolve_model_path", lambda *a: pytest.fail("the weights were fetched"))
    with pytest.raises(ConversionError, match=r"act-order .* Qwen/Qwen2\.5-VL-3B-Instruct-AWQ") as caught:
        convert("someone/Qwen2.5-VL-3B-Instruct-GPTQ", tmp_path / "out")
    assert "\n" not in str(caught.value)
    assert fetched == [("someone/Qwen2.5-VL-3B-Instruct-GPTQ", ["config.json"])]
