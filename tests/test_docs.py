"""The docs say what the code does: the guide's snippets run, the CLI reference is current."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fresh_registry import fresh_registry  # noqa: F401  (a fixture)

from datapipe.cli_reference import COMMAND, render

ROOT = Path(__file__).resolve().parents[1]


def python_snippets(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


@pytest.mark.usefixtures("fresh_registry")
def test_every_snippet_of_the_recipe_guide_runs_in_order(tmp_path, monkeypatch):
    guide = ROOT / "docs" / "recipes.md"
    snippets = python_snippets(guide.read_text())
    assert len(snippets) >= 8
    folder = tmp_path / "empty"
    folder.mkdir()
    monkeypatch.chdir(folder)  # as a user would: an empty folder, nothing configured
    monkeypatch.delenv("DATAPIPE_RECIPES", raising=False)
    monkeypatch.delenv("DATAPIPE_CACHE", raising=False)
    namespace = {"__name__": "recipes_guide"}
    for number, snippet in enumerate(snippets, 1):
        code = compile(snippet, f"{guide}, python snippet {number}", "exec",
                       dont_inherit=True)  # not this file's __future__ imports
        exec(code, namespace)  # a failure's traceback names the snippet


def test_the_cli_reference_matches_the_parser():
    committed = (ROOT / "docs" / "cli.md").read_text()
    assert committed == render(), (
        f"docs/cli.md is out of date with datapipe/cli.py; regenerate it: {COMMAND}")


def test_the_cli_reference_covers_every_command_and_option():
    text = render()
    for command in ("prepare", "list", "info", "train", "test"):
        assert f"### `datapipe {command}`" in text
    for option in ("--ckpt PATH", "--plot PNG", "--recipes DIR", "--no-verify"):
        assert f"`{option}" in text
