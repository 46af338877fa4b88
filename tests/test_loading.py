"""Loading every config layout and weight-name layout met in practice, and the errors."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file

from mlx_qwenvl.errors import ModelLoadError
from mlx_qwenvl.loading import load_model
from reference import make_reference, rel_error, save_reference, tiny_config, to_torch, real_width_config
from test_model_parity import build_prompt, make_inputs

ITEMS = [("image", (1, 10, 14))]


def reference_logits(ref, items=ITEMS, seed=0):
    ids, types = build_prompt(items)
    inputs = make_inputs(items, seed)
    with torch.no_grad():
        out = ref(input_ids=to_torch(ids), mm_token_type_ids=to_torch(types),
                  **{k: to_torch(v) for k, v in inputs.items()})
    return out.logits.float().cpu().numpy()


def our_logits(model, items=ITEMS, seed=0):
    ids, _ = build_prompt(items)
    return model(ids, **make_inputs(items, seed))


@pytest.fixture(scope="module")
def expected(tiny_reference):
    return reference_logits(tiny_reference[0])


def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(folder, rename):
    """Rename (and transform) every tensor of a single-file folder."""
    file = folder / "model.safetensors"
    tensors = load_file(file)
    renamed = dict(rename(k, v) for k, v in tensors.items())
    renamed = {k: v for k, v in renamed.items() if k is not None}
    save_file(renamed, file, metadata={"format": "pt"})


def dual_layout(config):
    """transformers 4.5x re-saves: root keys kept plus a nested text_config copy."""
    text = {k: v for k, v in config.items() if k != "vision_config"}
    text["rope_scaling"] = {"mrope_section": config["rope_scaling"]["mrope_section"],
                            "rope_type": "default", "type": "default"}
    return {**config, "rope_scaling": text["rope_scaling"], "text_config": text}


def test_config_layouts_load_and_match(tiny_reference, expected, tmp_path):
    _, path, config = tiny_reference
    # The nested layout is what transformers 5.x writes itself.
    nested = copy_folder(path, tmp_path / "nested")
    make_reference(config).save_pretrained(nested)
    assert "text_config" in json.loads((nested / "config.json").read_text())
    assert "hidden_size" not in json.loads((nested / "config.json").read_text())
    dual = copy_folder(path, tmp_path / "dual")
    (dual / "config.json").write_text(json.dumps(dual_layout(config)))
    for folder in (path, nested, dual):
        error = rel_error(our_logits(load_model(folder, dtype=mx.float32)), expected)
        assert error <= 1e-4, folder


def test_transformers5_weight_names(tiny_reference, expected, tmp_path):
    folder = copy_folder(tiny_reference[1], tmp_path / "v5names")

    def rename(key, value):
        if key.startswith("visual."):
            return "model." + key, value
        if key.startswith("model."):
            return "model.language_model." + key[len("model."):], value
        return key, value

    rewrite_weights(folder, rename)
    keys = load_file(folder / "model.safetensors").keys()
    assert any(k.startswith("model.language_model.") for k in keys)
    assert rel_error(our_logits(load_model(folder, dtype=mx.float32)), expected) <= 1e-4


def to_mlx_vlm_layout(key, value):
    """What mlx-vlm's sanitize + save produce from a hub checkpoint."""
    if key.startswith("visual."):
        key = "vision_tower." + key[len("visual."):]
        if key.endswith("patch_embed.proj.weight"):
            value = np.ascontiguousarray(value.transpose(0, 2, 3, 4, 1))
    elif key.startswith("model."):
        key = "language_model." + key
    elif key.startswith("lm_head."):
        key = "language_model." + key
    return key, value


def test_mlx_vlm_weight_names(tiny_reference, expected, tmp_path):
    folder = copy_folder(tiny_reference[1], tmp_path / "mlxvlm")
    rewrite_weights(folder, to_mlx_vlm_layout)
    shape = load_file(folder / "model.safetensors")["vision_tower.patch_embed.proj.weight"].shape
    assert shape[-1] == 3  # channels-last: must not be transposed again
    assert rel_error(our_logits(load_model(folder, dtype=mx.float32)), expected) <= 1e-4


def test_quantized_mlx_folder(tiny_reference, tmp_path):
    """A folder as mlx-community publishes it: mlx-vlm names, 4-bit text, 16-bit vision tower."""
    model = load_model(tiny_reference[1], dtype=mx.float32)
    nn.quantize(model, group_size=32, bits=4,
                class_predicate=lambda p, m: isinstance(m, nn.Linear) and p.startswith("language_model"))
    folder = tmp_path / "q4"
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = dict(tiny_reference[2], quantization={"group_size": 32, "bits": 4})
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_model(folder, dtype=mx.float32)
    assert isinstance(loaded.language_model.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    assert not isinstance(loaded.vision_tower.blocks[0].attn.qkv, nn.QuantizedLinear)
    np.testing.assert_array_equal(np.array(our_logits(loaded)), np.array(our_logits(model)))


def test_tied_head_checkpoint(tmp_path):
    config = tiny_config(tie_word_embeddings=True)
    ref = make_reference(config, seed=1)
    folder = save_reference(ref, tmp_path / "tied", config)
    assert not any(k.startswith("lm_head") for k in load_file(folder / "model.safetensors"))
    model = load_model(folder, dtype=mx.float32)
    assert "lm_head" not in model.language_model
    assert rel_error(our_logits(model), reference_logits(ref)) <= 1e-4


def test_sharded_checkpoint_and_missing_shard(tiny_reference, expected, tmp_path):
    folder = tmp_path / "sharded"
    tiny_reference[0].save_pretrained(folder, max_shard_size="2MB")
    (folder / "config.json").write_text(json.dumps(tiny_reference[2]))
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").exists()
    assert rel_error(our_logits(load_model(folder, dtype=mx.float32)), expected) <= 1e-4
    shards[-1].unlink()
    with pytest.raises(ModelLoadError, match=f"missing shard.*{shards[-1].name}"):
        load_model(folder)


def test_missing_and_unexpected_weights_are_listed(tiny_reference, tmp_path):
    folder = copy_folder(tiny_reference[1], tmp_path / "missing")
    rewrite_weights(folder, lambda k, v: (None if k == "model.layers.1.mlp.up_proj.weight" else k, v))
    with pytest.raises(ModelLoadError, match=r"missing weights: language_model\.model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(folder)
    folder = copy_folder(tiny_reference[1], tmp_path / "extra")
    rewrite_weights(folder, lambda k, v: ("visual.extra.weight" if k == "visual.merger.ln_q.weight" else k, v))
    with pytest.raises(ModelLoadError, match=r"missing weights: vision_tower\.merger\.ln_q\.weight; "
                                             r"unexpected weights: vision_tower\.extra\.weight"):
        load_model(folder)


def test_config_errors(tiny_reference, tmp_path):
    folder = copy_folder(tiny_reference[1], tmp_path / "llama")
    config = dict(tiny_reference[2], model_type="llama")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="model_type 'llama', not 'qwen2_5_vl'"):
        load_model(folder)
    config = {k: v for k, v in tiny_reference[2].items() if k != "num_key_value_heads"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="missing num_key_value_heads"):
        load_model(folder)
    vision = {k: v for k, v in tiny_reference[2]["vision_config"].items() if k != "tokens_per_second"}
    (folder / "config.json").write_text(json.dumps(dict(tiny_reference[2], vision_config=vision)))
    with pytest.raises(ModelLoadError, match="missing tokens_per_second in vision_config"):
        load_model(folder)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_shape_mismatch_is_an_error(tiny_reference, tmp_path):
    folder = copy_folder(tiny_reference[1], tmp_path / "shape")
    config = dict(tiny_reference[2], intermediate_size=256)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"has shape .* the config implies"):
        load_model(folder)


@pytest.mark.parametrize("size", ["3B", "7B"])
def test_real_widths_match_reference(size, tmp_path):
    """The exact 3B / 7B widths and head counts, one or two layers, a small vocabulary
    (special ids moved below it) so the test stays light."""
    config = real_width_config(size, text_layers=1, vision_depth=2, vocab_size=4096)
    ref = make_reference(config, seed=2)
    folder = save_reference(ref, tmp_path / size, config)
    model = load_model(folder, dtype=mx.float32)
    image = config["image_token_id"]
    ids = np.array([[11, 22, 33, config["vision_start_token_id"]] + [image] * 16 + [44, 55]])
    types = (ids == image).astype(np.int64)
    pixels = np.random.default_rng(0).standard_normal((64, 1176)).astype(np.float32)
    grid = np.array([[1, 8, 8]])
    with torch.no_grad():
        expected = ref(input_ids=to_torch(ids), mm_token_type_ids=to_torch(types),
                       pixel_values=to_torch(pixels), image_grid_thw=to_torch(grid)).logits.cpu().numpy()
    ours = model(ids, pixel_values=pixels, image_grid_thw=grid)
    error = rel_error(ours, expected)
    print(f"{size} widths: logits rel error {error:.2e}")
    assert error <= 1e-4
