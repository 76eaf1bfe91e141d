"""End to end: owners' budgets hold across real simulated runs, and audit confirms it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from opacus.accountants import RDPAccountant

from fedmodel.config import RunConfig
from fedmodel.datasets.scenarios import client_partitions
from fedmodel.privacy.accountant import epsilon_of
from fedmodel.privacy.budget import OwnerBudget
from fedmodel.privacy.ledger import PrivacyLedger, dataset_fingerprint
from fedmodel.run_directory import RunSummary
from simulations.runner import run_federation
from tests.conftest import dp_accounting_epsilon
from tests.test_simulation import engine_processes

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
DELTA = 1e-5


def simulate(config: RunConfig, run_dir: Path) -> RunSummary:
    summary = run_federation(config.replace(output_dir=str(run_dir)), run_dir, lambda row: None)
    assert engine_processes(run_dir) == []
    return summary


def fresh_opacus_epsilon(history: list[tuple[float, float, int]]) -> float:
    accountant = RDPAccountant()
    accountant.load_state_dict({"history": history, "mechanism": "rdp"})
    return float(accountant.get_epsilon(DELTA))


def audit_json(path: Path) -> dict[str, Any]:
    result = subprocess.run(
        [str(BIN / "fedmodel"), "audit", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_two_runs_on_the_same_data_compose_and_stop_at_the_budget(tmp_path: Path) -> None:
    ledgers = tmp_path / "hospital-ledgers"
    base = RunConfig(clients=2, epsilon=0.5, budget_epsilon=0.65, ledger_dir=str(ledgers))
    first = simulate(base.replace(rounds=2), tmp_path / "run-1")
    assert first.completed and first.stopped_early is None and first.rounds == 2

    second = simulate(base.replace(rounds=4, epsilon=0.6), tmp_path / "run-2")
    assert second.completed is True
    assert second.stopped_early is not None and 0 < second.rounds < 4
    assert {d["round"] for d in second.dropouts} == {second.rounds + 1}
    assert all("budget-exhausted" in d["reason"] for d in second.dropouts)
    checkpoints = sorted(p.name for p in (tmp_path / "run-2" / "checkpoints").iterdir())
    assert checkpoints[-1] == f"round-{second.rounds:04d}.pt"

    for client in second.clients:
        ledger = PrivacyLedger(ledgers / f"client-{client['client']}.sqlite")
        (fingerprint,) = {entry.fingerprint for entry in ledger.entries()}
        history = ledger.spent_history(fingerprint)
        run_one = next(c for c in first.clients if c["client"] == client["client"])
        # one accountant fed both runs' history = what the ledger (and the client) report
        both = [tuple(run_one["history"][0]), *[tuple(s) for s in client["history"]][1:]]
        assert history == both and len(history) == 2
        assert client["epsilon"] == pytest.approx(fresh_opacus_epsilon(history), rel=1e-9)
        assert client["epsilon"] <= 0.65
        noise, rate, steps = history[-1]
        per_round = steps // second.rounds
        assert fresh_opacus_epsilon([history[0], (noise, rate, steps + per_round)]) > 0.65
        assert dp_accounting_epsilon(history, DELTA, pld=True) <= client["epsilon"]

    report = audit_json(tmp_path / "run-2")
    assert report["ok"] is True
    for ledger in report["ledgers"]:
        (owner,) = ledger["owners"]
        assert owner["runs"] == 2 and owner["spent_epsilon"] <= owner["budget_epsilon"] == 0.65


def test_an_owner_with_less_budget_left_drops_out_and_the_others_finish(tmp_path: Path) -> None:
    config = RunConfig(clients=3, rounds=3, epsilon=1.0)
    run_dir = tmp_path / "run"
    # Hospital 0's data was already used by an earlier study, recorded in its ledger.
    features, labels = client_partitions(config)[0].tensors()
    earlier = PrivacyLedger(run_dir / "ledgers" / "client-0.sqlite")
    fingerprint = dataset_fingerprint(features.numpy(), labels.numpy())
    study = (2.0, 0.03, 60)
    pending, _ = earlier.write_ahead(
        fingerprint, "earlier-study", 1, study, 1.0, DELTA, 1.0,
        OwnerBudget(1.0, DELTA).projector(study),
    )  # fmt: skip
    earlier.commit(pending, study, epsilon_of([study], DELTA))

    summary = simulate(config, run_dir)
    assert summary.completed and summary.stopped_early is None
    assert summary.rounds == 3
    (dropout,) = summary.dropouts
    assert dropout["client"] == "0" and "budget-exhausted" in dropout["reason"]
    counts = [row["clients"] for row in summary.per_round]
    assert counts[: dropout["round"] - 1] == [3] * (dropout["round"] - 1)
    assert counts[dropout["round"] - 1 :] == [2] * (4 - dropout["round"])
    hospital = next(c for c in summary.clients if c["client"] == "0")
    assert hospital["dropped_out_round"] == dropout["round"]
    assert hospital["epsilon"] <= 1.0

    report = audit_json(run_dir)
    owners = {o["owner"]: o for ledger in report["ledgers"] for o in ledger["owners"]}
    assert owners["client-0"]["spent_epsilon"] <= 1.0 and owners["client-0"]["runs"] == 2
    assert owners["client-0"]["spent_epsilon"] == pytest.approx(hospital["epsilon"], rel=1e-9)
    assert owners["client-1"]["runs"] == 1 and owners["client-1"]["rounds"] == 3
