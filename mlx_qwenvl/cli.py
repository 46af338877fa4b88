"""The ``mlx-qwenvl`` command: generate, chat (cli_chat.py), convert and server (server.py).

Importing this module loads neither MLX nor the model code: each command imports what it needs
when it runs, and ``chat`` and ``server`` are themselves imported only then (LazyGroup), so that
``mlx-qwenvl --help`` is fast."""

import functools
import importlib
import sys
import time

import click

from .errors import QwenVLError, error_line, first_line
from .quantization import BITS, GROUP_SIZES, MODES, RECIPES, modes_help

DTYPES = {"auto": "auto", "checkpoint": None, "float32": "float32", "bfloat16": "bfloat16",
          "float16": "float16"}
LARGE_IMAGE_TOKENS = 4096  # a notice is printed above this many tokens for one image


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def distributed_guard():
    """The FailureGuard of a run under mlx.launch (several processes), else None."""
    module = sys.modules.get("mlx_qwenvl.distributed")
    return module.current_guard() if module is not None else None


def friendly_errors(command):
    """One line on stderr and exit code 1 instead of a traceback (unless --debug); an interrupt
    carrying its own message (ConversionInterrupted) prints it and exits 130. Under
    mlx.launch the line names the rank, and any failure ends this rank at once (the others
    follow: see distributed.FailureGuard)."""

    @functools.wraps(command)
    def wrapper(*args, debug=False, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt as error:
            guard = distributed_guard()
            if guard is not None:  # every rank must stop at the same token: end them all
                guard.end(None, 130)
            if isinstance(error, QwenVLError) and not debug:  # an interrupt that says what it left behind
                click.echo(f"error: {first_line(error)}", err=True)
                sys.exit(130)
            raise
        except (click.exceptions.Exit, SystemExit):
            raise
        except Exception as error:  # noqa: BLE001 - the CLI's last line of defence
            if debug:
                raise
            if distributed_guard() is not None:
                distributed_guard().fail(error)
            fail(error_line(error))

    return click.option("--debug", is_flag=True, help="Show full tracebacks.")(wrapper)


class PeerCommand(click.Command):
    """Takes ``--image a b c`` (one flag, several values, as mlx-vlm documents) besides the
    repeatable ``--image a --image b``; the same for ``--video``."""

    multi_value = ("--image", "--video")

    def parse_args(self, ctx, args):
        try:
            args = verbose_values(expand_multi_value(args, self.multi_value))
        except click.UsageError as error:
            error.ctx = ctx
            raise
        return super().parse_args(ctx, args)


def expand_multi_value(args: list, flags) -> list:
    """``--image a b --prompt x`` -> ``--image a --image b --prompt x``: values run until the
    next option (anything starting with ``-``, except ``-`` itself).

    Raises:
        click.UsageError: a flag followed by no value.
    """
    expanded, flag, taken = [], None, 0
    for arg in args:
        if flag and not (arg.startswith("-") and arg != "-"):
            expanded += [flag, arg]
            taken += 1
            continue
        if flag and not taken:
            break
        flag, taken = (arg, 0) if arg in flags else (None, 0)
        if flag is None:
            expanded.append(arg)
    if flag and not taken:
        raise click.UsageError(f"Option '{flag}' needs at least one value.")
    return expanded


def verbose_values(args: list) -> list:
    """mlx-lm's ``--verbose True`` / ``--verbose False`` (a value, where ours is a flag)."""
    out = []
    for arg in args:
        if out and out[-1] == "--verbose" and arg.lower() in ("true", "false"):
            if arg.lower() == "false":
                out.pop()
            continue
        out.append(arg)
    return out


def model_options(command):
    for option in reversed([
        click.option("--model", "model_path", required=True,
                     help="Local model folder or Hugging Face repo id."),
        click.option("--revision", default=None, help="Hub revision (branch, tag or commit)."),
        click.option("--min-pixels", type=int, default=None, help="Smallest image area (pixels)."),
        click.option("--max-pixels", type=int, default=None,
                     help="Largest image area (pixels); caps the tokens per image."),
        click.option("--fps", "video_fps", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Frames sampled per second of video (default: the preprocessor's, 2)."),
        click.option("--video-max-frames", type=click.IntRange(min=1), default=None,
                     help="Most frames sampled from one video."),
        click.option("--max-tokens", "-m", type=click.IntRange(min=1), default=512, show_default=True),
        click.option("--temp", "--temperature", "temperature", type=float, default=None,
                     help="Sampling temperature (default: generation_config.json, else greedy)."),
        click.option("--top-p", type=float, default=None,
                     help="Nucleus sampling: keep the most likely tokens up to this mass, in (0, 1]."),
        click.option("--top-k", type=int, default=None, help="Keep the k most likely tokens (0: off)."),
        click.option("--min-p", type=float, default=0.0,
                     help="Drop tokens below this fraction of the top probability, in [0, 1]."),
        click.option("--repetition-penalty", type=float, default=None,
                     help="Penalty over the whole prompt and answer, as transformers."),
        click.option("--seed", type=int, default=None, help="Random seed for sampling (0 or more)."),
        click.option("--stop", "stop", multiple=True,
                     help="Stop at this text, which is not printed (repeatable)."),
        click.option("--max-kv-size", type=int, default=None, help="Rotating KV cache size."),
        click.option("--kv-bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default=None,
                     callback=lambda ctx, param, value: None if value is None else int(value),
                     help="Quantize the KV cache to these bits."),
        click.option("--kv-group-size", type=click.Choice(["32", "64", "128"]), default=None,
                     callback=lambda ctx, param, value: None if value is None else int(value),
                     help="Group size of --kv-bits (default: 64, or the largest dividing the head size)."),
        click.option("--quantized-kv-start", type=click.IntRange(min=0), default=5000, show_default=True,
                     help="Tokens in the cache before --kv-bits quantizes it (as mlx-lm)."),
        click.option("--prefill-step-size", type=click.IntRange(min=1), default=2048, show_default=True,
                     help="Prompt tokens per prefill step."),
        click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="auto", show_default=True,
                     help="Compute dtype: auto is float32 on a Linux CPU, else the checkpoint's."),
        click.option("--verbose", is_flag=True, help="Print statistics (as mlx-lm) and load details."),
        click.option("--parallel", type=click.Choice(["tensor", "pipeline"]), default="tensor", show_default=True,
                     help="Under mlx.launch: split the model by tensor or by pipeline parallelism "
                          "(ignored in one process)."),
        click.option("--system", "--system-prompt", "system", default=None, help="System prompt."),
    ]):
        command = option(command)
    return command


def check_options(options: dict) -> None:
    """The sampling options' ranges, before anything is loaded (InputError, one line)."""
    from .generate import check_sampling

    check_sampling(**{key: options[key] for key in ("temperature", "top_p", "top_k", "min_p",
                                                    "repetition_penalty", "seed")})


def sampling_kwargs(options: dict) -> dict:
    keys = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed",
            "stop", "kv_bits", "kv_group_size", "quantized_kv_start", "prefill_step_size")
    return {key: options[key] for key in keys}


def start_distributed():
    """Under mlx.launch with several processes: the group, the failure guard installed, and
    only rank 0 printing (the others' output goes nowhere; their failures still print one
    line). None in one process, where nothing changes."""
    import os

    from .distributed import FailureGuard, world_group

    group = world_group()
    if group is None:
        return None
    FailureGuard(group).install()
    if group.rank() != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    return group


def finish_distributed(group) -> None:
    """Every rank waits for the others' last collectives before exiting."""
    if group is not None:
        distributed_guard().finish()


def load_for_cli(model_path: str, verbose: bool, dtype: str, revision=None, group=None, parallel="tensor"):
    """Load as ``load`` does; notices (float32 does not fit, ...) become one ``note:`` line each,
    and ``--verbose`` adds the BLAS in use and the config values taken from defaults. With a
    ``group``: this rank's part (``parallel``), and a processor whose media rank 0 reads."""
    import warnings

    import mlx.core as mx

    from . import _blas
    from .loading import DtypeFallbackWarning, load

    if verbose:
        click.echo(f"[blas] {_blas.blas_info()}", err=True)
    dtype = DTYPES[dtype]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DtypeFallbackWarning)
        model, processor = load(model_path, dtype=getattr(mx, dtype) if dtype not in (None, "auto") else dtype,
                                revision=revision, group=group, parallel=parallel)
    if group is not None:
        from .distributed import RankZeroProcessor

        processor = RankZeroProcessor(processor, group)
    for warning in caught:
        if issubclass(warning.category, DtypeFallbackWarning):
            click.echo(f"note: {warning.message}", err=True)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    if verbose and model.args.defaulted:
        taken = ", ".join(f"{key}={value}" for key, value in model.args.defaulted.items())
        click.echo(f"[config] not in config.json, defaults taken: {taken}", err=True)
    return model, processor


def read_prompt(prompt: str) -> str:
    """``--prompt -`` reads the prompt from stdin, as mlx-lm does."""
    if prompt != "-":
        return prompt
    text = sys.stdin.read()
    if not text.strip():
        raise QwenVLError("--prompt - read an empty prompt from stdin")
    return text


def image_notices(processor, images, min_pixels, max_pixels) -> None:
    """A one-line notice for each large image: its cost in tokens and how to cap it."""
    for image in images:
        tokens = processor.image_tokens(image, min_pixels=min_pixels, max_pixels=max_pixels)
        if tokens > LARGE_IMAGE_TOKENS:
            click.echo(
                f"note: {image} becomes {tokens} vision tokens; --max-pixels caps it "
                f"(e.g. --max-pixels 1003520 for at most 1280 tokens)",
                err=True,
            )


def stats_line(response) -> str:
    return (
        f"prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tok/s | "
        f"generation: {response.generation_tokens} tokens, {response.generation_tps:.1f} tok/s | "
        f"peak memory: {response.peak_memory:.2f} GB"
    )


PROGRESS_MIN_TOKENS = 2048  # shorter prefills finish before a progress line would help


class PrefillProgress:
    """``prompt_progress_callback`` for the terminal: ``prefill N/M tokens, X tok/s`` on stderr,
    rewritten in place and erased when the answer starts; silent when stderr is not a terminal."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.tic, self.shown = time.perf_counter(), False

    def __call__(self, processed: int, total: int) -> None:
        if not self.enabled or total < PROGRESS_MIN_TOKENS:
            return
        if processed == 0:
            self.tic = time.perf_counter()
        elif processed < total:
            rate = processed / max(time.perf_counter() - self.tic, 1e-9)
            self.stream.write(f"\rprefill {processed}/{total} tokens, {rate:.0f} tok/s")
            self.stream.flush()
            self.shown = True
        elif self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


class LazyGroup(click.Group):
    """Subcommands defined in other modules, imported only when run, so ``--help`` and the
    other commands do not pay for them."""

    lazy = {"chat": ("mlx_qwenvl.cli_chat", "chat", "An interactive chat that remembers images across turns."),
            "server": ("mlx_qwenvl.server", "server_command",
                       "An OpenAI-compatible server (/v1/chat/completions) that keeps conversations cached.")}

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self.lazy})

    def main(self, *args, **kwargs):
        """As click's, but a usage error is one line (``error: ...``, exit 2), like every other
        error of the CLI, and Ctrl-C outside a command exits 130 without click's 'Aborted!'."""
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as error:
            command = error.ctx.command_path if error.ctx is not None else "mlx-qwenvl"
            click.echo(f"error: {error.format_message()} (see {command} --help)", err=True)
            sys.exit(2)
        except click.ClickException as error:
            click.echo(f"error: {error.format_message()}", err=True)
            sys.exit(error.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt):
            click.echo(err=True)
            sys.exit(130)
        except click.exceptions.Exit as done:
            sys.exit(done.exit_code)

    def get_command(self, ctx, name):
        if name in self.lazy and name not in self.commands:
            module, attribute, _ = self.lazy[name]
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter):
        rows = [(name, self.lazy[name][2] if name in self.lazy and name not in self.commands
                 else self.commands[name].get_short_help_str(formatter.width - 6 - len(name)))
                for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-qwenvl", message="mlx-qwenvl %(version)s")
def main():
    """Qwen2.5-VL on MLX: chat with images and videos on-device."""


@main.command(cls=PeerCommand)
@model_options
@click.option("--image", "images", multiple=True,
              help="Image path or URL (several after one flag, or repeat the flag).")
@click.option("--video", "videos", multiple=True, help="Video file or folder of frames (as --image).")
@click.option("--prompt", "-p", required=True, help="The question or instruction; - reads stdin.")
@friendly_errors
def generate(model_path, revision, images, videos, prompt, system, verbose, max_kv_size, min_pixels,
             max_pixels, video_fps, video_max_frames, dtype, parallel, **options):
    """Answer one prompt, streaming the answer to stdout."""
    from .generate import statistics, stream_generate

    check_options(options)
    group = start_distributed()
    if group is None:
        prompt = read_prompt(prompt)
    else:  # rank 0 reads stdin; every rank gets the same prompt
        from .distributed import from_rank_zero

        prompt = from_rank_zero(lambda: read_prompt(prompt), group)
    model, processor = load_for_cli(model_path, verbose, dtype, revision, group, parallel)
    image_notices(processor, images, min_pixels, max_pixels)
    content = [{"type": "image", "image": image} for image in images]
    content += [{"type": "video", "video": video} for video in videos]
    messages = ([{"role": "system", "content": system}] if system else [])
    messages.append({"role": "user", "content": content + [{"type": "text", "text": prompt}]})
    if verbose:
        click.echo("=" * 10)
    response = None
    for response in stream_generate(model, processor, messages, max_kv_size=max_kv_size,
                                    min_pixels=min_pixels, max_pixels=max_pixels, video_fps=video_fps,
                                    video_max_frames=video_max_frames,
                                    prompt_progress_callback=PrefillProgress(), **sampling_kwargs(options)):
        click.echo(response.text, nl=False)
        sys.stdout.flush()
    finish_distributed(group)
    click.echo()
    if verbose and response is not None:
        click.echo("=" * 10)
        click.echo(statistics(response))


CONVERT_DTYPES = ("float16", "bfloat16", "float32")


class ConvertProgress:
    """convert's ``progress(done, total, name)`` on stderr, in bytes written: one updating line
    (and the tensor being written) on a terminal, a line every 5% in logs and pipes."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last_step, self.last_time, self.start = -1, 0.0, time.time()

    def __call__(self, done: int, total: int, name: str) -> None:
        from .convert_plan import human_bytes

        fraction = done / total if total else 1.0
        line = f"[convert] {fraction * 100:5.1f}%  {human_bytes(done)} / {human_bytes(total)}"
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


@main.command("convert", short_help="Convert a Qwen2.5-VL checkpoint into an MLX folder, optionally quantized.",
              context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--hf-path", required=True, help="Hugging Face repo id or local folder to convert.")
@click.option("--mlx-path", default="mlx_model", show_default=True, help="Output folder.")
@click.option("--dtype", type=click.Choice(CONVERT_DTYPES), default=None,
              help="Weight dtype (default: the source's; dequantizing: its 16-bit dtype).")
@click.option("-q", "--quantize", is_flag=True, help="Quantize the language model.")
@click.option("--q-bits", type=click.Choice([str(b) for b in BITS]), default=None,
              help="Bits per weight (default: the mode's; affine 4).")
@click.option("--q-group-size", type=click.Choice([str(g) for g in GROUP_SIZES]), default=None,
              help="Weights per quantization group (default: the mode's; affine 64).")
@click.option("--q-mode", type=click.Choice(list(MODES)), default="affine", show_default=True,
              help=f"Quantization mode: {modes_help()}.")
@click.option("--quant-predicate", type=click.Choice(list(RECIPES)), default=None,
              help="Mixed-precision recipe (affine): mixed_<low>_<high> bits per layer, chosen as mlx-lm does.")
@click.option("--quantize-vision", is_flag=True,
              help="Quantize the vision tower too (default: it stays 16-bit, being the most sensitive).")
@click.option("-d", "--dequantize", is_flag=True, help="Turn a quantized MLX folder back into 16-bit.")
@click.option("--upload-repo", default=None, help="Hugging Face repo to upload the result to.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@friendly_errors
def convert_command(hf_path, mlx_path, dtype, quantize, q_bits, q_group_size, q_mode, quant_predicate,
                    quantize_vision, dequantize, upload_repo, force):
    """Convert a Qwen2.5-VL checkpoint into an MLX folder (mlx-community layout), optionally quantized.

    AWQ and GPTQ (without act-order) checkpoints convert exactly, as they are."""
    from .convert import convert
    from .convert_folder import terminate_as_interrupt
    from .errors import ConversionInterrupted

    with terminate_as_interrupt():
        progress = ConvertProgress()
        try:
            convert(hf_path, mlx_path, dtype=dtype, quantize=quantize, q_bits=None if q_bits is None else int(q_bits),
                    q_group_size=None if q_group_size is None else int(q_group_size), q_mode=q_mode,
                    quant_predicate=quant_predicate, quantize_vision=quantize_vision, dequantize=dequantize,
                    upload_repo=upload_repo, force=force, progress=progress,
                    log=lambda message: click.echo(message, err=True))
        except KeyboardInterrupt as error:  # before the writing starts, or a plain one: said as one line too
            if isinstance(error, ConversionInterrupted):
                raise
            raise ConversionInterrupted("conversion interrupted") from None


# The chat command and its loop live in cli_chat, imported when used; their names are found here too.
CHAT_NAMES = ("chat", "CHAT_HELP", "chat_step", "read_line", "run_chat_command", "media_count", "answer_turn")


def __getattr__(name):
    if name in CHAT_NAMES:
        return getattr(importlib.import_module("mlx_qwenvl.cli_chat"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
