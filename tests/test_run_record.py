"""The run record follows the task's scoring: a regression run records R2, MSE and MAE."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from fedmodel.config import RunConfig
from fedmodel.evaluation import evaluate
from fedmodel.run_directory import CLASSIFIER_SCORING, RunSummary, Scoring
from fedmodel.runtime.flwr_run import progress_row
from fedmodel.task import LOWER_IS_BETTER
from server.run_record import RunRecorder

REGRESSION = Scoring(("r2", "mse", "mae"), "r2", LOWER_IS_BETTER)


def regression_scores(weight: float) -> dict[str, float]:
    """A one-weight linear model's real scores on y = 2x."""
    inputs = torch.linspace(-1, 1, 50)[:, None]
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(weight)
    rows = TensorDataset(inputs, 2 * inputs[:, 0])
    return evaluate(
        model, rows, lambda out, target: (out[:, 0] - target).square(), metrics="regression"
    )


def test_a_regression_run_records_r2_mse_and_mae_in_every_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = RunRecorder(tmp_path, RunConfig(rounds=2, dp="off"), REGRESSION)
    scores = [regression_scores(weight) for weight in (0.0, 1.0, 1.9)]
    for server_round, metrics in enumerate(scores):
        recorder.record_evaluation(server_round, metrics)
    recorder.write_summary(completed=True)

    with (tmp_path / "metrics.csv").open() as handle:
        header, *rows = list(csv.reader(handle))
    assert header[:5] == ["round", "r2", "mse", "mae", "loss"]
    assert "auroc" not in header and header[5] == "train_loss"
    assert [float(row[2]) for row in rows] == pytest.approx([s["mse"] for s in scores[1:]])
    summary = RunSummary.load(tmp_path)
    assert summary.scoring == REGRESSION
    assert list(summary.final_metrics) == ["r2", "mse", "mae", "loss"]
    assert summary.final_metrics["r2"] == pytest.approx(
        1 - 0.1**2 / 4, abs=1e-6
    )  # 1 - (2 - w)^2 / 2^2
    assert summary.initial is not None and summary.initial["r2"] == pytest.approx(0.0, abs=1e-6)
    progress = [row for row in map(progress_row, caplog.messages) if row is not None]
    assert [row["round"] for row in progress] == [1, 2]
    assert Scoring.from_json(progress[-1]["scoring"]) == REGRESSION
    assert progress[-1]["mae"] == pytest.approx(scores[2]["mae"])


def test_an_undefined_or_unscored_metric_is_recorded_as_none(tmp_path: Path) -> None:
    """AUROC of a one-class test set is NaN; deployed nodes score no AUPRC."""
    recorder = RunRecorder(tmp_path, RunConfig(rounds=1, dp="off"), CLASSIFIER_SCORING)
    recorder.record_evaluation(1, {"auroc": math.nan, "accuracy": 1.0, "loss": 0.1})
    final = json.loads((tmp_path / "summary.json").read_text())["final"]
    assert final == {
        "auroc": None,
        "auprc": None,
        "recall_at_1pct_fpr": None,
        "accuracy": 1.0,
        "loss": 0.1,
    }
