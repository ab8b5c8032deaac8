"""Recipe names -> factories that build DataModules: a dict and a few functions.

    @datapipe.register("my-data")
    def my_data(**overrides) -> DataModule: ...

    dm = datapipe.load("my-data", batch_size=64)   # keyword overrides beat defaults
    datapipe.list_recipes("*mnist*")

Recipes come from three places, looked at lazily on first use: the built-ins (declared
below as data, name -> "module:attr", so this module never imports the DataModules that
use it), the ``datapipe.recipes`` entry-point group of installed packages, and recipe
files (``*.py``) in the folders named by ``--recipes`` or $DATAPIPE_RECIPES
(``os.pathsep``-separated).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datapipe.cache import check_name
from datapipe.errors import CacheError, RecipeError, UnknownRecipeError
from datapipe.naming import Registry, load_declared

ENTRY_POINT_GROUP = "datapipe.recipes"
RECIPES_ENV = "DATAPIPE_RECIPES"

BUILTINS = {
    "mnist": "datapipe.datamodules.mnist:MNISTDataModule",
    "cifar10": "datapipe.datamodules.cifar:CIFAR10DataModule",
    "cifar100": "datapipe.datamodules.cifar:CIFAR100DataModule",
    "imagenet": "datapipe.datamodules.imagenet:ImageNetDataModule",
}

_recipes: Registry[Callable[..., Any]] = Registry(ENTRY_POINT_GROUP, BUILTINS)
_discovered = False


def _origin_of(factory: Callable[..., Any]) -> str:
    """Where a factory was defined, as "file:line" (cheap: no source parsing)."""
    code = getattr(factory, "__code__", None)
    if code is not None:
        return f"{code.co_filename}:{code.co_firstlineno}"
    module = sys.modules.get(getattr(factory, "__module__", ""), None)
    where = getattr(module, "__file__", None) or getattr(factory, "__module__", "?")
    return f"{where} ({getattr(factory, '__qualname__', factory)!s})"


def register(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register a factory (a function or DataModule class) under ``name``.

    ``name`` is a plain name (see cache.check_name): it names folders in the cache.
    """
    try:
        check_name(name, "recipe name")
    except CacheError as e:
        raise RecipeError(str(e)) from None

    def decorate(factory: Callable[..., Any]) -> Callable[..., Any]:
        origin = _origin_of(factory)
        known = _recipes.origin(name)
        if known is not None and known != origin:
            raise RecipeError(
                f"recipe {name!r} is registered twice: at {known} and at {origin}; "
                "rename one of them"
            )
        _recipes.add(name, factory, origin)
        return factory

    return decorate


def _import_recipe_file(path: Path) -> None:
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    module_name = f"datapipe_recipes_{path.stem.replace('-', '_')}_{digest}"
    if module_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise RecipeError(f"cannot import recipe file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except RecipeError:
        del sys.modules[module_name]
        raise
    except Exception as e:
        del sys.modules[module_name]
        raise RecipeError(
            f"recipe file {path} failed to import: {type(e).__name__}: {e}"
        ) from e


def load_recipe_dir(folder: str | os.PathLike) -> None:
    """Import every ``*.py`` in ``folder`` (not starting with _), registering its recipes."""
    path = Path(folder)
    if not path.is_dir():
        raise RecipeError(f"recipe folder {path} does not exist or is not a folder")
    for file in sorted(path.glob("*.py")):
        if not file.name.startswith("_"):
            _import_recipe_file(file)


def _discover() -> None:
    """Register the built-ins, entry points and $DATAPIPE_RECIPES folders, once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    # A built-in name registered by someone else is a clash; an entry point whose name is
    # taken (by a built-in, or registered while loading) is passed over.
    for entry in _recipes.declared().values():
        builtin = entry.name in BUILTINS
        if builtin or entry.name not in _recipes:
            factory = load_declared(entry, RecipeError)
            if builtin or entry.name not in _recipes:
                register(entry.name)(factory)
    for folder in filter(None, os.environ.get(RECIPES_ENV, "").split(os.pathsep)):
        load_recipe_dir(folder)


def list_recipes(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style wildcard, sorted."""
    _discover()
    return _recipes.names(pattern, declared=False)


def get_factory(name: str) -> Callable[..., Any]:
    """The factory registered under ``name``; UnknownRecipeError suggests close names."""
    check_name(name)  # a path is never a name: say so rather than "unknown recipe"
    _discover()
    factory = _recipes.get(name)
    if factory is None:
        raise UnknownRecipeError(
            f"unknown recipe {name!r}{_recipes.suggest(name, declared=False)} "
            f"(known: {', '.join(_recipes.names(declared=False))}; "
            "add your own with --recipes DIR)"
        )
    return factory


def load(name: str, **overrides: Any) -> Any:
    """Build the DataModule registered as ``name``; keyword overrides beat its defaults."""
    factory = get_factory(name)
    try:
        module = factory(**overrides)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise RecipeError(f"recipe {name!r} does not take that option: {e}") from None
        raise
    if hasattr(module, "_made_by"):  # a DataModule: its hparams are the factory's arguments
        module._made_by = (factory, (), overrides)
    return module
