"""Other libraries' quantized checkpoints: AWQ and GPTQ (without act-order) map onto MLX's affine
quantization exactly and are converted; the rest (act-order GPTQ, FP8, bitsandbytes, ...) are
refused in one line, before any weight is read, saying what to use instead.

Their weight is (q - zero) * scale, MLX's q * scale + bias: so bias = -zero * scale, computed and
stored in float32, where it is exact (a 16-bit scale times a zero of at most 2**8).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .errors import ConversionError, ModelLoadError
from .quantization import MODES
from .safetensors_io import StoredTensor

# quantization_config.quant_method of other libraries, as their users know them.
FOREIGN_METHODS = {
    "awq": "AWQ", "gptq": "GPTQ", "fp8": "FP8", "fbgemm_fp8": "FBGEMM FP8", "bitsandbytes": "bitsandbytes",
    "compressed-tensors": "compressed-tensors", "hqq": "HQQ", "eetq": "EETQ", "aqlm": "AQLM",
    "quanto": "Quanto", "torchao": "torchao", "modelopt": "ModelOpt", "bitnet": "BitNet", "mxfp4": "MXFP4",
    "auto-round": "AutoRound", "vptq": "VPTQ", "higgs": "HIGGS", "spqr": "SpQR",
}
# The published 16-bit checkpoints by text width, named in the errors for a foreign checkpoint.
ORIGINAL_SIZES = {2048: "3B", 3584: "7B", 5120: "32B", 8192: "72B"}

AWQ_POSITIONS = (0, 4, 1, 5, 2, 6, 3, 7)  # AutoAWQ GEMM: value j of a word sits in nibble AWQ_POSITIONS[j]
GPTQ_BITS = (2, 4, 8)  # the widths that fill 32-bit words exactly, as MLX packs them
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> what is added to a stored zero point
PARTS = ("qweight", "qzeros", "scales", "g_idx")  # a quantized layer's tensors
PART_DTYPES = {"qweight": ("I32", "U32"), "qzeros": ("I32", "U32"), "g_idx": ("I32", "I64"),
               "scales": ("F16", "BF16", "F32")}


@dataclass
class Foreign:
    """An AWQ or GPTQ checkpoint, which maps onto MLX's affine quantization exactly."""

    method: str  # "AWQ" or "GPTQ"
    bits: int
    group_size: int
    zero_offset: int = 0  # added to each stored zero point (AutoGPTQ's "gptq" format stores zero - 1)
    layers: dict = field(default_factory=dict)  # MLX module path -> {"qweight": MLX name, ...}
    sizes: dict = field(default_factory=dict)  # MLX name of each of those tensors -> its bytes

    @property
    def per_word(self) -> int:
        return 32 // self.bits


def quantization_config(config: dict):
    """config.json's ``quantization_config``, at the root or in text_config (where transformers
    may nest it); None when there is none."""
    return config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")


def _foreign_settings(config: dict) -> Optional[dict]:
    """The quantization_config of another library (with a quant_method), unless an MLX
    ``quantization`` entry describes the weights (an MLX folder keeping its source's leftover)."""
    if config.get("quantization") is not None:
        return None
    settings = quantization_config(config)
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
    if group_size not in MODES["affine"].group_sizes:
        return f"{label} weights in groups of {group_size} (MLX groups 32, 64 or 128 weights)"
    return None


def original_checkpoint(config: dict) -> Optional[str]:
    """The published 16-bit checkpoint of the config's size (known by its text width), such as
    ``Qwen/Qwen2.5-VL-7B-Instruct``; None for a width no published size has."""
    width = (config.get("text_config") or {}).get("hidden_size") or config.get("hidden_size")
    size = ORIGINAL_SIZES.get(width)
    return f"Qwen/Qwen2.5-VL-{size}-Instruct" if size else None


def convert_instead(config: dict) -> str:
    """Where an exact MLX folder can come from instead of a foreign checkpoint convert refuses."""
    original = original_checkpoint(config)
    if original:
        return (f"convert from the 16-bit original (`mlx-qwenvl convert --hf-path {original} -q`) or from "
                f"{original}-AWQ, which converts exactly")
    return ("convert from the 16-bit checkpoint it was made from (`mlx-qwenvl convert --hf-path "
            "<16-bit checkpoint> -q`) or from an AWQ or GPTQ (without act-order) checkpoint, which converts exactly")


def _from_original(config: dict) -> str:
    """The way from the 16-bit original, for a foreign checkpoint the loader refuses."""
    original = original_checkpoint(config)
    way = f"use the 16-bit original ({original})" if original else "use the 16-bit checkpoint it was made from"
    return (f"{way}, or make a 4-bit MLX folder from it with `mlx-qwenvl convert --hf-path "
            f"{original or '<16-bit checkpoint>'} -q`")


def foreign_quantization_error(config: dict, method, where: str) -> ModelLoadError:
    """The loader's one line for another library's quantization, naming the method and the way
    forward: for AWQ and GPTQ (without act-order) an exact MLX folder made from this one with
    ``mlx-qwenvl convert``; otherwise (and besides) the 16-bit original, or an MLX folder made
    from it."""
    label = FOREIGN_METHODS.get(str(method).lower(), str(method))
    settings = quantization_config(config)
    if isinstance(settings, dict) and foreign_refusal(settings) is None:
        folder = where if Path(where).is_dir() else "<folder>"
        return ModelLoadError(
            f"{where} holds {label}-quantized weights (quantization_config.quant_method {method!r}), which MLX "
            f"cannot load directly; convert them exactly with `mlx-qwenvl convert --hf-path {folder} --mlx-path "
            f"<new folder>`, or {_from_original(config)}"
        )
    return ModelLoadError(
        f"{where} holds {label}-quantized weights (quantization_config.quant_method {method!r}), which "
        f"MLX cannot load; {_from_original(config)}"
    )


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
    """``(out, in)`` of one layer from its qweight, qzeros, scales (and g_idx) StoredTensors.

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
    fits = len(q) == 2 and width % g == 0 and rows % per == 0 and all(
        tensor.shape == expected[part] and tensor.dtype in PART_DTYPES[part] for part, tensor in parts.items())
    if not fits:
        shapes = ", ".join(f"{part} {tensor.shape} {tensor.dtype}" for part, tensor in parts.items())
        raise ModelLoadError(f"{where}: {path} is not a {foreign.method} layer of {foreign.bits}-bit weights in "
                             f"groups of {g}: {shapes}")
    return rows, width


def foreign_specs(tensors: dict, foreign: Foreign, where) -> dict:
    """The MLX tensors a foreign checkpoint converts to, by MLX name, in the source's order:
    each quantized layer's qweight, qzeros, scales (and g_idx) become the uint32 weight
    [out, in * bits / 32] and float32 scales and biases [out, in / group] MLX stores. Records
    each layer's source tensors in ``foreign.layers``. Raises ModelLoadError as _foreign_shape,
    and for a qweight without its qzeros or scales."""
    layers = {name[: -len(".qweight")] for name in tensors if name.endswith(".qweight")}
    out = {}
    for name, tensor in tensors.items():
        path, _, leaf = name.rpartition(".")
        if path not in layers or leaf not in PARTS:
            out[name] = tensor  # every other tensor (a quantized layer's bias too) as it is
            continue
        if leaf != "qweight":
            continue  # read with the qweight
        parts = {part: f"{path}.{part}" for part in PARTS if f"{path}.{part}" in tensors}
        missing = [f"{path}.{part}" for part in ("qzeros", "scales") if part not in parts]
        if missing:
            raise ModelLoadError(f"{where}: {name} has no {' or '.join(missing)}")
        rows, width = _foreign_shape(foreign, {part: tensors[n] for part, n in parts.items()}, path, where)
        foreign.layers[path] = parts
        foreign.sizes.update({n: tensors[n].nbytes for n in parts.values()})
        groups = width // foreign.group_size
        out[f"{path}.weight"] = StoredTensor.of((rows, width * foreign.bits // 32), mx.uint32)
        out[f"{path}.scales"] = StoredTensor.of((rows, groups), mx.float32)
        out[f"{path}.biases"] = StoredTensor.of((rows, groups), mx.float32)
    return out


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


def unpack_rows(foreign: Foreign, qweight: mx.array, qzeros: mx.array, scales: mx.array, block: tuple) -> list:
    """Output rows ``block`` (start, stop: multiples of 32 / bits) of one of ``foreign``'s layers
    as MLX's [weight uint32 [rows, in * bits / 32], scales float32, biases float32 [rows, groups]].

    MLX's dequantization of these gives their float32 weights bit for bit (see the module's
    docstring). AWQ packs qweight and qzeros along the outputs in the order 0 2 4 6 1 3 5 7;
    GPTQ packs qweight along the inputs in order, as MLX does (its words are MLX's,
    transposed), and qzeros along the outputs in order."""
    start, stop = block
    bits, per = foreign.bits, foreign.per_word
    words = slice(start // per, stop // per)
    if foreign.method == "AWQ":  # qweight [in, out / per]
        values = _unpack(qweight[:, words], bits, AWQ_POSITIONS)  # [in, rows]
        weight = _pack(mx.contiguous(values.T), bits)
        zeros = _unpack(qzeros[:, words], bits, AWQ_POSITIONS).T
    else:
        weight = mx.contiguous(qweight[:, start:stop].T).view(mx.uint32)  # GPTQ: qweight [in / per, out]
        zeros = _unpack(qzeros[:, words], bits, range(per)).T
    scale = scales[:, start:stop].T.astype(mx.float32)
    biases = -(zeros.astype(mx.float32) + foreign.zero_offset) * scale
    return [weight, mx.contiguous(scale), biases]
