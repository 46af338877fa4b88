"""Random-weight Qwen2.5-VL model folders in the hub layout, written shard by shard.

Shapes:
- ``3B``, ``7B``: the real hub configs (36/28 text layers, 32 vision blocks, real widths and
  vocabulary): 3.75B / 8.29B parameters.
- ``deep-thin``: the real 3B layer and block counts (36 text layers, 32 vision blocks, full
  attention in blocks 7/15/23/31, 112-px windows) with tiny widths and an 8192-token vocabulary,
  so that per-token and per-layer overhead, not arithmetic, dominates.
- ``3B-slice``: the real 3B widths and vocabulary with 2 text layers and 2 vision blocks (one
  windowed, one full): the per-layer kernels of the 3B model at a cost the reference BLAS can run.
- ``tiny``: a few layers of tiny widths, for the smoke test.

The weights are drawn with ``mx.random`` from a fixed seed per tensor name, so a folder is the
same on every machine, and written as bfloat16 (the hub checkpoints' dtype) one shard at a time:
the 3B folder never needs more than one shard in memory. Models with a vocabulary smaller than
the tokenizer's use :func:`remap_ids` on the processor's token ids.
"""

import json
import shutil
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_ASSETS = ROOT / "tests" / "assets" / "qwen2_tokenizer"

# The tokenizer's special tokens start at <|endoftext|> 151643; <|image_pad|> is 151655.
FIRST_SPECIAL = 151643
NUM_SPECIAL = 22  # 151643 .. 151664
SPECIAL_KEYS = {  # config key -> the real id
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
}

HUB_PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}

GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": False,
    "eos_token_id": [151645, 151643],
}


def hub_config(text: dict, vision: dict, vocab_size: int = 151936) -> dict:
    """A config.json in the hub's flat layout."""
    config = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 128000,
        "max_window_layers": 70,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": vocab_size,
        **SPECIAL_KEYS,
        **text,
        "vision_config": {
            "hidden_act": "silu",
            "in_chans": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "depth": 32,
            **vision,
        },
    }
    if vocab_size < FIRST_SPECIAL + NUM_SPECIAL:
        # The special tokens move to the top of the small vocabulary (see remap_ids).
        for key, real in SPECIAL_KEYS.items():
            config[key] = small_vocab_special(real, vocab_size)
    return config


def small_vocab_special(real_id: int, vocab_size: int) -> int:
    return vocab_size - NUM_SPECIAL + (real_id - FIRST_SPECIAL)


def remap_ids(ids, vocab_size: int):
    """Map the real tokenizer's ids into a small vocabulary: specials to the top, the rest modulo."""
    import numpy as np

    ids = np.asarray(ids)
    if vocab_size >= FIRST_SPECIAL + NUM_SPECIAL:
        return ids
    special = ids >= FIRST_SPECIAL
    mapped = np.where(special, vocab_size - NUM_SPECIAL + (ids - FIRST_SPECIAL), ids % (vocab_size - NUM_SPECIAL))
    return mapped.astype(ids.dtype)


TEXT_3B = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, tie_word_embeddings=True)
TEXT_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, tie_word_embeddings=False)
VISION_REAL = dict(hidden_size=1280, intermediate_size=3420, num_heads=16)


def shape_config(shape: str) -> dict:
    if shape == "3B":
        return hub_config(TEXT_3B, dict(VISION_REAL, out_hidden_size=2048))
    if shape == "7B":
        return hub_config(TEXT_7B, dict(VISION_REAL, out_hidden_size=3584), vocab_size=152064)
    if shape == "3B-slice":
        return hub_config(dict(TEXT_3B, num_hidden_layers=2),
                          dict(VISION_REAL, out_hidden_size=2048, depth=2, fullatt_block_indexes=[1]))
    if shape == "deep-thin":
        # head_dim 128 (text) and 80 (vision) as the real models, with one or two heads.
        return hub_config(
            dict(hidden_size=256, intermediate_size=512, num_hidden_layers=36, num_attention_heads=2,
                 num_key_value_heads=1, tie_word_embeddings=True),
            dict(hidden_size=160, intermediate_size=432, num_heads=2, out_hidden_size=256),
            vocab_size=8192,
        )
    if shape == "tiny":
        return hub_config(
            dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
                 num_key_value_heads=1, tie_word_embeddings=False),
            dict(hidden_size=80, intermediate_size=128, num_heads=1, out_hidden_size=128, depth=4,
                 fullatt_block_indexes=[1, 3]),
            vocab_size=1024,
        )
    raise ValueError(f"unknown shape {shape!r}: 3B, 7B, 3B-slice, deep-thin or tiny")


SHAPES = ("3B", "7B", "3B-slice", "deep-thin", "tiny")


def weight_shapes(config: dict) -> list:
    """(hub name, shape) of every weight, in file order."""
    v = config["vision_config"]
    vh, vi, merged = v["hidden_size"], v["intermediate_size"], v["hidden_size"] * v["spatial_merge_size"] ** 2
    h, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    shapes = [("visual.patch_embed.proj.weight", (vh, 3, v["temporal_patch_size"], v["patch_size"], v["patch_size"]))]
    for i in range(v["depth"]):
        p = f"visual.blocks.{i}."
        shapes += [
            (p + "norm1.weight", (vh,)), (p + "norm2.weight", (vh,)),
            (p + "attn.qkv.weight", (3 * vh, vh)), (p + "attn.qkv.bias", (3 * vh,)),
            (p + "attn.proj.weight", (vh, vh)), (p + "attn.proj.bias", (vh,)),
            (p + "mlp.gate_proj.weight", (vi, vh)), (p + "mlp.gate_proj.bias", (vi,)),
            (p + "mlp.up_proj.weight", (vi, vh)), (p + "mlp.up_proj.bias", (vi,)),
            (p + "mlp.down_proj.weight", (vh, vi)), (p + "mlp.down_proj.bias", (vh,)),
        ]
    shapes += [
        ("visual.merger.ln_q.weight", (vh,)),
        ("visual.merger.mlp.0.weight", (merged, merged)), ("visual.merger.mlp.0.bias", (merged,)),
        ("visual.merger.mlp.2.weight", (v["out_hidden_size"], merged)),
        ("visual.merger.mlp.2.bias", (v["out_hidden_size"],)),
        ("model.embed_tokens.weight", (config["vocab_size"], h)),
    ]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.q_proj.bias", (h,)),
            (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
        ]
    shapes.append(("model.norm.weight", (h,)))
    if not config.get("tie_word_embeddings"):
        shapes.append(("lm_head.weight", (config["vocab_size"], h)))
    return shapes


def parameter_count(config: dict) -> int:
    count = 0
    for _, shape in weight_shapes(config):
        n = 1
        for d in shape:
            n *= d
        count += n
    return count


def random_weight(name: str, shape, seed: int = 0):
    """A deterministic bfloat16 tensor: norms near 1, everything else N(0, 0.02)."""
    import mlx.core as mx

    key = mx.random.key(zlib.crc32(f"{seed}:{name}".encode()))
    if name.endswith("norm.weight") or ".norm1." in name or ".norm2." in name or "ln_q" in name \
            or name.endswith("layernorm.weight"):
        return (1.0 + 0.1 * mx.random.normal(shape, key=key)).astype(mx.bfloat16)
    return mx.random.normal(shape, dtype=mx.bfloat16, scale=0.02, key=key)


def write_model(shape: str, path, seed: int = 0, shard_bytes: int = 2 << 30) -> Path:
    """Create (or reuse, when complete) a random-weight model folder of ``shape``."""
    import mlx.core as mx

    path = Path(path)
    config = shape_config(shape)
    stamp = {"shape": shape, "seed": seed, "parameters": parameter_count(config)}
    done = path / "bench_model.json"
    if done.is_file() and json.loads(done.read_text()) == stamp:
        return path
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)

    shards, current, size = [], {}, 0

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            mx.save_safetensors(str(path / name), current, metadata={"format": "pt"})
            shards.append((name, list(current)))
            current, size = {}, 0

    for name, tensor_shape in weight_shapes(config):
        array = random_weight(name, tensor_shape, seed)
        mx.eval(array)
        if size and size + array.nbytes > shard_bytes:
            flush()
        current[name] = array
        size += array.nbytes
    flush()
    total = len(shards)
    weight_map = {}
    for i, (name, keys) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        (path / name).rename(path / final)
        weight_map.update({key: final for key in keys})
    index = {"metadata": {"total_size": 2 * stamp["parameters"]}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    (path / "preprocessor_config.json").write_text(json.dumps(HUB_PREPROCESSOR_CONFIG, indent=2))
    for file in TOKENIZER_ASSETS.iterdir():
        if file.is_file():
            shutil.copy(file, path / file.name)
    done.write_text(json.dumps(stamp))
    return path
