"""End to end: a simulation paused after round 2 of 4 and resumed spends as one never stopped.

Three hospitals (breast-cancer, logistic regression) under DP-SGD, through the real CLI.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from opacus.accountants import RDPAccountant

from fedmodel.privacy.calibration import calibrate_noise_multiplier
from fedmodel.privacy.ledger import PrivacyLedger
from tests.conftest import assert_epsilons_recompute, dp_accounting_epsilon
from tests.test_simulation import simulate

pytestmark = pytest.mark.slow

RUN = ("--dataset", "breast-cancer", "--model", "logreg", "--clients", "3", "--rounds", "4",
       "--no-baselines", "--engine", "local")  # fmt: skip


def summary_of(run_dir: Path) -> dict[str, Any]:
    return dict(json.loads((run_dir / "summary.json").read_text()))


def test_paused_and_resumed_run_spends_what_an_unbroken_run_spends(tmp_path: Path) -> None:
    first, run_dir = simulate(tmp_path, *RUN, "--stop-after-round", "2")
    assert "paused after round 2 of 4" in first.stdout
    assert [row["round"] for row in summary_of(run_dir)["per_round"]] == [1, 2]
    second, _ = simulate(tmp_path, "--resume", "run")
    assert "round 3/4" in second.stdout and "round 1/" not in second.stdout

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
