"""The converter's source: every check that can fail, made before any weight is read.

From config.json and the safetensors headers alone, through the loader's own functions: the
model type and config keys, every shard present and complete, each tensor's dtype, name and
shape against the model; another library's quantization is mapped (AWQ, GPTQ) or refused.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .config import ModelArgs
from .errors import ConversionError, ModelLoadError
from .foreign import Foreign, convert_instead, foreign_format, foreign_specs
from .loading import load_weights, mlx_quantization, model_skeleton, read_config, sanitize, stored_tensors
from .model import Model


@dataclass
class Source:
    path: Path
    config: dict
    args: ModelArgs
    tensors: dict  # MLX name -> StoredTensor (for AWQ/GPTQ: the MLX tensors they become), in file and offset order
    model: Model  # an unevaluated skeleton: shapes and the module tree, no memory
    nbytes: int = 0  # the stored weights' bytes
    foreign: Optional[Foreign] = None  # an AWQ or GPTQ checkpoint, converted exactly

    @property
    def quantized(self) -> bool:
        return bool(self.args.quantization)

    def lazy_weights(self) -> dict:
        """MLX name -> the stored array, unevaluated: nothing is read until it is used."""
        return sanitize(load_weights(self.path), self.args)


def inspect_source(path: Path) -> Source:
    """The source folder, checked (and, for GPTQ, its small g_idx tensors read).

    Raises ModelLoadError for a folder that is not a complete Qwen2.5-VL checkpoint, and
    ConversionError (before any weight file is opened) for another library's quantization
    that has no exact MLX form.
    """
    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist")
    config = read_config(path)
    args = ModelArgs.from_dict(config)  # another model type or a missing key is the first thing to say
    foreign = foreign_format(config, path)
    if foreign is not None:
        args.quantization = {"group_size": foreign.group_size, "bits": foreign.bits}
    else:
        args.quantization = mlx_quantization(config, str(path))  # MLX settings under any key
    if args.quantization is not None and not {"group_size", "bits"} <= set(args.quantization):
        raise ModelLoadError(f"{path}/config.json has a quantization entry without group_size and bits")

    stored = stored_tensors(path, args)
    for name, tensor in stored.items():
        if tensor.mx_dtype is None:
            raise ModelLoadError(f"{tensor.file.name}: tensor {name} has unsupported dtype {tensor.dtype}")
    tensors = stored if foreign is None else foreign_specs(stored, foreign, path)
    model = model_skeleton(args, {name: tensor.shape for name, tensor in tensors.items()}, where=f"{path}: ")
    source = Source(path, config, args, tensors, model, sum(tensor.nbytes for tensor in stored.values()), foreign)
    if foreign is not None:
        check_group_index(source)
    return source


def check_group_index(source: Source) -> None:
    """GPTQ's g_idx (the group of each input) must be input // group_size: consecutive runs, as
    MLX groups them. Act-order checkpoints scatter it even where the config does not say so.
    Reads only the g_idx tensors (int32 [in], small). Raises ConversionError naming the layer."""
    foreign = source.foreign
    if not any("g_idx" in parts for parts in foreign.layers.values()):
        return
    arrays = source.lazy_weights()
    for path, parts in foreign.layers.items():
        if "g_idx" not in parts:
            continue
        index = arrays[parts["g_idx"]]
        expected = mx.arange(index.shape[0]) // foreign.group_size
        if not mx.array_equal(index.astype(mx.int64), expected.astype(mx.int64)).item():
            raise ConversionError(
                f"{source.path}: {path} has a GPTQ g_idx that is not input // group_size (act-order groups), "
                f"which has no exact MLX form; {convert_instead(source.config)}")


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
