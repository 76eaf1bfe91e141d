"""The direction of dependencies holds, and the contract that guards it really bites.

pyproject.toml's [tool.importlinter] contracts encode the layers: the core `fedmodel`
knows no role; `server` and `client` are independent and import neither the harness
nor the CLI; only the faces, `fedmodel.cli` and `fedmodel.console` (which only the CLI
imports), import `simulations`. A contract that never fails guards nothing, so a
temporary copy of the tree gets an upward import and must fail.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedmodel", "server", "client", "simulations")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on the packages in `tree` (it puts its cwd first on sys.path), with
    the contracts of `tree`'s pyproject.toml."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache", "--no-logo"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_tree_keeps_every_layer_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "upward_import", "broken_contract"),
    [
        (
            "fedmodel/models.py",
            "import simulations.runner",
            "Only the CLI and the console import the harness",
        ),
        (
            "fedmodel/config/run_config.py",
            "import server.strategy",
            "Only the harness and the faces import a role",
        ),
        ("server/strategy.py", "import client.policy", "server and client are independent"),
        ("client/policy.py", "import fedmodel.cli.main", "Nothing imports the CLI"),
        (
            "fedmodel/privacy/audit.py",
            "import fedmodel.console.app",
            "Only the CLI imports the console",
        ),
    ],
)
def test_an_upward_import_breaks_the_contract_that_forbids_it(
    tmp_path: Path, module: str, upward_import: str, broken_contract: str
) -> None:
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{upward_import}  # injected by the test\n")

    result = lint_imports(tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    broken = [line for line in result.stdout.splitlines() if line.endswith(" BROKEN")]
    assert any(line.startswith(broken_contract) for line in broken), result.stdout
    assert upward_import.split()[1] in result.stdout  # the report names the bad import
