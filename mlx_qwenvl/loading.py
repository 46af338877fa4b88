"""Loading Qwen2.5-VL model folders: hub checkpoints, transformers 5.x saves, mlx-vlm conversions.

Everything that can fail does so from config.json and the safetensors headers, before any weight
is read; the converter reads folders through the same functions (read_config, mlx_quantization,
stored_tensors, model_skeleton, load_weights). How much memory a model takes is in memory.py,
where a model comes from (a folder, ``demo``, the hub) in hub.py.
"""

import glob
import json
import os
import platform
import warnings
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelArgs, read_folder_json
from .errors import ModelLoadError, short_list
from .foreign import foreign_quantization_error, quantization_config
from .hub import resolve_model_path
from .memory import (GB, RUNTIME_MARGIN, conversion_overhead, loaded_bytes, quantized_modules, stored_kind,
                     system_available_memory)
from .model import Model
from .quantization import QuantSettings
from .safetensors_io import StoredTensor, read_stored_tensors

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

AVAILABLE_MEMORY_ENV = "MLX_QWENVL_AVAILABLE_MEMORY"  # test hook: bytes to take as available


class DtypeFallbackWarning(UserWarning):
    """dtype 'auto' kept the checkpoint's dtype because float32 would not fit in memory."""


def read_config(path: Path) -> dict:
    """A model folder's config.json. Raises ModelLoadError when it is missing or not JSON."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} has no config.json: not a model folder")
    try:
        return json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{config_file} is not valid JSON ({error})") from None


def read_configs(path: Path) -> dict:
    """The folder's three configuration files, each read once, for whoever needs them (as
    mlx-lm's load): ``config`` (config.json, required), ``generation_config`` and
    ``preprocessor_config`` (None when the folder has none). Raises ModelLoadError as read_config
    and for an unreadable optional file."""
    return {"config": read_config(path),
            "generation_config": read_folder_json(path, "generation_config.json"),
            "preprocessor_config": read_folder_json(path, "preprocessor_config.json")}


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
    settings = quantization_config(config)
    if not isinstance(settings, dict) or not settings:
        return None
    if settings.get("quant_method") is not None:
        raise foreign_quantization_error(config, settings["quant_method"], where)
    return settings


def model_args(config: dict, where: str = "the model") -> ModelArgs:
    """The ModelArgs of ``config``, its quantization the MLX settings (mlx_quantization): parsed
    once, and another model type or a missing key is the first thing said.

    Raises ModelLoadError as ModelArgs.from_dict, then as mlx_quantization."""
    args = ModelArgs.from_dict(config)
    args.quantization = mlx_quantization(config, where)
    return args


def folder_args(path, config: Optional[dict] = None) -> tuple:
    """``(Path, ModelArgs)`` of a model folder, its config.json read here unless given.
    Raises ModelLoadError for a missing folder, then as read_config and model_args."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist")
    return path, model_args(config if config is not None else read_config(path), str(path))


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


def stored_quantization(path: str, module: nn.Module, shapes: dict) -> Optional[QuantSettings]:
    """The settings a layer's stored shapes imply; None when no setting MLX has implies them.

    The layer's input width comes from the config (the unquantized module). The scales hold
    one column per group, so group_size = width / scales columns; the packed weight holds
    width * bits / 32 columns, so bits = 32 * packed columns / width: one answer for each.
    The stored shapes alone would not do: they fix only bits * group_size (32 * packed /
    scales columns), 128 for both 4 bits in groups of 32 and 2 bits in groups of 64.
    Affine layers store biases, the floating-point modes do not, and each of those has a
    single (bits, group size), so the mode follows too (QuantSettings.implied).
    """
    weight, scales = shapes.get(f"{path}.weight"), shapes.get(f"{path}.scales")
    width = module.weight.shape[-1]
    if weight is None or scales is None or not scales[-1] or width % scales[-1] or (32 * weight[-1]) % width:
        return None
    return QuantSettings.implied(32 * weight[-1] // width, width // scales[-1], f"{path}.biases" in shapes)


def _quantize_like(model: nn.Module, quantization: dict, shapes: dict, where: str = "") -> dict:
    """Quantize exactly the layers stored quantized, each as stored (as mlx-lm does).

    A layer's settings are its override in ``quantization`` (keyed in any naming the weights
    may use), else what its stored shapes imply (stored_quantization), else the folder's
    default. Returns the settings with every override, and every layer that differs from the
    default, under its MLX path. Raises ModelLoadError for settings MLX cannot quantize with.
    """
    default = QuantSettings.from_entry(quantization)
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
            resolved[path] = settings.as_dict()
        return settings.as_dict()

    try:
        nn.quantize(model, **default.as_dict(), class_predicate=predicate)
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
            parts.append(f"missing weights: {short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected weights: {short_list(unexpected)}")
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
    args = model_args(config)
    weights = sanitize(weights, args)
    model = model_skeleton(args, {name: value.shape for name, value in weights.items()})
    _fill(model, weights, dtype)
    return model


# --------------------------------------------------------------------------- memory


def stored_tensors(path: Path, args: ModelArgs) -> dict[str, StoredTensor]:
    """MLX name -> StoredTensor for every weight of a folder, from the safetensors headers alone,
    file by file in the order of their data.

    Raises ModelLoadError for a shard missing from the index, a truncated or unreadable file, a
    tensor stored in two files, and names that mix the MLX and PyTorch layouts."""
    return sanitize(read_stored_tensors(weight_files(path)), args)


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
    dequantize = auto and bool(quantized_modules(model))
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
               parallel: str = "tensor", config: Optional[dict] = None) -> Model:
    """The Model of a local folder: ``load`` without the hub and the processor; see ``load`` for
    ``dtype`` (an ``mx.Dtype``, None, 'auto' or a name, as the CLI's ``--dtype``), ``lazy``,
    ``group`` and ``parallel`` (``lazy`` does not apply under a group: see
    ``distributed.load_model_sharded``), and for the ModelLoadError raised, before any weight is
    read, for a folder that cannot be loaded as asked. ``config``: the folder's config.json when
    the caller has read it (else it is read here).

    ``'auto'`` is float32 on a Linux CPU because float32 products go through BLAS there, while
    bfloat16 and quantized products are 20-250x slower (see choose_dtype for the memory check).
    """
    dtype = as_dtype(dtype)
    if group is not None and group.size() > 1:
        from .distributed import load_model_sharded

        return load_model_sharded(path, group, parallel, dtype, config)
    path, args = folder_args(path, config)
    tensors = stored_tensors(path, args)
    model = model_skeleton(args, {name: tensor.shape for name, tensor in tensors.items()})
    dtype, dequantize = choose_dtype(dtype, model, tensors, str(path))
    _fill(model, sanitize(load_weights(path), args), dtype, dequantize, lazy=lazy)
    return model


def load(path_or_repo, *, dtype="auto", revision: Optional[str] = None, lazy: bool = False, group=None,
         parallel: str = "tensor"):
    """``(model, processor)`` from a local folder, ``"demo"`` or a hub repo id, as ``mlx_lm.load``.

    Options are keyword-only (a second positional argument means a tokenizer config in
    mlx-lm and an adapter path in mlx-vlm).

    Args:
        path_or_repo: a model folder; ``"demo"``, the small model shipped with the package; or
            a hub repo id (``owner/name``), of which only the files a model needs are
            downloaded (taken from the hub cache when offline).
        dtype: the floating-point weights' dtype. ``"auto"`` (default) is float32 on a Linux
            CPU (quantized layers dequantized) when the weights in float32, the largest
            module's conversion and a 2 GiB margin fit in the bytes this process can still
            allocate, else the checkpoint's dtype with a ``DtypeFallbackWarning``; elsewhere
            (Metal, CUDA) the checkpoint's. ``None`` or ``"checkpoint"`` keeps the checkpoint's;
            an ``mx.Dtype`` or its name (``"float32"``, ``"bfloat16"``, ``"float16"``) casts to
            it. Quantized layers stay quantized (uint32 weights, their scales and biases) except
            under ``"auto"``'s float32.
        revision: the hub branch, tag or commit (hub ids only).
        lazy: return before the weights are read into memory (they load on first use), as
            mlx-lm (not under a ``group``); the checks below still run first.
        group: an ``mx.distributed`` group of several processes (as ``mlx.launch`` makes): this
            rank loads only its part of the model, split by ``parallel`` (``"tensor"`` or
            ``"pipeline"``); every rank calls ``load`` alike. None, or a group of one: the whole
            model.

    Returns:
        ``(Model, Processor)``: the model, its parameters in the dtype above (``Model.args``
        holds the parsed config.json), and the folder's processor (tokenizer, chat template,
        image and video preprocessing, generation_config.json's sampling defaults).

    Raises:
        ModelLoadError: before any weight is read: a missing folder or ``demo`` model; a hub
            id that is neither downloadable nor cached; a config.json that is missing, not
            JSON, of another model type or missing a key; another library's quantization
            (AWQ/GPTQ name ``mlx-qwenvl convert``, which converts them exactly); a shard missing
            from the index, truncated or unreadable; weight names or shapes the config does not
            imply; an explicit float32 that does not fit in memory; an unknown or non-floating
            dtype; a tokenizer, chat template or preprocessor file that cannot be read.
    """
    from .processor import Processor

    path = resolve_model_path(path_or_repo, revision)
    configs = read_configs(path)
    # The processor first: a bad tokenizer or template is said before gigabytes are read.
    processor = Processor.from_pretrained(path, preprocessor_config=configs["preprocessor_config"] or {},
                                          generation_config=configs["generation_config"])
    model = load_model(path, dtype, lazy=lazy, group=group, parallel=parallel, config=configs["config"])
    return model, processor
