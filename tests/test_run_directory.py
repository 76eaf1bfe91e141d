"""summary.json through RunSummary: the same JSON on disk, and one-line errors on drift."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

from fedmodel.errors import ExitCode, TaskError
from fedmodel.run_directory import (
    CLASSIFIER_SCORING,
    SUMMARY_FILE,
    RunSummary,
    Scoring,
    SummaryError,
)
from fedmodel.task import Task

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
    "scoring": {
        "metrics": ["auroc", "auprc", "recall_at_1pct_fpr", "accuracy"],
        "headline": "auroc",
        "lower_is_better": ["loss"],
    },
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
        if key not in {"dp_mode", "client_level_dp", "software", "rejected_updates", "scoring"}
    }
    summary = RunSummary.from_json(older)
    assert summary.client_level_dp is None and summary.rejected_updates == []
    assert summary.scoring == CLASSIFIER_SCORING  # every run before scoring was recorded


def length_of_stay(headline: str = "") -> Task:
    """A regression task (its data is never read: scoring needs names only)."""
    rows = TensorDataset(torch.zeros(4, 2), torch.zeros(4))
    return Task(
        name="stay",
        model=lambda: torch.nn.Linear(2, 1),
        loss=lambda outputs, targets: (outputs[:, 0] - targets).square(),
        train_data=lambda site: rows,
        test_data=lambda seed: rows,
        metrics="regression",
        headline=headline,
    )


def test_a_regression_scoring_round_trips_and_leads_with_r2(tmp_path: Path) -> None:
    scoring = Scoring.of(length_of_stay())
    assert scoring.columns == ("r2", "mse", "mae", "loss") and scoring.headline == "r2"
    assert scoring.lower_is_better == {"mse", "mae", "loss"}
    summary = RunSummary.from_json({**WRITTEN_BY_THE_COORDINATOR, "scoring": scoring.to_json()})
    summary.save(tmp_path)
    assert RunSummary.load(tmp_path).scoring == scoring
    final = {"r2": 0.5, "mse": 2.0, "mae": None, "loss": 2.0}
    assert scoring.described(final) == ["R2 0.5000", "MSE 2.0000", "MAE -", "loss 2.0000"]
    assert scoring.described(final, skip_missing=True) == ["R2 0.5000", "MSE 2.0000", "loss 2.0000"]
    assert scoring.improvement("mse", -0.25) == 0.25 and scoring.improvement("r2", -0.25) == -0.25


def test_a_binary_tasks_scoring_is_the_classifier_scoring_older_runs_default_to() -> None:
    assert Scoring.of(replace(length_of_stay(), metrics="binary")) == CLASSIFIER_SCORING


def test_a_headline_the_task_does_not_score_is_one_line_naming_it() -> None:
    with pytest.raises(TaskError) as raised:
        Scoring.of(length_of_stay(headline="auroc"))
    assert str(raised.value) == (
        "task 'stay': headline 'auroc' is not one of its metrics (r2, mse, mae, loss); "
        "name one of them or leave headline empty"
    )


def test_a_malformed_scoring_is_one_line_naming_the_file() -> None:
    raw = {**WRITTEN_BY_THE_COORDINATOR, "scoring": {"metrics": ["r2"]}}
    with pytest.raises(SummaryError, match="^run/summary.json: 'scoring' is malformed"):
        RunSummary.from_json(raw, "run/summary.json")


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
