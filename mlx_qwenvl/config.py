"""Model arguments built from a Qwen2.5-VL config.json in any of its published layouts.

Three layouts are met in practice:
- flat (the hub files): text keys at the root, ``rope_scaling.mrope_section``;
- dual (transformers 4.5x re-saves): the root keys plus a ``text_config`` copy;
- nested (transformers 5.x): sizes only in ``text_config``, ``rope_parameters``.
mlx-vlm's converted folders are the dual layout plus a ``quantization`` entry.

The transformers class defaults are wrong for every real size (72B-like widths, text
eps 1e-5, vision tokens_per_second 4), so a missing defining key is an error, never
a silent default.
"""

from dataclasses import dataclass
from typing import Optional

from .errors import ModelLoadError

MODEL_TYPE = "qwen2_5_vl"


@dataclass
class TextArgs:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class VisionArgs:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    fullatt_block_indexes: tuple
    tokens_per_second: float
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    in_channels: int = 3

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class ModelArgs:
    text: TextArgs
    vision: VisionArgs
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    quantization: Optional[dict] = None

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        model_type = config.get("model_type")
        if model_type != MODEL_TYPE:
            raise ModelLoadError(
                f"config.json has model_type {model_type!r}, not {MODEL_TYPE!r} (Qwen2.5-VL)"
            )
        text = _text_section(config)
        ids = {
            key: _first(key, config, text)
            for key in ("image_token_id", "video_token_id", "vision_start_token_id")
        }
        text_args = _text_args(text)
        # transformers forwards a tie flag found in text_config to the root: either one ties.
        text_args.tie_word_embeddings = bool(
            config.get("tie_word_embeddings")
            or (config.get("text_config") or {}).get("tie_word_embeddings")
        )
        return cls(
            text=text_args,
            vision=_vision_args(config.get("vision_config")),
            quantization=config.get("quantization"),
            **{key: value for key, value in ids.items() if value is not None},
        )


def _first(key, *dicts):
    for d in dicts:
        if d.get(key) is not None:
            return d[key]
    return None


def _require(section: dict, keys, where: str) -> dict:
    missing = [key for key in keys if section.get(key) is None]
    if missing:
        raise ModelLoadError(f"config.json is missing {', '.join(missing)} in {where}")
    return {key: section[key] for key in keys}


def _text_section(config: dict) -> dict:
    """The text keys, whichever layout holds them (nested values win over root copies)."""
    text = {k: v for k, v in config.items() if k not in ("text_config", "vision_config")}
    text.update(config.get("text_config") or {})
    return text


def _text_args(text: dict) -> TextArgs:
    sizes = _require(
        text,
        (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "rms_norm_eps",
        ),
        "the text config",
    )
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_theta = _first("rope_theta", rope, text)
    mrope_section = rope.get("mrope_section")
    if rope_theta is None or mrope_section is None:
        missing = "rope_theta" if rope_theta is None else "mrope_section"
        raise ModelLoadError(f"config.json is missing {missing} in the text config")
    optional = {
        key: text[key]
        for key in ("max_position_embeddings",)
        if text.get(key) is not None
    }
    return TextArgs(
        **sizes,
        rope_theta=float(rope_theta),
        mrope_section=tuple(mrope_section),
        **optional,
    )


def _vision_args(vision: Optional[dict]) -> VisionArgs:
    if not vision:
        raise ModelLoadError("config.json has no vision_config")
    required = _require(
        vision,
        (
            "depth",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "out_hidden_size",
            "fullatt_block_indexes",
            "tokens_per_second",
        ),
        "vision_config",
    )
    required["fullatt_block_indexes"] = tuple(required["fullatt_block_indexes"])
    optional = {
        key: vision[key]
        for key in ("patch_size", "spatial_merge_size", "temporal_patch_size", "window_size")
        if vision.get(key) is not None
    }
    channels = _first("in_channels", vision) or _first("in_chans", vision)
    if channels is not None:
        optional["in_channels"] = channels
    return VisionArgs(**required, **optional)
