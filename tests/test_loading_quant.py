"""Quantization settings as other tools write them: mixed-precision overrides in any naming,
settings only under ``quantization_config``, and checkpoints of other quantization libraries."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from mlx_lm.utils import dequantize_model
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

import mlx_qwenvl.loading as loading
from mlx_qwenvl.errors import ModelLoadError
from mlx_qwenvl.loading import load_model
from reference import rel_error
from test_loading import our_logits

# The folder is 4-bit in groups of 32 (the language model's Linear layers); these layers
# differ, one of them in the vision tower and one the output head.
DEFAULT = {"group_size": 32, "bits": 4}
MIXED = {
    "language_model.model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 8},
    "language_model.model.layers.1.self_attn.q_proj": {"group_size": 32, "bits": 6},
    "language_model.lm_head": {"group_size": 64, "bits": 8},
    "vision_tower.blocks.0.attn.qkv": {"group_size": 64, "bits": 8},
}


def hub_name(path):
    """The module path as the hub checkpoint names its weights."""
    return (path.replace("language_model.lm_head", "lm_head")
            .replace("language_model.model.", "model.").replace("vision_tower.", "visual."))


def transformers5_name(path):
    return (path.replace("language_model.lm_head", "lm_head")
            .replace("language_model.model.", "model.language_model.").replace("vision_tower.", "model.visual."))


NAMINGS = {"mlx": lambda path: path, "hub": hub_name, "transformers5": transformers5_name}


@pytest.fixture(scope="module")
def mixed(tiny_reference):
    """The tiny model quantized with MIXED: its stored tensors, and the logits of the quantized
    model and of the same weights dequantized (float32)."""
    model = load_model(tiny_reference[1], dtype=mx.float32)

    def predicate(path, module):
        if path in MIXED:
            return MIXED[path]
        return isinstance(module, nn.Linear) and path.startswith("language_model.")

    nn.quantize(model, **DEFAULT, class_predicate=predicate)
    mx.eval(model.parameters())
    weights = dict(tree_flatten(model.parameters()))
    quantized = np.array(our_logits(model))
    dequantize_model(model)
    return weights, quantized, np.array(our_logits(model))


def write_folder(folder, weights, config):
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def assert_loads_mixed(folder, mixed):
    """Each layer quantized as stored; logits equal the quantized model's (float32 scales: the
    same arithmetic) and, computed in float32, the dequantized weights'."""
    _, quantized, dequantized = mixed
    model = load_model(folder, dtype=mx.float32)
    layers = model.language_model.model.layers
    assert (layers[0].mlp.down_proj.bits, layers[0].mlp.down_proj.group_size) == (8, 64)
    assert (layers[1].self_attn.q_proj.bits, layers[1].self_attn.q_proj.group_size) == (6, 32)
    assert (layers[0].mlp.up_proj.bits, layers[0].mlp.up_proj.group_size) == (4, 32)
    assert model.language_model.lm_head.bits == 8
    assert model.vision_tower.blocks[0].attn.qkv.bits == 8
    assert not isinstance(model.vision_tower.blocks[1].attn.qkv, nn.QuantizedLinear)
    np.testing.assert_array_equal(np.array(our_logits(model)), quantized)
    dense = load_model(folder)  # "auto": dequantized to float32 on a Linux CPU
    assert rel_error(our_logits(dense), dequantized) <= 1e-5


@pytest.mark.parametrize("naming", sorted(NAMINGS))
def test_overrides_in_every_naming(tiny_reference, mixed, tmp_path, naming):
    overrides = {NAMINGS[naming](path): settings for path, settings in MIXED.items()}
    config = dict(tiny_reference[2], quantization={**DEFAULT, **overrides})
    assert_loads_mixed(write_folder(tmp_path / naming, mixed[0], config), mixed)


def test_stored_shapes_decide_without_overrides(tiny_reference, mixed, tmp_path):
    config = dict(tiny_reference[2], quantization=dict(DEFAULT))
    assert_loads_mixed(write_folder(tmp_path / "plain", mixed[0], config), mixed)


def test_mlx_settings_under_quantization_config(tiny_reference, mixed, tmp_path):
    overrides = {hub_name(path): settings for path, settings in MIXED.items()}
    config = dict(tiny_reference[2], quantization_config={**DEFAULT, **overrides})
    assert_loads_mixed(write_folder(tmp_path / "qc", mixed[0], config), mixed)


def test_override_contradicting_the_weights_blames_the_config(tiny_reference, mixed, tmp_path):
    wrong = {"model.layers.0.mlp.up_proj": {"group_size": 32, "bits": 8}}  # stored 4-bit
    config = dict(tiny_reference[2], quantization={**DEFAULT, **wrong})
    with pytest.raises(ModelLoadError, match=r"weight language_model\.model\.layers\.0\.mlp\.up_proj\.weight "
                                             r"has shape \(128, 8\), the config implies \(128, 16\)"):
        load_model(write_folder(tmp_path / "wrong", mixed[0], config))


# ---------------------------------------------------------------- other quantization libraries

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _packed(rows, cols):
    return torch.randint(0, 2**31 - 1, (rows, cols), dtype=torch.int32)


def awq(weight, group_size=32):
    out, inp = weight.shape
    return {"qweight": _packed(inp, out // 8), "qzeros": _packed(inp // group_size, out // 8),
            "scales": torch.rand(inp // group_size, out, dtype=torch.float16)}


def gptq(weight, group_size=32):
    out, inp = weight.shape
    return {"qweight": _packed(inp // 8, out), "qzeros": _packed(inp // group_size, out // 8),
            "scales": torch.rand(inp // group_size, out, dtype=torch.float16),
            "g_idx": torch.arange(inp, dtype=torch.int32) // group_size}


def bitsandbytes(weight):
    n = weight.numel()
    return {"weight": torch.randint(0, 255, (n // 2, 1), dtype=torch.uint8),
            "weight.absmax": torch.rand(n // 64), "weight.quant_map": torch.rand(16),
            "weight.quant_state.bitsandbytes__nf4": torch.randint(0, 255, (100,), dtype=torch.uint8)}


def fp8(weight):
    out, inp = weight.shape
    return {"weight": weight.to(torch.float8_e4m3fn),
            "weight_scale_inv": torch.rand((out + 127) // 128, (inp + 127) // 128)}


FOREIGN = {
    "awq": ("AWQ", awq, {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm",
                         "zero_point": True}),
    "gptq": ("GPTQ", gptq, {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                            "sym": True}),
    "bitsandbytes": ("bitsandbytes", bitsandbytes,
                     {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}),
    "fp8": ("FP8", fp8, {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}),
    "compressed-tensors": ("compressed-tensors", fp8,
                           {"quant_method": "compressed-tensors", "format": "float-quantized"}),
}


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Any attempt to list or read the weights fails the test."""
    def refuse(*args):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(loading, "load_weights", refuse)
    monkeypatch.setattr(loading, "weight_files", refuse)


@pytest.mark.parametrize("method", sorted(FOREIGN))
def test_foreign_quantization_is_one_line(tiny_reference, tmp_path, method, no_weight_reads):
    label, layout, quantization_config = FOREIGN[method]
    folder = tmp_path / method
    shutil.copytree(tiny_reference[1], folder)
    tensors = {}
    for name, value in load_torch(folder / "model.safetensors").items():
        layer = name[: -len(".weight")]
        if name.startswith("model.layers.") and layer.endswith(LINEAR):
            tensors.update({f"{layer}.{key}": tensor for key, tensor in layout(value).items()})
        else:
            tensors[name] = value
    save_torch(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = dict(tiny_reference[2], quantization_config=quantization_config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as caught:
        load_model(folder)
    message = str(caught.value)
    print(message)
    assert "\n" not in message
    assert f"{label}-quantized" in message and f"quant_method '{method}'" in message
    assert "mlx-qwenvl convert" in message and "16-bit" in message


def test_foreign_quantization_names_the_original(tiny_reference, tmp_path, no_weight_reads):
    """With the 7B's width the message names the 16-bit repository to use instead; the config
    alone decides (this folder has no weights at all)."""
    folder = tmp_path / "awq7b"
    folder.mkdir()
    config = dict(tiny_reference[2], hidden_size=3584,
                  quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"AWQ-quantized .* `mlx-qwenvl convert --hf-path "
                                             r"Qwen/Qwen2\.5-VL-7B-Instruct -q`"):
        load_model(folder)


def test_quantization_entry_wins_over_a_foreign_leftover(tiny_reference, mixed, tmp_path):
    """An MLX folder converted from an AWQ source may keep the source's quantization_config;
    its own ``quantization`` entry describes the weights (as in mlx-lm)."""
    config = dict(tiny_reference[2], quantization={**DEFAULT, **MIXED},
                  quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128})
    assert_loads_mixed(write_folder(tmp_path / "both", mixed[0], config), mixed)


def test_floating_point_modes(tiny_reference, tmp_path):
    """mxfp4 by default, one mxfp8 and one nvfp4 layer, one affine: the stored shapes (and the
    absent biases) tell each layer's mode without overrides."""
    model = load_model(tiny_reference[1], dtype=mx.float32)
    modes = {"language_model.model.layers.0.mlp.down_proj": {"group_size": 32, "bits": 8, "mode": "mxfp8"},
             "language_model.model.layers.1.mlp.up_proj": {"group_size": 16, "bits": 4, "mode": "nvfp4"},
             "language_model.model.layers.1.self_attn.o_proj": {"group_size": 64, "bits": 4, "mode": "affine"}}

    def predicate(path, module):
        if path in modes:
            return dict(modes[path])
        return isinstance(module, nn.Linear) and path.startswith("language_model.")

    nn.quantize(model, group_size=32, bits=4, mode="mxfp4", class_predicate=predicate)
    mx.eval(model.parameters())
    config = dict(tiny_reference[2], quantization={"group_size": 32, "bits": 4, "mode": "mxfp4"})
    folder = write_folder(tmp_path / "fp", dict(tree_flatten(model.parameters())), config)
    loaded = load_model(folder, dtype=mx.float32)
    layers = loaded.language_model.model.layers
    assert [layer.mode for layer in (layers[0].mlp.down_proj, layers[1].mlp.up_proj,
                                     layers[1].self_attn.o_proj, layers[0].mlp.up_proj)] == \
        ["mxfp8", "nvfp4", "affine", "mxfp4"]
    np.testing.assert_array_equal(np.array(our_logits(loaded)), np.array(our_logits(model)))
    dense = load_model(folder)  # "auto": dequantized to float32 on a Linux CPU
    dequantize_model(model)
    assert rel_error(our_logits(dense), our_logits(model)) <= 1e-5
