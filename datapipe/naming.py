"""A named registry: names -> objects, where each was registered, and the closest names.

Both of datapipe's registries are one of these: recipes (``datapipe.registry``) and the
Module classes checkpoints name (``datapipe.trainer.module``). Each owner keeps its own
rules (what a name may be, what counts as registering twice, its error types); this
holds the dict, the origins, the wildcard listing, the "did you mean" hint and the
declared-but-not-yet-imported objects.

Declared objects are ``importlib.metadata.EntryPoint``\\ s: the owner's built-ins, given
as data (name -> ``"module:attr"``) so the registry never imports the modules that
register into it, and the entry-point group of installed packages. Both load the same
way, on demand; a built-in wins over an installed package's entry point of its name.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


def suggest(name: object, known: Iterable[str]) -> str:
    """``"; did you mean a, b?"`` naming up to three close names, or ``""``."""
    close = difflib.get_close_matches(str(name), list(known), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else ""


class Registry(Generic[T]):
    """Registered objects by name, each with its origin, plus declared ones not loaded yet."""

    def __init__(self, group: str, builtins: Mapping[str, str] | None = None) -> None:
        self.group = group  # the entry-point group installed packages declare into
        self.builtins = dict(builtins or {})  # name -> "module:attr"
        self._items: dict[str, T] = {}
        self._origins: dict[str, str] = {}

    def copy(self) -> Registry[T]:
        """An independent registry with the same contents (tests restore the original)."""
        other = Registry[T](self.group, self.builtins)
        other._items = dict(self._items)
        other._origins = dict(self._origins)
        return other

    def add(self, name: str, item: T, origin: str) -> None:
        """Register ``item`` as ``name``; the owner has already refused a clash."""
        self._items[name] = item
        self._origins[name] = origin

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def get(self, name: str) -> T | None:
        return self._items.get(name)

    def origin(self, name: str) -> str | None:
        """Where ``name`` was registered from, or None if it is not registered."""
        return self._origins.get(name)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def declared(self, installed: bool = True) -> dict[str, EntryPoint]:
        """Objects known by where they are, not loaded: the built-ins, then (unless
        ``installed=False``) the entry points of installed packages."""
        found = {n: EntryPoint(n, v, self.group) for n, v in self.builtins.items()}
        for entry in entry_points(group=self.group) if installed else ():
            found.setdefault(entry.name, entry)
        return found

    def names(self, pattern: str = "*", declared: bool = True) -> list[str]:
        """Names matching a shell-style wildcard, sorted; the declared ones too unless
        ``declared=False``."""
        names = set(self._items) | (set(self.declared()) if declared else set())
        return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))

    def suggest(self, name: object, declared: bool = True) -> str:
        """The "did you mean" hint for a name that is not here, among the known names."""
        return suggest(name, self.names(declared=declared))


def load_declared(entry: EntryPoint, error: type[Exception]) -> object:
    """The object ``entry`` names, imported; ``error`` (one line) if importing fails."""
    try:
        return entry.load()
    except Exception as e:
        raise error(f"entry point {entry.name!r} ({entry.value}) of {entry.group} failed "
                    f"to load: {type(e).__name__}: {e}") from e
