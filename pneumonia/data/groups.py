"""Subgroups of a validation set: the groupings its file names carry.

A model that is good on average can be poor on one kind of image ("hidden stratification",
Oakden-Rayner et al., CHIL 2020). Kermany's file names carry such a grouping: the NORMAL
images come as `IM-0115-0001.jpeg` and `NORMAL2-IM-1427-0001.jpeg` (two numbering series,
two batches of collection), the PNEUMONIA ones as `person1_bacteria_1.jpeg` and
`person1_virus_1.jpeg`. A file-name family is a name with its numbers and punctuation taken
out: those four families, and one family for names without such a pattern.
"""

from __future__ import annotations

import re

# Groups smaller than this are folded into "other": a figure on a handful of images says
# nothing, and its interval would span most of [0, 1].
MIN_GROUP = 20
OTHER = "other"


def file_family(name: str) -> str:
    """`NORMAL2-IM-1427-0001.jpeg` -> "NORMAL-IM", `person1_virus_1.jpeg` -> "person-virus":
    the letters of the file name's words, without the extension, numbers or a shift's
    "#kind" suffix (the shift validation names its images `<name>#<kind>`)."""
    stem = name.split("#", 1)[0].rsplit("/", 1)[-1]
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    words = [w for w in re.split(r"[^A-Za-z]+", stem) if w]
    return "-".join(words) or OTHER


def family_groups(names: list[str], min_size: int | None = None) -> dict[str, list[int]]:
    """Family -> the indices of its images, largest first; families under `min_size` images
    pooled as "other" (left out while that too holds fewer). Empty when the names carry no
    grouping (one family only)."""
    min_size = MIN_GROUP if min_size is None else min_size
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(file_family(name), []).append(i)
    small = [f for f, index in groups.items() if len(index) < min_size]
    pooled = sorted(i for f in small for i in groups.pop(f))
    if len(pooled) >= min_size:  # else too few to say anything about: left out
        groups[OTHER] = pooled
    if len(groups) < 2:
        return {}
    return dict(sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])))
