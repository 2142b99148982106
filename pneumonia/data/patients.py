"""Patient ids from Kermany file names, so that no patient lands on both sides of a split."""

from __future__ import annotations

import os
import re

# Kermany names carry the patient before the per-image counters:
#   person1000_bacteria_2931.jpeg, person447_virus_921_1.jpeg      -> person1000, person447
#   IM-0115-0001.jpeg, IM-0629-0001-0003.jpeg                       -> IM-0115, IM-0629
#   NORMAL2-IM-1427-0001.jpeg                                       -> NORMAL2-IM-1427
# NORMAL2-IM-n and IM-n are different series in the source data, so the prefix is kept.
_PATTERNS = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),
    re.compile(r"^((?:NORMAL\d*-)?IM-\d+)-\d", re.IGNORECASE),
)


def patient_id(filename: str) -> str:
    """The patient a Kermany image belongs to; the file stem when the name has no known pattern."""
    stem = os.path.splitext(os.path.basename(filename))[0]
    for pattern in _PATTERNS:
        match = pattern.match(stem)
        if match:
            return match.group(1)
    return stem
