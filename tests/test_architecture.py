"""The house's floors: no import circles inside datapipe/, lazy imports included.

The graph is read from the source with ``ast``: every ``import`` and ``from ... import``
anywhere in a module (inside functions too: a lazy import is still an arrow), plus
``importlib.import_module("a.literal")``; imports under ``if TYPE_CHECKING:`` are left
out, since they never run.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "datapipe"

def _modules(package: Path) -> dict[str, Path]:
    found = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _type_checking_only(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _imported(name: str, path: Path, node: ast.AST, modules: dict[str, Path]) -> list[str]:
    """The modules an import statement (or import_module call) names.

    ``from pkg import sub`` is an arrow to ``pkg.sub`` when that is a module, else to
    ``pkg`` (the package's own ``__init__``), as tools like import-linter count them.
    """
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            base = package[: len(package) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        return [f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                for alias in node.names]
    if (isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module")
            and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)):
        return [node.args[0].value]
    return []


def _with_packages(target: str, importer: str, modules: dict[str, Path]) -> set[str]:
    """``target`` and the packages above it that importing it runs first, less those
    above ``importer`` (already running when it runs)."""
    parts = target.split(".")
    chain = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    mine = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 2)}
    return {m for m in chain - mine if m in modules}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module of ``package`` -> the modules of it that it imports (lazily or not)."""
    return {m: set(targets) for m, targets in _graph(package).items()}


@functools.cache  # parsed once per run: every test here reads the same tree
def _graph(package: Path) -> dict[str, frozenset[str]]:
    modules = _modules(package)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _type_checking_only(tree)
        for node in ast.walk(tree):
            if id(node) not in skip:
                for target in _imported(name, path, node, modules):
                    graph[name].update(_with_packages(target, name, modules))
    return {m: frozenset(targets) for m, targets in graph.items()}


def circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected groups of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        found.append(frozenset(group))
    return found


def test_the_graph_sees_lazy_imports_and_skips_type_checking_ones(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import leaf\n")
    (package / "sub" / "leaf.py").write_text("from .. import base\n")
    (package / "base.py").write_text("import os\n")
    (package / "top.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pkg import hidden\n"
        "def later():\n    from pkg.sub import leaf\n"
        "    import importlib\n    importlib.import_module('pkg.base')\n")
    (package / "hidden.py").write_text("import pkg.top\n")
    graph = import_graph(package)
    # the lazy import runs pkg/sub/__init__.py on its way to the leaf; TYPE_CHECKING: none
    assert graph["pkg.top"] == {"pkg.sub", "pkg.sub.leaf", "pkg.base"}
    assert graph["pkg.sub"] == {"pkg.sub.leaf"} and graph["pkg.sub.leaf"] == {"pkg.base"}
    assert graph["pkg.hidden"] == {"pkg.top"} and circles(graph) == []


def test_circles_finds_a_cycle_and_only_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [frozenset({"a", "b", "c"})]


def test_no_import_circles_in_datapipe():
    found = [sorted(c) for c in circles(import_graph())]
    assert not found, f"import circles in datapipe/: {found}"


def test_the_data_card_and_the_datamodule_import_neither_trainer_nor_hf_building():
    # The card is read by `datapipe info` (no torch); the DataModule exports to Hugging
    # Face through hf_export, which never builds a DataModule back.
    graph = import_graph()
    assert not {m for m in graph["datapipe.card"] if m.startswith("datapipe.trainer")}
    assert "datapipe.integrations.hf" not in graph["datapipe.datamodule"]
    assert "datapipe.datamodule" not in graph["datapipe.integrations.hf_export"]


def test_no_stage_imports_prepare_and_the_loader_imports_no_stage():
    graph = import_graph()
    stages = {m for m in graph if m == "datapipe.stages" or m.startswith("datapipe.stages.")}
    assert not {m for s in stages for m in graph[s]
                if m in ("datapipe.prepare", "datapipe.prepare_sharded")}
    assert not graph["datapipe.loader"] & stages


def test_the_registries_do_not_import_what_registers_into_them():
    graph = import_graph()
    assert not {m for m in graph["datapipe.registry"] if m.startswith("datapipe.datamodules")}
    assert "datapipe.models" not in graph["datapipe.trainer.module"]
