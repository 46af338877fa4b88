"""The ``mlx-qwenvl`` command: generate, chat and convert."""

import functools
import importlib
import sys
import time

import click

from .errors import QwenVLError

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
    """One line on stderr and exit code 1 instead of a traceback (unless --debug). Under
    mlx.launch the line names the rank, and any failure ends this rank at once (the others
    follow: see distributed.FailureGuard)."""

    @functools.wraps(command)
    def wrapper(*args, debug=False, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            guard = distributed_guard()
            if guard is not None:  # every rank must stop at the same token: end them all
                guard.end(None, 130)
            raise
        except (click.exceptions.Exit, SystemExit):
            raise
        except Exception as error:  # noqa: BLE001 - the CLI's last line of defence
            if debug:
                raise
            if distributed_guard() is not None:
                distributed_guard().fail(error)
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            if isinstance(error, (QwenVLError, OSError)):
                fail(message or type(error).__name__)
            fail(f"{type(error).__name__}: {message}" if message else type(error).__name__)

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

    lazy = {"convert": ("mlx_qwenvl.convert", "convert_command",
                        "Convert a Qwen2.5-VL checkpoint into an MLX folder, optionally quantized."),
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


CHAT_HELP = "Commands: /image PATH, /video PATH, /clear, /exit (Ctrl-D). Ctrl-C stops an answer."


@main.command(cls=PeerCommand)
@model_options
@click.option("--image", "images", multiple=True, help="Image(s) for the first question.")
@click.option("--video", "videos", multiple=True, help="Video(s) for the first question.")
@friendly_errors
def chat(model_path, revision, images, videos, system, verbose, max_kv_size, min_pixels, max_pixels,
         video_fps, video_max_frames, dtype, parallel, **options):
    """An interactive chat that remembers images across turns."""
    from .chat import ChatSession
    from .generate import kv_group_size_for

    check_options(options)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    group = start_distributed()
    model, processor = load_for_cli(model_path, verbose, dtype, revision, group, parallel)
    for image in images:
        processor.check_image(image)
    for video in videos:
        processor.check_video(video)
    image_notices(processor, images, min_pixels, max_pixels)
    options["kv_group_size"] = kv_group_size_for(model, options["kv_bits"], options["kv_group_size"])
    session = ChatSession(model, processor, system=system, max_kv_size=max_kv_size,
                          min_pixels=min_pixels, max_pixels=max_pixels, video_fps=video_fps,
                          video_max_frames=video_max_frames)
    pending = {"images": list(images), "videos": list(videos)}
    click.echo(CHAT_HELP)
    while True:
        try:
            if not chat_step(session, pending, processor, options, min_pixels, max_pixels, group):
                finish_distributed(group)
                return
        except KeyboardInterrupt:  # at the prompt, or between a question and its answer
            if group is not None:
                raise  # the ranks cannot stop at the same token: the run ends (friendly_errors)
            click.echo()


def chat_step(session, pending, processor, options, min_pixels, max_pixels, group=None) -> bool:
    """Read one line and act on it; False means exit. Under mlx.launch rank 0 reads the
    terminal and sends each line to the others."""
    if group is None:
        line = read_line()
    else:
        from .distributed import read_turn

        line = read_turn(read_line, group)
    if line is None:
        click.echo()
        return False
    if not line:
        return True
    if line.startswith("/"):
        return run_chat_command(line, session, pending, processor, min_pixels, max_pixels)
    answer_turn(session, line, pending, options)
    return True


def read_line():
    """The next chat line: None at end of input, "" after Ctrl-C at the prompt."""
    try:
        return input(">> ").strip()
    except EOFError:
        return None
    except KeyboardInterrupt:
        click.echo()
        return ""


def run_chat_command(line, session, pending, processor, min_pixels, max_pixels) -> bool:
    """Handle a /command; False means exit."""
    command, _, argument = line.partition(" ")
    argument = argument.strip()
    if command in ("/exit", "/quit"):
        return False
    if command == "/clear":
        session.clear()
        pending["images"].clear()
        pending["videos"].clear()
        click.echo("(conversation cleared)")
    elif command in ("/image", "/video") and argument:
        kind = "images" if command == "/image" else "videos"
        try:
            if kind == "images":
                processor.check_image(argument)
                image_notices(processor, [argument], min_pixels, max_pixels)
            else:
                processor.check_video(argument)
        except QwenVLError as error:
            click.echo(f"error: {error}", err=True)
            return True
        pending[kind].append(argument)
        click.echo(f"(added {argument}; ask your question)")
    else:
        click.echo(CHAT_HELP)
    return True


def media_count(pending) -> str:
    """'1 image', '2 images and 1 video', ... for the media waiting for the next question."""
    parts = [f"{len(items)} {kind[:-1] if len(items) == 1 else kind}"
             for kind, items in pending.items() if items]
    return " and ".join(parts)


def answer_turn(session, text, pending, options) -> None:
    """Stream one answer. Attached media go with the turn once it is in the conversation; a
    turn undone (Ctrl-C during prefill, a failure) keeps or drops them, and says which."""
    response, turns, failed = None, len(session.messages), False
    stream = session.stream(text, pending["images"], pending["videos"],
                            prompt_progress_callback=PrefillProgress(), **sampling_kwargs(options))
    try:
        for response in stream:
            click.echo(response.text, nl=False)
            sys.stdout.flush()
        click.echo()
    except KeyboardInterrupt:
        if distributed_guard() is not None:
            raise  # the ranks cannot stop at the same token: the run ends (friendly_errors)
        click.echo("\n(stopped)")
    except Exception as error:  # noqa: BLE001 - a failed turn must not end the conversation
        if distributed_guard() is not None and not isinstance(error, QwenVLError):
            # Bad input fails alike on every rank (same inputs, same code) and the conversation
            # goes on; anything else (a lost rank, memory) may differ between ranks: end them.
            raise
        failed = True
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if not isinstance(error, QwenVLError):
            message = f"{type(error).__name__}: {message}"
        click.echo(f"\nerror: {message}", err=True)
        if isinstance(error, QwenVLError) and media_count(pending):  # the media may be the problem
            click.echo(f"({media_count(pending)} dropped; attach again with /image or /video)")
            pending["images"].clear()
            pending["videos"].clear()
    finally:
        stream.close()  # the session keeps what was answered so far
    if len(session.messages) > turns:  # the media went into the conversation
        pending["images"].clear()
        pending["videos"].clear()
    elif media_count(pending):
        click.echo(f"({media_count(pending)} still attached to your next question; /clear drops attachments)")
    if response is not None and not failed:
        click.echo(f"[{stats_line(response)}]", err=True)
