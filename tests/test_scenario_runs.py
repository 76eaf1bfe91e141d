"""End to end through Flower's engine: a natural-site scenario and a user's own CSV."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import assert_epsilons_recompute
from tests.test_csv import clinic_table
from tests.test_simulation import engine_processes

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def simulate(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str, str]:
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [str(BIN / "fedmodel"), "simulate", *args, "--output", str(run_dir)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert engine_processes(run_dir) == []
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary, (run_dir / "report.md").read_text(), result.stdout


def test_covid_clinics_federate_the_clinics_big_enough_for_dp(tmp_path: Path) -> None:
    summary, report, stdout = simulate(
        tmp_path,
        "medical",
        "--dataset",
        "covid-clinics",
        "--rounds",
        "1",
        "--fraction",
        "0.1",
        "--baseline-sites",
        "2",
    )
    assert summary["dataset"] == "covid-clinics" and summary["completed"] is True
    assert summary["num_clients"] == 39
    assert summary["federation"]["natural_sites"] == 88
    assert len(summary["federation"]["too_small_to_train"]) == 49
    assert summary["per_round"][0]["clients"] == 3  # int(39 x 0.1) sampled by FedAvg
    final = summary["final"]
    assert 0.0 <= final["auprc"] <= 1.0 and 0.0 <= final["recall_at_1pct_fpr"] <= 1.0
    baselines = summary["baselines"]
    assert baselines["central"]["auroc"] > 0.6  # weak but real signal (AUC ~0.65-0.7)
    assert baselines["local_sites"] == 2
    assert "88 natural sites" in stdout and "## Baselines" in report
    assert all(client["epsilon"] <= 1.0 for client in summary["clients"])
    assert_epsilons_recompute(summary)


def test_a_users_csv_runs_one_client_per_site(tmp_path: Path) -> None:
    data = tmp_path / "clinics.csv"
    clinic_table(rows=3000).to_csv(data, index=False)
    summary, report, _ = simulate(
        tmp_path,
        "csv",
        "--data",
        str(data),
        "--label",
        "outcome",
        "--partition-by",
        "site",
        "--rounds",
        "2",
        "--local-epochs",
        "2",
        "--epsilon",
        "3",
        "--baseline-sites",
        "3",
    )
    assert (summary["scenario"], summary["dataset"]) == ("csv", "clinics.csv")
    assert summary["num_clients"] == 3
    assert summary["federation"]["site_names"] == ["east", "north", "south"]
    assert sum(client["num_examples"] for client in summary["clients"]) == 2400
    assert summary["final"]["auroc"] > 0.65  # each site alone under DP reaches ~0.68-0.71
    assert summary["baselines"]["local_sites"] == 3
    assert_epsilons_recompute(summary)
    assert "site alone (DP)" in report
    assert len(summary["heterogeneity"]["clients"]) == 3 and "## Heterogeneity" in report
    assert (tmp_path / "run" / "heterogeneity.png").read_bytes().startswith(b"\x89PNG")
