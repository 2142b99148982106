"""How a run reports its progress to whoever started it, and how durations read."""

from __future__ import annotations

import math
from collections.abc import Callable

# Called with (done, total) after each epoch (centralized) or round (federated), e.g. by a
# comparison's progress display.
Progress = Callable[[int, int], None]


def duration(seconds: float) -> str:
    """`4m05s`; `?` for a time not known yet."""
    if not math.isfinite(seconds):
        return "?"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
