"""The exceptions users see: each carries a one-line message naming the input and the problem,
and the helpers that keep a message to one line."""


class QwenVLError(Exception):
    """Base class for the errors mlx_qwenvl raises on bad input or bad model folders."""


class InputError(QwenVLError, ValueError):
    """An image, video or prompt that cannot be used (missing, unreadable, too large, malformed)."""


class ModelLoadError(QwenVLError):
    """A model folder or config that cannot be loaded (missing files, weights, wrong model type)."""


class ConversionError(QwenVLError):
    """A conversion that cannot start or did not finish (nothing is left half-written)."""


class ConversionInterrupted(ConversionError, KeyboardInterrupt):
    """Ctrl-C (or SIGTERM under the CLI) during a conversion; the partial output was removed."""


def first_line(error: BaseException) -> str:
    """The first line of ``str(error)`` (stripped at both ends first); the error's type name when
    that is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def error_line(error: BaseException, plain=(QwenVLError, OSError)) -> str:
    """What a user is told of ``error``: its first line, after its type name (``ValueError:
    ...``) unless it is one of ``plain``, whose messages say what went wrong by themselves (ours,
    and the system's); the type name alone when the message is empty."""
    if isinstance(error, plain) or not str(error).strip():
        return first_line(error)
    return f"{type(error).__name__}: {first_line(error)}"


def short_list(names, limit: int = 8) -> str:
    """``a, b, c (+N more)``: at most ``limit`` of ``names``, sorted, for a one-line message."""
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
