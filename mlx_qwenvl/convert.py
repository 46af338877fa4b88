"""Convert Qwen2.5-VL checkpoints into MLX folders, optionally quantized.

The output is the folder layout mlx-community publishes (mlx-vlm's weight names, its
``quantization`` entry in config.json, safetensors shards of at most 5 GB with an index),
so mlx-vlm and the apps built on it load our folders, and we load theirs.

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
from .loading import _short_list, model_skeleton, read_config, resolve_model_path, sanitize, weight_files, weight_layout
from .model import Model

MAX_SHARD_BYTES = 5_000_000_000  # "at most 5 GB" in either reading of GB
HEADER_BYTES, ENTRY_BYTES = 1024, 256  # a shard's file size: its data plus at most this header
CHUNK_BYTES = 64 << 20  # rows converted and written at a time
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
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
    """Every check that can fail, from config.json and the safetensors headers only."""
    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist")
    config = read_config(path)
    args = ModelArgs.from_dict(config)  # another model type or a missing key fails here
    foreign = config.get("quantization_config") or {}
    if not args.quantization and isinstance(foreign, dict) and foreign.get("quant_method"):
        raise ModelLoadError(
            f"{path} is a {foreign['quant_method']}-quantized checkpoint; convert from the 16-bit original"
        )
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

    model = model_skeleton(args, {name: spec.shape for name, spec in specs.items()}, where=f"{path}: ")
    source = Source(path, config, args, files, specs, model)
    source.nbytes = sum(spec.nbytes for spec in specs.values())
    return source


# --------------------------------------------------------------------------- the plan


@dataclass
class Job:
    """One source tensor (and, dequantizing, its scales and biases) to its output tensors."""

    kind: str  # "cast", "quantize" or "dequantize"
    source: str  # MLX name of the tensor read
    outputs: list  # [(name, dtype, shape)], written in this order
    nbytes: int  # source bytes, for progress
    group_size: int = 0
    bits: int = 0
    mode: str = "affine"


@dataclass
class Plan:
    jobs: list
    shards: list = field(default_factory=list)  # [(file name, [jobs])]
    quantization: Optional[dict] = None
    dtype: Optional[mx.Dtype] = None

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(dtype, shape) for job in self.jobs for _, dtype, shape in job.outputs)


def _nbytes(dtype, shape) -> int:
    return math.prod(shape) * dtype.size


def quantizable_weights(model: Model, group_size: int, quantize_vision: bool) -> set:
    """The ``.weight`` of every layer mlx-lm would quantize (Linear, Embedding) whose input
    width divides into groups; the vision blocks only when asked. The patch merger, which
    projects into the language model's embedding space, stays 16-bit as in mlx-vlm."""
    names = set()
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized"):
            continue
        if path.startswith(VISION_PREFIX) and (not quantize_vision or path.startswith(MERGER_PREFIX)):
            continue
        if module.weight.shape[-1] % group_size == 0:
            names.add(f"{path}.weight")
    return names


def _layer_quantization(quantization: dict, path: str) -> tuple:
    params = quantization.get(path)
    params = params if isinstance(params, dict) else quantization
    return params["group_size"], params["bits"], params.get("mode", quantization.get("mode", "affine"))


def make_plan(source: Source, dtype, quantize, q_bits, q_group_size, quantize_vision, dequantize) -> Plan:
    def out_dtype(spec):
        return dtype if dtype is not None and mx.issubdtype(spec.dtype, mx.floating) else spec.dtype

    jobs = []
    if dequantize:
        quantization = source.args.quantization
        for name, spec in source.specs.items():
            path, _, leaf = name.rpartition(".")
            if leaf in ("scales", "biases") and f"{path}.weight" in source.specs and (
                f"{path}.scales" in source.specs
            ):
                continue  # consumed with the weight
            if leaf == "weight" and f"{path}.scales" in source.specs:
                group_size, bits, mode = _layer_quantization(quantization, path)
                shape = (*spec.shape[:-1], spec.shape[-1] * 32 // bits)
                nbytes = sum(source.specs[f"{path}.{part}"].nbytes for part in ("weight", "scales", "biases")
                             if f"{path}.{part}" in source.specs)
                jobs.append(Job("dequantize", name, [(name, dtype, shape)], nbytes, group_size, bits, mode))
            else:
                jobs.append(Job("cast", name, [(name, out_dtype(spec), spec.shape)], spec.nbytes))
        return _shard(Plan(jobs, dtype=dtype))

    quantized = quantizable_weights(source.model, q_group_size, quantize_vision) if quantize else set()
    for name, spec in source.specs.items():
        if name in quantized:
            path = name[: -len(".weight")]
            rows, width = spec.shape[:-1], spec.shape[-1]
            outputs = [
                (name, mx.uint32, (*rows, width * q_bits // 32)),
                (f"{path}.scales", out_dtype(spec), (*rows, width // q_group_size)),
                (f"{path}.biases", out_dtype(spec), (*rows, width // q_group_size)),
            ]
            jobs.append(Job("quantize", name, outputs, spec.nbytes, q_group_size, q_bits))
        else:
            jobs.append(Job("cast", name, [(name, out_dtype(spec), spec.shape)], spec.nbytes))
    plan = Plan(jobs, dtype=dtype)
    if quantize:
        plan.quantization = {"group_size": q_group_size, "bits": q_bits}
    elif source.quantized:
        plan.quantization = dict(source.args.quantization)
    return _shard(plan)


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


def _row_blocks(shape: tuple, itemsize: int):
    """Row ranges of about CHUNK_BYTES; one block for tensors without rows."""
    if len(shape) < 2:
        yield None
        return
    row_bytes = max(1, math.prod(shape[1:]) * itemsize)
    step = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, shape[0], step):
        yield start, min(start + step, shape[0])


def run_job(job: Job, arrays: dict, writer: SafetensorsWriter) -> None:
    source = arrays.pop(job.source)
    if job.kind == "dequantize":
        path = job.source[: -len(".weight")]
        scales, biases = arrays.pop(f"{path}.scales"), arrays.pop(f"{path}.biases", None)
    # Blocks are sized on the unpacked shape with float32 intermediates in mind.
    shape = job.outputs[0][2] if job.kind == "dequantize" else source.shape
    dtype = job.outputs[0][1]
    for block in _row_blocks(tuple(shape), 4):
        rows = slice(None) if block is None else slice(*block)
        row = 0 if block is None else block[0]
        if job.kind == "cast":
            outputs = [source[rows].astype(dtype)]
        elif job.kind == "quantize":
            weight = source[rows].astype(job.outputs[1][1])
            outputs = mx.quantize(weight, group_size=job.group_size, bits=job.bits)
        else:
            outputs = [mx.dequantize(source[rows], scales[rows], None if biases is None else biases[rows],
                                     group_size=job.group_size, bits=job.bits, mode=job.mode).astype(dtype)]
        mx.eval(outputs)
        for (out_name, _, _), array in zip(job.outputs, outputs):
            writer.write(out_name, array, row)
        del outputs
    del source
    mx.clear_cache()


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
        q = plan.quantization
        tower = "quantized too" if quantize_vision else f"kept in {dtype_name}"
        what = (f"{q['bits']}-bit (affine, group size {q['group_size']}) language model; "
                f"vision tower {tower}")
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


def convert(
    hf_path,
    mlx_path="mlx_model",
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    quantize_vision: bool = False,
    dequantize: bool = False,
    upload_repo: Optional[str] = None,
    force: bool = False,
    progress: Optional[Callable[[int, int, str], None]] = None,
    log: Optional[Callable[[str], None]] = None,
) -> Path:
    """Convert a Qwen2.5-VL checkpoint (hub id or folder) into an MLX folder; returns its path.

    ``dtype`` ('float16', 'bfloat16', 'float32') defaults to the source config's dtype
    (dequantizing: the scales' 16-bit dtype). ``quantize`` stores the language model's
    Linear and Embedding weights with ``q_bits`` bits per weight in groups of
    ``q_group_size``; the vision tower stays 16-bit unless ``quantize_vision``.
    ``dequantize`` turns a quantized MLX folder back into 16-bit weights. ``progress``
    is called as ``progress(done_bytes, total_bytes, tensor_name)``; ``log`` gets the
    one-line summaries.
    """
    log = log or (lambda message: None)
    if quantize and dequantize:
        raise ConversionError("choose either quantizing (-q) or dequantizing (-d), not both")
    if quantize_vision and not quantize:
        raise ConversionError("quantizing the vision tower (--quantize-vision) needs quantize (-q)")
    if quantize and q_bits not in Q_BITS:
        raise ConversionError(f"q_bits must be one of {', '.join(map(str, Q_BITS))}, not {q_bits}")
    if quantize and q_group_size not in Q_GROUP_SIZES:
        raise ConversionError(
            f"q_group_size must be one of {', '.join(map(str, Q_GROUP_SIZES))}, not {q_group_size}")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")

    if upload_repo:
        from huggingface_hub import get_token

        if not get_token():
            raise ConversionError(f"uploading to {upload_repo} needs a Hugging Face login (`hf auth login`)")
    target = Path(mlx_path).expanduser()
    remove_stale_temporaries(target)
    check_target(target, force)  # before any download
    path = resolve_model_path(hf_path)
    source = inspect_source(path)
    check_target(target, force, source=path)
    if dequantize and not source.quantized:
        raise ConversionError(f"{path} is not quantized; there is nothing to dequantize")
    if quantize and source.quantized:
        bits = source.args.quantization.get("bits")
        raise ConversionError(
            f"{path} is already quantized ({bits}-bit); convert the 16-bit checkpoint, or dequantize first")

    out_dtype = _choose_dtype(source, dtype, dequantize)
    plan = make_plan(source, out_dtype, quantize, q_bits, q_group_size, quantize_vision, dequantize)
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
        + (f", {bits_per_weight(plan):.3f} bits per quantized weight" if quantize else ""))
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


def _describe(source: Source, plan: Plan, target: Path, quantize_vision: bool) -> str:
    text = source.args.text
    what = f"{_dtype_name(plan.dtype)}" if plan.dtype is not None else "source dtype"
    if plan.quantization and any(job.kind == "quantize" for job in plan.jobs):
        q = plan.quantization
        tower = "quantized" if quantize_vision else f"kept in {what}"
        what = f"{q['bits']}-bit, group size {q['group_size']}, vision tower {tower}"
    elif any(job.kind == "dequantize" for job in plan.jobs):
        what = f"dequantized to {what}"
    return (f"converting {source.path} (Qwen2.5-VL, {text.num_hidden_layers} layers, "
            f"{_human(source.nbytes)}) to {target}: {what}")


def bits_per_weight(plan: Plan) -> float:
    bits = weights = 0
    for job in plan.jobs:
        if job.kind == "quantize":
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
@click.option("--q-bits", type=click.Choice([str(b) for b in Q_BITS]), default="4", show_default=True,
              help="Bits per weight.")
@click.option("--q-group-size", type=click.Choice([str(g) for g in Q_GROUP_SIZES]), default="64",
              show_default=True, help="Weights per quantization group.")
@click.option("--quantize-vision", is_flag=True,
              help="Quantize the vision tower too (default: it stays 16-bit, being the most sensitive).")
@click.option("-d", "--dequantize", is_flag=True, help="Turn a quantized MLX folder back into 16-bit.")
@click.option("--upload-repo", default=None, help="Hugging Face repo to upload the result to.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def convert_command(hf_path, mlx_path, dtype, quantize, q_bits, q_group_size, quantize_vision,
                    dequantize, upload_repo, force, debug):
    """Convert a Qwen2.5-VL checkpoint into an MLX folder (mlx-community layout), optionally quantized."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        previous = None
    try:
        convert(hf_path, mlx_path, dtype=dtype, quantize=quantize, q_bits=int(q_bits),
                q_group_size=int(q_group_size), quantize_vision=quantize_vision,
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
