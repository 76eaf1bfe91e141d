"""summary.json through RunSummary: the same JSON on disk, and one-line errors on drift."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedmodel.errors import ExitCode
from fedmodel.run_directory import SUMMARY_FILE, RunSummary, SummaryError

# What server/run_record.py wrote before RunSummary existed (a deployed run: no harness blocks)
WRITTEN_BY_THE_COORDINATOR: dict[str, Any] = {
    "scenario": "deployment",
    "dataset": "csv",
    "rounds": 1,
    "planned_rounds": 2,
    "completed": True,
    "num_clients": 2,
    "dp_mode": "sample",
    "dp": True,
    "delta": 1e-5,
    "target_epsilon": 8.0,
    "accountant": "rdp",
    "client_level_dp": None,
    "final": {"auroc": 0.7, "accuracy": 0.6, "loss": 0.5, "auprc": None},
    "initial": {"auroc": 0.5},
    "per_round": [{"round": 1, "auroc": 0.7}],
    "clients": [{"client": "0", "epsilon": 1.5}, {"client": "1", "epsilon": None}],
    "stopped_early": "budget",
    "dropouts": [],
    "rejected_updates": [],
    "config": {"ledger_dir": ""},
    "software": {"flwr": "1.39.0"},
}


def test_a_summary_round_trips_to_the_same_json(tmp_path: Path) -> None:
    (tmp_path / SUMMARY_FILE).write_text(json.dumps(WRITTEN_BY_THE_COORDINATOR))
    summary = RunSummary.load(tmp_path)
    assert summary.max_epsilon == 1.5 and summary.stopped_early == "budget"
    summary.save(tmp_path)
    saved = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert saved == WRITTEN_BY_THE_COORDINATOR
    assert list(saved) == list(WRITTEN_BY_THE_COORDINATOR)  # key order kept too


def test_the_harness_blocks_follow_the_coordinators_keys() -> None:
    summary = RunSummary.from_json({**WRITTEN_BY_THE_COORDINATOR, "seconds": 3.5})
    keys = list(summary.to_json())
    assert keys == [*WRITTEN_BY_THE_COORDINATOR, "seconds"]  # no nulls for blocks not written


def test_a_summary_from_before_client_level_dp_still_loads() -> None:
    older = {
        key: value
        for key, value in WRITTEN_BY_THE_COORDINATOR.items()
        if key not in {"dp_mode", "client_level_dp", "software", "rejected_updates"}
    }
    summary = RunSummary.from_json(older)
    assert summary.client_level_dp is None and summary.rejected_updates == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epsilon": 1.0}, "run/summary.json: unknown key 'epsilon'"),
        ({"completed": None}, "run/summary.json: missing key 'completed'"),
    ],
)
def test_an_unknown_or_missing_key_is_one_line_naming_file_and_key(
    change: dict[str, Any], message: str
) -> None:
    raw = {k: v for k, v in {**WRITTEN_BY_THE_COORDINATOR, **change}.items() if v is not None}
    with pytest.raises(SummaryError) as raised:
        RunSummary.from_json(raw, "run/summary.json")
    assert str(raised.value) == message
    assert raised.value.exit_code == ExitCode.RUN_DIRECTORY


def test_a_summary_that_is_not_json_says_which_file(tmp_path: Path) -> None:
    (tmp_path / SUMMARY_FILE).write_text("{not json")
    with pytest.raises(SummaryError, match=f"{tmp_path / SUMMARY_FILE}: cannot read it"):
        RunSummary.load(tmp_path)


def test_only_a_completed_run_has_a_completed_summary(tmp_path: Path) -> None:
    assert RunSummary.of_completed_run(tmp_path) is None
    unfinished = {**WRITTEN_BY_THE_COORDINATOR, "completed": False}
    (tmp_path / SUMMARY_FILE).write_text(json.dumps(unfinished))
    assert RunSummary.of_completed_run(tmp_path) is None
    (tmp_path / SUMMARY_FILE).write_text(json.dumps(WRITTEN_BY_THE_COORDINATOR))
    assert RunSummary.of_completed_run(tmp_path) == RunSummary.load(tmp_path)
