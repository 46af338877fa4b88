"""Loading Qwen2.5-VL model folders: hub checkpoints, transformers 5.x saves, mlx-vlm conversions."""

import glob
import json
import platform
from pathlib import Path
from typing import Optional

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


def model_skeleton(args: ModelArgs, shapes: dict, where: str = "") -> Model:
    """The Model for ``args``, quantized like the weights, checked against their names and
    shapes (``shapes``: MLX name -> shape); errors list what does not match."""
    model = Model(args)
    if args.quantization:
        _quantize_like(model, args.quantization, shapes)
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


def build_model(config: dict, weights: dict, dtype=None) -> Model:
    """A Model with ``weights`` (any supported naming) loaded."""
    args = ModelArgs.from_dict(config)
    weights = sanitize(weights, args)
    model = model_skeleton(args, {name: value.shape for name, value in weights.items()})
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
                   for k, v in weights.items()}
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model


def _quantize_like(model: nn.Module, quantization: dict, weights: dict) -> None:
    """Quantize exactly the layers a converted folder stored quantized (as mlx-lm does)."""

    def predicate(path, module):
        if path in quantization:
            return quantization[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def load_model(path, dtype: Optional[mx.Dtype] = "auto") -> Model:
    """Load a local model folder.

    ``dtype='auto'`` computes in float32 on a Linux CPU, where float32 products go through
    BLAS while bfloat16 and quantized products are 20-250x slower: 16-bit weights are cast
    and quantized ones dequantized. Elsewhere (Metal, CUDA) it keeps the checkpoint's dtype.
    ``dtype=None`` always keeps it; an ``mx.Dtype`` casts the floating-point weights.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist")
    config = read_config(path)
    ModelArgs.from_dict(config)  # fail on a wrong model type before reading any weights
    weights = load_weights(path)
    auto = dtype == "auto"
    dtype = default_dtype() if auto else dtype
    model = build_model(config, weights, dtype)
    if auto and dtype == mx.float32 and model.args.quantization:
        from mlx_lm.utils import dequantize_model

        dequantize_model(model)
        mx.eval(model.parameters())
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


def load(path_or_repo, dtype="auto", revision: Optional[str] = None):
    """``(model, processor)`` from a local folder or a hub repo id, as ``mlx_lm.load``."""
    from .processor import Processor

    path = resolve_model_path(path_or_repo, revision)
    model = load_model(path, dtype)
    return model, Processor.from_pretrained(path)
