"""Named entries a config selects: models, activations, strategies, losses, optimizers, decays.

The shape of timm's model registry (a decorator fills it, and the modules that define entries
register them when imported) with the suggestion of MONAI's `look_up_option`. Contracts:

- `register(name, **tags)` is a decorator: it records its argument under `name`, with `tags`
  as the entry's metadata (the models' `takes_width`, `takes_size`), and returns it
  unchanged. Registering a name twice is a programming error (ValueError), never a silent
  replacement.
- `names()` lists the names in registration order, or sorted for `sort=True`. Config fields
  build their `Literal[...]` types from it, so this order is the one `fit --help` shows.
- `get(name)` returns the entry. An unknown name is a one-line UserError naming the config
  key, the closest name when one is close enough, and every choice:
  `unknown optim.name 'adamww': did you mean 'adamw'? choose one of sgd, momentum, ...`
- `choices()` is that list of choices (the names, then `extra_choices`); `Registry.every()`
  gives every registry alive, so `fit --help` lists each one's choices under its config key
  (`pneumonia.run.helptext`) with nothing to add when an entry or a registry is added.
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from pneumonia.core.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered object and its metadata."""

    value: T
    tags: dict[str, object] = field(default_factory=dict)


class Registry(Generic[T]):
    """Objects by name, for the config key `key` (used in messages).

    `sort`: list the names sorted rather than in registration order. `extra_choices`: forms
    served outside the registry, listed after the names when a name is refused (the models'
    `timm/<any timm model>`).
    """

    def __init__(self, key: str, *, sort: bool = False, extra_choices: Sequence[str] = ()):
        self.key = key
        self.sort = sort
        self.extra_choices = tuple(extra_choices)
        self._entries: dict[str, Entry[T]] = {}
        _LIVE.add(self)

    @staticmethod
    def every() -> list[Registry]:
        """Every registry alive in this process (those of the modules imported so far)."""
        return list(_LIVE)

    def register(self, name: str, **tags: object) -> Callable[[T], T]:
        """Decorator: make the decorated object selectable as `name`, with `tags`."""

        def add(value: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.key} {name!r} is already registered")
            self._entries[name] = Entry(value, tags)
            return value

        return add

    def names(self, **tags: object) -> tuple[str, ...]:
        """The registered names (those whose tags have these values, if any are given)."""
        names = [
            name
            for name, entry in self._entries.items()
            if all(entry.tags.get(tag) == value for tag, value in tags.items())
        ]
        return tuple(sorted(names) if self.sort else names)

    def get(self, name: str, key: str | None = None) -> T:
        """The entry registered as `name`; `key` names the config field in the refusal when
        several fields select from this registry."""
        if name not in self._entries:
            raise UserError(self._refusal(name, key or self.key))
        return self._entries[name].value

    def choices(self) -> tuple[str, ...]:
        """What the config key accepts: the names, then the forms served outside the registry."""
        return self.names() + self.extra_choices

    def _refusal(self, name: str, key: str) -> str:
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown {key} {name!r}: {hint}choose one of {', '.join(self.choices())}"

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


# Weak: a registry made by a test goes when the test drops it.
_LIVE: weakref.WeakSet[Registry] = weakref.WeakSet()
