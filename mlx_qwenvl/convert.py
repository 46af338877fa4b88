"""Convert Qwen2.5-VL checkpoints into MLX folders, optionally quantized.

The output is the folder layout mlx-community publishes (mlx-vlm's weight names, its
``quantization`` entry in config.json, safetensors shards of at most 5 GB with an index),
so mlx-vlm and the apps built on it load our folders, and we load theirs. Quantizing takes
MLX's modes (affine, mxfp4, nvfp4, mxfp8) and mlx-lm's mixed recipes (``mixed_3_6`` ...), and
writes config.json as mlx-lm does; AWQ and GPTQ checkpoints (without act-order) become MLX
affine folders whose weights dequantize exactly to theirs, and the formats without an exact
MLX form are refused, in one line, before any weight is read.

How it stays light: every source tensor is read lazily, converted in row blocks of about
64 MB and written straight into its place in the output shard (the shard's header is
planned from the source's shapes before any data is written), so peak memory is about
one tensor, not one shard and never the whole model.

How it stays safe: the source is checked first (model type, config keys, every shard
present and complete, every tensor's name and shape against the model) from the
safetensors headers alone; the folder is then written under ``<target>.tmp-<random>``
beside the target and renamed only when complete. Any error or Ctrl-C removes the
temporary folder, and an existing target is replaced (``force``) only at that last rename.

Test hook: ``MLX_QWENVL_CONVERT_SLEEP=<seconds>`` sleeps after each tensor, so tests can
interrupt a conversion of a tiny model mid-way. It has no other use.
"""

import json
import math
import os
import secrets
import shutil
import signal
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import click
import mlx.core as mx
import numpy as np

from .config import ModelArgs, VisionArgs
from .errors import ModelLoadError, QwenVLError
from .loading import (AFFINE_BITS, AFFINE_GROUP_SIZES, FLOAT_MODES, FOREIGN_METHODS, ORIGINAL_SIZES, _short_list,
                      model_skeleton, read_config, resolve_model_path, sanitize, weight_files, weight_layout,
                      with_mlx_quantization)
from .model import Model

MAX_SHARD_BYTES = 5_000_000_000  # "at most 5 GB" in either reading of GB
HEADER_BYTES, ENTRY_BYTES = 1024, 256  # a shard's file size: its data plus at most this header
CHUNK_BYTES = 64 << 20  # rows converted and written at a time
# MLX's CPU quantize of the floating-point modes holds temporaries of 45 (mxfp4) to 80 (nvfp4)
# bytes an element, affine about 7: their blocks are this many times smaller, so the peak stays
# near one tensor (nvfp4: 1.3 GB for a 64 MB block, 0.11 GB at 1/16; no slower, measured).
QUANTIZE_BLOCK_DIVISOR = {"affine": 1, "mxfp8": 4, "mxfp4": 16, "nvfp4": 16}
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
# What mx.quantize takes in this MLX (its table of modes, checked against the library itself):
# affine in any of these bits and group sizes, each floating-point mode in one (bits, group size).
Q_BITS = AFFINE_BITS
Q_GROUP_SIZES = AFFINE_GROUP_SIZES
Q_MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")
MODE_SETTINGS = {mode: (group_size, bits) for (bits, group_size), mode in FLOAT_MODES.items()}
MODE_DEFAULTS = {"affine": (64, 4), **MODE_SETTINGS}  # (group size, bits) when not given, as mlx-lm
# Mixed-precision recipes: (low bits, high bits). mlx-lm has the first four of these; mlx-vlm all.
RECIPES = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_5": (3, 5), "mixed_3_6": (3, 6),
           "mixed_3_8": (3, 8), "mixed_4_6": (4, 6), "mixed_4_8": (4, 8)}
VISION_PREFIX = "vision_tower."
MERGER_PREFIX = "vision_tower.merger."
SLEEP_ENV = "MLX_QWENVL_CONVERT_SLEEP"  # test hook, see the module docstring
MARKER = ".mlx_qwenvl_convert_in_progress"  # inside a temporary folder: the writer's pid

# Files a model folder needs besides weights and config.json, copied when present.
COPY_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)

# safetensors dtype names <-> MLX dtypes.
ST_DTYPES = {
    "BOOL": mx.bool_, "U8": mx.uint8, "I8": mx.int8, "U16": mx.uint16, "I16": mx.int16,
    "U32": mx.uint32, "I32": mx.int32, "U64": mx.uint64, "I64": mx.int64,
    "F16": mx.float16, "BF16": mx.bfloat16, "F32": mx.float32,
}
ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}
# numpy has no bfloat16: its bytes are written through a same-size integer view.
BYTE_VIEWS = {mx.bfloat16: mx.uint16}


class ConversionError(QwenVLError):
    """A conversion that cannot start or did not finish (nothing is left half-written)."""


class ConversionInterrupted(ConversionError, KeyboardInterrupt):
    """Ctrl-C (or SIGTERM under the CLI) during a conversion; the partial output was removed."""


# --------------------------------------------------------------------------- the source


@dataclass(frozen=True)
class TensorSpec:
    """A tensor known by its header only; ``sanitize`` renames and transposes these for free."""

    shape: tuple
    dtype: mx.Dtype

    def transpose(self, *axes):
        return TensorSpec(tuple(self.shape[a] for a in axes), self.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.size


@dataclass
class Source:
    path: Path
    config: dict
    args: ModelArgs
    files: list
    specs: dict  # MLX name -> TensorSpec, in file and offset order
    model: Model  # an unevaluated skeleton: shapes and the module tree, no memory
    nbytes: int = 0
    foreign: Optional["Foreign"] = None  # an AWQ or GPTQ checkpoint, converted exactly

    @property
    def quantized(self) -> bool:
        return bool(self.args.quantization)


def read_safetensors_header(file: Path) -> dict:
    """``{name: {"dtype", "shape", "data_offsets"}}`` from the header, checking the file is complete."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{file} is not a safetensors file (only {size} bytes)")
        length = struct.unpack("<Q", head)[0]
        if length > 100_000_000 or 8 + length > size:
            raise ModelLoadError(f"{file} is truncated or not a safetensors file")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelLoadError(f"{file} has an unreadable safetensors header") from None
    header.pop("__metadata__", None)
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + length + end > size:
        raise ModelLoadError(
            f"{file} is truncated: its header describes {8 + length + end} bytes, the file has {size}"
        )
    return header


def _spec(file: Path, name: str, entry: dict) -> TensorSpec:
    dtype = ST_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ModelLoadError(f"{file.name}: tensor {name} has unsupported dtype {entry['dtype']}")
    return TensorSpec(tuple(entry["shape"]), dtype)


def inspect_source(path: Path) -> Source:
    """Every check that can fail, from config.json and the safetensors headers only (and, for
    GPTQ, its small g_idx tensors).

    Raises ModelLoadError for a folder that is not a complete Qwen2.5-VL checkpoint, and
    ConversionError (before any weight file is opened) for another library's quantization
    that has no exact MLX form.
    """
    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist")
    config = read_config(path)
    ModelArgs.from_dict(config)  # another model type or a missing key is the first thing to say
    foreign = foreign_format(config, path)
    if foreign is not None:
        settings = {**config, "quantization": {"group_size": foreign.group_size, "bits": foreign.bits}}
    else:
        settings = with_mlx_quantization(config, str(path))  # MLX settings under any key
    args = ModelArgs.from_dict(settings)
    if args.quantization is not None and not {"group_size", "bits"} <= set(args.quantization):
        raise ModelLoadError(f"{path}/config.json has a quantization entry without group_size and bits")
    files = weight_files(path)  # a shard listed in the index but absent fails here

    headers = {file: read_safetensors_header(file) for file in files}
    owner = {}
    for file, header in headers.items():
        for name in header:
            if name in owner:
                raise ModelLoadError(f"tensor {name} is in both {owner[name].name} and {file.name}")
            owner[name] = file
    weight_layout(owner)  # mixed MLX / PyTorch names fail here

    specs = {}
    for file, header in headers.items():
        ordered = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        renamed = sanitize({name: _spec(file, name, entry) for name, entry in ordered}, args)
        specs.update(renamed)
    raw = specs
    if foreign is not None:
        specs = foreign_specs(raw, foreign, path)

    model = model_skeleton(args, {name: spec.shape for name, spec in specs.items()}, where=f"{path}: ")
    source = Source(path, config, args, files, specs, model, foreign=foreign)
    source.nbytes = sum(spec.nbytes for spec in raw.values())
    if foreign is not None:
        check_group_index(source)
    return source


# --------------------------------------------------------------------------- other libraries


AWQ_POSITIONS = (0, 4, 1, 5, 2, 6, 3, 7)  # AutoAWQ GEMM: value j of a word sits in nibble AWQ_POSITIONS[j]
GPTQ_BITS = (2, 4, 8)  # the widths that fill 32-bit words exactly, as MLX packs them
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> what is added to a stored zero point


@dataclass
class Foreign:
    """An AWQ or GPTQ checkpoint, which maps onto MLX's affine quantization exactly: their
    weight is (q - zero) * scale, MLX's q * scale + bias, so bias = -zero * scale (computed and
    stored in float32, where it is exact: a 16-bit scale times a zero of at most 2**8)."""

    method: str  # "AWQ" or "GPTQ"
    bits: int
    group_size: int
    zero_offset: int = 0  # added to each stored zero point (AutoGPTQ's "gptq" format stores zero - 1)
    layers: dict = field(default_factory=dict)  # MLX module path -> {"qweight": MLX name, ...}
    sizes: dict = field(default_factory=dict)  # MLX name of each of those tensors -> its bytes

    @property
    def per_word(self) -> int:
        return 32 // self.bits


def _foreign_settings(config: dict) -> Optional[dict]:
    """The quantization_config of another library (with a quant_method), unless an MLX
    ``quantization`` entry describes the weights (an MLX folder keeping its source's leftover)."""
    if config.get("quantization") is not None:
        return None
    settings = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if isinstance(settings, dict) and settings.get("quant_method") is not None:
        return settings
    return None


def foreign_refusal(settings: dict) -> Optional[str]:
    """What a foreign ``quantization_config`` holds, in words, when it has no exact MLX form;
    None for the AWQ and GPTQ layouts convert maps exactly."""
    method = str(settings.get("quant_method")).lower()
    label = FOREIGN_METHODS.get(method, str(settings.get("quant_method")))
    bits, group_size = settings.get("bits"), settings.get("group_size")
    if method == "awq":
        version = str(settings.get("version", "gemm")).lower()
        if version != "gemm":
            return f"AWQ weights packed for its {version} kernel (only GEMM packing is mapped)"
        if bits != 4:
            return f"{bits}-bit AWQ weights (AWQ packs 4-bit)"
        if settings.get("zero_point") is False:
            return "AWQ weights without zero points"
    elif method == "gptq":
        if settings.get("desc_act"):
            return "GPTQ weights quantized with act-order (desc_act: groups that are not runs of consecutive inputs)"
        if bits not in GPTQ_BITS:
            return f"{bits}-bit GPTQ weights (only 2, 4 and 8 bits pack into words as MLX's do)"
        if str(settings.get("checkpoint_format", "gptq")).lower() not in GPTQ_FORMATS:
            return f"GPTQ weights in the {settings.get('checkpoint_format')} layout"
    elif method in ("fp8", "fbgemm_fp8"):
        return f"{label} weights (8-bit floats with block scales)"
    elif method == "bitsandbytes":
        return "bitsandbytes weights (NF4/FP4 code books or int8 with outlier columns)"
    else:
        return f"{label}-quantized weights"
    if group_size not in AFFINE_GROUP_SIZES:
        return f"{label} weights in groups of {group_size} (MLX groups 32, 64 or 128 weights)"
    return None


def convert_instead(config: dict) -> str:
    """Where an exact MLX folder can come from instead: named for the published sizes."""
    width = (config.get("text_config") or {}).get("hidden_size") or config.get("hidden_size")
    size = ORIGINAL_SIZES.get(width)
    if size:
        original = f"Qwen/Qwen2.5-VL-{size}-Instruct"
        return (f"convert from the 16-bit original (`mlx-qwenvl convert --hf-path {original} -q`) or from "
                f"{original}-AWQ, which converts exactly")
    return ("convert from the 16-bit checkpoint it was made from (`mlx-qwenvl convert --hf-path "
            "<16-bit checkpoint> -q`) or from an AWQ or GPTQ (without act-order) checkpoint, which converts exactly")


def foreign_format(config: dict, where) -> Optional[Foreign]:
    """The Foreign format of a config whose quantization_config names AWQ or GPTQ; None for a
    float or MLX checkpoint. Raises ConversionError, in one line saying what to convert from
    instead, for every other library's quantization and for the AWQ/GPTQ variants that have
    no exact MLX form (GPTQ act-order, AWQ GEMV packing, odd bit widths or group sizes)."""
    settings = _foreign_settings(config)
    if settings is None:
        return None
    refusal = foreign_refusal(settings)
    if refusal:
        raise ConversionError(f"{where} holds {refusal}, which have no exact MLX form; {convert_instead(config)}")
    method = str(settings["quant_method"]).lower()
    offset = GPTQ_FORMATS[str(settings.get("checkpoint_format", "gptq")).lower()] if method == "gptq" else 0
    return Foreign(method.upper(), settings["bits"], settings["group_size"], offset)


def _foreign_shape(foreign: Foreign, parts: dict, path: str, where) -> tuple:
    """``(out, in)`` of one layer from its qweight, qzeros, scales (and g_idx) specs.

    AWQ stores qweight [in, out / per word], GPTQ [in / per word, out]; both qzeros
    [in / group, out / per word] and scales [in / group, out]. Raises ModelLoadError when the
    tensors do not fit together as the config's bits and group size say."""
    q, per, g = parts["qweight"].shape, foreign.per_word, foreign.group_size
    width, rows = (q[0], q[-1] * per) if foreign.method == "AWQ" else (q[0] * per, q[-1])
    expected = {
        "qweight": (width, rows // per) if foreign.method == "AWQ" else (width // per, rows),
        "qzeros": (width // g, rows // per),
        "scales": (width // g, rows),
        "g_idx": (width,),
    }
    kinds = {"qweight": (mx.int32, mx.uint32), "qzeros": (mx.int32, mx.uint32), "g_idx": (mx.int32, mx.int64),
             "scales": (mx.float16, mx.bfloat16, mx.float32)}
    fits = len(q) == 2 and width % g == 0 and rows % per == 0 and all(
        spec.shape == expected[part] and spec.dtype in kinds[part] for part, spec in parts.items())
    if not fits:
        shapes = ", ".join(f"{part} {spec.shape} {ST_NAMES[spec.dtype]}" for part, spec in parts.items())
        raise ModelLoadError(f"{where}: {path} is not a {foreign.method} layer of {foreign.bits}-bit weights in "
                             f"groups of {g}: {shapes}")
    return rows, width


def foreign_specs(specs: dict, foreign: Foreign, where) -> dict:
    """The MLX tensors a foreign checkpoint converts to, by MLX name, in the source's order:
    each quantized layer's qweight, qzeros, scales (and g_idx) become the uint32 weight
    [out, in * bits / 32] and float32 scales and biases [out, in / group] MLX stores. Records
    each layer's source tensors in ``foreign.layers``. Raises ModelLoadError as _foreign_shape,
    and for a qweight without its qzeros or scales."""
    layers = {name[: -len(".qweight")] for name in specs if name.endswith(".qweight")}
    out = {}
    for name, spec in specs.items():
        path, _, leaf = name.rpartition(".")
        if path not in layers or leaf not in ("qweight", "qzeros", "scales", "g_idx"):
            out[name] = spec  # every other tensor (a quantized layer's bias too) as it is
            continue
        if leaf != "qweight":
            continue  # read with the qweight
        parts = {part: f"{path}.{part}" for part in ("qweight", "qzeros", "scales", "g_idx")
                 if f"{path}.{part}" in specs}
        missing = [f"{path}.{part}" for part in ("qzeros", "scales") if part not in parts]
        if missing:
            raise ModelLoadError(f"{where}: {name} has no {' or '.join(missing)}")
        rows, width = _foreign_shape(foreign, {part: specs[n] for part, n in parts.items()}, path, where)
        foreign.layers[path] = parts
        foreign.sizes.update({n: specs[n].nbytes for n in parts.values()})
        groups = width // foreign.group_size
        out[f"{path}.weight"] = TensorSpec((rows, width * foreign.bits // 32), mx.uint32)
        out[f"{path}.scales"] = TensorSpec((rows, groups), mx.float32)
        out[f"{path}.biases"] = TensorSpec((rows, groups), mx.float32)
    return out


def check_group_index(source: Source) -> None:
    """GPTQ's g_idx (the group of each input) must be input // group_size: consecutive runs, as
    MLX groups them. Act-order checkpoints scatter it even where the config does not say so.
    Reads only the g_idx tensors (int32 [in], small). Raises ConversionError naming the layer."""
    foreign = source.foreign
    if not any("g_idx" in parts for parts in foreign.layers.values()):
        return
    arrays = {}
    for file in source.files:
        arrays.update(sanitize(mx.load(str(file)), source.args))  # lazy: only what is evaluated is read
    for path, parts in foreign.layers.items():
        if "g_idx" not in parts:
            continue
        index = arrays[parts["g_idx"]]
        expected = mx.arange(index.shape[0]) // foreign.group_size
        if not mx.array_equal(index.astype(mx.int64), expected.astype(mx.int64)).item():
            raise ConversionError(
                f"{source.path}: {path} has a GPTQ g_idx that is not input // group_size (act-order groups), "
                f"which has no exact MLX form; {convert_instead(source.config)}")


# --------------------------------------------------------------------------- the plan


@dataclass
class Job:
    """One source tensor (with, dequantizing or unpacking, its companions) to its output tensors."""

    kind: str  # "cast", "quantize", "dequantize" or "unpack" (an AWQ/GPTQ layer)
    source: str  # MLX name of the tensor read
    outputs: list  # [(name, dtype, shape)], written in this order
    nbytes: int  # source bytes, for progress
    group_size: int = 0
    bits: int = 0
    mode: str = "affine"
    dtype: Optional[mx.Dtype] = None  # quantizing: the float dtype the weight is quantized from
    parts: dict = field(default_factory=dict)  # unpacking: the layer's qzeros, scales (g_idx) names
    packing: str = ""  # unpacking: "AWQ" or "GPTQ"
    zero_offset: int = 0  # unpacking: added to each stored zero point


@dataclass
class Plan:
    jobs: list
    shards: list = field(default_factory=list)  # [(file name, [jobs])]
    quantization: Optional[dict] = None  # config.json's entry
    dtype: Optional[mx.Dtype] = None
    mode: str = "affine"
    recipe: Optional[str] = None
    foreign: Optional[Foreign] = None

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(dtype, shape) for job in self.jobs for _, dtype, shape in job.outputs)


def _nbytes(dtype, shape) -> int:
    return math.prod(shape) * dtype.size


def _out_dtype(dtype, spec: TensorSpec):
    """A floating-point tensor's output dtype: ``dtype``, or its own when None; others keep theirs."""
    return dtype if dtype is not None and mx.issubdtype(spec.dtype, mx.floating) else spec.dtype


def recipe_bits(recipe: str, num_layers: int) -> Callable[[str], int]:
    """Bits for a language-model layer path under a mixed recipe, by mlx-lm's rule
    (mlx_lm.convert.mixed_quant_predicate_builder, after llama.cpp's Q4_K_M): the high bits
    for the output head, and for v_proj and down_proj in the first and last eighth of the
    decoder layers and every third layer between; the low bits elsewhere, the input embedding
    included (as mlx-lm; mlx-vlm gives it the high bits). Paths without a layer index count
    as layer 0, as in mlx-lm."""
    low, high = RECIPES[recipe]
    first, last = num_layers // 8, 7 * num_layers // 8

    def bits(path: str) -> int:
        parts = path.split(".")
        # mlx-lm reads the index where its first down_proj path has one: language_model.model.layers.<i>
        index = int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else 0
        more = index < first or index >= last or (index - first) % 3 == 2
        if more and any(key in path for key in ("v_proj", "v_a_proj", "v_b_proj", "down_proj")):
            return high
        return high if "lm_head" in path else low

    return bits


def quantization_choices(model: Model, group_size: int, bits: Optional[int], mode: str = "affine",
                         quantize_vision: bool = False, recipe: Optional[str] = None) -> dict:
    """Weight name -> {"group_size", "bits", "mode"} for each layer convert quantizes.

    Those are the layers mlx-lm would quantize (Linear, Embedding) whose input width divides
    into groups, the vision blocks only when asked; the patch merger, which projects into the
    language model's embedding space, stays unquantized as in mlx-vlm. A recipe sets each
    language-model layer's bits (recipe_bits) instead of ``bits``; it never covers the vision
    tower (as in mlx-vlm). ``model`` can be an unevaluated skeleton."""
    rule = recipe_bits(recipe, len(model.language_model.model.layers)) if recipe else None
    choices = {}
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            continue
        if path.startswith(VISION_PREFIX) and (rule or not quantize_vision or path.startswith(MERGER_PREFIX)):
            continue
        choices[f"{path}.weight"] = {"group_size": group_size, "bits": rule(path) if rule else bits, "mode": mode}
    return choices


def _config_entry(choices: dict, group_size: int, bits: int, mode: str, recipe: Optional[str]) -> dict:
    """config.json's ``quantization`` as mlx-lm writes it: the default settings ("mode" only for
    the floating-point modes, so that older readers see the affine entry they know) and, with a
    recipe, every quantized layer's settings under its module path."""
    entry = {"group_size": group_size, "bits": RECIPES[recipe][0] if recipe else bits}
    if mode != "affine":
        entry["mode"] = mode
    if recipe:
        for name, settings in choices.items():
            entry[name[: -len(".weight")]] = {"group_size": settings["group_size"], "bits": settings["bits"]}
    return entry


def _layer_quantization(quantization: dict, path: str) -> tuple:
    params = quantization.get(path)
    params = params if isinstance(params, dict) else quantization
    return params["group_size"], params["bits"], params.get("mode", quantization.get("mode", "affine"))


def make_plan(source: Source, dtype, quantize, q_bits, q_group_size, quantize_vision, dequantize,
              q_mode: str = "affine", recipe: Optional[str] = None) -> Plan:
    """The jobs and shards of a conversion: dequantizing an MLX folder, unpacking an AWQ/GPTQ
    checkpoint, or casting a float checkpoint and quantizing its layers as asked."""
    if dequantize:
        return _shard(_dequantize_plan(source, dtype))
    if source.foreign is not None:
        return _shard(_unpack_plan(source, dtype))

    def out_dtype(spec):
        return _out_dtype(dtype, spec)

    choices = (quantization_choices(source.model, q_group_size, q_bits, q_mode, quantize_vision, recipe)
               if quantize else {})
    jobs = []
    for name, spec in source.specs.items():
        if name not in choices:
            jobs.append(Job("cast", name, [(name, out_dtype(spec), spec.shape)], spec.nbytes))
            continue
        settings, path, compute = choices[name], name[: -len(".weight")], out_dtype(spec)
        rows, width, group_size, bits = spec.shape[:-1], spec.shape[-1], settings["group_size"], settings["bits"]
        groups = (*rows, width // group_size)
        # Affine stores scales and biases in the weights' dtype; the floating-point modes store
        # one 8-bit scale a group (mx.quantize returns uint8) and no biases.
        outputs = [(name, mx.uint32, (*rows, width * bits // 32)),
                   (f"{path}.scales", compute if q_mode == "affine" else mx.uint8, groups)]
        if q_mode == "affine":
            outputs.append((f"{path}.biases", compute, groups))
        jobs.append(Job("quantize", name, outputs, spec.nbytes, group_size, bits, q_mode, dtype=compute))
    plan = Plan(jobs, dtype=dtype, mode=q_mode, recipe=recipe)
    if quantize:
        plan.quantization = _config_entry(choices, q_group_size, q_bits, q_mode, recipe)
    elif source.quantized:
        plan.quantization = dict(source.args.quantization)
    return _shard(plan)


def _dequantize_plan(source: Source, dtype) -> Plan:
    jobs, quantization = [], source.args.quantization
    for name, spec in source.specs.items():
        path, _, leaf = name.rpartition(".")
        if leaf in ("scales", "biases") and f"{path}.weight" in source.specs and f"{path}.scales" in source.specs:
            continue  # consumed with the weight
        if leaf == "weight" and f"{path}.scales" in source.specs:
            group_size, bits, mode = _layer_quantization(quantization, path)
            shape = (*spec.shape[:-1], spec.shape[-1] * 32 // bits)
            nbytes = sum(source.specs[f"{path}.{part}"].nbytes for part in ("weight", "scales", "biases")
                         if f"{path}.{part}" in source.specs)
            jobs.append(Job("dequantize", name, [(name, dtype, shape)], nbytes, group_size, bits, mode))
        else:
            jobs.append(Job("cast", name, [(name, _out_dtype(dtype, spec), spec.shape)], spec.nbytes))
    return Plan(jobs, dtype=dtype)


def _unpack_plan(source: Source, dtype) -> Plan:
    """An AWQ/GPTQ checkpoint: each quantized layer unpacked into MLX's weight, scales and
    biases (float32, for exactness, whatever ``dtype``), every other tensor cast to ``dtype``
    (None: as stored)."""
    foreign, jobs = source.foreign, []
    for name, spec in source.specs.items():
        path, _, leaf = name.rpartition(".")
        if path in foreign.layers and leaf in ("scales", "biases"):
            continue  # written by the weight's job
        if path in foreign.layers and leaf == "weight":
            parts = foreign.layers[path]
            outputs = [(name, spec.dtype, spec.shape)] + [
                (f"{path}.{part}", mx.float32, source.specs[f"{path}.{part}"].shape) for part in ("scales", "biases")]
            nbytes = sum(foreign.sizes[part] for part in parts.values())
            jobs.append(Job("unpack", parts["qweight"], outputs, nbytes, foreign.group_size, foreign.bits,
                            parts={key: value for key, value in parts.items() if key != "qweight"},
                            packing=foreign.method, zero_offset=foreign.zero_offset))
            continue
        jobs.append(Job("cast", name, [(name, _out_dtype(dtype, spec), spec.shape)], spec.nbytes))
    plan = Plan(jobs, dtype=dtype, foreign=foreign)
    plan.quantization = {"group_size": foreign.group_size, "bits": foreign.bits}
    return plan


def _shard(plan: Plan) -> Plan:
    """Consecutive jobs into shards of at most MAX_SHARD_BYTES (a job is never split)."""
    groups, current, size = [], [], HEADER_BYTES
    for job in plan.jobs:
        job_bytes = sum(_nbytes(dtype, shape) + ENTRY_BYTES for _, dtype, shape in job.outputs)
        if current and size + job_bytes > MAX_SHARD_BYTES:
            groups.append(current)
            current, size = [], HEADER_BYTES
        current.append(job)
        size += job_bytes
    groups.append(current)
    if len(groups) == 1:
        plan.shards = [("model.safetensors", groups[0])]
    else:
        plan.shards = [(f"model-{i:05d}-of-{len(groups):05d}.safetensors", group)
                       for i, group in enumerate(groups, 1)]
    return plan


# --------------------------------------------------------------------------- writing


class SafetensorsWriter:
    """A safetensors file whose header is written first and whose tensors are then filled in
    any order, block of rows by block of rows, so no tensor needs to be held whole."""

    def __init__(self, path: Path, entries: list, metadata: Optional[dict] = None):
        self.path = path
        self.entries = {}
        header = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, dtype, shape in entries:
            nbytes = _nbytes(dtype, shape)
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self.entries[name] = (offset, nbytes, shape)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.data_start = 8 + len(raw)
        self.size = self.data_start + offset
        self.written = dict.fromkeys(self.entries, 0)
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.file.truncate(self.size)

    def write(self, name: str, array: mx.array, row: int = 0) -> None:
        """Write ``array`` as rows ``row:`` of tensor ``name`` (all of it when it has no rows)."""
        offset, nbytes, shape = self.entries[name]
        if len(shape):
            offset += row * (nbytes // shape[0])
        view = BYTE_VIEWS.get(array.dtype)
        data = np.ascontiguousarray(array.view(view) if view is not None else array)
        if offset + data.nbytes > self.entries[name][0] + nbytes:
            raise ConversionError(f"internal error: {name} overflows its place in {self.path.name}")
        self.file.seek(self.data_start + offset)
        self.file.write(data.data.cast("B"))
        self.written[name] += data.nbytes

    def close(self) -> None:
        self.file.close()
        short = [name for name, (_, nbytes, _) in self.entries.items() if self.written[name] != nbytes]
        if short:
            raise ConversionError(f"internal error: {_short_list(short)} incompletely written")

    def abort(self) -> None:
        self.file.close()


def _row_blocks(shape: tuple, itemsize: int, align: int = 1):
    """Row ranges of about CHUNK_BYTES, starting at multiples of ``align``; one block for
    tensors without rows."""
    if len(shape) < 2:
        yield None
        return
    row_bytes = max(1, math.prod(shape[1:]) * itemsize)
    step = max(align, CHUNK_BYTES // row_bytes // align * align)
    for start in range(0, shape[0], step):
        yield start, min(start + step, shape[0])


def run_job(job: Job, arrays: dict, writer: SafetensorsWriter) -> None:
    source = arrays.pop(job.source)
    if job.kind == "dequantize":
        path = job.source[: -len(".weight")]
        scales, biases = arrays.pop(f"{path}.scales"), arrays.pop(f"{path}.biases", None)
    if job.kind == "unpack":
        parts = {key: arrays.pop(name) for key, name in job.parts.items()}
    # Blocks are sized on the output's (unpacked) shape with float32 intermediates in mind.
    shape = job.outputs[0][2] if job.kind == "dequantize" else source.shape
    if job.kind == "unpack":
        shape = (job.outputs[0][2][0], job.outputs[0][2][1] * 32 // job.bits)
    dtype = job.outputs[0][1]
    # An unpacked block starts at a whole packed word of the foreign tensors' output columns.
    align = 32 // job.bits if job.kind == "unpack" else 1
    itemsize = 4 * (QUANTIZE_BLOCK_DIVISOR[job.mode] if job.kind == "quantize" else 1)
    for block in _row_blocks(tuple(shape), itemsize, align):
        rows = slice(None) if block is None else slice(*block)
        row = 0 if block is None else block[0]
        if job.kind == "cast":
            outputs = [source[rows].astype(dtype)]
        elif job.kind == "quantize":
            outputs = mx.quantize(source[rows].astype(job.dtype), group_size=job.group_size, bits=job.bits,
                                  mode=job.mode)
        elif job.kind == "unpack":
            outputs = unpack_rows(job, source, parts["qzeros"], parts["scales"], block or (0, shape[0]))
        else:
            outputs = [mx.dequantize(source[rows], scales[rows], None if biases is None else biases[rows],
                                     group_size=job.group_size, bits=job.bits, mode=job.mode).astype(dtype)]
        mx.eval(outputs)
        for (out_name, _, _), array in zip(job.outputs, outputs):
            writer.write(out_name, array, row)
        del outputs
    del source
    mx.clear_cache()


def _unpack(packed: mx.array, bits: int, positions) -> mx.array:
    """uint32 [..., n] words -> [..., n * 32 / bits] values; value j of a word from bits
    ``positions[j] * bits`` upwards."""
    shifts = mx.array([position * bits for position in positions], dtype=mx.uint32)
    values = (packed.view(mx.uint32)[..., None] >> shifts) & ((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], -1)


def _pack(values: mx.array, bits: int) -> mx.array:
    """uint32 [rows, n] values -> [rows, n * bits / 32] words as MLX packs them: value j of a
    word from bit j * bits upwards (the fields are disjoint, so the sum is their bitwise or)."""
    per = 32 // bits
    shifts = mx.arange(per, dtype=mx.uint32) * bits
    return (values.reshape(values.shape[0], -1, per) << shifts).sum(axis=-1).astype(mx.uint32)


def unpack_rows(job: Job, qweight: mx.array, qzeros: mx.array, scales: mx.array, block: tuple) -> list:
    """Output rows ``block`` (start, stop: multiples of 32 / bits) of an AWQ or GPTQ layer as
    MLX's [weight uint32 [rows, in * bits / 32], scales float32, biases float32 [rows, groups]].

    Their weight is (q - zero) * scale, MLX's q * scale + bias: so bias = -zero * scale, exact
    in float32 (a 16-bit scale times an integer of at most 2**8), and MLX's dequantization gives
    their float32 weights bit for bit. AWQ packs qweight and qzeros along the outputs in the
    order 0 2 4 6 1 3 5 7; GPTQ packs qweight along the inputs in order, as MLX does (its words
    are MLX's, transposed), and qzeros along the outputs in order."""
    start, stop = block
    bits, per = job.bits, 32 // job.bits
    words = slice(start // per, stop // per)
    if job.packing == "AWQ":  # qweight [in, out / per]
        values = _unpack(qweight[:, words], bits, AWQ_POSITIONS)  # [in, rows]
        weight = _pack(mx.contiguous(values.T), bits)
        zeros = _unpack(qzeros[:, words], bits, AWQ_POSITIONS).T
    else:
        weight = mx.contiguous(qweight[:, start:stop].T).view(mx.uint32)  # GPTQ: qweight [in / per, out]
        zeros = _unpack(qzeros[:, words], bits, range(per)).T
    scale = scales[:, start:stop].T.astype(mx.float32)
    biases = -(zeros.astype(mx.float32) + job.zero_offset) * scale
    return [weight, mx.contiguous(scale), biases]


def mlx_config(config: dict, args: ModelArgs, quantization: Optional[dict]) -> dict:
    """The source config in the layout mlx-vlm reads and writes.

    mlx-vlm builds its text config from the *root* keys (it copies the root over
    ``text_config``), so the text sizes, ``rope_theta``, ``rope_scaling`` with its
    ``type`` and an explicit ``tie_word_embeddings`` must be at the root, even for a
    transformers-5 source that keeps them only in ``text_config``. ``text_config`` gets
    the same keys (the dual layout); ``vision_config`` keeps its keys and gets every
    parsed one it lacks. So the config is complete whatever was read (a transformers save
    leaves class defaults out): it loads the same without any defaults, here or elsewhere.
    """
    config = json.loads(json.dumps(config))
    nested = config.get("text_config") or {}
    for key, value in nested.items():
        if key not in ("model_type", "architectures"):
            config[key] = value  # nested values win, as in ModelArgs
    text = args.text
    rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    rope.pop("rope_theta", None)
    rope["mrope_section"] = list(text.mrope_section)
    if rope.get("type") not in ("mrope", "default"):
        rope["type"] = "mrope" if rope.get("rope_type") == "mrope" else "default"
    rope.setdefault("rope_type", "default")
    config.update(
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        vocab_size=text.vocab_size,
        rms_norm_eps=text.rms_norm_eps,
        rope_theta=text.rope_theta,
        max_position_embeddings=text.max_position_embeddings,
        rope_scaling=rope,
        tie_word_embeddings=text.tie_word_embeddings,
        image_token_id=args.image_token_id,
        video_token_id=args.video_token_id,
        vision_start_token_id=args.vision_start_token_id,
    )
    # rope_theta and rope_scaling stand for transformers 5's rope_parameters.
    for key in ("torch_dtype", "dtype", "_name_or_path", "quantization", "quantization_config",
                "rope_parameters"):
        config.pop(key, None)
    skip = ("vision_config", "text_config", "architectures", "model_type", "transformers_version")
    text_config = {k: v for k, v in config.items() if k not in skip}
    text_config["model_type"] = nested.get("model_type", config.get("model_type"))
    config["text_config"] = text_config
    config["vision_config"] = _complete_vision(config.get("vision_config") or {}, args.vision)
    for key in ("torch_dtype", "dtype"):
        config["vision_config"].pop(key, None)
    if quantization:
        config["quantization"] = dict(quantization)
        config["quantization_config"] = dict(quantization)
    return dict(sorted(config.items()))


def _complete_vision(vision: dict, args: VisionArgs) -> dict:
    """``vision`` with every VisionArgs value it lacks (the hub's ``in_chans`` counts for
    ``in_channels``, as it does when we read it)."""
    vision = dict(vision)
    for key, value in asdict(args).items():
        if key == "in_channels" and vision.get("in_chans") is not None:
            continue
        if vision.get(key) is None:
            vision[key] = list(value) if isinstance(value, tuple) else value
    return vision


def model_card(hf_path: str, source: Source, plan: Plan, upload_repo: Optional[str], quantize_vision) -> str:
    from . import __version__

    is_hub_id = not Path(hf_path).expanduser().exists() and str(hf_path).count("/") == 1
    front = ["---", "library_name: mlx", "pipeline_tag: image-text-to-text", "tags:", "- mlx", "- qwen2_5_vl"]
    if is_hub_id:
        front += [f"base_model: {hf_path}"]
    front.append("---")
    dtype_name = _dtype_name(plan.dtype) if plan.dtype is not None else "the source's dtype"
    if plan.quantization:
        tower = "quantized too" if quantize_vision else f"kept in {dtype_name}"
        what = f"{quantization_words(plan)} language model; vision tower {tower}"
    else:
        what = f"{dtype_name} weights"
    source_link = f"[`{hf_path}`](https://huggingface.co/{hf_path})" if is_hub_id else f"`{hf_path}`"
    name = upload_repo or "<this folder>"
    return "\n".join(front + [
        "",
        f"# {upload_repo or Path(hf_path).name}",
        "",
        f"Qwen2.5-VL converted to MLX from {source_link} with mlx-qwenvl {__version__}: {what}.",
        "",
        "The folder uses the mlx-vlm / mlx-community layout, so mlx-vlm loads it as well.",
        "",
        "```bash",
        "pip install mlx-qwenvl",
        f'mlx-qwenvl generate --model {name} --image photo.jpg --prompt "Describe this image."',
        "```",
        "",
    ])


def _dtype_name(dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    return ""


# --------------------------------------------------------------------------- safety


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: Path) -> None:
    """Temporary folders of conversions to ``target`` whose process died (SIGKILL, power loss)."""
    for folder in target.parent.glob(f"{target.name}.tmp-*"):
        marker = folder / MARKER
        try:
            pid = int(marker.read_text().strip())
        except (OSError, ValueError):
            continue  # not ours, or finishing right now
        if not _pid_alive(pid):
            shutil.rmtree(folder, ignore_errors=True)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def check_target(target: Path, force: bool, source: Optional[Path] = None) -> None:
    if target.exists() or target.is_symlink():
        if not target.is_dir() or target.is_symlink():
            raise ConversionError(f"{target} exists and is not a folder")
        if not force and not _is_empty_dir(target):
            raise ConversionError(f"{target} exists and is not empty; pass --force to replace it")
    if source is not None:
        resolved, src = target.resolve(), source.resolve()
        if resolved == src or resolved in src.parents:
            raise ConversionError(f"{target} holds the source checkpoint; choose another output folder")


def _existing_ancestor(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def _make_parents(folder: Path) -> list:
    """Create ``folder`` and missing parents; the ones created, deepest last."""
    created = []
    for parent in reversed([folder, *folder.parents]):
        if not parent.exists():
            parent.mkdir()
            created.append(parent)
    return created


class _NoInterrupts:
    """Ctrl-C and SIGTERM are ignored for the moment the folder is put in place or cleaned
    up, so neither can leave it half-renamed or half-removed (main thread only)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.saved = {}
        try:
            for sig in self.SIGNALS:
                self.saved[sig] = signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def _finalize(temporary: Path, target: Path, force: bool) -> None:
    with _NoInterrupts():
        if _is_empty_dir(target):
            target.rmdir()
        if target.exists() or target.is_symlink():
            if not force:
                raise ConversionError(f"{target} appeared during the conversion; pass --force to replace it")
            aside = target.with_name(f"{target.name}.old-{secrets.token_hex(4)}")
            os.rename(target, aside)
            try:
                os.rename(temporary, target)
            except BaseException:
                os.rename(aside, target)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(temporary, target)


# --------------------------------------------------------------------------- convert


def check_quantization_options(quantize: bool, q_bits: Optional[int], q_group_size: Optional[int],
                               q_mode: str, quant_predicate: Optional[str], quantize_vision: bool,
                               dequantize: bool) -> tuple:
    """``(group_size, bits)`` for the options (each mode's defaults where not given, as mlx-lm),
    or ConversionError in one line for a combination MLX or the recipes do not have."""
    if quantize and dequantize:
        raise ConversionError("choose either quantizing (-q) or dequantizing (-d), not both")
    if q_mode not in Q_MODES:
        raise ConversionError(f"q_mode must be one of {', '.join(Q_MODES)}, not {q_mode!r}")
    if quant_predicate is not None and quant_predicate not in RECIPES:
        raise ConversionError(f"quant_predicate must be one of {', '.join(RECIPES)}, not {quant_predicate!r}")
    given = [("quantizing the vision tower (--quantize-vision)", quantize_vision),
             ("--q-mode " + q_mode, q_mode != "affine"), (f"--quant-predicate {quant_predicate}", quant_predicate),
             ("--q-bits", q_bits is not None), ("--q-group-size", q_group_size is not None)]
    for what, present in given:
        if present and not quantize:
            raise ConversionError(f"{what} needs quantize (-q)")
    default_group, default_bits = MODE_DEFAULTS[q_mode]
    group_size = default_group if q_group_size is None else q_group_size
    bits = default_bits if q_bits is None else q_bits
    if not quantize:
        return group_size, bits
    if quant_predicate is not None:
        low, high = RECIPES[quant_predicate]
        if q_mode != "affine":
            raise ConversionError(f"the mixed recipes (--quant-predicate) quantize in affine mode only, "
                                  f"not {q_mode} (as in mlx-lm)")
        if q_bits is not None:
            raise ConversionError(f"--quant-predicate {quant_predicate} sets each layer's bits ({low} or {high}); "
                                  f"leave q_bits (--q-bits) out")
        if quantize_vision:
            raise ConversionError("the mixed recipes (--quant-predicate) cover the language model only, as in "
                                  "mlx-vlm; drop --quantize-vision or the recipe")
    if q_mode != "affine":
        if (group_size, bits) != (default_group, default_bits):
            raise ConversionError(
                f"{q_mode} quantizes {default_bits}-bit weights in groups of {default_group} only, not "
                f"{bits}-bit in groups of {group_size}; leave --q-bits and --q-group-size out")
        return group_size, bits
    if bits not in Q_BITS:
        raise ConversionError(f"q_bits must be one of {', '.join(map(str, Q_BITS))} for affine quantization, "
                              f"not {bits}")
    if group_size not in Q_GROUP_SIZES:
        raise ConversionError(f"q_group_size must be one of {', '.join(map(str, Q_GROUP_SIZES))} for affine "
                              f"quantization, not {group_size}")
    return group_size, bits


def check_source_options(source: Source, quantize: bool, dequantize: bool) -> None:
    """ConversionError (one line) for -q on a quantized source and -d on an unquantized or a
    foreign (AWQ/GPTQ) one."""
    path = source.path
    if source.foreign is not None and (quantize or dequantize):
        method = source.foreign.method
        if quantize:
            raise ConversionError(f"{path} is already quantized ({method} {source.foreign.bits}-bit), and converts "
                                  f"to MLX exactly as it is; drop -q")
        raise ConversionError(f"{path} holds {method} weights; convert it without -d (an exact MLX folder), then "
                              f"dequantize that folder with -d")
    if dequantize and not source.quantized:
        raise ConversionError(f"{path} is not quantized; there is nothing to dequantize")
    if quantize and source.quantized:
        bits = source.args.quantization.get("bits")
        raise ConversionError(
            f"{path} is already quantized ({bits}-bit); convert the 16-bit checkpoint, or dequantize first")


def _precheck_hub_config(hf_path) -> None:
    """A hub id's config.json alone, so that a quantization with no exact MLX form is refused
    (ConversionError) before the weights are downloaded; any other problem is left to
    resolve_model_path, which reports it."""
    name = str(hf_path)
    if name == "demo" or Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return
    try:
        from huggingface_hub import snapshot_download  # (hf_hub_download retries for ~25 s offline)

        config = json.loads((Path(snapshot_download(name, allow_patterns=["config.json"])) / "config.json").read_text())
    except Exception:  # offline, unknown, gated: resolve_model_path says which
        return
    if isinstance(config, dict):
        foreign_format(config, name)


def convert(
    hf_path,
    mlx_path="mlx_model",
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    quantize_vision: bool = False,
    dequantize: bool = False,
    upload_repo: Optional[str] = None,
    force: bool = False,
    progress: Optional[Callable[[int, int, str], None]] = None,
    log: Optional[Callable[[str], None]] = None,
    q_mode: str = "affine",
    quant_predicate: Optional[str] = None,
) -> Path:
    """Convert a Qwen2.5-VL checkpoint (hub id or folder) into an MLX folder; returns its path.

    ``dtype`` ('float16', 'bfloat16', 'float32') defaults to the source config's dtype
    (dequantizing: the scales' 16-bit dtype). ``quantize`` stores the language model's
    Linear and Embedding weights in ``q_mode`` ('affine', 'mxfp4', 'nvfp4', 'mxfp8') with
    ``q_bits`` bits per weight in groups of ``q_group_size`` (None: the mode's defaults,
    affine 4-bit in groups of 64, as mlx-lm); ``quant_predicate`` names a mixed recipe
    (``mixed_3_6`` etc.: mlx-lm's per-layer choice of the low and high bits). The vision
    tower stays 16-bit unless ``quantize_vision``. ``dequantize`` turns a quantized MLX
    folder back into 16-bit weights. An AWQ or GPTQ checkpoint (without act-order) becomes
    MLX affine weights that dequantize exactly to its own. ``progress`` is called as
    ``progress(done_bytes, total_bytes, tensor_name)``; ``log`` gets the one-line summaries.

    Raises ConversionError (one line) for options MLX does not have, other libraries'
    quantization without an exact MLX form, and failures while writing; ModelLoadError for
    a source that is not a complete Qwen2.5-VL checkpoint; ConversionInterrupted on Ctrl-C.
    Nothing is left at ``mlx_path`` unless the conversion completes.
    """
    log = log or (lambda message: None)
    q_group_size, q_bits = check_quantization_options(quantize, q_bits, q_group_size, q_mode, quant_predicate,
                                                      quantize_vision, dequantize)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")

    if upload_repo:
        from huggingface_hub import get_token

        if not get_token():
            raise ConversionError(f"uploading to {upload_repo} needs a Hugging Face login (`hf auth login`)")
    target = Path(mlx_path).expanduser()
    remove_stale_temporaries(target)
    check_target(target, force)  # before any download
    _precheck_hub_config(hf_path)
    path = resolve_model_path(hf_path)
    source = inspect_source(path)
    check_target(target, force, source=path)
    check_source_options(source, quantize, dequantize)

    out_dtype = _choose_dtype(source, dtype, dequantize)
    plan = make_plan(source, out_dtype, quantize, q_bits, q_group_size, quantize_vision, dequantize,
                     q_mode, quant_predicate)
    free = shutil.disk_usage(_existing_ancestor(target.parent)).free
    if free < plan.nbytes * 1.01 + (16 << 20):
        raise ConversionError(
            f"{target.parent} has {_human(free)} free; the converted model needs {_human(plan.nbytes)}")
    log(_describe(source, plan, target, quantize_vision))

    temporary = target.with_name(f"{target.name}.tmp-{secrets.token_hex(4)}")
    created = []
    try:
        created = _make_parents(target.parent)
        temporary.mkdir()
        (temporary / MARKER).write_text(str(os.getpid()))
        _write(source, plan, temporary, progress)
        config = mlx_config(source.config, source.args, plan.quantization)
        (temporary / "config.json").write_text(json.dumps(config, indent=4) + "\n")
        for name in COPY_FILES:
            if (path / name).is_file():
                shutil.copyfile(path / name, temporary / name)
        (temporary / "README.md").write_text(
            model_card(str(hf_path), source, plan, upload_repo, quantize_vision))
        (temporary / MARKER).unlink()
        _finalize(temporary, target, force)
    except BaseException as error:
        with _NoInterrupts():
            shutil.rmtree(temporary, ignore_errors=True)
            for folder in reversed(created):
                try:
                    folder.rmdir()
                except OSError:
                    pass
        if isinstance(error, KeyboardInterrupt):
            raise ConversionInterrupted(f"conversion interrupted; nothing was written to {target}") from None
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if isinstance(error, OSError) and not isinstance(error, QwenVLError):
            reason = f"{type(error).__name__}: {reason}"
        raise ConversionError(f"conversion failed ({reason}); nothing was written to {target}") from error

    log(f"wrote {target}: {len(plan.shards)} shard(s), {_human(plan.nbytes)}"
        + (f", {bits_per_weight(plan):.3f} bits per quantized weight" if bits_per_weight(plan) else ""))
    if upload_repo:
        upload(target, upload_repo)
        log(f"uploaded to https://huggingface.co/{upload_repo}")
    return target


def _choose_dtype(source: Source, dtype: Optional[str], dequantize: bool):
    if dtype is not None:
        return DTYPES[dtype]
    if dequantize:
        scales = next(spec for name, spec in source.specs.items() if name.endswith(".scales"))
        return scales.dtype if scales.dtype in (mx.float16, mx.bfloat16) else mx.float16
    config = source.config
    name = (config.get("torch_dtype") or config.get("dtype")
            or (config.get("text_config") or {}).get("torch_dtype")
            or (config.get("text_config") or {}).get("dtype"))
    return DTYPES.get(name)  # None keeps each tensor's own dtype


def quantization_words(plan: Plan) -> str:
    """The plan's quantization in a few words: "4-bit affine, group size 64", "mxfp4 (4-bit,
    group size 32)", "mixed_3_6 recipe (3/6-bit affine, group size 64)", "AWQ 4-bit ..."."""
    q = plan.quantization or {}
    if plan.foreign is not None:
        return (f"{plan.foreign.method} {q['bits']}-bit (group size {q['group_size']}) unpacked exactly to MLX affine "
                f"{q['bits']}-bit, float32 scales and biases")
    if plan.recipe:
        low, high = RECIPES[plan.recipe]
        return f"{plan.recipe} recipe ({low}/{high}-bit affine, group size {q['group_size']})"
    mode = plan.mode if plan.mode != "affine" else q.get("mode", "affine")  # a quantized source kept as is
    if mode != "affine":
        return f"{mode} ({q['bits']}-bit, group size {q['group_size']})"
    return f"{q['bits']}-bit affine, group size {q['group_size']}"


def _describe(source: Source, plan: Plan, target: Path, quantize_vision: bool) -> str:
    text = source.args.text
    what = f"{_dtype_name(plan.dtype)}" if plan.dtype is not None else "source dtype"
    if plan.quantization and any(job.kind in ("quantize", "unpack") for job in plan.jobs):
        tower = "quantized" if quantize_vision else f"kept in {what}"
        what = f"{quantization_words(plan)}, vision tower {tower}"
    elif any(job.kind == "dequantize" for job in plan.jobs):
        what = f"dequantized to {what}"
    return (f"converting {source.path} (Qwen2.5-VL, {text.num_hidden_layers} layers, "
            f"{_human(source.nbytes)}) to {target}: {what}")


def bits_per_weight(plan: Plan) -> float:
    """Stored bits (weights, scales, biases) per weight of the layers the plan quantizes; 0.0
    when it quantizes none."""
    bits = weights = 0
    for job in plan.jobs:
        if job.kind in ("quantize", "unpack"):
            bits += sum(_nbytes(dtype, shape) * 8 for _, dtype, shape in job.outputs)
            name, _, shape = job.outputs[0]
            weights += math.prod(shape) * 32 // job.bits
    return bits / weights if weights else 0.0


def _write(source: Source, plan: Plan, folder: Path, progress) -> None:
    arrays = {}
    for file in source.files:
        arrays.update(sanitize(mx.load(str(file)), source.args))  # lazy: nothing is read yet
    sleep = float(os.environ.get(SLEEP_ENV) or 0)
    total = sum(job.nbytes for job in plan.jobs)
    done = 0
    index = {"metadata": {"total_size": plan.nbytes}, "weight_map": {}}
    for file_name, jobs in plan.shards:
        entries = [entry for job in jobs for entry in job.outputs]
        writer = SafetensorsWriter(folder / file_name, entries, metadata={"format": "mlx"})
        try:
            for job in jobs:
                run_job(job, arrays, writer)
                done += job.nbytes
                if progress is not None:
                    progress(done, total, job.source)
                if sleep:
                    time.sleep(sleep)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        for name, _, _ in entries:
            index["weight_map"][name] = file_name
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4) + "\n")


def upload(folder: Path, repo: str) -> None:
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id=repo, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model")
    except KeyboardInterrupt:
        raise ConversionError(f"upload to {repo} interrupted; the converted folder is at {folder}") from None
    except Exception as error:  # offline, not logged in, no rights
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversionError(
            f"upload to {repo} failed ({reason}); the converted folder is at {folder}") from None


# --------------------------------------------------------------------------- command line


class _Progress:
    """Bytes done: one updating line on a terminal, a line every 5% otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last_step = -1
        self.last_time = 0.0
        self.start = time.time()

    def __call__(self, done: int, total: int, name: str) -> None:
        fraction = done / total if total else 1.0
        line = f"[convert] {fraction * 100:5.1f}%  {_human(done)} / {_human(total)}"
        now = time.time()
        if self.tty:
            if now - self.last_time > 0.1 or done == total:
                self.last_time = now
                self.stream.write(f"\r{line}  {name[-60:]:<60}" + ("\n" if done == total else ""))
                self.stream.flush()
        else:
            step = int(fraction * 20)
            if step != self.last_step:
                self.last_step = step
                self.stream.write(f"{line}  ({now - self.start:.0f} s)\n")
                self.stream.flush()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@click.command("convert", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--hf-path", required=True, help="Hugging Face repo id or local folder to convert.")
@click.option("--mlx-path", default="mlx_model", show_default=True, help="Output folder.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help="Weight dtype (default: the source's; dequantizing: its 16-bit dtype).")
@click.option("-q", "--quantize", is_flag=True, help="Quantize the language model.")
@click.option("--q-bits", type=click.Choice([str(b) for b in Q_BITS]), default=None,
              help="Bits per weight (default: the mode's; affine 4).")
@click.option("--q-group-size", type=click.Choice([str(g) for g in sorted({16, *Q_GROUP_SIZES})]), default=None,
              help="Weights per quantization group (default: the mode's; affine 64).")
@click.option("--q-mode", type=click.Choice(list(Q_MODES)), default="affine", show_default=True,
              help="Quantization mode: affine (1-6 or 8 bits, groups of 32/64/128), mxfp4 (4-bit, groups of 32), "
                   "nvfp4 (4-bit, groups of 16) or mxfp8 (8-bit, groups of 32).")
@click.option("--quant-predicate", type=click.Choice(list(RECIPES)), default=None,
              help="Mixed-precision recipe (affine): mixed_<low>_<high> bits per layer, chosen as mlx-lm does.")
@click.option("--quantize-vision", is_flag=True,
              help="Quantize the vision tower too (default: it stays 16-bit, being the most sensitive).")
@click.option("-d", "--dequantize", is_flag=True, help="Turn a quantized MLX folder back into 16-bit.")
@click.option("--upload-repo", default=None, help="Hugging Face repo to upload the result to.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def convert_command(hf_path, mlx_path, dtype, quantize, q_bits, q_group_size, q_mode, quant_predicate,
                    quantize_vision, dequantize, upload_repo, force, debug):
    """Convert a Qwen2.5-VL checkpoint into an MLX folder (mlx-community layout), optionally quantized.

    AWQ and GPTQ (without act-order) checkpoints convert exactly, as they are."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        previous = None
    try:
        convert(hf_path, mlx_path, dtype=dtype, quantize=quantize, q_bits=None if q_bits is None else int(q_bits),
                q_group_size=None if q_group_size is None else int(q_group_size), q_mode=q_mode,
                quant_predicate=quant_predicate, quantize_vision=quantize_vision,
                dequantize=dequantize, upload_repo=upload_repo, force=force,
                progress=_Progress(), log=lambda message: click.echo(message, err=True))
    except KeyboardInterrupt as error:
        if debug:
            raise
        message = str(error) if isinstance(error, ConversionInterrupted) else "conversion interrupted"
        click.echo(f"error: {message}", err=True)
        sys.exit(130)
    except Exception as error:  # noqa: BLE001 - the command's last line of defence
        if debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if not isinstance(error, (QwenVLError, OSError)):
            message = f"{type(error).__name__}: {message}" if message else type(error).__name__
        click.echo(f"error: {message or type(error).__name__}", err=True)
        sys.exit(1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    convert_command()
