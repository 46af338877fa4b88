"""Write the config.json files that transformers 4.49.0's own save_pretrained gives for the
official Qwen2.5-VL sizes and a tiny test model (tests/test_config_defaults.py reads them).

4.49 keeps in vision_config only the values that differ from Qwen2_5_VLVisionConfig's
defaults, so these files are what a fine-tune saved with 4.49 looks like. Each folder holds
``config.json`` (the 4.49 save) and ``source.json`` (the complete dict it was made from: the
hub config.json's values, without its transformers_version).

Made with (transformers 4.49 builds configs without torch):
    python3 -m venv /tmp/tf449 && /tmp/tf449/bin/pip install transformers==4.49.0
    /tmp/tf449/bin/python tests/assets/configs_4_49/make_configs.py
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (hidden, intermediate, layers, heads, kv heads, vocab, tied, max_window_layers), from the
# hub's Qwen/Qwen2.5-VL-{size}-Instruct config.json files.
SIZES = {
    "3B": (2048, 11008, 36, 16, 2, 151936, True, 70),
    "7B": (3584, 18944, 28, 28, 4, 152064, False, 28),
    "32B": (5120, 27648, 64, 40, 8, 152064, False, 64),
    "72B": (8192, 29568, 80, 64, 8, 152064, False, 80),
}


def official(size: str) -> dict:
    """The hub config.json of one official size (every key the hub file has)."""
    hidden, inter, layers, heads, kv, vocab, tied, window_layers = SIZES[size]
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "max_position_embeddings": 128000,
        "max_window_layers": window_layers,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": 32,
            "hidden_act": "silu",
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_chans": 3,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": vocab,
    }


# tests/reference.py's tiny_config() with these vision values: num_heads and
# intermediate_size equal 4.49's class defaults, so the save leaves them out and a reader
# must take them from the defaults; depth, hidden_size, out_hidden_size and
# fullatt_block_indexes differ from the defaults and are kept (defaults would be 7B-sized).
TINY_VISION = {"hidden_size": 128, "num_heads": 16, "intermediate_size": 3420}


def tiny() -> dict:
    """tests/reference.py tiny_config(vision_config=TINY_VISION), spelled out: this script
    runs without torch, which reference.py imports (the test checks the two agree)."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 128000,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "max_window_layers": 2,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "vision_config": {
            "depth": 4,
            "hidden_act": "silu",
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_heads": 4,
            "in_chans": 3,
            "out_hidden_size": 64,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [1, 3],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
            **TINY_VISION,
        },
    }


def main() -> None:
    import transformers
    from transformers import Qwen2_5_VLConfig

    if transformers.__version__ != "4.49.0":
        sys.exit(f"run this under transformers 4.49.0, not {transformers.__version__}")
    sources = {size: official(size) for size in SIZES}
    sources["tiny"] = tiny()
    for name, source in sources.items():
        folder = HERE / name
        folder.mkdir(exist_ok=True)
        # The config class mutates rope_scaling in place; give it a copy.
        Qwen2_5_VLConfig(**json.loads(json.dumps(source))).save_pretrained(folder)
        (folder / "source.json").write_text(json.dumps(source, indent=2) + "\n")
        print(folder / "config.json")


if __name__ == "__main__":
    main()
