"""The named registry both registries are made of: listing, hints, declared objects."""

from __future__ import annotations

import sys

import pytest

from datapipe.errors import ConfigError
from datapipe.naming import Registry, load_declared, suggest


def test_suggest_names_the_close_names_or_nothing():
    assert suggest("mnsit", ["mnist", "cifar10"]) == "; did you mean mnist?"
    assert suggest("zzz", ["mnist", "cifar10"]) == ""


def test_declared_names_are_listed_before_anything_is_imported(monkeypatch):
    monkeypatch.delitem(sys.modules, "json.tool", raising=False)
    names = Registry("datapipe.tests-none", {"tool": "json.tool:main"})
    names.add("mine", len, "here:1")
    assert names.names() == ["mine", "tool"]
    assert names.names("t*") == ["tool"] and names.names(declared=False) == ["mine"]
    assert "tool" not in names and "json.tool" not in sys.modules
    assert names.suggest("tol") == "; did you mean tool?"
    entry = names.declared()["tool"]
    assert load_declared(entry, ConfigError) is sys.modules["json.tool"].main


def test_a_declared_object_that_fails_to_import_is_one_line_of_the_owners_error():
    entry = Registry("g", {"gone": "no_such_module_anywhere:thing"}).declared()["gone"]
    with pytest.raises(ConfigError, match=r"^entry point 'gone' \(no_such_module_anywhere:"
                                          r"thing\) of g failed to load: ModuleNotFoundError"):
        load_declared(entry, ConfigError)


def test_a_copy_is_independent_of_its_original():
    names = Registry("g")
    names.add("a", 1, "x:1")
    other = names.copy()
    other.add("b", 2, "x:2")
    assert names.names() == ["a"] and other.names() == ["a", "b"]
    assert other.origin("a") == "x:1" and names.get("b") is None
