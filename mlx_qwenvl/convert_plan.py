"""The converter's plan: which output tensors each source tensor becomes (cast, quantized,
dequantized, or unpacked from AWQ/GPTQ), which layers are quantized and how (mlx-lm's choices and
mixed recipes), and how the outputs fall into shards of at most 5 GB. Planned from the source's
headers alone, so every output file's header is known before any data is written.
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx

from .convert_source import Source
from .errors import ConversionError
from .foreign import Foreign
from .quantization import RECIPES, QuantSettings
from .safetensors_io import StoredTensor, tensor_bytes

MAX_SHARD_BYTES = 5_000_000_000  # "at most 5 GB" in either reading of GB
HEADER_BYTES, ENTRY_BYTES = 1024, 256  # a shard's file size: its data plus at most this header
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
VISION_PREFIX = "vision_tower."
MERGER_PREFIX = "vision_tower.merger."


@dataclass
class Job:
    """One source tensor (with, dequantizing or unpacking, its companions) to its output tensors."""

    kind: str  # "cast", "quantize", "dequantize" or "unpack" (an AWQ/GPTQ layer)
    source: str  # MLX name of the tensor read
    outputs: list  # [(name, mx.Dtype, shape)], written in this order
    nbytes: int  # source bytes, for progress
    settings: Optional[QuantSettings] = None  # quantize, dequantize, unpack: the layer's
    dtype: Optional[mx.Dtype] = None  # quantizing: the float dtype the weight is quantized from
    parts: dict = field(default_factory=dict)  # unpacking: the layer's qzeros, scales (g_idx) names
    foreign: Optional[Foreign] = None  # unpacking: the checkpoint's packing


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
        return sum(tensor_bytes(dtype, shape) for job in self.jobs for _, dtype, shape in job.outputs)


def check_quantization_options(quantize: bool, q_bits: Optional[int], q_group_size: Optional[int],
                               q_mode: str, quant_predicate: Optional[str], quantize_vision: bool,
                               dequantize: bool) -> Optional[QuantSettings]:
    """The quantization asked for (each mode's defaults where not given, as mlx-lm; None when
    not quantizing), or ConversionError in one line for a combination MLX or the recipes do not
    have."""
    if quantize and dequantize:
        raise ConversionError("choose either quantizing (-q) or dequantizing (-d), not both")
    settings = QuantSettings.choose(q_mode, q_bits, q_group_size)  # refuses a mode MLX does not have
    if quant_predicate is not None and quant_predicate not in RECIPES:
        raise ConversionError(f"quant_predicate (--quant-predicate) must be one of {', '.join(RECIPES)}, not {quant_predicate!r}")
    given = [("quantizing the vision tower (--quantize-vision)", quantize_vision),
             ("--q-mode " + q_mode, q_mode != "affine"), (f"--quant-predicate {quant_predicate}", quant_predicate),
             ("--q-bits", q_bits is not None), ("--q-group-size", q_group_size is not None)]
    for what, present in given:
        if present and not quantize:
            raise ConversionError(f"{what} needs quantize (-q)")
    if not quantize:
        return None
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
    return settings.check()


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


def quantization_choices(model, group_size: int, bits: Optional[int], mode: str = "affine",
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
        choices[f"{path}.weight"] = QuantSettings(rule(path) if rule else bits, group_size, mode).as_dict()
    return choices


def _config_entry(choices: dict, settings: QuantSettings, recipe: Optional[str]) -> dict:
    """config.json's ``quantization`` as mlx-lm writes it: the default settings and, with a
    recipe (its low bits the default), every quantized layer's settings under its module path."""
    if recipe:
        settings = QuantSettings(RECIPES[recipe][0], settings.group_size, settings.mode)
    entry = settings.entry()
    if recipe:
        for name, choice in choices.items():
            entry[name[: -len(".weight")]] = {"group_size": choice["group_size"], "bits": choice["bits"]}
    return entry


def _out_dtype(dtype, tensor: StoredTensor):
    """A floating-point tensor's output dtype: ``dtype``, or its own when None; others keep theirs."""
    return dtype if dtype is not None and tensor.floating else tensor.mx_dtype


def _cast(name: str, tensor: StoredTensor, dtype) -> Job:
    return Job("cast", name, [(name, _out_dtype(dtype, tensor), tensor.shape)], tensor.nbytes)


def make_plan(source: Source, dtype, settings: Optional[QuantSettings], quantize_vision: bool = False,
              dequantize: bool = False, recipe: Optional[str] = None) -> Plan:
    """The jobs and shards of a conversion: dequantizing an MLX folder, unpacking an AWQ/GPTQ
    checkpoint, or casting a float checkpoint and quantizing its layers with ``settings`` (None:
    none) and ``recipe``."""
    if dequantize:
        return _shard(_dequantize_plan(source, dtype))
    if source.foreign is not None:
        return _shard(_unpack_plan(source, dtype))
    choices = (quantization_choices(source.model, settings.group_size, settings.bits, settings.mode,
                                    quantize_vision, recipe) if settings else {})
    jobs = []
    for name, tensor in source.tensors.items():
        if name not in choices:
            jobs.append(_cast(name, tensor, dtype))
            continue
        layer, path, compute = QuantSettings(**choices[name]), name[: -len(".weight")], _out_dtype(dtype, tensor)
        rows, width = tensor.shape[:-1], tensor.shape[-1]
        groups = (*rows, width // layer.group_size)
        # Affine stores scales and biases in the weights' dtype; the floating-point modes store
        # one 8-bit scale a group (mx.quantize returns uint8) and no biases.
        outputs = [(name, mx.uint32, (*rows, width * layer.bits // 32)),
                   (f"{path}.scales", compute if layer.biases else mx.uint8, groups)]
        if layer.biases:
            outputs.append((f"{path}.biases", compute, groups))
        jobs.append(Job("quantize", name, outputs, tensor.nbytes, layer, dtype=compute))
    plan = Plan(jobs, dtype=dtype, mode=settings.mode if settings else "affine", recipe=recipe)
    if settings:
        plan.quantization = _config_entry(choices, settings, recipe)
    elif source.quantized:
        plan.quantization = dict(source.args.quantization)
    return _shard(plan)


def _dequantize_plan(source: Source, dtype) -> Plan:
    jobs, tensors = [], source.tensors
    for name, tensor in tensors.items():
        path, _, leaf = name.rpartition(".")
        if leaf in ("scales", "biases") and f"{path}.weight" in tensors and f"{path}.scales" in tensors:
            continue  # consumed with the weight
        if leaf == "weight" and f"{path}.scales" in tensors:
            layer = QuantSettings.from_entry(source.args.quantization, path)
            shape = (*tensor.shape[:-1], tensor.shape[-1] * 32 // layer.bits)
            nbytes = sum(tensors[f"{path}.{part}"].nbytes for part in ("weight", "scales", "biases")
                         if f"{path}.{part}" in tensors)
            jobs.append(Job("dequantize", name, [(name, dtype, shape)], nbytes, layer))
        else:
            jobs.append(_cast(name, tensor, dtype))
    return Plan(jobs, dtype=dtype)


def _unpack_plan(source: Source, dtype) -> Plan:
    """An AWQ/GPTQ checkpoint: each quantized layer unpacked into MLX's weight, scales and
    biases (float32, for exactness, whatever ``dtype``), every other tensor cast to ``dtype``
    (None: as stored)."""
    foreign, tensors, jobs = source.foreign, source.tensors, []
    layer = QuantSettings(foreign.bits, foreign.group_size)
    for name, tensor in tensors.items():
        path, _, leaf = name.rpartition(".")
        if path in foreign.layers and leaf in ("scales", "biases"):
            continue  # written by the weight's job
        if path in foreign.layers and leaf == "weight":
            parts = foreign.layers[path]
            outputs = [(name, tensor.mx_dtype, tensor.shape)] + [
                (f"{path}.{part}", mx.float32, tensors[f"{path}.{part}"].shape) for part in ("scales", "biases")]
            nbytes = sum(foreign.sizes[part] for part in parts.values())
            jobs.append(Job("unpack", parts["qweight"], outputs, nbytes, layer, foreign=foreign,
                            parts={key: value for key, value in parts.items() if key != "qweight"}))
            continue
        jobs.append(_cast(name, tensor, dtype))
    plan = Plan(jobs, dtype=dtype, foreign=foreign)
    plan.quantization = {"group_size": foreign.group_size, "bits": foreign.bits}
    return plan


def _shard(plan: Plan) -> Plan:
    """Consecutive jobs into shards of at most MAX_SHARD_BYTES (a job is never split)."""
    groups, current, size = [], [], HEADER_BYTES
    for job in plan.jobs:
        job_bytes = sum(tensor_bytes(dtype, shape) + ENTRY_BYTES for _, dtype, shape in job.outputs)
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


def bits_per_weight(plan: Plan) -> float:
    """Stored bits (weights, scales, biases) per weight of the layers the plan quantizes; 0.0
    when it quantizes none."""
    bits = weights = 0
    for job in plan.jobs:
        if job.kind in ("quantize", "unpack"):
            bits += sum(tensor_bytes(dtype, shape) * 8 for _, dtype, shape in job.outputs)
            weights += math.prod(job.outputs[0][2]) * 32 // job.settings.bits
    return bits / weights if weights else 0.0


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


def dtype_name(dtype) -> str:
    """'float16' for mx.float16 (DTYPES' names); str(dtype) for others."""
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))


def human_bytes(nbytes: float) -> str:
    """``512 B``, ``1.50 MB``, ``7.62 GB`` (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    return ""
