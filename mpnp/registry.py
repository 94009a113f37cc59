"""One registry type for every pluggable kind (sensors, encoders, connectors, context policies,
power monitors, model backends).

A :class:`Registry` maps names to factories; built-in entries may live in modules that are
imported only when a name is first looked up or listed (heavy ones import torch). Every
registry raises the same errors: :class:`UnknownNameError` (a ``ValueError``) naming the
known names, and ``ValueError`` for a name registered twice.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """A name no registry entry has; the message lists the known ones."""

    def __init__(self, what: str, name: str, known: Iterable[str]) -> None:
        self.what, self.name, self.known = what, name, sorted(known)
        super().__init__(f"unknown {what} {name!r}; known: {', '.join(self.known) or 'none'}")


class Registry(Generic[T]):
    """Named factories of ``T``.

    Args:
        what: what an entry is, for messages (``"connector"``, ``"power monitor"`` ...).
        builtin_modules: modules whose import registers the built-in entries, loaded on the
            first :meth:`get` / :meth:`names`.
        lazy: name -> module for entries registered only when that name is asked for
            (listed by :meth:`names` without importing them).
    """

    def __init__(self, what: str, builtin_modules: Iterable[str] = (),
                 lazy: Mapping[str, str] | None = None) -> None:
        self.what = what
        self._entries: dict[str, T] = {}
        self._builtin_modules = tuple(builtin_modules)
        self._lazy = dict(lazy or {})
        self._loaded = False

    def register(self, name: str, entry: T) -> T:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.what} name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a test that registers an entry of its own cleans up with this);
        an unknown name is ignored."""
        self._entries.pop(name, None)

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@registry.decorator("name")`` registers the decorated class or function."""
        return lambda entry: self.register(name, entry)

    def load(self) -> None:
        """Import the built-in modules now (a registration that must see the built-ins first,
        to report a clash with one, calls this)."""
        self._load()

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._builtin_modules:
                importlib.import_module(module)

    def get(self, name: str) -> T:
        self._load()
        if name not in self._entries and name in self._lazy:
            importlib.import_module(self._lazy[name])
        if name not in self._entries:
            raise UnknownNameError(self.what, name, self.names())
        return self._entries[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(set(self._entries) | set(self._lazy))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()
