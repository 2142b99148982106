"""The allowed range of every numeric config field, as types the parser enforces: a value out
of range is a one-line error naming the key and the range (`Parser key "data.batch_size": ...
0 does not conform to restriction v>0`) before anything is read or written.

Annotate a config dataclass field with one of these instead of int or float; jsonargparse
checks it when the command line or a YAML file is parsed (not when code builds the dataclass).
"""

from __future__ import annotations

from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    restricted_number_type,
)

# A Generator's and NumPy's seed: 0 <= seed < 2**32.
Seed = restricted_number_type("Seed", int, [(">=", 0), ("<", 2**32)])
# Side of the square images (16 px: the smallest input every registry model reduces).
ImageSide = restricted_number_type("ImageSide", int, [(">=", 16), ("<=", 2048)])
FractionUpToOne = restricted_number_type("FractionUpToOne", float, [(">", 0), ("<=", 1)])
FractionBelowOne = restricted_number_type("FractionBelowOne", float, [(">=", 0), ("<", 1)])
FractionBelowHalf = restricted_number_type("FractionBelowHalf", float, [(">=", 0), ("<", 0.5)])
AtLeastOne = restricted_number_type("AtLeastOne", float, [(">=", 1)])
Degrees = restricted_number_type("Degrees", float, [(">=", 0), ("<=", 180)])
# Side of a random convolution's kernel: reflect padding of side // 2 must stay below the
# smallest image side (16 px), so at most 15 (RandConv's paper draws up to 7).
KernelSide = restricted_number_type("KernelSide", int, [(">=", 1), ("<=", 15)])
# At least 10 synthetic patients: the patient split needs some for validation.
SyntheticPatients = restricted_number_type("SyntheticPatients", int, [(">=", 10)])

__all__ = [
    "AtLeastOne",
    "ClosedUnitInterval",
    "Degrees",
    "FractionBelowHalf",
    "FractionBelowOne",
    "FractionUpToOne",
    "ImageSide",
    "KernelSide",
    "NonNegativeFloat",
    "NonNegativeInt",
    "OpenUnitInterval",
    "PositiveFloat",
    "PositiveInt",
    "Seed",
    "SyntheticPatients",
]
