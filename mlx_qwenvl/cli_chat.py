"""``mlx-qwenvl chat``: an interactive chat that remembers images across turns. Loaded by the
command line only when this command runs (see cli.LazyGroup)."""

import importlib
import sys

import click

from .cli import (PeerCommand, PrefillProgress, check_options, distributed_guard, finish_distributed, friendly_errors,
                  image_notices, load_for_cli, model_options, sampling_kwargs, start_distributed, stats_line)
from .errors import QwenVLError, error_line

CHAT_HELP = "Commands: /image PATH, /video PATH, /clear, /exit (Ctrl-D). Ctrl-C stops an answer."


@click.command("chat", cls=PeerCommand)
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
        importlib.import_module("readline")  # line editing and history for input()
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
        click.echo(f"\nerror: {error_line(error, plain=QwenVLError)}", err=True)
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
