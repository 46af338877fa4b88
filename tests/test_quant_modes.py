"""Quantization modes (affine, mxfp4, nvfp4, mxfp8) and mixed-precision recipes in ``convert``
(issue 20, items 1, 2 and 5): each writes what mlx-lm writes, loads back here and in mlx-lm,
and computes with exactly the weights it stores."""

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.convert import mixed_quant_predicate_builder
from mlx_lm.models import qwen2_vl as mlx_lm_qwen2_vl
from mlx_lm.utils import load_model as mlx_lm_load_model

from mlx_qwenvl.config import ModelArgs
from mlx_qwenvl.convert import ConversionError, convert
from mlx_qwenvl.loading import load_model
from mlx_qwenvl.model import Model
from reference import make_reference, real_width_config, rel_error, save_reference
from test_convert import TOKENIZER, assert_same_arrays, logits, read_json, small_config, tensors

convert_module = importlib.import_module("mlx_qwenvl.convert")  # the package exports a function of that name
convert_plan = importlib.import_module("mlx_qwenvl.convert_plan")
safetensors_io = importlib.import_module("mlx_qwenvl.safetensors_io")
REPO = Path(__file__).resolve().parents[1]
MODES = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}  # MLX's defaults
# mlx-vlm's recipes; the first four are also mlx-lm's (mlx_lm.convert.QUANT_RECIPES).
RECIPES = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_5": (3, 5), "mixed_3_6": (3, 6),
           "mixed_3_8": (3, 8), "mixed_4_6": (4, 6), "mixed_4_8": (4, 8)}
MLX_LM_RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random float32 checkpoint (hub layout) with 8 text layers, so that the recipes' layer
    rule (first and last eighth, every third between) picks some layers and not others."""
    config = small_config(num_hidden_layers=8, max_window_layers=8)
    folder = save_reference(make_reference(config, seed=5), tmp_path_factory.mktemp("src") / "hub",
                            json.loads(json.dumps(config)))
    for file in TOKENIZER.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


def dense_float32(model):
    """``model`` with every quantized layer made dense in float32 (mx.dequantize with dtype:
    mlx-lm's dequantize_model keeps the floating-point modes' weights in bfloat16, its default
    for uint8 scales, so an embedding lookup would come out in bfloat16). Written here rather
    than calling loading.dequantize_layers: it is the independent reference that function's
    result (load_model's default float32) is compared with."""
    layers = []
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weight = mx.dequantize(module.weight, module.scales, module.get("biases"), group_size=module.group_size,
                                   bits=module.bits, mode=module.mode, dtype=mx.float32)
            if isinstance(module, nn.QuantizedLinear):
                dense = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
                if "bias" in module:
                    dense.bias = module.bias
            else:
                dense = nn.Embedding(*weight.shape)
            dense.weight = weight
            layers.append((path, dense))
    model.update_modules(tree_unflatten(layers))
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(model.parameters()))
    return model


def in_memory(source, settings: dict):
    """The source quantized in memory with nn.quantize, each weight path -> settings."""
    model = load_model(source, dtype=mx.float32)

    def predicate(path, module):
        return dict(settings[f"{path}.weight"]) if f"{path}.weight" in settings else False

    nn.quantize(model, class_predicate=predicate)
    return model


# --------------------------------------------------------------------------- modes


@pytest.mark.parametrize("mode", sorted(MODES))
def test_mode_logits_equal_dequantized(source, tmp_path, mode, monkeypatch):
    group_size, bits = MODES[mode]
    # Blocks of a few rows (the floating-point modes' are smaller still): the result must not
    # depend on them.
    monkeypatch.setattr(safetensors_io, "CHUNK_BYTES", 1 << 16)
    out = convert(source, tmp_path / mode, quantize=True, q_mode=mode)
    config = read_json(out / "config.json")
    expected_entry = {"group_size": group_size, "bits": bits, **({} if mode == "affine" else {"mode": mode})}
    assert config["quantization"] == config["quantization_config"] == expected_entry

    stored = tensors(out)
    layer = "language_model.model.layers.0.mlp.down_proj"
    assert stored[f"{layer}.weight"].shape == (128, 256 * bits // 32)
    assert stored[f"{layer}.scales"].shape == (128, 256 // group_size)
    assert stored[f"{layer}.scales"].dtype == (mx.float32 if mode == "affine" else mx.uint8)
    assert (f"{layer}.biases" in stored) == (mode == "affine")
    assert not any(k.startswith("vision_tower.") and k.endswith(".scales") for k in stored)

    ours = load_model(out, dtype=mx.float32)
    quantized = ours.language_model.model.layers[0].mlp.down_proj
    assert isinstance(quantized, nn.QuantizedLinear) and quantized.mode == mode
    assert isinstance(ours.language_model.model.embed_tokens, nn.QuantizedEmbedding)
    # The stored tensors are mlx-lm's whole-tensor quantization of the source in this mode.
    settings = {"group_size": group_size, "bits": bits, "mode": mode}
    weights = [k for k in stored if k.startswith("language_model.") and k.endswith(".weight")
               and f"{k[:-len('.weight')]}.scales" in stored]
    expected = in_memory(source, dict.fromkeys(weights, settings))
    assert_same_arrays(dict(tree_flatten(ours.parameters())), dict(tree_flatten(expected.parameters())))
    # float32, 1e-5 relative: the logits are those of the stored weights dequantized, both as
    # loaded (quantized layers kept) and as load() makes them dense by default.
    source_config = read_json(source / "config.json")
    reference = logits(dense_float32(expected), source_config)
    for model in (ours, load_model(out)):
        error = rel_error(logits(model, source_config), reference)
        print(f"{mode}: logits vs dequantized {error:.2e}")
        assert error <= 1e-5
    # mlx-lm (text) loads the folder as well, with the same layers quantized the same way.
    theirs, _ = mlx_lm_load_model(out)
    theirs_layer = theirs.language_model.model.layers[0].mlp.down_proj
    assert (theirs_layer.mode, theirs_layer.bits, theirs_layer.group_size) == (mode, bits, group_size)


@pytest.mark.parametrize("mode, group_size, bits", [
    ("mxfp4", 64, None), ("nvfp4", 32, None), ("mxfp8", None, 4), ("affine", 16, None), ("affine", None, 7),
])
def test_unsupported_mode_settings_are_one_line(source, tmp_path, mode, group_size, bits, monkeypatch):
    monkeypatch.setattr(convert_module, "resolve_model_path", lambda *a: pytest.fail("the source was read"))
    with pytest.raises(ConversionError) as caught:
        convert(source, tmp_path / "out", quantize=True, q_mode=mode, q_group_size=group_size, q_bits=bits)
    message = str(caught.value)
    print(message)
    assert "\n" not in message and mode in message
    assert not (tmp_path / "out").exists()


def test_unknown_mode_and_recipe_misuse_are_one_line(source, tmp_path):
    cases = [
        (dict(quantize=True, q_mode="int4"), r"q_mode \(--q-mode\) must be one of affine, mxfp4, nvfp4, mxfp8"),
        (dict(quantize=True, quant_predicate="mixed_9_9"), "mixed_2_6"),
        (dict(quantize=True, quant_predicate="mixed_3_6", q_mode="mxfp4"), "affine"),
        (dict(quantize=True, quant_predicate="mixed_3_6", q_bits=4), "q_bits"),
        (dict(quant_predicate="mixed_3_6"), r"-q"),
        (dict(q_mode="mxfp4"), r"-q"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(ConversionError, match=pattern) as caught:
            convert(source, tmp_path / "out", **kwargs)
        assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_cli_mode_error_is_one_line(source, tmp_path):
    process = subprocess.run(
        [sys.executable, str(REPO / "convert.py"), "--hf-path", str(source), "--mlx-path", str(tmp_path / "o"),
         "-q", "--q-mode", "nvfp4", "--q-group-size", "32"], cwd=REPO, text=True, capture_output=True, timeout=120)
    assert process.returncode == 1
    assert process.stderr.count("\n") == 1 and process.stderr.startswith("error: ") and "nvfp4" in process.stderr
    assert not (tmp_path / "o").exists()


def test_settings_only_under_quantization_config_convert(source, tmp_path):
    """A folder whose MLX settings sit only under ``quantization_config`` (some tools write
    only that key) is a quantized source like any other: it dequantizes and refuses -q."""
    q4 = convert(source, tmp_path / "q4", quantize=True, q_group_size=32)
    folder = tmp_path / "qc"
    shutil.copytree(q4, folder)
    config = read_json(folder / "config.json")
    del config["quantization"]
    (folder / "config.json").write_text(json.dumps(config))
    back = convert(folder, tmp_path / "deq", dequantize=True, dtype="float32")
    expected = convert(q4, tmp_path / "deq-ref", dequantize=True, dtype="float32")
    assert_same_arrays(tensors(back), tensors(expected))
    with pytest.raises(ConversionError, match="already quantized"):
        convert(folder, tmp_path / "twice", quantize=True)


# --------------------------------------------------------------------------- recipes


def mlx_lm_choices(config: dict, recipe: str, group_size: int = 64) -> dict:
    """Weight path -> bits as mlx-lm's convert decides for this config (its own predicate, and
    quantize_model's gate: a layer with to_quantized whose input width divides into groups)."""
    model = mlx_lm_qwen2_vl.Model(mlx_lm_qwen2_vl.ModelArgs.from_dict(json.loads(json.dumps(config))))
    predicate = mixed_quant_predicate_builder(recipe, model, group_size)
    choices = {}
    for path, module in model.named_modules():
        if hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0:
            choices[f"{path}.weight"] = predicate(path, module)["bits"]
    return choices


def mlx_lm_rule(config: dict, recipe: str) -> dict:
    """mlx-lm's choices for a recipe it lacks (mixed_3_5, mixed_3_8, mixed_4_8, which mlx-vlm
    has): its mixed_2_6 layer choice with 2 and 6 read as the recipe's low and high bits."""
    low, high = RECIPES[recipe]
    return {path: {2: low, 6: high}[bits] for path, bits in mlx_lm_choices(config, "mixed_2_6").items()}


def our_choices(config: dict, recipe: str) -> dict:
    """Weight path -> bits of the language model as our convert plans them (a skeleton: no memory)."""
    model = Model(ModelArgs.from_dict(json.loads(json.dumps(config))))
    settings = convert_plan.quantization_choices(model, 64, None, "affine", False, recipe)
    assert all(s["group_size"] == 64 and s.get("mode", "affine") == "affine" for s in settings.values())
    assert not any(path.startswith("vision_tower.") for path in settings)
    return {path: s["bits"] for path, s in settings.items()}


@pytest.mark.parametrize("size", ["3B", "7B"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_matches_mlx_lm_on_real_layer_names(recipe, size):
    """All 36 (3B) or 28 (7B) decoder layers, the real widths, tied and untied heads."""
    config = real_width_config(size, text_layers={"3B": 36, "7B": 28}[size], vision_depth=32)
    expected = mlx_lm_choices(config, recipe) if recipe in MLX_LM_RECIPES else mlx_lm_rule(config, recipe)
    ours = our_choices(config, recipe)
    assert ours == expected
    low, high = RECIPES[recipe]
    assert {low, high} == set(ours.values())


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_folder_loads_here_and_in_mlx_lm(source, tmp_path, recipe):
    out = convert(source, tmp_path / recipe, quantize=True, quant_predicate=recipe)
    config = read_json(out / "config.json")
    low, high = RECIPES[recipe]
    entry = config["quantization"]
    assert entry == config["quantization_config"]
    assert {k: entry[k] for k in ("group_size", "bits")} == {"group_size": 64, "bits": low}
    overrides = {path: settings for path, settings in entry.items() if isinstance(settings, dict)}
    # Every quantized layer is written under its module path, as mlx-lm writes it.
    choices = (mlx_lm_choices(config, recipe) if recipe in MLX_LM_RECIPES else mlx_lm_rule(config, recipe))
    assert {f"{path}.weight": s["bits"] for path, s in overrides.items()} == choices
    assert all(s["group_size"] == 64 for s in overrides.values())
    assert {s["bits"] for s in overrides.values()} == {low, high}

    ours = load_model(out, dtype=mx.float32)
    theirs, _ = mlx_lm_load_model(out)
    for path, settings in overrides.items():
        for model in (ours, theirs):
            layer = dict(model.named_modules())[path]
            assert (layer.bits, layer.group_size) == (settings["bits"], 64), path
    expected = in_memory(source, {f"{p}.weight": dict(s) for p, s in overrides.items()})
    assert_same_arrays(dict(tree_flatten(ours.parameters())), dict(tree_flatten(expected.parameters())))
    source_config = read_json(source / "config.json")
    assert rel_error(logits(ours, source_config), logits(dense_float32(expected), source_config)) <= 1e-5


def test_recipe_mode_in_model_card_and_bits_per_weight(source, tmp_path):
    logs = []
    out = convert(source, tmp_path / "m", quantize=True, quant_predicate="mixed_3_6", log=logs.append)
    card = (out / "README.md").read_text()
    assert "mixed_3_6" in card
    assert any("mixed_3_6" in line for line in logs)
    mx4 = convert(source, tmp_path / "mx", quantize=True, q_mode="mxfp4", log=logs.append)
    assert "mxfp4" in (mx4 / "README.md").read_text()
    assert "4.250 bits per quantized weight" in logs[-1]  # 4 bits + one 8-bit scale per 32
