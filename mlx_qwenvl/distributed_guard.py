"""Failures under ``mlx.launch``: a failure on one rank ends every rank with one line naming the
rank, never a hang (:class:`FailureGuard`), and the stall watchdog's clock (:func:`beat`,
:func:`idle`)."""

import atexit
import os
import select
import signal
import sys
import threading
import time
from typing import Optional

from .distributed_collectives import barrier
from .errors import error_line

STALL_TIMEOUT_ENV = "MLX_QWENVL_STALL_TIMEOUT"  # seconds without progress before a rank gives up
DEFAULT_STALL_TIMEOUT = 600.0


_guard = None  # the FailureGuard of this process, if any


def beat() -> None:
    """Progress: the stall watchdog's clock restarts (each forward call, each loaded module)."""
    if _guard is not None:
        _guard.last_beat = time.monotonic()


class _Idle:
    def __enter__(self):
        if _guard is not None:
            _guard.idle += 1

    def __exit__(self, *exc):
        if _guard is not None:
            _guard.idle -= 1
            _guard.last_beat = time.monotonic()


def idle():
    """A context for waits of any length (a user typing): the stall watchdog does not count them."""
    return _Idle()


def is_lost_peer(error: BaseException) -> bool:
    """An MLX error saying a connection to another rank broke (it stopped or its link failed)."""
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "peer was lost" in text or text.startswith(("[ring]", "[jaccl]", "[mpi]")))


def neighbours(rank: int, size: int) -> str:
    """The ranks a ring rank talks to, in words: 'rank 1', 'rank 1 or rank 3'."""
    others = sorted({(rank - 1) % size, (rank + 1) % size} - {rank})
    return " or ".join(f"rank {r}" for r in others)


class FailureGuard:
    """For a command run by every rank of a group (the CLI under mlx.launch): a failure on one
    rank ends every rank, each printing at most one line, never a hang.

    - An error on this rank: ``error: rank R: message`` (``report``), exit 1. An error every
      rank raises alike (marked ``everywhere``: bad input shared from rank 0) is printed once,
      by rank 0, as without distribution.
    - A rank that dies closes its connections: MLX then fails the others' pending collective
      ("connection to a peer was lost"), reported as ``lost contact with rank K``.
      ``mlx.launch`` also ends the other ranks (SIGTERM) when one exits non-zero: the line then
      says so. MLX's own "[ring] ..." lines about the broken socket are filtered from stderr.
    - A rank that stops answering without closing its connections (a frozen process, a cut
      cable) would leave the others waiting in a collective forever: a watchdog thread ends a
      rank that makes no progress (``beat``) for ``MLX_QWENVL_STALL_TIMEOUT`` seconds (default
      600) outside ``idle()`` waits. It also ends a rank whose launcher is gone (the rank was
      reparented), which nothing else would stop.

    Threads do the ending because the main thread may be blocked inside a collective (MLX
    releases the GIL there, so they run), and ``os._exit`` because MLX's teardown can itself
    wait for a peer that is gone.
    """

    TRANSPORT_PREFIXES = (b"[ring]", b"[jaccl]", b"[mpi]")

    def __init__(self, group, stall_timeout: Optional[float] = None):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        if stall_timeout is None:
            stall_timeout = float(os.environ.get(STALL_TIMEOUT_ENV) or DEFAULT_STALL_TIMEOUT)
        self.stall_timeout = stall_timeout
        self.last_beat = time.monotonic()
        self.idle = 0
        self.reported = threading.Lock()
        self.stderr_fd = 2
        self._forwarder = None
        self._wakeup = None

    # -- setup

    def install(self) -> "FailureGuard":
        global _guard
        self._filter_stderr()
        self._watch_signals()
        threading.Thread(target=self._watch, name="mlx-qwenvl-watchdog", daemon=True).start()
        _guard = self
        return self

    def _filter_stderr(self) -> None:
        """fd 2 through a pipe whose reader drops MLX's transport lines ("[ring] Socket 3 was
        closed by the peer", printed from C++ ten times before the error reaches Python)."""
        sys.stderr.flush()
        self.stderr_fd = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)

        def forward():
            pending = b""
            while True:
                try:
                    data = os.read(read_end, 65536)
                except OSError:
                    data = b""
                if not data:
                    break
                lines = (pending + data).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if not line.startswith(self.TRANSPORT_PREFIXES):
                        os.write(self.stderr_fd, line + b"\n")
            if pending and not pending.startswith(self.TRANSPORT_PREFIXES):
                os.write(self.stderr_fd, pending)

        self._forwarder = threading.Thread(target=forward, name="mlx-qwenvl-stderr", daemon=True)
        self._forwarder.start()
        atexit.register(self._restore_stderr)

    def _restore_stderr(self) -> None:
        """fd 2 back to the real stderr; the pipe's last write end closes, so the reader
        forwards what is left and ends."""
        try:
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - a closed stderr must not stop the ending
            pass
        if self._forwarder is not None and self.stderr_fd != 2:
            os.dup2(self.stderr_fd, 2)
            self._forwarder.join(timeout=1)
            self._forwarder = None

    def _watch_signals(self) -> None:
        """SIGTERM (mlx.launch ending this rank because another exited non-zero) reaches the
        watchdog thread through signal.set_wakeup_fd, even while the main thread waits."""
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        # Python runs this handler only when the main thread is between bytecodes; the C-level
        # handler also writes the signal to the wakeup fd, which the watchdog thread reads.
        signal.signal(signal.SIGTERM, lambda *_: self.end(self._terminated_message(), 143))
        signal.set_wakeup_fd(write_end)
        self._wakeup = read_end

    def _terminated_message(self) -> str:
        return (f"terminated by SIGTERM, which mlx.launch sends once another rank "
                f"({neighbours(self.rank, self.size) if self.size == 2 else 'see its warnings'}) has ended")

    def _watch(self) -> None:
        parent = os.getppid()
        while True:
            try:
                ready, _, _ = select.select([self._wakeup], [], [], 0.5)
                if ready and signal.SIGTERM in os.read(self._wakeup, 64):
                    self.end(self._terminated_message(), 143)
                if os.getppid() != parent:  # reparented: the launcher that started this rank is gone
                    self.end("the launcher that started this rank ended", 1)
                if self.idle == 0 and time.monotonic() - self.last_beat > self.stall_timeout:
                    self.end(f"no progress for {self.stall_timeout:.0f} s: {neighbours(self.rank, self.size)} "
                             f"stopped answering ({STALL_TIMEOUT_ENV} sets this limit)", 1)
            except Exception:  # noqa: BLE001 - this thread must outlive any error, or SIGTERM is lost
                time.sleep(0.5)

    # -- ending

    def report(self, message: str, rank_prefix: bool = True) -> bool:
        """Print ``error: rank R: message`` once per process; False if a line was printed already."""
        if not self.reported.acquire(blocking=False):
            return False
        try:
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - stdout may be closed; the line still goes out
            pass
        self._restore_stderr()  # what was printed before comes first
        prefix = f"rank {self.rank}: " if rank_prefix else ""
        os.write(self.stderr_fd, f"error: {prefix}{message}\n".encode())
        return True

    def end(self, message: Optional[str], code: int = 1):
        """Report ``message`` (None: nothing) and end the process now, whatever happens while
        reporting (the launcher, and with it stderr, may be gone: a write then fails)."""
        try:
            if message is not None:
                self.report(message)
            else:
                self._restore_stderr()
        except BaseException:  # noqa: BLE001 - ending is what matters
            pass
        finally:
            os._exit(code)

    def fail(self, error: BaseException):
        """End this rank for ``error`` with its one line (see the class)."""
        text = error_line(error)
        if getattr(error, "everywhere", False):
            if self.rank == 0:
                self.report(text, rank_prefix=False)
            else:
                time.sleep(0.5)  # let rank 0 print before the launcher ends it
            self.end(None, 1)
        if is_lost_peer(error):
            self.end(f"lost contact with {neighbours(self.rank, self.size)} (it stopped or the link failed)")
        self.end(text)

    def finish(self) -> None:
        """A clean end: wait for every rank's last collectives, so that none exits while another
        still needs it."""
        with idle():
            barrier(self.group)


def current_guard() -> Optional[FailureGuard]:
    return _guard
