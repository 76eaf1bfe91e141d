"""`fedmodel simulate csv --task regression`: a continuous label is a number to predict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedmodel.config import RunConfig
from fedmodel.datasets.csv_scenario import load_csv_split
from fedmodel.datasets.scenarios import federation
from fedmodel.errors import ConfigError
from fedmodel.models import build_model
from fedmodel.task import client_datasets
from fedmodel.task_loading import load_task
from simulations.baselines import run_baselines


def stay_table(rows: int = 500, seed: int = 0) -> pd.DataFrame:
    """Length of stay, in days with fractions, linear in two numbers and a ward."""
    rng = np.random.default_rng(seed)
    age = rng.normal(60, 10, rows)
    lactate = rng.gamma(2.0, 1.0, rows)
    ward = rng.choice(["icu", "general"], rows)
    stay = 0.1 * (age - 60) + 0.5 * lactate + 1.0 * (ward == "icu") + rng.normal(0, 0.1, rows)
    return pd.DataFrame({"age": age, "lactate": lactate, "ward": ward, "stay": stay.round(3)})


def write(frame: pd.DataFrame, tmp_path: Path, name: str = "stay.csv") -> str:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return str(path)


def test_a_continuous_label_keeps_its_numbers_and_gets_one_output(tmp_path: Path) -> None:
    table = stay_table()
    path = write(table, tmp_path)
    config = RunConfig(
        scenario="csv", dataset="stay.csv", data=path, label="stay", task="regression", clients=4
    )
    found = federation(config)
    assert found.test.num_classes == 1 and found.clients[0].num_classes == 1
    assert len(found.test) == 100  # 20% at random: no class to stratify by
    labels = np.concatenate([*(client.labels for client in found.clients), found.test.labels])
    np.testing.assert_allclose(np.sort(labels), np.sort(table["stay"]), rtol=1e-6)
    model = build_model("mlp", found.test.num_features, found.test.num_classes)
    assert model(torch.as_tensor(found.test.features[:5])).shape == (5, 1)


def test_regression_baselines_score_every_metric_and_compare_in_r2(tmp_path: Path) -> None:
    path = write(stay_table(), tmp_path)
    config = RunConfig(
        scenario="csv", dataset="stay.csv", data=path, label="stay", task="regression",
        clients=3, rounds=1, lr=0.05,
    )  # fmt: skip
    task = load_task(config)
    clients = client_datasets(task, config.clients, config.seed)
    federated = {"r2": 0.5, "mse": 1.0, "mae": 0.8, "loss": 1.0}
    baselines = run_baselines(config, task, clients, task.test_data(config.seed), federated)
    local = baselines["local"]
    assert set(baselines["local_mean"]) == {"r2", "mse", "mae", "loss"}
    assert baselines["local_worst"] == min(local, key=lambda row: row["r2"])
    assert baselines["local_mean"]["mse"] == pytest.approx(np.mean([r["mse"] for r in local]))
    comparison = baselines["comparison"]
    assert comparison["metric"] == "r2"
    assert comparison["federated_minus_local_mean"] == pytest.approx(
        0.5 - baselines["local_mean"]["r2"]
    )
    # No model: the training rows' mean for every test row, scored by hand.
    train_mean = np.concatenate([client.tensors[1].numpy() for client in clients]).mean()  # type: ignore[attr-defined]
    test_labels = task.test_data(config.seed).tensors[1].numpy()  # type: ignore[attr-defined]
    constant = baselines["constant"]
    assert constant["mse"] == pytest.approx(np.mean((test_labels - train_mean) ** 2), rel=1e-4)
    assert constant["r2"] <= 0.0  # no better than the test set's own mean


@pytest.mark.parametrize(
    ("change", "task", "message"),
    [
        (
            {"stay": ["long"] + ["3.5"] * 499},
            "regression",
            "label column 'stay' in .*stay.csv must be numeric for --task regression; "
            "found text: long$",
        ),
        (
            {"stay": 2.5},
            "regression",
            "label column 'stay' in .*stay.csv is constant \\(2.5\\); "
            "a regression needs a label that varies$",
        ),
        (
            {"stay": [np.nan] + [1.0] * 499},
            "regression",
            "label column 'stay' in .*stay.csv has 1 missing value\\(s\\); "
            "drop or fill those rows$",
        ),
        ({}, "binary", "must be binary .*\\(for a number to predict use --task regression\\)$"),
        ({}, "multiclass", "more than 100\\): for a number to predict use --task regression"),
    ],
    ids=["text", "constant", "missing", "binary", "multiclass"],
)
def test_a_label_that_cannot_be_regressed_or_classified_is_one_line(
    tmp_path: Path, change: dict[str, object], task: str, message: str
) -> None:
    path = write(stay_table().assign(**change), tmp_path)
    with pytest.raises(ConfigError, match=message) as raised:
        load_csv_split(path, "stay", None, task)  # type: ignore[arg-type]
    assert "\n" not in str(raised.value)


@pytest.mark.slow
def test_simulate_csv_regression_end_to_end(tmp_path: Path) -> None:
    """The acceptance line of issue 15: a continuous label trains, under DP, to R2 > 0."""
    path = write(stay_table(rows=1500), tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "fedmodel.cli", "simulate", "csv", "--data", path,
         "--label", "stay", "--task", "regression", "--clients", "3", "--rounds", "2",
         "--no-baselines", "--output", "run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert list(summary["final"]) == ["r2", "mse", "mae", "loss"]
    assert summary["scoring"]["headline"] == "r2"
    assert summary["final"]["r2"] > 0
    assert "Final test R2" in result.stdout
    assert (tmp_path / "run" / "r2.png").exists()
