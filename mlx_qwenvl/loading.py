"""Loading Qwen2.5-VL model folders: hub checkpoints, transformers 5.x saves, mlx-vlm conversions."""

import glob
import json
import math
import os
import platform
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelArgs
from .errors import ModelLoadError
from .model import Model

# Weight-name layouts and how each maps onto the MLX model's names.
TORCH_PREFIXES = (
    ("model.visual.", "vision_tower."),  # transformers 5.x in-memory names
    ("model.language_model.", "language_model.model."),
    ("visual.", "vision_tower."),  # hub checkpoints (and what transformers writes)
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
MLX_PREFIXES = ("vision_tower.", "language_model.")
PATCH_EMBED = "vision_tower.patch_embed.proj.weight"

# What MLX quantizes with: affine (weights, scales and biases) in these bits and group sizes, and
# the floating-point modes (weights and uint8 scales, no biases), each with one bits/group size.
AFFINE_BITS = (1, 2, 3, 4, 5, 6, 8)
AFFINE_GROUP_SIZES = (32, 64, 128)
FLOAT_MODES = {(4, 16): "nvfp4", (4, 32): "mxfp4", (8, 32): "mxfp8"}

# quantization_config.quant_method of other libraries, as their users know them.
FOREIGN_METHODS = {
    "awq": "AWQ", "gptq": "GPTQ", "fp8": "FP8", "fbgemm_fp8": "FBGEMM FP8", "bitsandbytes": "bitsandbytes",
    "compressed-tensors": "compressed-tensors", "hqq": "HQQ", "eetq": "EETQ", "aqlm": "AQLM",
    "quanto": "Quanto", "torchao": "torchao", "modelopt": "ModelOpt", "bitnet": "BitNet", "mxfp4": "MXFP4",
    "auto-round": "AutoRound", "vptq": "VPTQ", "higgs": "HIGGS", "spqr": "SpQR",
}
# The published 16-bit checkpoints by text width, named in the error for a foreign checkpoint.
ORIGINAL_SIZES = {2048: "3B", 3584: "7B", 5120: "32B", 8192: "72B"}

AVAILABLE_MEMORY_ENV = "MLX_QWENVL_AVAILABLE_MEMORY"  # test hook: bytes to take as available
# Memory needed beyond the weights. A prompt with an image: the vision tower's full-attention
# blocks hold heads x patches^2 float32 scores (16 x 4096^2 x 4 B, about 1 GB, for an image of
# ~1000 tokens); the KV cache takes ~0.1 MB a token in float32 (7B: 28 layers x 2 x 4 heads x
# 128 x 4 B), ~0.4 GB for 4000 tokens; Python, MLX and the tokenizer ~0.5 GB. 2 GiB covers a
# typical prompt; a much larger image or context can still need more.
RUNTIME_MARGIN = 2 << 30
GB = 1e9

# cgroup controllers: (mount under the root, limit file, usage file, reclaimable-cache key in
# memory.stat). Page cache counts as used in a cgroup, but its inactive part (the weight files
# just read, say) is reclaimed before the kernel kills anything, as kubelet reckons it too.
CGROUP_V2 = ("sys/fs/cgroup", "memory.max", "memory.current", "inactive_file")
CGROUP_V1 = ("sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


class DtypeFallbackWarning(UserWarning):
    """dtype 'auto' kept the checkpoint's dtype because float32 would not fit in memory."""


def read_config(path: Path) -> dict:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} has no config.json: not a model folder")
    try:
        return json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{config_file} is not valid JSON ({error})") from None


def weight_files(path: Path) -> list:
    """The safetensors files of a folder; with an index, every shard it lists must exist."""
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        shards = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
        missing = [name for name in shards if not (path / name).is_file()]
        if missing:
            raise ModelLoadError(f"{path} is missing shard(s) listed in its index: {', '.join(missing)}")
        return [path / name for name in shards]
    files = sorted(glob.glob(str(path / "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{path} has no .safetensors weight files")
    return [Path(f) for f in files]


def load_weights(path: Path) -> dict:
    weights = {}
    for file in weight_files(path):
        weights.update(mx.load(str(file)))
    return weights


def weight_layout(weights: dict) -> str:
    """'mlx' for converted MLX folders, 'torch' for PyTorch checkpoints; never a mix."""
    is_mlx = [key.startswith(MLX_PREFIXES) for key in weights]
    if all(is_mlx):
        return "mlx"
    if not any(is_mlx):
        return "torch"
    raise ModelLoadError("the weights mix MLX (vision_tower.*) and PyTorch (visual.*) names")


def sanitize(weights: dict, args: ModelArgs) -> dict:
    """Rename to the MLX model's names; PyTorch's channels-first Conv3d weight becomes channels-last.

    The layout decision comes from the weight names (where the weights came from), so the
    patch-embedding weight is transposed exactly once and never by guessing from its shape.
    """
    layout = weight_layout(weights)
    renamed = {}
    for key, value in weights.items():
        if key.endswith("inv_freq"):
            continue  # rotary buffers some exports include; recomputed here
        if layout == "torch":
            for old, new in TORCH_PREFIXES:
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
            if key == PATCH_EMBED:
                value = value.transpose(0, 2, 3, 4, 1)
        renamed[key] = value
    if args.text.tie_word_embeddings:
        renamed.pop("language_model.lm_head.weight", None)
    return renamed


def _short_list(keys, limit=8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def default_dtype():
    """On a Linux CPU float32 is the fast path (BLAS); elsewhere keep the checkpoint's dtype."""
    if platform.system() == "Linux" and mx.default_device() == mx.cpu:
        return mx.float32
    return None


# --------------------------------------------------------------------------- quantization settings


def mlx_quantization(config: dict, where: str = "the model") -> Optional[dict]:
    """The folder's MLX quantization settings: the ``quantization`` entry (mlx-lm, mlx-vlm, our
    convert), else ``quantization_config`` when it holds MLX settings (some tools write only
    that key; transformers may nest it in text_config).

    Raises ModelLoadError when ``quantization_config`` names another library's method
    (``quant_method``: AWQ, GPTQ, FP8, bitsandbytes, ...), whose weights MLX cannot use.
    """
    if config.get("quantization") is not None:
        return config["quantization"]  # mlx-lm trusts it over any quantization_config too
    settings = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if not isinstance(settings, dict) or not settings:
        return None
    if settings.get("quant_method") is not None:
        raise foreign_quantization_error(config, settings["quant_method"], where)
    return settings


def with_mlx_quantization(config: dict, where: str = "the model") -> dict:
    """``config`` with its MLX quantization settings under ``quantization``, where ModelArgs
    reads them. Raises ModelLoadError as mlx_quantization."""
    return {**config, "quantization": mlx_quantization(config, where)}


def foreign_quantization_error(config: dict, method, where: str) -> ModelLoadError:
    """One line naming the method and the way forward: for AWQ and GPTQ (without act-order) an
    exact MLX folder made from this one with ``mlx-qwenvl convert``; otherwise (and besides) the
    16-bit original, or an MLX folder made from it (named for the published sizes, recognised
    by their text width)."""
    from .convert import foreign_refusal  # convert imports this module

    label = FOREIGN_METHODS.get(str(method).lower(), str(method))
    settings = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
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


def _from_original(config: dict) -> str:
    """The way from the 16-bit original: named for the published sizes."""
    width = (config.get("text_config") or {}).get("hidden_size") or config.get("hidden_size")
    size = ORIGINAL_SIZES.get(width)
    if size:
        original = f"Qwen/Qwen2.5-VL-{size}-Instruct"
        way = f"use the 16-bit original ({original})"
    else:
        original = "<16-bit checkpoint>"
        way = "use the 16-bit checkpoint it was made from"
    return f"{way}, or make a 4-bit MLX folder from it with `mlx-qwenvl convert --hf-path {original} -q`"


def mlx_module_path(path: str) -> str:
    """A module path in any naming the loader accepts for weights (hub checkpoint, transformers
    5, MLX) as the MLX model's: ``model.layers.0.mlp`` -> ``language_model.model.layers.0.mlp``."""
    if path.startswith(MLX_PREFIXES):
        return path
    dotted = path + "."  # so that a bare "lm_head" matches its prefix "lm_head."
    for old, new in TORCH_PREFIXES:
        if dotted.startswith(old):
            return (new + dotted[len(old):])[:-1]
    return path


def stored_quantization(path: str, module: nn.Module, shapes: dict) -> Optional[dict]:
    """The settings a layer's stored shapes imply; None when no setting MLX has implies them.

    The layer's input width comes from the config (the unquantized module). The scales hold
    one column per group, so group_size = width / scales columns; the packed weight holds
    width * bits / 32 columns, so bits = 32 * packed columns / width: one answer for each.
    The stored shapes alone would not do: they fix only bits * group_size (32 * packed /
    scales columns), 128 for both 4 bits in groups of 32 and 2 bits in groups of 64.
    Affine layers store biases, the floating-point modes do not, and each of those has a
    single (bits, group size), so the mode follows too.
    """
    weight, scales = shapes.get(f"{path}.weight"), shapes.get(f"{path}.scales")
    width = module.weight.shape[-1]
    if weight is None or scales is None or not scales[-1] or width % scales[-1] or (32 * weight[-1]) % width:
        return None
    group_size, bits = width // scales[-1], 32 * weight[-1] // width
    if f"{path}.biases" in shapes:
        mode = "affine" if bits in AFFINE_BITS and group_size in AFFINE_GROUP_SIZES else None
    else:
        mode = FLOAT_MODES.get((bits, group_size))
    return None if mode is None else {"group_size": group_size, "bits": bits, "mode": mode}


def _quantize_like(model: nn.Module, quantization: dict, shapes: dict, where: str = "") -> dict:
    """Quantize exactly the layers stored quantized, each as stored (as mlx-lm does).

    A layer's settings are its override in ``quantization`` (keyed in any naming the weights
    may use), else what its stored shapes imply (stored_quantization), else the folder's
    default. Returns the settings with every override, and every layer that differs from the
    default, under its MLX path. Raises ModelLoadError for settings MLX cannot quantize with.
    """
    default = {"group_size": quantization.get("group_size"), "bits": quantization.get("bits"),
               "mode": quantization.get("mode", "affine")}
    overrides = {mlx_module_path(key): value for key, value in quantization.items()
                 if isinstance(value, (dict, bool))}
    resolved = {key: value for key, value in quantization.items() if not isinstance(value, (dict, bool))}
    resolved.update(overrides)

    def predicate(path, module):
        if path in overrides:
            return overrides[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in shapes:
            return False
        settings = stored_quantization(path, module, shapes)
        if settings is None:
            return True  # the default; the shape check names the layer if it is wrong
        if settings != default:
            resolved[path] = settings
        return dict(settings)  # nn.quantize may edit it

    try:
        nn.quantize(model, **default, class_predicate=predicate)
    except ValueError as error:
        raise ModelLoadError(f"{where}cannot quantize the model as config.json says: {error}") from None
    return resolved


# --------------------------------------------------------------------------- building


def model_skeleton(args: ModelArgs, shapes: dict, where: str = "") -> Model:
    """The Model for ``args``, quantized like the weights, checked against their names and
    shapes (``shapes``: MLX name -> shape); errors list what does not match."""
    model = Model(args)
    if args.quantization:
        # Whoever reads per-layer settings later (dequantizing) finds each layer's own, under
        # its MLX path, whatever naming or inference the folder needed.
        args.quantization = _quantize_like(model, args.quantization, shapes, where)
    expected = {name: tuple(value.shape) for name, value in tree_flatten(model.parameters())}
    missing, unexpected = set(expected) - set(shapes), set(shapes) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing weights: {_short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected weights: {_short_list(unexpected)}")
        raise ModelLoadError(where + "; ".join(parts))
    wrong = [name for name, shape in shapes.items() if tuple(shape) != expected[name]]
    if wrong:
        name = wrong[0]
        more = f" (+{len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ModelLoadError(
            f"{where}weight {name} has shape {tuple(shapes[name])}, the config implies {expected[name]}{more}"
        )
    return model


def dequantize_layers(model: nn.Module, dtype=None) -> None:
    """Every quantized Linear and Embedding of ``model`` made dense, its weight in ``dtype``
    (None: mx.dequantize's default, the scales' dtype). Unlike mlx-lm's dequantize_model, which
    leaves the floating-point modes' weights (uint8 scales) in bfloat16, so that their
    embedding lookups, and what follows, would compute in bfloat16 under float32."""
    from mlx.utils import tree_unflatten

    layers = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        weight = mx.dequantize(module.weight, module.scales, module.get("biases"), group_size=module.group_size,
                               bits=module.bits, mode=module.mode, dtype=dtype)
        if isinstance(module, nn.QuantizedLinear):
            dense = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
            if "bias" in module:
                dense.bias = module.bias
        else:
            dense = nn.Embedding(*weight.shape)
        dense.weight = weight
        layers.append((path, dense))
    if layers:
        model.update_modules(tree_unflatten(layers))


class _TypedQuantizedEmbedding(nn.QuantizedEmbedding):
    """A floating-point-mode quantized embedding whose looked-up rows come out in ``dtype``.
    MLX's come out in bfloat16 (mx.dequantize's default for uint8 scales); the values are exact
    in bfloat16 (at most 4 + 3 significant bits), so the cast adds no error."""

    def __call__(self, x):
        return super().__call__(x).astype(self.output_dtype)


def _typed_float_embeddings(model: nn.Module, dtype) -> None:
    """Make each floating-point-mode QuantizedEmbedding return ``dtype`` rows (affine ones do
    already: their scales were cast to it)."""
    for _, module in model.named_modules():
        if isinstance(module, nn.QuantizedEmbedding) and module.mode != "affine":
            module.__class__ = _TypedQuantizedEmbedding
            module.output_dtype = dtype


def _fill(model: Model, weights: dict, dtype=None, dequantize: bool = False, lazy: bool = False) -> None:
    """Load ``weights`` (MLX names, checked by model_skeleton) into ``model``: floating-point
    ones cast to ``dtype`` (None: as stored), quantized layers made dense with ``dequantize``;
    ``lazy`` leaves them unevaluated (read on first use).

    ``weights`` is emptied: nothing outside the model keeps a checkpoint tensor alive."""
    def cast(value):
        return value.astype(dtype) if dtype is not None and mx.issubdtype(value.dtype, mx.floating) else value

    model.load_weights([(name, cast(weights.pop(name))) for name in list(weights)])
    if dequantize:
        dequantize_layers(model, dtype)
    elif dtype is not None:
        _typed_float_embeddings(model, dtype)
    if lazy:
        return
    # One module at a time: each module's checkpoint tensors are freed once its converted ones
    # exist, so the peak is the converted model plus one module, not plus the whole checkpoint.
    for _, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        mx.eval(module.parameters())
    mx.eval(model.parameters())


def build_model(config: dict, weights: dict, dtype=None) -> Model:
    """A Model with ``weights`` (any supported naming) loaded, cast to ``dtype`` (None: as stored).

    Raises ModelLoadError for another library's quantization and for missing, unexpected or
    misshapen weights."""
    args = ModelArgs.from_dict(with_mlx_quantization(config))
    weights = sanitize(weights, args)
    model = model_skeleton(args, {name: value.shape for name, value in weights.items()})
    _fill(model, weights, dtype)
    return model


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class StoredTensor:
    """A tensor known from its safetensors header; sanitize renames and transposes it for free."""

    shape: tuple
    dtype: str  # safetensors' name: "BF16", "U32", ...
    nbytes: int

    def transpose(self, *axes):
        return StoredTensor(tuple(self.shape[a] for a in axes), self.dtype, self.nbytes)

    @property
    def floating(self) -> bool:
        return self.dtype.startswith(("F", "BF"))


def stored_tensors(path: Path, args: ModelArgs) -> dict:
    """MLX name -> StoredTensor for every weight of a folder, from the safetensors headers alone.

    Raises ModelLoadError for a shard missing from the index, a truncated or unreadable file."""
    from .convert import read_safetensors_header  # convert imports this module

    tensors = {}
    for file in weight_files(path):
        for name, entry in read_safetensors_header(file).items():
            start, end = entry["data_offsets"]
            tensors[name] = StoredTensor(tuple(entry["shape"]), entry["dtype"], end - start)
    return sanitize(tensors, args)


def _quantized_modules(model: nn.Module) -> dict:
    return {path: module for path, module in model.named_modules()
            if "scales" in module and hasattr(module, "bits")}


def _dequantized_bits(model: nn.Module, dequantize: bool) -> dict:
    """Module path -> bits of every layer that loading makes dense (none unless ``dequantize``)."""
    return {path: module.bits for path, module in _quantized_modules(model).items()} if dequantize else {}


def _loaded(tensor: StoredTensor, leaf: str, dtype, bits: Optional[int]) -> int:
    """Bytes of one stored tensor once loaded: in ``dtype`` if floating point (None: as stored);
    with ``bits`` (its layer dequantized) a weight unpacked to ``dtype``, scales and biases gone."""
    elements = math.prod(tensor.shape)
    if bits is not None:
        return elements * 32 // bits * dtype.size if leaf == "weight" else 0
    if dtype is not None and tensor.floating:
        return elements * dtype.size
    return tensor.nbytes


def loaded_bytes(model: Model, tensors: dict, dtype=None, dequantize: bool = False) -> int:
    """Bytes the stored ``tensors`` take once loaded into ``model`` (a skeleton) as ``dtype``,
    quantized layers made dense with ``dequantize`` (which needs a ``dtype``)."""
    bits = _dequantized_bits(model, dequantize)
    total = 0
    for name, tensor in tensors.items():
        path, _, leaf = name.rpartition(".")
        total += _loaded(tensor, leaf, dtype, bits.get(path))
    return total


def conversion_overhead(model: Model, tensors: dict, dtype=None, dequantize: bool = False) -> int:
    """The most memory one module holds beside the loaded model while it is converted (_fill
    converts one at a time): its stored tensors, and when it is dequantized, its scales and
    biases in ``dtype`` plus an intermediate the size of its dense weight (MLX's dequantize
    peaks at twice its output)."""
    bits = _dequantized_bits(model, dequantize)
    per_module = Counter()
    for name, tensor in tensors.items():
        path, _, leaf = name.rpartition(".")
        per_module[path] += tensor.nbytes
        if path in bits:
            per_module[path] += _loaded(tensor, leaf, dtype, bits[path] if leaf == "weight" else None)
    return max(per_module.values(), default=0)


def stored_kind(model: Model, tensors: dict) -> str:
    """The checkpoint's weights in a word: '4-bit', '4/8-bit' (mixed) or their float dtype."""
    bits = sorted({module.bits for module in _quantized_modules(model).values()})
    if bits:
        return "/".join(map(str, bits)) + "-bit"
    sizes = Counter()
    for tensor in tensors.values():
        if tensor.floating:
            sizes[tensor.dtype] += tensor.nbytes
    names = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
    return names.get(sizes.most_common(1)[0][0], "stored") if sizes else "stored"


def _read_int(file: Path) -> Optional[int]:
    """The number in a one-number file; None when absent or not a number ("max": no limit)."""
    try:
        text = file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat_value(file: Path, key: str) -> int:
    """A ``key value`` line of a memory.stat file; 0 when absent."""
    try:
        lines = file.read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
            return int(parts[1])
    return 0


def _meminfo_available(root: Path) -> Optional[int]:
    try:
        lines = (root / "proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # the kernel writes kB (KiB)
    return None


def _own_cgroups(root: Path) -> dict:
    """{"v2": path, "v1": path} of this process's memory cgroups, from /proc/self/cgroup."""
    groups = {}
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return groups
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            groups["v2"] = parts[2]
        elif "memory" in parts[1].split(","):
            groups["v1"] = parts[2]
    return groups


def _cgroup_headroom(root: Path) -> Iterator[int]:
    """What each limited cgroup holding this process has left: its own group and every ancestor
    (a parent's limit binds its children), in cgroup v2 and v1."""
    groups = _own_cgroups(root)
    for version, (mount, limit_file, usage_file, cache_key) in (("v2", CGROUP_V2), ("v1", CGROUP_V1)):
        base = root / mount
        relative = Path(groups.get(version, "/").lstrip("/"))
        for folder in [base / relative, *(base / parent for parent in relative.parents)]:
            limit = _read_int(folder / limit_file)
            if limit is None:
                continue
            used = (_read_int(folder / usage_file) or 0) - _stat_value(folder / "memory.stat", cache_key)
            yield limit - max(0, used)


def system_available_memory(root: Path = Path("/")) -> Optional[int]:
    """Bytes this process can still allocate: the least of MemAvailable and every cgroup limit's
    headroom; None where none of them can be read (macOS, for one)."""
    root = Path(root)
    figures = [figure for figure in (_meminfo_available(root), *_cgroup_headroom(root)) if figure is not None]
    return max(0, min(figures)) if figures else None


def available_memory() -> Optional[int]:
    """system_available_memory(), or the test hook's figure."""
    override = os.environ.get(AVAILABLE_MEMORY_ENV)
    if override:
        return int(float(override))
    return system_available_memory()


def choose_dtype(requested, model: Model, tensors: dict, where: str = "the model") -> tuple:
    """``(dtype, dequantize)`` for loading the stored ``tensors`` into ``model`` (a skeleton).

    ``'auto'`` is float32, quantized layers dequantized, on a Linux CPU when that fits in the
    memory this process can use; otherwise it keeps the checkpoint's dtype and warns with a
    DtypeFallbackWarning. Raises ModelLoadError when an explicit float32 cannot fit; other
    explicit dtypes are not checked.
    """
    auto = isinstance(requested, str) and requested == "auto"
    dtype = default_dtype() if auto else requested
    if dtype is None or dtype != mx.float32:  # (mx.Dtype cannot be compared with None)
        return dtype, False
    dequantize = auto and bool(_quantized_modules(model))
    weights = loaded_bytes(model, tensors, mx.float32, dequantize)
    needed = weights + conversion_overhead(model, tensors, mx.float32, dequantize) + RUNTIME_MARGIN
    available = available_memory()
    if available is None or needed <= available:
        return dtype, dequantize
    figures = f"float32 needs about {needed / GB:.1f} GB of memory, only {available / GB:.1f} GB is available"
    kind = stored_kind(model, tensors)
    if not auto:
        raise ModelLoadError(f"{where}: {figures}; load the checkpoint's {kind} weights instead "
                             f"(--dtype checkpoint, or dtype=None)")
    if weights <= loaded_bytes(model, tensors):
        return dtype, dequantize  # the checkpoint is float32 already: keeping it saves nothing
    warnings.warn(f"{figures}: keeping the checkpoint's {kind} weights, which compute more slowly on a "
                  f"CPU (--dtype checkpoint chooses them without this check)", DtypeFallbackWarning, stacklevel=3)
    return None, False


DTYPE_NAMES = {"auto": "auto", "checkpoint": None, "float32": mx.float32, "bfloat16": mx.bfloat16,
               "float16": mx.float16}


def as_dtype(dtype):
    """An ``mx.Dtype``, None or 'auto' from any of those or a name in ``DTYPE_NAMES``.

    Raises:
        ModelLoadError: an unknown name or a non-floating dtype.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
        return DTYPE_NAMES[dtype]
    if dtype is not None and not mx.issubdtype(dtype, mx.floating):
        raise ModelLoadError(f"dtype {dtype} is not a floating-point type")
    return dtype


def load_model(path, dtype: Optional[mx.Dtype] = "auto", *, lazy: bool = False, group=None,
               parallel: str = "tensor") -> Model:
    """Load a local model folder.

    ``group`` (an ``mx.distributed`` group of more than one process, as ``mlx.launch`` makes)
    loads only this rank's part, split by ``parallel`` ('tensor' or 'pipeline'): see
    ``distributed.load_model_sharded`` (``lazy`` does not apply there). Without a group (or with
    a group of one) nothing changes.

    ``dtype='auto'`` computes in float32 on a Linux CPU, where float32 products go through
    BLAS while bfloat16 and quantized products are 20-250x slower: 16-bit weights are cast
    and quantized ones dequantized, when float32 fits in memory (else see choose_dtype).
    Elsewhere (Metal, CUDA) it keeps the checkpoint's dtype. ``dtype=None`` always keeps it;
    an ``mx.Dtype`` casts the floating-point weights.

    Everything that can fail does so before any weight is read: ModelLoadError for a missing
    folder, config or shard, another model type, another library's quantization, weight names
    or shapes the config does not imply, float32 asked for but too large, and an unknown
    dtype. ``dtype`` may also be a name: 'float32', 'bfloat16', 'float16', 'auto' or
    'checkpoint' (None), as the CLI's ``--dtype``.
    """
    dtype = as_dtype(dtype)
    if group is not None and group.size() > 1:
        from .distributed import load_model_sharded

        return load_model_sharded(path, group, parallel, dtype)
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist")
    config = read_config(path)
    ModelArgs.from_dict(config)  # a wrong model type is the first thing to say
    args = ModelArgs.from_dict(with_mlx_quantization(config, str(path)))
    tensors = stored_tensors(path, args)
    model = model_skeleton(args, {name: tensor.shape for name, tensor in tensors.items()})
    dtype, dequantize = choose_dtype(dtype, model, tensors, str(path))
    _fill(model, sanitize(load_weights(path), args), dtype, dequantize, lazy=lazy)
    return model


# What a model folder needs: weights, configs, tokenizer and templates (no PyTorch .bin files).
MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


DEMO_MODEL = Path(__file__).parent / "demo_model"


def resolve_model_path(path_or_repo, revision: Optional[str] = None) -> Path:
    """A local folder as is; ``demo`` for the small model shipped with the package; a hub repo
    id downloaded (only the files needed) or taken from the local cache when offline."""
    if str(path_or_repo) == "demo":
        if not (DEMO_MODEL / "config.json").is_file():
            raise ModelLoadError(f"the demo model is missing from this installation ({DEMO_MODEL})")
        return DEMO_MODEL
    path = Path(path_or_repo).expanduser()
    if path.exists():
        return path
    repo_id = str(path_or_repo)
    if repo_id.startswith((".", "/", "~")) or repo_id.count("/") != 1:
        raise ModelLoadError(f"model folder {path_or_repo} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILE_PATTERNS))
    except Exception as download_error:  # offline, unknown repo, gated: try the cache
        try:
            return Path(snapshot_download(repo_id, revision=revision,
                                          allow_patterns=MODEL_FILE_PATTERNS, local_files_only=True))
        except Exception:
            reason = str(download_error).strip().splitlines()[0] if str(download_error).strip() else type(download_error).__name__
            raise ModelLoadError(
                f"{repo_id} is neither a local folder nor in the hub cache, and downloading it "
                f"failed: {reason}"
            ) from None


def load(path_or_repo, *, dtype="auto", revision: Optional[str] = None, lazy: bool = False, group=None,
         parallel: str = "tensor"):
    """``(model, processor)`` from a local folder, ``"demo"`` or a hub repo id, as ``mlx_lm.load``.

    Options are keyword-only (a second positional argument means a tokenizer config in
    mlx-lm and an adapter path in mlx-vlm). ``dtype``: see ``load_model``; ``revision``: the
    hub branch, tag or commit; ``lazy=True`` returns before the weights are read into memory
    (they load on first use), as mlx-lm. ``group``/``parallel``: this rank's part of the model
    across several processes (see ``load_model``; every rank calls ``load`` alike).

    Raises:
        ModelLoadError: a missing folder or repo, or a folder that cannot be loaded.
    """
    from .processor import Processor

    path = resolve_model_path(path_or_repo, revision)
    model = load_model(path, dtype, lazy=lazy, group=group, parallel=parallel)
    return model, Processor.from_pretrained(path)
