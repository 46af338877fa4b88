"""A model folder's settings as plain objects built from its JSON files' contents:
``ModelArgs`` from config.json (in any of its published layouts) and ``SamplingDefaults``
from generation_config.json, and the readers of those files (``read_json``,
``read_folder_json``), which the loader calls once per load.

Three layouts of config.json are met in practice:
- flat (the hub files, transformers 4.49-4.51 saves): text keys at the root,
  ``rope_scaling.mrope_section``;
- dual (transformers 4.52-4.57 re-saves): the root keys plus a ``text_config`` copy;
- nested (transformers 5.x): sizes only in ``text_config``, ``rope_parameters``.
mlx-vlm's converted folders are the dual layout plus a ``quantization`` entry.

Missing keys. transformers writes a sub-config (4.49: vision_config; 4.52-4.57: also
text_config) with only the values that differ from its class defaults, and reads a missing
key back as that default. So a config.json that carries ``transformers_version`` takes, for a
missing key, the default of the version that wrote it (``writer_defaults``), and the keys so
filled are listed in ``ModelArgs.defaulted`` and logged at debug level. Those defaults are
the 72B's text widths with eps 1e-5 and a 7B-wide vision merger with tokens_per_second 4,
wrong for most real models, so a config without ``transformers_version`` (hand-written, or
from another tool) gets none: a missing size-defining key is an error naming it.
"""

import json
import logging
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Optional

from .errors import ModelLoadError

MODEL_TYPE = "qwen2_5_vl"
log = logging.getLogger("mlx_qwenvl")

# The defaults of transformers' Qwen2.5-VL configuration classes, read from each release's
# transformers/models/qwen2_5_vl/configuration_qwen2_5_vl.py (__init__ arguments in 4.x,
# class fields in 5.x) and, for mrope_section, modeling_qwen2_5_vl.py. Checked: 4.49.0,
# 4.50.0, 4.51.0, 4.52.1, 4.53.0, 4.54.0, 4.55.0, 4.56.0, 4.57.0, 4.57.1, 5.0.0, 5.1.0, 5.5.0,
# 5.10.1, 5.15.0-5.24.0. Every value below is the same in all of them:
#
#   text (4.49-4.51 Qwen2_5_VLConfig; 4.52+ Qwen2_5_VLTextConfig)   vision (Qwen2_5_VLVisionConfig)
#   vocab_size 152064, hidden_size 8192, intermediate_size 29568,   depth 32, hidden_size 3584,
#   num_hidden_layers 80, num_attention_heads 64,                    intermediate_size 3420, num_heads 16,
#   num_key_value_heads 8 (an explicit null: num_attention_heads),   in_channels 3, patch_size 14,
#   rms_norm_eps 1e-5, rope_theta 1e6 (5.x: default_theta),          spatial_merge_size 2,
#   max_position_embeddings 32768, tie_word_embeddings False         temporal_patch_size 2, window_size 112,
#                                                                    tokens_per_second 4, out_hidden_size 3584,
#                                                                    fullatt_block_indexes [7, 15, 23, 31]
#
# What changed is where keys live and what some keys mean:
#   4.49-4.51  one class; text keys at the root; the image/video/vision_start ids have no
#              default (the model fails without them); vision ``in_chans`` and
#              ``spatial_patch_size`` (hub spellings) are ignored, ``in_channels`` counts.
#   4.52-4.56  text keys in Qwen2_5_VLTextConfig (``text_config``; root copies kept);
#              image_token_id 151655 and video_token_id 151656 default at the root.
#   4.57       vision_start_token_id 151652 defaults at the root too.
#   5.0-5.24   text keys only in text_config; rope_theta and mrope_section in rope_parameters
#              (``rope_scaling`` still read, and preferred); from 5.16 (not 5.15) a root
#              tie_word_embeddings False takes a True from text_config.
#   5.17+      modeling falls back to mrope_section [16, 24, 24]; vision
#              ``num_attention_heads`` means num_heads.
#   5.23+      vision ``num_hidden_layers`` means depth.
# A version before 4.49 (the hub files say 4.41.2: Qwen's pre-release of the class) takes
# 4.49's defaults; one after 5.24 takes the newest row.
WRITER_DEFAULTS = (  # (first version, defaults added or changed); later rows win
    ((4, 49), {
        "text_config.vocab_size": 152064,
        "text_config.hidden_size": 8192,
        "text_config.intermediate_size": 29568,
        "text_config.num_hidden_layers": 80,
        "text_config.num_attention_heads": 64,
        "text_config.num_key_value_heads": 8,
        "text_config.rms_norm_eps": 1e-5,
        "text_config.rope_theta": 1000000.0,
        "text_config.max_position_embeddings": 32768,
        "text_config.tie_word_embeddings": False,
        "vision_config.depth": 32,
        "vision_config.hidden_size": 3584,
        "vision_config.intermediate_size": 3420,
        "vision_config.num_heads": 16,
        "vision_config.in_channels": 3,
        "vision_config.patch_size": 14,
        "vision_config.spatial_merge_size": 2,
        "vision_config.temporal_patch_size": 2,
        "vision_config.tokens_per_second": 4,
        "vision_config.window_size": 112,
        "vision_config.out_hidden_size": 3584,
        "vision_config.fullatt_block_indexes": (7, 15, 23, 31),
    }),
    ((5, 17), {"text_config.mrope_section": (16, 24, 24)}),
)
# Other names transformers' vision config reads as its own keys: alias -> (key, first version).
VISION_ALIASES = {"num_attention_heads": ("num_heads", (5, 17)), "num_hidden_layers": ("depth", (5, 23))}
# Ids the tokenizer fixes; every version since 4.52 defaults to them, and so do we.
TOKEN_IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652}


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
    # Values config.json left out, by key path ("vision_config.depth": 32).
    defaulted: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        """Raises ModelLoadError for another model type, or a missing key that has no default."""
        model_type = config.get("model_type")
        if model_type != MODEL_TYPE:
            raise ModelLoadError(
                f"config.json has model_type {model_type!r}, not {MODEL_TYPE!r} (Qwen2.5-VL)"
            )
        version = writer_version(config)
        defaults = writer_defaults(version) if version else {}
        defaulted = {}
        text = _Section(_text_section(config), "text_config", "the text config", defaults, defaulted)
        vision = _Section(_vision_section(config, version), "vision_config", "vision_config", defaults,
                          defaulted)
        text_args = _text_args(text, config)
        vision_args = _vision_args(vision)
        ids = {key: _token_id(key, config, text.values, defaulted) for key in TOKEN_IDS}
        if defaulted:
            whose = f"transformers {config['transformers_version']}" if version else "mlx_qwenvl"
            log.debug("config.json leaves out %s: %s's defaults taken", ", ".join(
                f"{key}={value}" for key, value in defaulted.items()), whose)
        return cls(text=text_args, vision=vision_args, quantization=config.get("quantization"),
                   defaulted=defaulted, **ids)


def writer_version(config: dict) -> Optional[tuple]:
    """(major, minor) of the transformers that wrote config.json; None when it says none
    (or nothing readable: no defaults are better than a guessed version's)."""
    match = re.match(r"\s*(\d+)\.(\d+)", str(config.get("transformers_version") or ""))
    return (int(match[1]), int(match[2])) if match else None


def writer_defaults(version: tuple) -> dict:
    """The class defaults of that transformers version, by key path (see WRITER_DEFAULTS)."""
    defaults = dict(WRITER_DEFAULTS[0][1])  # versions before the first row: its defaults
    for since, changes in WRITER_DEFAULTS[1:]:
        if version >= since:
            defaults.update(changes)
    return defaults


@dataclass
class _Section:
    """One config section's keys, with the writer's defaults for those it lacks."""

    values: dict
    prefix: str  # "text_config" / "vision_config": the key paths in defaulted
    where: str  # for messages
    defaults: dict  # by key path; empty without a transformers_version
    defaulted: dict  # filled in: key path -> value taken

    def get(self, key, fallback=None):
        """The key's value; else the writer's default, else ``fallback`` (either recorded)."""
        if self.values.get(key) is not None:
            return self.values[key]
        value = self.defaults.get(f"{self.prefix}.{key}", fallback)
        if value is not None:
            self.defaulted[f"{self.prefix}.{key}"] = value
        return value

    def require(self, keys) -> dict:
        """Raises ModelLoadError naming every key that is missing and has no default."""
        found = {key: self.get(key) for key in keys}
        missing = [key for key, value in found.items() if value is None]
        if missing:
            why = "" if self.defaults else " (no transformers_version says whose defaults apply)"
            raise ModelLoadError(f"config.json is missing {', '.join(missing)} in {self.where}{why}")
        return found


def _text_section(config: dict) -> dict:
    """The text keys, whichever layout holds them (nested values win over root copies)."""
    text = {k: v for k, v in config.items() if k not in ("text_config", "vision_config")}
    text.update(config.get("text_config") or {})
    return text


def _vision_section(config: dict, version: Optional[tuple]) -> dict:
    """vision_config with the aliases its writer reads turned into the keys they stand for.

    Raises ModelLoadError when there is none and no writer's defaults to build one from."""
    vision = dict(config.get("vision_config") or {})
    if not vision and version is None:
        raise ModelLoadError("config.json has no vision_config")
    for alias, (key, since) in VISION_ALIASES.items():
        if version and version >= since and vision.get(key) is None and alias in vision:
            vision[key] = vision[alias]
    return vision


def _field_defaults(cls) -> dict:
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def _text_args(text: _Section, config: dict) -> TextArgs:
    """Raises ModelLoadError for a missing size, eps, rope_theta or mrope_section."""
    heads = text.values.get("num_attention_heads")
    if "num_key_value_heads" in text.values and text.values["num_key_value_heads"] is None and heads:
        # Every transformers version reads an explicit null as "as many as the query heads".
        text.values["num_key_value_heads"] = text.defaulted["text_config.num_key_value_heads"] = heads
    sizes = text.require(("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                          "num_key_value_heads", "vocab_size", "rms_norm_eps"))
    rope = _Section(dict(text.values.get("rope_parameters") or text.values.get("rope_scaling") or {}),
                    text.prefix, text.where, text.defaults, text.defaulted)
    if rope.values.get("rope_theta") is None:
        rope.values["rope_theta"] = text.values.get("rope_theta")
    rope_args = rope.require(("rope_theta", "mrope_section"))
    optional = _field_defaults(TextArgs)
    return TextArgs(
        **sizes,
        rope_theta=float(rope_args["rope_theta"]),
        mrope_section=tuple(rope_args["mrope_section"]),
        max_position_embeddings=text.get("max_position_embeddings", optional["max_position_embeddings"]),
        tie_word_embeddings=_tie_word_embeddings(text, config),
    )


def _tie_word_embeddings(text: _Section, config: dict) -> bool:
    # transformers forwards a tie flag found in text_config to the root: either one ties.
    found = [d.get("tie_word_embeddings") for d in (config, config.get("text_config") or {})]
    if all(value is None for value in found):
        return bool(text.get("tie_word_embeddings", False))
    return any(bool(value) for value in found)


def _vision_args(vision: _Section) -> VisionArgs:
    """Raises ModelLoadError for a missing size-defining key."""
    required = vision.require(("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size",
                               "fullatt_block_indexes", "tokens_per_second"))
    required["fullatt_block_indexes"] = tuple(required["fullatt_block_indexes"])
    if vision.values.get("in_channels") is None and vision.values.get("in_chans") is not None:
        # The hub files spell it in_chans; transformers ignores that and takes 3, as it always is.
        vision.values["in_channels"] = vision.values["in_chans"]
    optional = {key: vision.get(key, default) for key, default in _field_defaults(VisionArgs).items()
                if key not in required}
    return VisionArgs(**required, **optional)


def _token_id(key: str, config: dict, text: dict, defaulted: dict) -> int:
    for section in (config, text):
        if section.get(key) is not None:
            return section[key]
    defaulted[key] = TOKEN_IDS[key]
    return TOKEN_IDS[key]


# --------------------------------------------------------------------------------------------
# generation_config.json


@dataclass
class SamplingDefaults:
    """The sampling generation_config.json asks for (transformers' ``GenerationConfig`` keys),
    used where a call leaves an option unset; greedy without it."""

    temperature: float = 0.0
    top_p: float = 1.0  # 1.0 keeps every token, as transformers' default
    top_k: int = 0
    repetition_penalty: Optional[float] = None
    eos_token_ids: set = field(default_factory=set)

    @classmethod
    def from_dict(cls, generation_config: Optional[dict]) -> "SamplingDefaults":
        """From generation_config.json's contents (None: the folder has none). Greedy when
        ``do_sample`` is false or absent, as transformers; its end-of-sequence ids and
        repetition penalty apply either way."""
        config = generation_config or {}
        eos = config.get("eos_token_id")
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if not config.get("do_sample", False):
            return cls(eos_token_ids=eos, repetition_penalty=config.get("repetition_penalty"))
        return cls(
            temperature=float(config.get("temperature", 1.0)),
            top_p=float(config.get("top_p", 1.0)),
            top_k=int(config.get("top_k", 0) or 0),
            repetition_penalty=config.get("repetition_penalty"),
            eos_token_ids=eos,
        )

    @classmethod
    def from_folder(cls, path) -> "SamplingDefaults":
        """From a folder's generation_config.json (greedy when it has none)."""
        return cls.from_dict(read_folder_json(path, "generation_config.json") if path else None)


def read_json(file: Path) -> dict:
    """A model folder's JSON file.

    Raises ModelLoadError naming the file when it cannot be read or parsed."""
    try:
        return json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{file}: cannot read JSON ({exc})") from exc


def read_folder_json(folder: Path, name: str) -> Optional[dict]:
    """A model folder's optional JSON file (generation_config.json, preprocessor_config.json):
    its contents, or None when the folder has none.

    Raises ModelLoadError naming the file when it cannot be read or parsed."""
    file = Path(folder) / name
    return read_json(file) if file.is_file() else None
