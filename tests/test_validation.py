"""The validation split a sweep selects on: held-out training rows, never the test set."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from fedmodel.config import RunConfig
from fedmodel.data import dataset_tensors, row_count
from fedmodel.errors import ConfigError
from fedmodel.task import Site, Task
from fedmodel.task_loading import load_task
from fedmodel.validation import validation_task

CLIENTS = 3


def _client_rows(site: Site) -> Dataset:
    """Client i's rows are numbered 1000 * i + row, so a test can tell them apart."""
    rows = 40 + 10 * site.partition_id
    ids = torch.arange(rows, dtype=torch.float32) + 1000 * site.partition_id
    return TensorDataset(ids[:, None], torch.zeros(rows))


def _no_test_set(seed: int) -> Dataset:
    raise AssertionError("a run scored on its validation split read the test set")


TASK = Task(
    name="numbered rows",
    model=lambda: torch.nn.Linear(1, 1),
    loss=lambda outputs, targets: (outputs[:, 0] - targets).square(),
    train_data=_client_rows,
    test_data=_no_test_set,
)


def _ids(data: Dataset) -> set[float]:
    assert isinstance(data, TensorDataset)
    return set(data.tensors[0][:, 0].tolist())


def test_validation_rows_are_held_out_training_rows_and_the_test_set_is_never_read() -> None:
    task = validation_task(TASK, 0.25, CLIENTS)
    validation = _ids(task.test_data(7))  # _no_test_set would raise
    trained: set[float] = set()
    for index in range(CLIENTS):
        site = Site(index, CLIENTS, 7)
        kept, everything = _ids(task.train_data(site)), _ids(_client_rows(site))
        held = everything - kept
        assert held <= validation and len(held) == round(len(everything) * 0.25)
        trained |= kept
    assert not trained & validation  # nothing scored on was trained on
    assert len(validation) == 10 + 12 + 15


def test_the_split_follows_the_seed_alone() -> None:
    task = validation_task(TASK, 0.25, CLIENTS)
    again = validation_task(TASK, 0.25, CLIENTS)
    assert _ids(task.test_data(7)) == _ids(again.test_data(7))
    assert _ids(task.test_data(7)) != _ids(task.test_data(8))


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_a_fraction_outside_zero_one_is_refused(fraction: float) -> None:
    with pytest.raises(ConfigError, match="--validation-fraction must be in"):
        RunConfig(validation_fraction=fraction)


def test_a_scenario_with_a_validation_fraction_scores_on_its_training_rows() -> None:
    config = RunConfig(dataset="breast-cancer", clients=4, validation_fraction=0.2)
    plain, held = load_task(config.replace(validation_fraction=0.0)), load_task(config)
    sites = [Site(index, 4, config.seed) for index in range(4)]
    train_rows = sum(row_count(plain.train_data(site)) for site in sites)
    kept = sum(row_count(held.train_data(site)) for site in sites)
    validation = held.test_data(config.seed)
    assert kept + row_count(validation) == train_rows
    assert row_count(validation) == pytest.approx(0.2 * train_rows, abs=4)

    def rows(data: Dataset) -> set[tuple[float, ...]]:
        return {tuple(row) for row in dataset_tensors(data)[0].tolist()}

    training = set().union(*(rows(plain.train_data(site)) for site in sites))
    assert rows(validation) <= training  # training rows, not test rows
    assert not rows(validation) & rows(plain.test_data(config.seed))
