"""The converter's output folder, all or nothing: written under ``<target>.tmp-<random>`` beside
the target and renamed only when complete. Any error or Ctrl-C removes the temporary folder (and
the parents it created); an existing target is replaced (``force``) only at that last rename,
with Ctrl-C and SIGTERM held off while the folder is put in place or cleaned up. A conversion
killed outright leaves its temporary folder, marked with its pid, for the next one to remove.
"""

import os
import secrets
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from .errors import ConversionError, ConversionInterrupted, QwenVLError, first_line

MARKER = ".mlx_qwenvl_convert_in_progress"  # inside a temporary folder: the writer's pid


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
    """ConversionError (one line) for a target that is not a folder, one that is not empty
    without ``force``, and one that holds ``source``."""
    if target.exists() or target.is_symlink():
        if not target.is_dir() or target.is_symlink():
            raise ConversionError(f"{target} exists and is not a folder")
        if not force and not _is_empty_dir(target):
            raise ConversionError(f"{target} exists and is not empty; pass --force to replace it")
    if source is not None:
        resolved, src = target.resolve(), source.resolve()
        if resolved == src or resolved in src.parents:
            raise ConversionError(f"{target} holds the source checkpoint; choose another output folder")


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk ``folder`` will be on (its nearest existing ancestor's)."""
    path = folder.resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _make_parents(folder: Path) -> list:
    """Create ``folder`` and missing parents; the ones created, deepest last."""
    created = []
    for parent in reversed([folder, *folder.parents]):
        if not parent.exists():
            parent.mkdir()
            created.append(parent)
    return created


class NoInterrupts:
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


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def terminate_as_interrupt():
    """SIGTERM raises KeyboardInterrupt inside the block, so that a terminated conversion cleans
    up as Ctrl-C does (the command line's; nothing changes outside the main thread)."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _finalize(temporary: Path, target: Path, force: bool) -> None:
    with NoInterrupts():
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


@contextmanager
def atomic_folder(target: Path, force: bool):
    """A temporary folder to write into, which becomes ``target`` when the block completes.

    Raises ConversionInterrupted on Ctrl-C (KeyboardInterrupt) and ConversionError for any
    other failure, in one line naming its first line, after removing the temporary folder:
    nothing is left at ``target`` (an existing one is kept)."""
    temporary = target.with_name(f"{target.name}.tmp-{secrets.token_hex(4)}")
    created = []
    try:
        created = _make_parents(target.parent)
        temporary.mkdir()
        (temporary / MARKER).write_text(str(os.getpid()))
        yield temporary
        (temporary / MARKER).unlink()
        _finalize(temporary, target, force)
    except BaseException as error:
        with NoInterrupts():
            shutil.rmtree(temporary, ignore_errors=True)
            for folder in reversed(created):
                try:
                    folder.rmdir()
                except OSError:
                    pass
        if isinstance(error, KeyboardInterrupt):
            raise ConversionInterrupted(f"conversion interrupted; nothing was written to {target}") from None
        reason = first_line(error)
        if isinstance(error, OSError) and not isinstance(error, QwenVLError):
            reason = f"{type(error).__name__}: {reason}"
        raise ConversionError(f"conversion failed ({reason}); nothing was written to {target}") from error
