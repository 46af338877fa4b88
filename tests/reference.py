"""The reference path for parity tests: transformers' Qwen2.5-VL, created with random weights.

``MLX_QWENVL_REF_DEVICE`` picks the torch device (default: cuda when torch sees a GPU, else
cpu), so the same suite is the CUDA reference path on an NVIDIA machine.
"""

import json
import os
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

VOCAB = 151936  # the 3B embedding width: covers every real token id


def reference_device() -> str:
    return os.environ.get("MLX_QWENVL_REF_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def tiny_config(**overrides) -> dict:
    """A small Qwen2.5-VL in the hub's flat config layout (text keys at the root)."""
    config = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
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
        },
    }
    vision = overrides.pop("vision_config", {})
    config.update(overrides)
    config["vision_config"].update(vision)
    return config


def real_width_config(size: str, text_layers=2, vision_depth=2, vocab_size=None) -> dict:
    """The exact 3B or 7B widths and head counts, with few layers.

    ``vocab_size`` shrinks the embedding for light tests; the special ids then move below it.
    """
    widths = {
        "3B": dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16,
                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
        "7B": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                   num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    }[size]
    if vocab_size is not None:
        widths["vocab_size"] = vocab_size
        widths.update(image_token_id=vocab_size - 10, video_token_id=vocab_size - 9,
                      vision_start_token_id=vocab_size - 8, vision_end_token_id=vocab_size - 7,
                      vision_token_id=vocab_size - 6, bos_token_id=vocab_size - 5,
                      eos_token_id=vocab_size - 4)
    return tiny_config(
        num_hidden_layers=text_layers,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        **widths,
        vision_config=dict(depth=vision_depth, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=widths["hidden_size"], fullatt_block_indexes=[1]),
    )


def make_reference(config: dict, seed: int = 0, dtype=torch.float32):
    """A random-weight reference model; weights get a wider spread than the init so that
    errors in the port are not hidden by near-zero activations."""
    torch.manual_seed(seed)
    hf_config = Qwen2_5_VLConfig(**config)
    model = Qwen2_5_VLForConditionalGeneration(hf_config).to(dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.05 if param.dim() > 1 else 0.02)
    return model.to(dtype=dtype, device=reference_device())


def save_reference(model, path: Path, config: dict = None) -> Path:
    """Save in the hub layout; optionally overwrite config.json with a given layout."""
    model.save_pretrained(path, safe_serialization=True)
    if config is not None:
        (Path(path) / "config.json").write_text(json.dumps(config, indent=2))
    return Path(path)


def rel_error(ours, ref) -> float:
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def to_torch(array, dtype=None):
    tensor = torch.from_numpy(np.ascontiguousarray(np.asarray(array)))
    tensor = tensor.to(reference_device())
    return tensor if dtype is None else tensor.to(dtype)


IMAGE_TOKEN = 151655
STOP = [151645, 151643]  # <|im_end|>, <|endoftext|>


def reference_inputs(inputs) -> dict:
    """Our processor's output as the reference's keyword arguments (v5 wants mm_token_type_ids)."""
    ids = inputs["input_ids"].astype(np.int64)
    kwargs = dict(input_ids=to_torch(ids), mm_token_type_ids=to_torch((ids == IMAGE_TOKEN).astype(np.int64)))
    if inputs.get("pixel_values") is not None:
        kwargs.update(pixel_values=to_torch(inputs["pixel_values"]), image_grid_thw=to_torch(inputs["image_grid_thw"]))
    return kwargs


def reference_generate(ref, inputs, max_new_tokens) -> list:
    """The reference's greedy continuation of our processor's prompt, as token ids."""
    with torch.no_grad():
        out = ref.generate(**reference_inputs(inputs), max_new_tokens=max_new_tokens, do_sample=False,
                           eos_token_id=STOP, pad_token_id=151643)
    return out[0, inputs["input_ids"].shape[1]:].cpu().tolist()


VIDEO_TOKEN = 151656


def reference_logits(ref, ids, positions, inputs=None, seconds=None, dtype=torch.float32, allowed=None):
    """The reference's float32 logits (1, L, vocab) for ``ids`` (1, L) at M-RoPE ``positions`` (3, L).

    ``inputs`` holds pixel values and grids under our processor's keys (pixels are cast to
    ``dtype``); ``seconds`` is second_per_grid_ts. ``allowed`` (L, L) booleans, query by key,
    replace the causal mask: the keys each query attends to.
    """
    ids = np.asarray(ids)
    types = np.where(ids == IMAGE_TOKEN, 1, np.where(ids == VIDEO_TOKEN, 2, 0))
    kwargs = {k: to_torch(v, dtype if k.startswith("pixel") else None) for k, v in (inputs or {}).items()
              if v is not None and k != "input_ids"}
    if seconds is not None:
        kwargs["second_per_grid_ts"] = to_torch(np.array(seconds, np.float32))
    if allowed is not None:
        mask = np.where(np.asarray(allowed, bool), 0.0, -np.inf).astype(np.float32)[None, None]
        kwargs["attention_mask"] = {"full_attention": to_torch(mask, dtype)}
    with torch.no_grad():
        out = ref(input_ids=to_torch(ids.astype(np.int64)), mm_token_type_ids=to_torch(types),
                  position_ids=to_torch(np.asarray(positions))[:, None], **kwargs)
    return out.logits.float().cpu().numpy()


ANSWER_START = 198  # "\n": the last token of every prompt the chat template ends with "assistant\n"


def script_answer(model, script, after: int = ANSWER_START):
    """Make a reference model answer ``script`` (token ids) greedily to any prompt ending in ``after``.

    Every decoder layer's attention and MLP outputs are zeroed, so the final hidden state is the
    last token's embedding: token i of the chain ``[after, *script]`` embeds as the unit vector
    of axis i and the head row of token i + 1 reads that axis (logit 16 against ~2 for any other
    token). The chain's tokens must be distinct and fewer than the hidden size.
    """
    chain = [after, *script]
    lm = model.model.language_model
    assert len(set(chain)) == len(chain) <= lm.config.hidden_size, "the chain needs distinct tokens"
    with torch.no_grad():
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        lm.norm.weight.fill_(1.0)
        for axis, (token, following) in enumerate(zip(chain, chain[1:])):
            lm.embed_tokens.weight[token] = 0.0
            lm.embed_tokens.weight[token, axis] = 1.0
            model.lm_head.weight[following] = 0.0
            model.lm_head.weight[following, axis] = 2.0
    return model
