"""Named entries: the built-in ones of a catalog, and those registered later (a plugin's, a test's).

``models.catalog`` (networks) and ``datamodules.datasets`` (data sets) each keep one; an entry is
any object with a ``name``. Importable without torch.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Generic, Protocol, TypeVar


class Named(Protocol):
    name: str


E = TypeVar("E", bound=Named)


class Registry(Generic[E]):
    """The entries of one catalog by name, in order: the built-in ones first.

    ``kind`` names an entry in messages (``"model"``, ``"data set"``). :attr:`entries` is a live,
    read-only view; :meth:`add` and :meth:`remove` are the only ways to change it.
    """

    def __init__(self, kind: str, built_in: Iterable[E]) -> None:
        self.kind = kind
        self._entries: dict[str, E] = {entry.name: entry for entry in built_in}
        self.built_in = tuple(self._entries)
        self.entries: Mapping[str, E] = MappingProxyType(self._entries)

    def add(self, entry: E) -> E:
        """Add ``entry`` after the others; ValueError where its name is taken."""
        if entry.name in self._entries:
            raise ValueError(f"a {self.kind} named {entry.name!r} is already in the catalog")
        self._entries[entry.name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Remove a registered entry (a test's, at its end); ValueError for a built-in one."""
        if name in self.built_in:
            raise ValueError(f"{name!r} is built in and cannot be removed")
        self._entries.pop(name, None)
