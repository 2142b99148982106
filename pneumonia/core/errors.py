"""User-facing errors: one line naming the file or key and what to do, no traceback; and the
entry points' exit codes: 2 for bad input, 1 for a file-system failure, 130/143 for an
interruption (pneumonia.core.interrupt)."""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable
from typing import TypeVar

from pneumonia.core.interrupt import Interrupted, interrupted, signals_interrupt
from pneumonia.core.startup import startup

T = TypeVar("T")


class UserError(Exception):
    """A problem with the user's input (data, config, checkpoint), reported as one line."""


def first_line(err: BaseException | str, limit: int = 200) -> str:
    """The first line of an error's text, cut to `limit` characters: enough to say what went
    wrong inside a one-line message of ours."""
    lines = str(err).strip().splitlines()
    return lines[0][:limit] if lines else type(err).__name__


AGAIN = "run the command again"  # what continues a command that has no resume of its own


def continue_with(err: OSError, then: str) -> OSError:
    """Mark a failed read or write with the command that continues the work once the cause is
    fixed (a run's `--resume`); `os_error_line` ends with it instead of `AGAIN`."""
    # An OSError has no such field: read back with getattr(err, "continue_with", None)
    err.continue_with = then  # type: ignore[attr-defined]
    return err


def os_error_line(err: OSError) -> str:
    """One line for a failed read or write: the path, the reason, what to do."""
    path = err.filename or "a file"
    reason = err.strerror or first_line(err, 160)
    then = getattr(err, "continue_with", AGAIN)
    hint = {
        errno.ENOSPC: f"free some space, then {then}",
        errno.EDQUOT: f"free some space, then {then}",
        errno.EACCES: "change its permissions or choose a path you may write to",
        errno.EROFS: "choose a folder you may write to",
        errno.ENOTDIR: "a file stands where a folder is expected: move it or choose another path",
        errno.EISDIR: "a folder stands where a file is expected: choose another path",
    }.get(err.errno or 0, f"check the path, its permissions and the free space, then {then}")
    return f"{path}: {reason}: {hint}"


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap an entry point: it starts with the process-wide settings of `startup`; a UserError
    prints `error: ...` and exits 2, a failed read or write (OSError) exits 1 with one line
    naming the path, and SIGINT / SIGTERM exit 130 / 143 with what is saved; never a traceback
    for any of these."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        if not asks_for_help(args[0] if args and isinstance(args[0], list) else sys.argv[1:]):
            startup()  # it imports torch; a help printed from its cache needs none of it
        try:
            with signals_interrupt():
                return main(*args, **kwargs)
        except UserError as err:
            _exit(f"error: {err}", 2)
        except OSError as err:
            _exit(f"error: {os_error_line(err)}", 1)
        except Interrupted as err:
            _exit(str(err), err.exit_code)
        except (KeyboardInterrupt, SystemExit) as err:
            stopped = interrupted(err, "nothing was saved", "run the command again")
            if stopped is None:
                raise
            _exit(str(stopped), stopped.exit_code)

    return wrapper


def asks_for_help(argv: list[str]) -> bool:
    """Whether the command line asks for the help (and nothing is run)."""
    return any(arg in ("-h", "--help") for arg in argv)


def _exit(line: str, code: int) -> None:
    print(line, file=sys.stderr, flush=True)
    raise SystemExit(code) from None
