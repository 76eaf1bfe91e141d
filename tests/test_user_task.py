"""A user's own Task, in a file outside the repository, through the command line.

The task is the one docs/tasks.md shows, extracted from the page, so the page cannot
drift from what runs. Bad tasks end in one line before anything starts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import assert_epsilons_recompute

FEDMODEL = str(Path(sys.executable).parent / "fedmodel")
DOCS_PAGE = Path(__file__).parents[1] / "docs" / "tasks.md"

BATCHNORM_TASK = """
import torch
from torch import nn
from torch.utils.data import TensorDataset
from fedmodel import Task

def rows(seed):
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(64, 4, generator=generator), torch.ones(64))

task = Task(
    name="batchnorm",
    model=lambda: nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)),
    loss=lambda out, y: (out.squeeze(-1) - y).square(),
    train_data=lambda site: rows(site.partition_id),
    test_data=rows,
    metrics="regression",
)
"""


def run_cli(*args: str, cwd: Path, pythonpath: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": pythonpath}
    return subprocess.run(
        [FEDMODEL, *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def documented_task() -> str:
    """The Python block of docs/tasks.md's "The ~30 lines you write"."""
    section = DOCS_PAGE.read_text().split("## The ~30 lines you write", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], re.DOTALL)
    return code


@pytest.mark.slow
def test_a_task_outside_the_repository_trains_under_dp_and_its_audit_verifies(
    tmp_path: Path,
) -> None:
    outside = tmp_path / "my-tasks"
    outside.mkdir()
    (outside / "risk_task.py").write_text(documented_task())
    # a relative PYTHONPATH, as a user types it (Ray's workers must see it too: the Ray
    # run of tests/test_engines.py runs this task)
    common = ("--clients", "3", "--rounds", "2", "--epsilon", "1", "--baseline-sites", "2")
    result = run_cli(
        "simulate", "task", "risk_task:task", *common, "--output", "run",
        cwd=tmp_path, pythonpath="my-tasks",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["task_ref"] == "risk_task:task"
    assert summary["federation"]["task"] == "risk-score"
    assert len(summary["clients"]) == 3
    assert all(0.5 < client["epsilon"] <= 1.0 for client in summary["clients"])
    assert_epsilons_recompute(summary)
    assert summary["final"]["auroc"] > 0.8  # a learnable task, learned under DP
    assert summary["baselines"]["central"]["auroc"] > 0.8

    audit = run_cli("audit", "ledgers", "run", "--json", cwd=tmp_path, pythonpath="")
    assert audit.returncode == 0, audit.stdout[-2000:] + audit.stderr[-2000:]
    report = json.loads(audit.stdout)
    assert report["ok"] is True


def test_a_bad_task_ends_in_one_line_before_anything_starts(tmp_path: Path) -> None:
    """Through the command line once; every other refusal's wording is checked in-process
    (tests/test_task_checks.py), without paying for a CLI and its engine each time."""
    (tmp_path / "bn_task.py").write_text(BATCHNORM_TASK)
    result = run_cli(
        "simulate", "task", "bn_task:task", "--output", "run",
        cwd=tmp_path, pythonpath=str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "layer '1' (BatchNorm1d)" in lines[0] and "--fix-model" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing half-written
