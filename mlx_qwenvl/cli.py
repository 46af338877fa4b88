"""The ``mlx-qwenvl`` command: generate, chat and convert."""

import functools
import sys

import click

from .errors import QwenVLError

DTYPES = {"auto": "auto", "checkpoint": None, "float32": "float32", "bfloat16": "bfloat16",
          "float16": "float16"}
LARGE_IMAGE_TOKENS = 4096  # a notice is printed above this many tokens for one image


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def friendly_errors(command):
    """One line on stderr and exit code 1 instead of a traceback (unless --debug)."""

    @functools.wraps(command)
    def wrapper(*args, debug=False, **kwargs):
        try:
            return command(*args, **kwargs)
        except (KeyboardInterrupt, click.exceptions.Exit, SystemExit):
            raise
        except Exception as error:  # noqa: BLE001 - the CLI's last line of defence
            if debug:
                raise
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            if isinstance(error, (QwenVLError, OSError)):
                fail(message or type(error).__name__)
            fail(f"{type(error).__name__}: {message}" if message else type(error).__name__)

    return click.option("--debug", is_flag=True, help="Show full tracebacks.")(wrapper)


def model_options(command):
    for option in reversed([
        click.option("--model", "model_path", required=True,
                     help="Local model folder or Hugging Face repo id."),
        click.option("--min-pixels", type=int, default=None, help="Smallest image area (pixels)."),
        click.option("--max-pixels", type=int, default=None,
                     help="Largest image area (pixels); caps the tokens per image."),
        click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True),
        click.option("--temp", "temperature", type=float, default=None,
                     help="Sampling temperature (default: generation_config.json, else greedy)."),
        click.option("--top-p", type=float, default=None),
        click.option("--top-k", type=int, default=None),
        click.option("--min-p", type=float, default=0.0),
        click.option("--repetition-penalty", type=float, default=None),
        click.option("--seed", type=int, default=None),
        click.option("--max-kv-size", type=int, default=None, help="Rotating KV cache size."),
        click.option("--kv-bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default=None,
                     callback=lambda ctx, param, value: None if value is None else int(value),
                     help="Quantize the KV cache to these bits."),
        click.option("--kv-group-size", type=click.Choice(["32", "64", "128"]), default="64",
                     show_default=True, callback=lambda ctx, param, value: int(value)),
        click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="auto", show_default=True,
                     help="Compute dtype: auto is float32 on a Linux CPU, else the checkpoint's."),
        click.option("--verbose", is_flag=True, help="Print statistics to stderr."),
    ]):
        command = option(command)
    return command


def sampling_kwargs(options: dict) -> dict:
    keys = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed",
            "kv_bits", "kv_group_size")
    return {key: options[key] for key in keys}


def load_for_cli(model_path: str, verbose: bool, dtype: str):
    import mlx.core as mx

    from . import _blas
    from .loading import load

    if verbose:
        click.echo(f"[blas] {_blas.blas_info()}", err=True)
    dtype = DTYPES[dtype]
    return load(model_path, dtype=getattr(mx, dtype) if dtype not in (None, "auto") else dtype)


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Qwen2.5-VL on MLX: chat with images and videos on-device."""


@main.command()
@model_options
@click.option("--image", "images", multiple=True, help="Image path or URL (repeatable).")
@click.option("--video", "videos", multiple=True, help="Video file or folder of frames (repeatable).")
@click.option("--prompt", required=True, help="The question or instruction.")
@click.option("--system", default=None, help="System prompt.")
@friendly_errors
def generate(model_path, images, videos, prompt, system, verbose, max_kv_size, min_pixels,
             max_pixels, dtype, **options):
    """Answer one prompt, streaming the answer to stdout."""
    from .generate import stream_generate

    model, processor = load_for_cli(model_path, verbose, dtype)
    image_notices(processor, images, min_pixels, max_pixels)
    content = [{"type": "image", "image": image} for image in images]
    content += [{"type": "video", "video": video} for video in videos]
    messages = ([{"role": "system", "content": system}] if system else [])
    messages.append({"role": "user", "content": content + [{"type": "text", "text": prompt}]})
    response = None
    for response in stream_generate(model, processor, messages, max_kv_size=max_kv_size,
                                    min_pixels=min_pixels, max_pixels=max_pixels,
                                    **sampling_kwargs(options)):
        click.echo(response.text, nl=False)
        sys.stdout.flush()
    click.echo()
    if verbose and response is not None:
        click.echo(stats_line(response), err=True)


CHAT_HELP = "Commands: /image PATH, /video PATH, /clear, /exit (Ctrl-D). Ctrl-C stops an answer."


@main.command()
@model_options
@click.option("--image", "images", multiple=True, help="Image(s) for the first question.")
@click.option("--system", default=None, help="System prompt.")
@friendly_errors
def chat(model_path, images, system, verbose, max_kv_size, min_pixels, max_pixels, dtype, **options):
    """An interactive chat that remembers images across turns."""
    from .chat import ChatSession

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    model, processor = load_for_cli(model_path, verbose, dtype)
    for image in images:
        processor.check_image(image)
    image_notices(processor, images, min_pixels, max_pixels)
    session = ChatSession(model, processor, system=system, max_kv_size=max_kv_size,
                          min_pixels=min_pixels, max_pixels=max_pixels)
    pending = {"images": list(images), "videos": []}
    click.echo(CHAT_HELP)
    while True:
        try:
            line = input(">> ").strip()
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo()
            continue
        if not line:
            continue
        if line.startswith("/"):
            if not run_chat_command(line, session, pending, processor, min_pixels, max_pixels):
                return
            continue
        answer_turn(session, line, pending, options)


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
    stream = session.stream(text, pending["images"], pending["videos"], **sampling_kwargs(options))
    try:
        for response in stream:
            click.echo(response.text, nl=False)
            sys.stdout.flush()
        click.echo()
    except KeyboardInterrupt:
        click.echo("\n(stopped)")
    except Exception as error:  # noqa: BLE001 - a failed turn must not end the conversation
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


def _register_convert() -> None:
    from .convert import convert_command

    main.add_command(convert_command, "convert")


_register_convert()
