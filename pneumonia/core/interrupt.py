"""Interruptions that end a run honestly: Ctrl-C (SIGINT) and SIGTERM (what `kill`, schedulers,
`docker stop` and CI send) stop training at once and exit 130 or 143, never 0, with the command
that continues the run.

The handler records the signal and raises KeyboardInterrupt (inside `deferred()`, only at the
next `check()`: a centralized fit stops between batches), so Lightning takes its own
graceful-shutdown path (it turns that into `sys.exit(1)`, and a SIGTERM it sees alone into a
SystemExit of code 0). The run layer then asks `received()` which signal it was and raises
`Interrupted`, which the entry points print as one line and exit 128 + the signal number with.
Every file a run writes is written atomically, so stopping at any instruction is safe.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_received: list[int] = []
_deferred: list[bool] = [False]


class Interrupted(Exception):
    """A run stopped by a signal: `saved` says what is kept, `resume` how to continue."""

    def __init__(self, signum: int, saved: str, resume: str) -> None:
        super().__init__(f"interrupted by {name(signum)}: {saved}: {resume}")
        self.signum, self.saved, self.resume = signum, saved, resume

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def _record(signum: int, frame: object) -> None:
    _received.append(signum)
    if not _deferred[0]:
        raise KeyboardInterrupt


@contextlib.contextmanager
def handlers_kept() -> Iterator[None]:
    """The SIGINT and SIGTERM handlers of now, put back on the way out: for a library call that
    installs its own (Ray's start installs a SIGTERM handler that exits without a word)."""
    if not _in_main_thread():
        yield
        return
    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in kept.items():
            if handler is not None:
                signal.signal(s, handler)


def record_signals() -> None:
    """Make SIGINT and SIGTERM only recorded again (inside `signals_interrupt`), over a handler
    a library installed since: Lightning's SIGTERM handler on several devices broadcasts from
    inside the handler, which can leave the processes waiting on each other forever."""
    if _in_main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, _record)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside, a signal is only recorded; the code stops at the next `check()`, a point where
    what it has written is consistent (a centralized fit: between batches, not between its
    checkpoint and the epoch's metrics rows)."""
    _deferred[0] = True
    try:
        yield
    finally:
        _deferred[0] = False


def check() -> None:
    """Raise KeyboardInterrupt if a signal arrived while deferred."""
    if _received:
        raise KeyboardInterrupt


def received() -> int | None:
    """The signal that interrupted this process (SIGINT for a bare Ctrl-C), or None."""
    return _received[-1] if _received else None


def name(signum: int) -> str:
    return signal.Signals(signum).name


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt while inside, and are remembered."""
    if not _in_main_thread():
        yield
        return
    with handlers_kept():
        _received.clear()
        record_signals()
        yield


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def interrupted(err: BaseException, saved: str, resume: str) -> Interrupted | None:
    """The `Interrupted` that `err` (caught around training) stands for, or None when it is
    not an interruption (a SystemExit of the program's own)."""
    signum = received()
    if signum is None and isinstance(err, KeyboardInterrupt):
        signum = signal.SIGINT  # a KeyboardInterrupt raised without our handler
    if signum is None:
        return None
    return Interrupted(int(signum), saved, resume)
