"""Named registries: the one idiom by which every stage is extended (docs/design.md, "Extending it").

A registry refuses a name twice, lists its names and, asked for a name it lacks, raises the error
its stage uses with the valid names in the message. Models, datasets, backends, batchers, container
engines and image flavours are each one ``Registry``.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, *, keep_order: bool = False) -> None:
        self.kind = kind  # "model", "dataset", ...: the word the error messages use
        self.keep_order = keep_order  # names() in registration order (a preference), else sorted
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise KeyError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: the decorated class or function is the entry."""
        return lambda entry: self.add(name, entry)

    def names(self) -> list[str]:
        return list(self._entries) if self.keep_order else sorted(self._entries)

    def get(self, name: str, error: Callable[[str], BaseException] = KeyError, also: tuple[str, ...] = ()) -> T:
        """The entry, or ``error("unknown KIND 'name'; valid KINDs: ...")``; ``also``: names the caller
        accepts besides the registered ones (listed first)."""
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join([*also, *self.names()])
            raise error(f"unknown {self.kind} {name!r}; valid {self.kind}s: {valid}") from None
