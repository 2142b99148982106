"""User-facing errors: one line naming the file or key and what to do, no traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem with the user's input (data, config, checkpoint), reported as one line."""


def first_line(err: BaseException | str, limit: int = 200) -> str:
    """The first line of an error's text, cut to `limit` characters: enough to say what went
    wrong inside a one-line message of ours."""
    lines = str(err).strip().splitlines()
    return lines[0][:limit] if lines else type(err).__name__


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap an entry point so a UserError prints `error: ...` and exits 2 instead of a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
