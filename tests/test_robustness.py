"""End to end: hostile simulated clients against validation and robust aggregation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import assert_epsilons_recompute
from tests.test_simulation import simulate

pytestmark = pytest.mark.slow


def test_nan_updates_are_rejected_and_the_run_completes(tmp_path: Path) -> None:
    _, run_dir = simulate(
        tmp_path, "--clients", "5", "--rounds", "2", "--attack", "nan", "--attackers", "0.2",
        "--no-baselines",
    )  # fmt: skip
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] is True and summary["rounds"] == 2
    rejected = summary["rejected_updates"]
    assert [(r["round"], r["client"]) for r in rejected] == [(1, "0"), (2, "0")]
    assert all("NaN" in r["reason"] for r in rejected)
    assert [row["rejected"] for row in summary["per_round"]] == [1, 1]
    assert [row["clients"] for row in summary["per_round"]] == [4, 4]
    assert summary["final"]["auroc"] > 0.75  # the honest four still learn
    assert_epsilons_recompute(summary)
