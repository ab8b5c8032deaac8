"""A registry fixture for tests that load recipe files: a clean slate, nothing left after.

A recipe file is imported once per process (its module stays in sys.modules), so a test
that restores the registry must also forget the modules, or the next load of the same
folder would find them imported and register nothing.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import pytest

from datapipe import registry


def _forget_recipe_modules() -> None:
    for name in [m for m in sys.modules if m.startswith("datapipe_recipes_")]:
        del sys.modules[name]


@contextlib.contextmanager
def registry_restored(discovered: bool | None = False) -> Iterator[None]:
    """Registrations made inside vanish after it, and so do imported recipe files.

    ``discovered``: the discovery flag inside (None: as it is).
    """
    saved = (registry._recipes, registry._discovered)
    registry._recipes = saved[0].copy()
    if discovered is not None:
        registry._discovered = discovered
    _forget_recipe_modules()
    try:
        yield
    finally:
        registry._recipes, registry._discovered = saved
        _forget_recipe_modules()


@pytest.fixture
def fresh_registry():
    """Registrations made by the test vanish after it, and so do imported recipe files."""
    with registry_restored():
        yield
