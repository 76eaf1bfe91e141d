"""The core library has no import cycle: not between modules, not between the siblings
of any package (fedmodel.training and fedmodel.privacy may not import each other, even
through different modules). Imports inside functions count: grimp reads every import
statement. fedmodel.cli, the face that imports the roles, is left out; its place above
them is tests/test_layers.py's contract.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

import grimp
import pytest

CORE = "fedmodel"
LEFT_OUT = "fedmodel.cli"

Import = tuple[str, str]  # (importer, imported)


def import_cycles(package: str = CORE) -> set[tuple[str, ...]]:
    """Every group of modules, and every group of siblings in one package, that import
    each other in a loop (each group sorted)."""
    graph = grimp.build_graph(package, cache_dir=None)
    modules = {m for m in graph.modules if m != LEFT_OUT and not m.startswith(LEFT_OUT + ".")}
    imports = {
        (importer, imported)
        for importer in modules
        for imported in graph.find_modules_directly_imported_by(importer)
        if imported in modules and imported != importer
    }
    cycles = _loops(modules, imports)
    for parent in {module.rpartition(".")[0] for module in modules}:
        children = {module for module in modules if module.rpartition(".")[0] == parent}
        between = {(_within(a, children), _within(b, children)) for a, b in imports}
        cycles |= _loops(children, {(a, b) for a, b in between if a and b and a != b})
    return cycles


def _within(module: str, children: Iterable[str]) -> str | None:
    """The child (a module or a subpackage) that `module` is or lies in, if any."""
    return next((c for c in children if module == c or module.startswith(c + ".")), None)


def _loops(nodes: set[str], edges: set[Import]) -> set[tuple[str, ...]]:
    """The strongly connected groups of more than one node."""
    reach = {node: _reachable(node, edges) for node in nodes}
    return {
        tuple(sorted(other for other in reach[node] if node in reach[other]))
        for node in nodes
        if node in reach[node]
    }


def _reachable(start: str, edges: set[Import]) -> set[str]:
    found: set[str] = set()
    frontier = [start]
    while frontier:
        node = frontier.pop()
        for importer, imported in edges:
            if importer == node and imported not in found:
                found.add(imported)
                frontier.append(imported)
    return found


def test_the_core_library_has_no_import_cycle() -> None:
    assert import_cycles() == set()


def test_an_import_inside_a_function_that_closes_a_loop_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy of the library whose accountant imports training inside a function: the
    check names the modules and the two sibling packages the import loops through."""
    copy = tmp_path / CORE
    shutil.copytree(Path(__file__).resolve().parents[1] / CORE, copy,
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    accountant = copy / "privacy" / "accountant.py"
    accountant.write_text(
        accountant.read_text()
        + "\n\ndef _trains() -> object:\n    from fedmodel.training import train_dp\n\n"
        + "    return train_dp\n"
    )
    monkeypatch.delitem(sys.modules, CORE)  # grimp then finds the copy, first on the path
    monkeypatch.syspath_prepend(str(tmp_path))
    cycles = import_cycles()
    assert ("fedmodel.privacy", "fedmodel.training") in cycles
    assert any({"fedmodel.privacy.accountant", "fedmodel.training"} <= set(c) for c in cycles)
