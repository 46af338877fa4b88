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

Where each part lives: safetensors_io (headers, the streaming writer), convert_source (the
checks, through the loader's functions), foreign (AWQ/GPTQ), quantization (QuantSettings, the
modes and recipes), convert_plan (jobs and shards), convert_folder (the atomic folder, signals),
convert_card (model card, upload); the command line is ``mlx_qwenvl.cli``'s ``convert``.

Test hook: ``MLX_QWENVL_CONVERT_SLEEP=<seconds>`` sleeps after each tensor, so tests can
interrupt a conversion of a tiny model mid-way. It has no other use.
"""

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from .config import ModelArgs, VisionArgs
from .convert_card import check_login, model_card, upload
from .convert_folder import atomic_folder, check_target, free_bytes, remove_stale_temporaries
from .convert_plan import (DTYPES, Job, Plan, bits_per_weight, check_quantization_options, dtype_name, human_bytes,
                           make_plan, quantization_words)
from .convert_source import Source, check_source_options, inspect_source
from .errors import ConversionError, ConversionInterrupted
from .foreign import foreign_format, unpack_rows
from .hub import hub_config, resolve_model_path
from .safetensors_io import SafetensorsWriter, read_safetensors_header, row_blocks

# The public names; the others are found in their modules (convert_plan, foreign, safetensors_io).
__all__ = ["convert", "ConversionError", "ConversionInterrupted", "read_safetensors_header"]

SLEEP_ENV = "MLX_QWENVL_CONVERT_SLEEP"  # test hook, see the module docstring

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
    settings = check_quantization_options(quantize, q_bits, q_group_size, q_mode, quant_predicate,
                                          quantize_vision, dequantize)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if upload_repo:
        check_login(upload_repo)
    target = Path(mlx_path).expanduser()
    remove_stale_temporaries(target)
    check_target(target, force)  # before any download
    hub = hub_config(hf_path)  # a hub id's config.json alone: refused before the weights are fetched
    if hub is not None:
        foreign_format(hub, str(hf_path))
    path = resolve_model_path(hf_path)
    source = inspect_source(path)
    check_target(target, force, source=path)
    check_source_options(source, quantize, dequantize)

    plan = make_plan(source, _choose_dtype(source, dtype, dequantize), settings, quantize_vision, dequantize,
                     quant_predicate)
    free = free_bytes(target.parent)
    if free < plan.nbytes * 1.01 + (16 << 20):
        raise ConversionError(
            f"{target.parent} has {human_bytes(free)} free; the converted model needs {human_bytes(plan.nbytes)}")
    log(_describe(source, plan, target, quantize_vision))

    with atomic_folder(target, force) as folder:
        _write(source, plan, folder, progress)
        config = mlx_config(source.config, source.args, plan.quantization)
        (folder / "config.json").write_text(json.dumps(config, indent=4) + "\n")
        for name in COPY_FILES:
            if (path / name).is_file():
                shutil.copyfile(path / name, folder / name)
        model_card(str(hf_path), plan, upload_repo, quantize_vision).save(folder / "README.md")

    log(f"wrote {target}: {len(plan.shards)} shard(s), {human_bytes(plan.nbytes)}"
        + (f", {bits_per_weight(plan):.3f} bits per quantized weight" if bits_per_weight(plan) else ""))
    if upload_repo:
        upload(target, upload_repo)
        log(f"uploaded to https://huggingface.co/{upload_repo}")
    return target


def _choose_dtype(source: Source, dtype: Optional[str], dequantize: bool):
    """The output's float dtype: the one asked for; dequantizing, the scales' 16-bit dtype; else
    the config's (None: each tensor keeps its own)."""
    if dtype is not None:
        return DTYPES[dtype]
    if dequantize:
        scales = next(tensor for name, tensor in source.tensors.items() if name.endswith(".scales"))
        return scales.mx_dtype if scales.mx_dtype in (mx.float16, mx.bfloat16) else mx.float16
    config = source.config
    name = (config.get("torch_dtype") or config.get("dtype")
            or (config.get("text_config") or {}).get("torch_dtype")
            or (config.get("text_config") or {}).get("dtype"))
    return DTYPES.get(name)  # None keeps each tensor's own dtype


def _describe(source: Source, plan: Plan, target: Path, quantize_vision: bool) -> str:
    """The one line logged before a conversion starts."""
    text = source.args.text
    what = f"{dtype_name(plan.dtype)}" if plan.dtype is not None else "source dtype"
    if plan.quantization and any(job.kind in ("quantize", "unpack") for job in plan.jobs):
        tower = "quantized" if quantize_vision else f"kept in {what}"
        what = f"{quantization_words(plan)}, vision tower {tower}"
    elif any(job.kind == "dequantize" for job in plan.jobs):
        what = f"dequantized to {what}"
    return (f"converting {source.path} (Qwen2.5-VL, {text.num_hidden_layers} layers, "
            f"{human_bytes(source.nbytes)}) to {target}: {what}")


def _write(source: Source, plan: Plan, folder: Path, progress) -> None:
    arrays = source.lazy_weights()  # nothing is read yet
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


def run_job(job: Job, arrays: dict, writer: SafetensorsWriter) -> None:
    """Read ``job``'s tensors from ``arrays`` (lazy; they are removed from it) and write its
    outputs, block of rows by block of rows."""
    source = arrays.pop(job.source)
    if job.kind == "dequantize":
        path = job.source[: -len(".weight")]
        scales, biases = arrays.pop(f"{path}.scales"), arrays.pop(f"{path}.biases", None)
    if job.kind == "unpack":
        parts = {key: arrays.pop(name) for key, name in job.parts.items()}
    # Blocks are sized on the output's (unpacked) shape with float32 intermediates in mind.
    shape = job.outputs[0][2] if job.kind == "dequantize" else source.shape
    if job.kind == "unpack":
        shape = (job.outputs[0][2][0], job.outputs[0][2][1] * 32 // job.settings.bits)
    dtype = job.outputs[0][1]
    # An unpacked block starts at a whole packed word of the foreign tensors' output columns.
    align = 32 // job.settings.bits if job.kind == "unpack" else 1
    itemsize = 4 * (job.settings.block_divisor if job.kind == "quantize" else 1)
    for block in row_blocks(tuple(shape), itemsize, align):
        rows = slice(None) if block is None else slice(*block)
        row = 0 if block is None else block[0]
        if job.kind == "cast":
            outputs = [source[rows].astype(dtype)]
        elif job.kind == "quantize":
            outputs = mx.quantize(source[rows].astype(job.dtype), **job.settings.as_dict())
        elif job.kind == "unpack":
            outputs = unpack_rows(job.foreign, source, parts["qzeros"], parts["scales"], block or (0, shape[0]))
        else:
            outputs = [mx.dequantize(source[rows], scales[rows], None if biases is None else biases[rows],
                                     **job.settings.as_dict()).astype(dtype)]
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


def __getattr__(name):
    """``convert_command``, the click command, lives in the command line (``mlx_qwenvl.cli``);
    imported from here only when asked for, so that importing this module needs no click."""
    if name == "convert_command":
        from .cli import convert_command

        return convert_command
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    from mlx_qwenvl.cli import convert_command

    convert_command()
