"""Configs that leave keys to the class defaults (issue 16).

transformers 4.49 writes a sub-config with only the values that differ from its class
defaults and reads a missing key back as that default; so does every later version for its
sub-configs. The fixtures in tests/assets/configs_4_49 are 4.49.0's own saves of the official
sizes and of a tiny model (made by make_configs.py there); each must load with exactly the
values transformers 5.24 reads from the same file.
"""

import dataclasses
import importlib.util
import json
import logging
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
import torch
from transformers import Qwen2_5_VLConfig

from mlx_qwenvl.config import ModelArgs, TextArgs, VisionArgs
from mlx_qwenvl.convert import convert
from mlx_qwenvl.errors import ModelLoadError
from mlx_qwenvl.loading import load_model
from reference import make_reference, reference_logits, rel_error, save_reference, tiny_config
from test_model_parity import build_prompt, make_inputs, original_rule_positions

ASSETS = Path(__file__).parent / "assets" / "configs_4_49"
FIXTURES = ["3B", "7B", "32B", "72B", "tiny"]
FP32_TOLERANCE = 1e-4

# The official sizes (hub config.json files): text widths, heads, vocabulary, tying and the
# vision merger's output width.
OFFICIAL = {
    "3B": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "32B": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "72B": dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
}
OFFICIAL_SHARED = dict(rope_theta=1000000.0, rms_norm_eps=1e-6, mrope_section=(16, 24, 24),
                       max_position_embeddings=128000)
OFFICIAL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                       fullatt_block_indexes=(7, 15, 23, 31), window_size=112, tokens_per_second=2,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def make_configs_module():
    """tests/assets/configs_4_49/make_configs.py, the script that made the fixtures."""
    spec = importlib.util.spec_from_file_location("make_configs", ASSETS / "make_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plain(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def ours(args: ModelArgs) -> dict:
    """Every field of our parsed arguments, by a flat name."""
    values = {f"text.{f.name}": _plain(getattr(args.text, f.name)) for f in dataclasses.fields(TextArgs)}
    values.update({f"vision.{f.name}": _plain(getattr(args.vision, f.name))
                   for f in dataclasses.fields(VisionArgs)})
    for name in ("image_token_id", "video_token_id", "vision_start_token_id"):
        values[name] = getattr(args, name)
    return values


def theirs(config: Qwen2_5_VLConfig) -> dict:
    """The same values as transformers 5.24 reads them (rope in text_config.rope_parameters;
    its modeling code falls back to mrope_section [16, 24, 24])."""
    text, vision = config.text_config, config.vision_config
    rope = text.rope_parameters
    special = {
        "rope_theta": rope["rope_theta"],
        "mrope_section": tuple(rope.get("mrope_section", (16, 24, 24))),
        "tie_word_embeddings": config.tie_word_embeddings,
    }
    values = {f"text.{f.name}": _plain(special.get(f.name, getattr(text, f.name, None)))
              for f in dataclasses.fields(TextArgs)}
    values.update({f"vision.{f.name}": _plain(getattr(vision, f.name)) for f in dataclasses.fields(VisionArgs)})
    for name in ("image_token_id", "video_token_id", "vision_start_token_id"):
        values[name] = getattr(config, name)
    return values


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    differ = {key: (a[key], b[key]) for key in a
              if a[key] != b[key] or isinstance(a[key], bool) != isinstance(b[key], bool)}
    assert not differ, differ


# --------------------------------------------------------------------------- the fixtures


def test_fixtures_are_4_49_saves():
    """The files are what 4.49 writes: the issue's 7B vision_config, sizes only where they differ."""
    for name in FIXTURES:
        config = read_json(ASSETS / name / "config.json")
        assert config["transformers_version"] == "4.49.0", name
    assert read_json(ASSETS / "7B" / "config.json")["vision_config"] == {
        "hidden_size": 1280, "in_chans": 3, "model_type": "qwen2_5_vl", "spatial_patch_size": 14,
        "tokens_per_second": 2}
    for size in ("3B", "32B", "72B"):
        vision = read_json(ASSETS / size / "config.json")["vision_config"]
        assert vision["out_hidden_size"] == OFFICIAL[size]["hidden_size"]
        assert not {"depth", "intermediate_size", "num_heads", "fullatt_block_indexes"} & set(vision)
    tiny = read_json(ASSETS / "tiny" / "config.json")["vision_config"]
    assert {"depth", "hidden_size", "out_hidden_size", "fullatt_block_indexes"} <= set(tiny)
    assert not {"num_heads", "intermediate_size", "window_size", "patch_size"} & set(tiny)


def test_tiny_fixture_is_tiny_config():
    """make_configs.py spells out tiny_config() (it runs without torch); the two agree."""
    module = make_configs_module()
    expected = tiny_config(vision_config=module.TINY_VISION)
    assert read_json(ASSETS / "tiny" / "source.json") == module.tiny() == expected


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_loads_as_transformers_reads_it(name):
    folder = ASSETS / name
    args = ModelArgs.from_dict(read_json(folder / "config.json"))
    assert_same(ours(args), theirs(Qwen2_5_VLConfig.from_pretrained(folder)))
    # The complete file it was saved from (the hub's, for the official sizes) reads the same.
    complete = ModelArgs.from_dict(read_json(folder / "source.json"))
    assert_same(ours(args), ours(complete))
    if name in OFFICIAL:
        values = ours(args)
        expected = {f"text.{k}": v for k, v in {**OFFICIAL[name], **OFFICIAL_SHARED}.items()}
        expected.update({f"vision.{k}": v for k, v in OFFICIAL_VISION.items()})
        expected["vision.out_hidden_size"] = OFFICIAL[name]["hidden_size"]
        assert {key: values[key] for key in expected} == expected


def test_defaulted_values_are_recorded_and_logged(caplog):
    with caplog.at_level(logging.DEBUG, logger="mlx_qwenvl"):
        args = ModelArgs.from_dict(read_json(ASSETS / "7B" / "config.json"))
    assert args.defaulted == {
        "vision_config.depth": 32,
        "vision_config.intermediate_size": 3420,
        "vision_config.num_heads": 16,
        "vision_config.out_hidden_size": 3584,
        "vision_config.fullatt_block_indexes": (7, 15, 23, 31),
        "vision_config.patch_size": 14,
        "vision_config.spatial_merge_size": 2,
        "vision_config.temporal_patch_size": 2,
        "vision_config.window_size": 112,
    }
    logged = " ".join(r.getMessage() for r in caplog.records if r.name == "mlx_qwenvl")
    assert "4.49.0" in logged and "vision_config.depth=32" in logged
    assert ModelArgs.from_dict(read_json(ASSETS / "7B" / "source.json")).defaulted == {}


# --------------------------------------------------------------------------- other layouts and versions

NESTED_72B_VISION = {"hidden_size": 1280, "out_hidden_size": 8192, "tokens_per_second": 2,
                     "model_type": "qwen2_5_vl"}

SYNTHETIC = {
    # 4.52-4.57 build text_config from nested dicts and save it sparse like vision_config:
    # a 72B-sized text model leaves out every size, and eps/context take the class defaults.
    "4.53-nested-sparse-text": {
        "model_type": "qwen2_5_vl", "transformers_version": "4.53.0",
        "text_config": {"model_type": "qwen2_5_vl_text",
                        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}},
        "vision_config": NESTED_72B_VISION,
    },
    # transformers 5: sizes in text_config, rope_theta and mrope_section (here: neither) in
    # rope_parameters; 5.17+ modeling falls back to mrope_section [16, 24, 24].
    "5.24-no-rope": {
        "model_type": "qwen2_5_vl", "transformers_version": "5.24.0", "tie_word_embeddings": True,
        "text_config": {"model_type": "qwen2_5_vl_text", "hidden_size": 2048, "intermediate_size": 11008,
                        "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
                        "vocab_size": 151936, "rms_norm_eps": 1e-6},
        "vision_config": {"model_type": "qwen2_5_vl_vision", "hidden_size": 1280, "out_hidden_size": 2048},
    },
    # 5.23+ read vision num_attention_heads / num_hidden_layers as num_heads / depth.
    "5.24-vision-aliases": {
        "model_type": "qwen2_5_vl", "transformers_version": "5.24.0",
        "text_config": {"model_type": "qwen2_5_vl_text", "rope_parameters": {
            "rope_type": "default", "rope_theta": 500000.0, "mrope_section": [16, 24, 24]}},
        "vision_config": {"model_type": "qwen2_5_vl_vision", "hidden_size": 1280, "num_attention_heads": 8,
                          "num_hidden_layers": 4, "fullatt_block_indexes": [1, 3]},
    },
    # An explicit null of num_key_value_heads means as many as the query heads (28), not 8.
    "4.49-null-kv-heads": dict(read_json(ASSETS / "7B" / "config.json"), num_key_value_heads=None),
    # A flat 4.49 file with text keys removed by hand: eps 1e-5, context 32768, not the hub's.
    "4.49-flat-missing-text-keys": {
        k: v for k, v in read_json(ASSETS / "7B" / "config.json").items()
        if k not in ("rms_norm_eps", "max_position_embeddings", "rope_theta", "vocab_size", "tie_word_embeddings")
    },
}


@pytest.mark.parametrize("case", list(SYNTHETIC))
def test_other_versions_load_as_transformers_reads_them(case):
    config = SYNTHETIC[case]
    args = ModelArgs.from_dict(json.loads(json.dumps(config)))
    assert_same(ours(args), theirs(Qwen2_5_VLConfig.from_dict(json.loads(json.dumps(config)))))
    assert args.defaulted


def test_text_defaults_are_recorded():
    args = ModelArgs.from_dict(json.loads(json.dumps(SYNTHETIC["4.49-flat-missing-text-keys"])))
    assert args.text.rms_norm_eps == 1e-5 and args.text.max_position_embeddings == 32768
    assert {"text_config.rms_norm_eps": 1e-5, "text_config.max_position_embeddings": 32768,
            "text_config.rope_theta": 1000000.0, "text_config.vocab_size": 152064}.items() <= args.defaulted.items()
    nested = ModelArgs.from_dict(json.loads(json.dumps(SYNTHETIC["4.53-nested-sparse-text"])))
    assert nested.defaulted["text_config.hidden_size"] == 8192
    assert nested.defaulted["text_config.num_hidden_layers"] == 80


def test_mrope_default_follows_the_writer():
    """transformers' modeling code defaults mrope_section only since 5.17; earlier files need it."""
    config = json.loads(json.dumps(SYNTHETIC["5.24-no-rope"]))
    assert ModelArgs.from_dict(dict(config, transformers_version="5.17.0")).text.mrope_section == (16, 24, 24)
    with pytest.raises(ModelLoadError, match="missing mrope_section"):
        ModelArgs.from_dict(dict(config, transformers_version="5.16.0"))


def test_versions_outside_the_table():
    """The hub's own files say 4.41.2 (before the class shipped in 4.49): 4.49's defaults.
    A newer release than the table knows takes the newest row; a dev suffix is ignored."""
    sparse = read_json(ASSETS / "7B" / "config.json")
    for version in ("4.41.2", "4.49.0.dev0", "9.0.0"):
        args = ModelArgs.from_dict(dict(sparse, transformers_version=version))
        assert args.vision.depth == 32 and args.vision.out_hidden_size == 3584, version


# --------------------------------------------------------------------------- without a version


def test_missing_depth_without_transformers_version_is_refused():
    config = tiny_config()
    del config["vision_config"]["depth"]
    with pytest.raises(ModelLoadError) as error:
        ModelArgs.from_dict(config)
    message = str(error.value)
    assert "\n" not in message and "missing depth in vision_config" in message
    sparse = read_json(ASSETS / "7B" / "config.json")
    del sparse["transformers_version"]
    with pytest.raises(ModelLoadError, match="missing depth, intermediate_size, num_heads, out_hidden_size, "
                                             "fullatt_block_indexes in vision_config"):
        ModelArgs.from_dict(sparse)


# --------------------------------------------------------------------------- a sparse model folder


@pytest.fixture(scope="module")
def tiny_sparse(tmp_path_factory):
    """tiny_config()'s random reference saved with the 4.49 sparse config.json."""
    module = make_configs_module()
    ref = make_reference(tiny_config(vision_config=module.TINY_VISION), seed=5)
    folder = save_reference(ref, tmp_path_factory.mktemp("sparse") / "tiny")
    shutil.copyfile(ASSETS / "tiny" / "config.json", folder / "config.json")
    return ref, folder


def test_tiny_sparse_config_logits_match_reference(tiny_sparse):
    """Images and a video through the model read from the sparse file. As in
    test_model_parity, the reference gets the original Qwen2.5-VL positions (transformers 5
    numbers video frames its own way)."""
    ref, folder = tiny_sparse
    model = load_model(folder, dtype=mx.float32)
    assert model.args.defaulted["vision_config.num_heads"] == 16
    assert model.args.defaulted["vision_config.intermediate_size"] == 3420
    items, seconds = [("image", (1, 8, 12)), ("image", (1, 16, 8)), ("video", (4, 8, 8))], [0.75]
    ids, types = build_prompt(items)
    inputs = make_inputs(items)
    positions = original_rule_positions(ids, items, seconds, tokens_per_second=2)
    expected = reference_logits(ref, ids, positions, inputs, seconds, torch.float32)
    error = rel_error(model(ids, second_per_grid_ts=seconds, **inputs), expected)
    print(f"sparse tiny config: fp32 logits rel error {error:.2e}")
    assert error <= FP32_TOLERANCE


def test_convert_writes_complete_config(tiny_sparse, tmp_path):
    _, folder = tiny_sparse
    source_args = ModelArgs.from_dict(read_json(folder / "config.json"))
    out = convert(folder, tmp_path / "out")
    config = read_json(out / "config.json")
    vision = config["vision_config"]
    for field in dataclasses.fields(VisionArgs):
        names = ("in_channels", "in_chans") if field.name == "in_channels" else (field.name,)
        assert any(name in vision for name in names), field.name
    for field in dataclasses.fields(TextArgs):
        where = config["rope_scaling"] if field.name == "mrope_section" else config
        assert field.name in where and field.name in (
            config["text_config"]["rope_scaling"] if field.name == "mrope_section" else config["text_config"])
    for name in ("image_token_id", "video_token_id", "vision_start_token_id"):
        assert name in config
    # It loads without any default, with or without the transformers_version it carries.
    unversioned = {k: v for k, v in config.items() if k != "transformers_version"}
    for written in (config, unversioned):
        args = ModelArgs.from_dict(json.loads(json.dumps(written)))
        assert args.defaulted == {}
        assert_same(ours(args), ours(source_args))
    assert load_model(out, dtype=mx.float32).args.defaulted == {}
