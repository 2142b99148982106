"""The allowed range of every numeric config field, as types the parser enforces: a value out
of range is a one-line error naming the key and the range (`Parser key "data.batch_size": ...
0 does not conform to restriction v>0`) before anything is read or written.

Annotate a config dataclass field with one of these instead of int or float; jsonargparse
checks it when the command line or a YAML file is parsed (not when code builds the dataclass).
"""

from __future__ import annotations

import operator
import types
import typing
from dataclasses import fields, is_dataclass

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
# First-stage channels of the ResNet family (paper: 64). At most 8x the paper's, twice the
# widest published ResNet (BiT's R152x4, 256): no trained model is wider, and a file claiming
# more (65536) would have the model's builder ask for tens of GB before anything is checked.
Width = restricted_number_type("Width", int, [(">", 0), ("<=", 512)])
# Maxout pieces: Goodfellow et al. use 2 to 5; more pieces than a stage's channels only
# repeat channels, and each piece is one more pass over every activation.
MaxoutPieces = restricted_number_type("MaxoutPieces", int, [(">", 0), ("<=", 64)])
# At least 10 synthetic patients: the patient split needs some for validation.
SyntheticPatients = restricted_number_type("SyntheticPatients", int, [(">=", 10)])

_SYMBOLS = {operator.gt: ">", operator.ge: ">=", operator.lt: "<", operator.le: "<="}


def allowed(kind: type) -> str:
    """What a numeric type allows, as text: 'an integer > 0 and <= 512'."""
    limits = [f"{_SYMBOLS.get(op, op)} {b}" for op, b in getattr(kind, "_restrictions", ())]
    number = "an integer" if issubclass(kind, int) else "a number"
    return " ".join([number, " and ".join(limits)]).strip()


def out_of_range(value: object, kind: type) -> bool:
    """Whether `value` is not a number of `kind` (an int or float type, ranged or not) within
    its range."""
    number = (int,) if issubclass(kind, int) else (int, float)
    if isinstance(value, bool) or not isinstance(value, number):
        return True
    return not all(op(value, bound) for op, bound in getattr(kind, "_restrictions", ()))


def first_out_of_range(cls: type, values: dict, prefix: str) -> tuple[str, object, str] | None:
    """(dotted key, value, allowed range) of the first numeric field of `values` (dataclass
    `cls` as a dict, the way a checkpoint carries it) outside the range of its type in `cls`,
    nested dataclasses included; None when every one is in range. Values come from a file
    someone else wrote: the config's ranges hold for them as for the command line (what is
    not a dict at all is left to the dataclass, which refuses it)."""
    if not isinstance(values, dict):
        return None
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name not in values:
            continue
        kind, value, key = hints[f.name], values[f.name], f"{prefix}.{f.name}"
        if isinstance(kind, type) and is_dataclass(kind):
            bad = first_out_of_range(kind, value, key)
        else:
            kind = _numeric(kind, value)
            bad = (key, value, allowed(kind)) if kind and out_of_range(value, kind) else None
        if bad:
            return bad
    return None


def _numeric(kind: object, value: object) -> type | None:
    """The int or float type of a field annotated `kind` (T or T | None) that `value` must
    be, or None (not a numeric field, or None where None is allowed)."""
    if isinstance(kind, types.UnionType):
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None or len(inner) != 1:
            return None
        kind = inner[0]
    if not isinstance(kind, type) or isinstance(kind, types.GenericAlias):
        return None
    return kind if issubclass(kind, (int, float)) and kind is not bool else None


__all__ = [
    "AtLeastOne",
    "ClosedUnitInterval",
    "Degrees",
    "FractionBelowHalf",
    "FractionBelowOne",
    "FractionUpToOne",
    "ImageSide",
    "KernelSide",
    "MaxoutPieces",
    "NonNegativeFloat",
    "NonNegativeInt",
    "OpenUnitInterval",
    "PositiveFloat",
    "PositiveInt",
    "Seed",
    "SyntheticPatients",
    "Width",
]
