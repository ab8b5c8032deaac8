"""A registry fixture for tests that load recipe files: a clean slate, nothing left after.

A recipe file is imported once per process (its module stays in sys.modules), so a test
that restores the registry must also forget the modules, or the next load of the same
folder would find them imported and register nothing.
"""

from __future__ import annotations

import sys

import pytest

from datapipe import registry


def _forget_recipe_modules() -> None:
    for name in [m for m in sys.modules if m.startswith("datapipe_recipes_")]:
        del sys.modules[name]


@pytest.fixture
def fresh_registry(monkeypatch):
    """Registrations made by the test vanish after it, and so do imported recipe files."""
    monkeypatch.setattr(registry, "_recipes", registry._recipes.copy())
    monkeypatch.setattr(registry, "_discovered", False)
    _forget_recipe_modules()
    yield
    _forget_recipe_modules()
