"""End to end: a simulation paused after round 2 of 4, moved to another directory and
resumed there spends as one never stopped, and its files name no path of the machine.

Three hospitals (breast-cancer, logistic regression) under DP-SGD, through the real CLI.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opacus.accountants import RDPAccountant

from fedmodel.privacy.calibration import calibrate_noise_multiplier
from fedmodel.privacy.ledger import PrivacyLedger
from tests.conftest import assert_epsilons_recompute, dp_accounting_epsilon
from tests.test_budget_e2e import audit_json
from tests.test_simulation import ROOT, simulate

pytestmark = pytest.mark.slow

RUN = ("--dataset", "breast-cancer", "--model", "logreg", "--clients", "3", "--rounds", "4",
       "--no-baselines", "--engine", "local")  # fmt: skip


def summary_of(run_dir: Path) -> dict[str, Any]:
    return dict(json.loads((run_dir / "summary.json").read_text()))


@dataclass(frozen=True)
class MovedRun:
    started_in: Path  # where the run was paused
    run_dir: Path  # where it was moved to and resumed


@pytest.fixture(scope="module")
def moved_run(tmp_path_factory: pytest.TempPathFactory) -> MovedRun:
    """One run for the module: paused after round 2, moved elsewhere, resumed there."""
    started, elsewhere = tmp_path_factory.mktemp("started"), tmp_path_factory.mktemp("moved")
    first, run_dir = simulate(started, *RUN, "--stop-after-round", "2")
    assert "paused after round 2 of 4" in first.stdout
    assert [row["round"] for row in summary_of(run_dir)["per_round"]] == [1, 2]
    run_dir.rename(elsewhere / "run")
    second, _ = simulate(elsewhere, "--resume", "run")
    assert "round 3/4" in second.stdout and "round 1/" not in second.stdout
    return MovedRun(run_dir, elsewhere / "run")


def test_paused_and_resumed_run_spends_what_an_unbroken_run_spends(moved_run: MovedRun) -> None:
    run_dir = moved_run.run_dir
    summary = summary_of(run_dir)
    assert summary["rounds"] == 4 and summary["stopped_early"] is None
    assert [row["round"] for row in summary["per_round"]] == [1, 2, 3, 4]
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("round-*.pt"))
    assert checkpoints == [f"round-{r:04d}.pt" for r in range(5)]

    # An unbroken run calibrates one noise multiplier for all 4 rounds and records
    # (sigma, q, 4 x steps): the resumed run's ledgers must hold exactly that.
    run_uid = json.loads((run_dir / "config.json").read_text())["run-uid"]
    for client in summary["clients"]:
        path = run_dir / "ledgers" / f"client-{client['client']}.sqlite"
        entries = PrivacyLedger.open_existing(path).entries()
        assert {entry.run_id for entry in entries} == {run_uid}
        assert sorted({entry.server_round for entry in entries}) == [1, 2, 3, 4]
        (fingerprint,) = {entry.fingerprint for entry in entries}
        _, rate, steps = entries[0].segment
        sigma = calibrate_noise_multiplier(1.0, 1e-5, rate, 4 * steps)
        history = PrivacyLedger.open_existing(path).spent_history(fingerprint)
        assert history == [(sigma, rate, 4 * steps)]
        fresh = RDPAccountant()
        fresh.load_state_dict({"history": history, "mechanism": "rdp"})
        assert client["epsilon"] == pytest.approx(fresh.get_epsilon(1e-5), rel=1e-9)
        assert client["epsilon"] == pytest.approx(dp_accounting_epsilon(history, 1e-5), rel=0.01)
        assert client["epsilon"] <= 1.0
    assert_epsilons_recompute(summary)


def test_a_moved_run_directory_names_no_path_of_the_machine_and_still_audits(
    moved_run: MovedRun,
) -> None:
    run_dir = moved_run.run_dir
    machine_paths = {
        str(path)
        for path in (moved_run.started_in, run_dir, ROOT, Path.home(), Path(tempfile.gettempdir()))
    }
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert {"config.json", "summary.json", "metrics.csv", "report.md"} <= {p.name for p in files}
    for path in files:
        content = path.read_bytes()
        assert not [p for p in machine_paths if p.encode() in content], path
    summary = summary_of(run_dir)
    assert summary["config"]["output_dir"] == "." and summary["config"]["ledger_dir"] == ""
    assert json.loads((run_dir / "config.json").read_text())["output-dir"] == "."
    assert set(summary["software"]) == {"fedmodel", "flwr", "opacus", "torch", "code_digest"}

    report = audit_json(run_dir)
    spent = sorted(
        owner["spent_epsilon"] for ledger in report["ledgers"] for owner in ledger["owners"]
    )
    assert report["ok"] is True
    assert spent == pytest.approx(sorted(client["epsilon"] for client in summary["clients"]))
