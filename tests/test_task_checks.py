"""A user's Task is refused before anything starts, in one line naming the problem and the fix.

Each task here is real: tiny torch models, TensorDatasets, torch losses and Opacus's own
validator; nothing of the checks is mocked.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from opacus.layers import DPLSTM
from torch import nn
from torch.utils.data import TensorDataset

from fedmodel.config import TASK_SCENARIO, RunConfig
from fedmodel.errors import ExitCode, TaskError
from fedmodel.models import ClassifierLoss
from fedmodel.task import Site, Task
from fedmodel.task_checks import check_task
from fedmodel.task_loading import load_task, task_from_reference

FEATURES, ROWS = 4, 12
CONFIG = RunConfig(clients=2)


def rows(targets: torch.Tensor, inputs: torch.Tensor | None = None) -> TensorDataset:
    """`len(targets)` rows of FEATURES random features (or `inputs`) and `targets`."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(len(targets), FEATURES, generator=generator)
    return TensorDataset(features if inputs is None else inputs, targets)


def binary_targets() -> torch.Tensor:
    return torch.arange(ROWS, dtype=torch.float32) % 2


def binary_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(
        outputs.squeeze(-1), targets, reduction="none"
    )


def linear_task(**changes: Any) -> Task:
    """A logistic regression on FEATURES features: valid as it stands."""
    task = Task(
        name="linear",
        model=lambda: nn.Linear(FEATURES, 1),
        loss=binary_loss,
        train_data=lambda site: rows(binary_targets()),
        test_data=lambda seed: rows(binary_targets()),
    )
    return dataclasses.replace(task, **changes)


def data(dataset: TensorDataset) -> dict[str, Callable[..., TensorDataset]]:
    """Train and test data both `dataset`."""
    return {"train_data": lambda site: dataset, "test_data": lambda seed: dataset}


class Normalised(nn.Module):
    """Linear, BatchNorm, Linear: a model Opacus refuses as it stands."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(FEATURES, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(inputs))


class Recurrent(nn.Module):
    """A recurrent layer over (batch, steps, FEATURES) sequences and a linear head."""

    def __init__(self, layer: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = layer(FEATURES, 6, batch_first=True)
        self.head = nn.Linear(6, 1)

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        states, _ = self.rnn(sequences)
        return self.head(states[:, -1])


def sequence_task(layer: type[nn.Module]) -> Task:
    sequences = torch.randn(ROWS, 5, FEATURES, generator=torch.Generator().manual_seed(1))
    return linear_task(model=lambda: Recurrent(layer), **data(rows(binary_targets(), sequences)))


def refusal(task: Task, config: RunConfig = CONFIG) -> str:
    """The one-line message `check_task` refuses `task` with."""
    with pytest.raises(TaskError) as refused:
        check_task(task, config)
    message = str(refused.value)
    assert "\n" not in message
    assert refused.value.exit_code is ExitCode.USAGE
    return message


def test_a_valid_task_passes_with_no_notes_and_leaves_the_torch_rng_alone() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    assert check_task(linear_task(), CONFIG) == []
    assert torch.equal(torch.rand(3), expected)


def test_batchnorm_model_is_refused_naming_the_layer_and_fix_model() -> None:
    message = refusal(linear_task(model=Normalised))
    assert message.startswith("layer 'features.1' (BatchNorm1d) is refused by Opacus")
    assert "--fix-model, which replaces it with GroupNorm" in message


def test_fix_model_passes_the_batchnorm_model_and_says_what_it_replaced() -> None:
    config = RunConfig(clients=2, fix_model=True)
    notes = check_task(linear_task(model=Normalised), config)
    assert notes == ["--fix-model replaced layer 'features.1' (BatchNorm1d) with GroupNorm"]


def test_fix_model_notes_the_replacement_in_the_task_load_task_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_task wraps the model factory in ModuleValidator.fix; the check still sees the
    user's own BatchNorm and reports it replaced, and the fixed model is what trains."""
    write_module(
        tmp_path,
        "normalised_task",
        "nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))",
    )
    monkeypatch.syspath_prepend(tmp_path)
    config = RunConfig(scenario=TASK_SCENARIO, task_ref="normalised_task:task", fix_model=True)
    task = load_task(config)
    assert check_task(task, config) == [
        "--fix-model replaced layer '1' (BatchNorm1d) with GroupNorm"
    ]
    trained = task.model()
    assert isinstance(trained, nn.Sequential) and isinstance(trained[1], nn.GroupNorm)


def test_fix_model_notes_when_nothing_needed_replacing() -> None:
    notes = check_task(linear_task(), RunConfig(clients=2, fix_model=True))
    assert notes == ["--fix-model: no layer needed replacing"]


def test_plain_lstm_is_refused_and_dplstm_accepted() -> None:
    message = refusal(sequence_task(nn.LSTM))
    assert message.startswith("layer 'rnn' (LSTM) is refused by Opacus")
    assert "replaces it with DPLSTM, or build the model with opacus.layers.DPLSTM" in message
    assert check_task(sequence_task(DPLSTM), CONFIG) == []


def test_a_model_returning_a_tuple_is_refused() -> None:
    """A recurrent layer's (output, state) tuple is not an output the metrics can score."""
    task = sequence_task(DPLSTM)
    task = dataclasses.replace(task, model=lambda: DPLSTM(FEATURES, 1, batch_first=True))
    assert refusal(task).startswith("the model returned a tuple, not a tensor")


def test_a_dataset_that_is_not_a_dataset_is_refused() -> None:
    message = refusal(linear_task(test_data=lambda seed: None))
    assert message.startswith("the test data has type NoneType, not a torch Dataset")


def test_a_model_without_trainable_parameters_is_refused() -> None:
    assert "no trainable parameters" in refusal(linear_task(model=nn.ReLU))


def test_a_model_in_eval_mode_is_refused() -> None:
    message = refusal(linear_task(model=lambda: nn.Linear(FEATURES, 1).eval()))
    assert "eval mode" in message and "drop the .eval() call" in message


def test_a_mean_reduced_loss_is_refused() -> None:
    def mean_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return binary_loss(outputs, targets).mean()

    assert refusal(linear_task(loss=mean_loss)) == (
        "the loss returned shape () for a batch of 8 rows; return one loss per row "
        "(reduction='none')"
    )


def test_a_loss_broadcast_to_a_matrix_is_refused() -> None:
    """(B, 1) outputs minus (B,) targets broadcast to (B, B): a classic silent bug."""

    def squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs - targets).square()

    task = linear_task(loss=squared_error, metrics="regression")
    assert "returned shape (8, 8) for a batch of 8 rows" in refusal(task)


def test_a_non_finite_loss_is_refused() -> None:
    def log_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return -torch.log(torch.zeros_like(targets))

    assert "the loss is not finite" in refusal(linear_task(loss=log_loss))


def test_a_detached_loss_is_refused() -> None:
    def detached(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return binary_loss(outputs, targets).detach()

    assert "no gradient to the model's parameters" in refusal(linear_task(loss=detached))


def test_an_empty_client_dataset_is_refused_naming_it() -> None:
    empty = rows(torch.zeros(0))
    message = refusal(linear_task(train_data=lambda site: empty))
    assert message == "the train data of client 0 is empty; return at least one (input, target) row"


def test_rows_that_are_not_pairs_are_refused() -> None:
    triples = TensorDataset(torch.randn(ROWS, FEATURES), binary_targets(), binary_targets())
    message = refusal(linear_task(test_data=lambda seed: triples))
    assert message.startswith("item 0 of the test data is not an (input, target) pair (3 items)")


def test_integer_inputs_are_refused_for_a_model_without_embedding() -> None:
    integers = rows(binary_targets(), torch.randint(0, 5, (ROWS, FEATURES)))
    message = refusal(linear_task(**data(integers)))
    assert "has inputs of dtype torch.int64" in message and ".float()" in message


def test_integer_token_ids_are_accepted_by_an_embedding_model() -> None:
    tokens = rows(binary_targets(), torch.randint(0, 5, (ROWS, 3)))

    def model() -> nn.Module:
        return nn.Sequential(nn.Embedding(5, 2), nn.Flatten(), nn.Linear(6, 1))

    assert check_task(linear_task(model=model, **data(tokens)), CONFIG) == []


def test_binary_targets_beyond_zero_and_one_are_refused() -> None:
    four_classes = rows(torch.arange(ROWS, dtype=torch.float32) % 4)
    message = refusal(linear_task(**data(four_classes)))
    assert message == (
        "the train data of client 0 has targets 0, 1, 2, 3; binary metrics need targets 0 "
        "and 1 (use metrics='multiclass' for class indices)"
    )


def test_multiclass_with_one_output_is_refused() -> None:
    task = linear_task(
        loss=ClassifierLoss(reduction="none"),
        metrics="multiclass",
        **data(rows(torch.arange(ROWS) % 3)),
    )
    message = refusal(task)
    assert message.startswith("the model returned shape (8, 1) for 8 rows of the train data")
    assert "one logit per class" in message


def test_multiclass_with_fewer_outputs_than_classes_is_refused() -> None:
    task = linear_task(
        model=lambda: nn.Linear(FEATURES, 3),
        loss=ClassifierLoss(reduction="none"),
        metrics="multiclass",
        **data(rows(torch.arange(ROWS) % 4)),
    )
    assert "has class index 3 but the model returns 3 logits per row" in refusal(task)


def test_multiclass_with_one_output_per_class_passes() -> None:
    task = linear_task(
        model=lambda: nn.Linear(FEATURES, 3),
        loss=ClassifierLoss(reduction="none"),
        metrics="multiclass",
        **data(rows(torch.arange(ROWS) % 3)),
    )
    assert check_task(task, CONFIG) == []


def squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.squeeze(-1) - targets).square()


def test_regression_with_one_output_and_float_targets_passes() -> None:
    task = linear_task(loss=squared_error, metrics="regression", **data(rows(torch.rand(ROWS))))
    assert check_task(task, CONFIG) == []


def test_regression_with_integer_targets_is_refused() -> None:
    days = rows(torch.arange(ROWS))
    task = linear_task(loss=squared_error, metrics="regression", **data(days))
    assert "targets of dtype torch.int64; regression needs floating-point" in refusal(task)


def test_a_user_metric_that_raises_is_refused_naming_it() -> None:
    def broken(outputs: np.ndarray, targets: np.ndarray) -> float:
        return float(outputs[:, 5].mean())

    task = linear_task(metrics={"mean_score": lambda o, t: float(o.mean()), "broken": broken})
    message = refusal(task)
    assert message.startswith("metric 'broken' failed on 8 rows of the train data of client 0")
    assert "IndexError" in message


def test_user_metrics_returning_numbers_or_nan_pass() -> None:
    metrics = {"mean_score": lambda o, t: float(o.mean()), "undefined": lambda o, t: np.nan}
    assert check_task(linear_task(metrics=metrics), CONFIG) == []


def test_an_unknown_grad_sample_mode_is_refused() -> None:
    message = refusal(linear_task(grad_sample_mode="fast"))
    assert message.startswith("task grad_sample_mode 'fast' is not one of hooks, ghost")


def test_the_fused_mode_is_refused_for_a_model_with_other_layers() -> None:
    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(FEATURES, 8), nn.LayerNorm(8), nn.Linear(8, 1))

    assert check_task(linear_task(grad_sample_mode="fused"), CONFIG) == []
    message = refusal(linear_task(model=model, grad_sample_mode="fused"))
    assert message.startswith("task grad_sample_mode 'fused' needs a model whose only")


def test_an_unknown_metric_kind_is_refused() -> None:
    assert "task metrics 'accuracy' is not one of binary" in refusal(
        linear_task(metrics="accuracy")
    )


def test_the_client_dataset_is_asked_for_with_the_run_seed_and_client_count() -> None:
    asked: list[Site] = []

    def train_data(site: Site) -> TensorDataset:
        asked.append(site)
        return rows(binary_targets())

    check_task(linear_task(train_data=train_data), RunConfig(clients=3, seed=5))
    check_task(linear_task(train_data=train_data, num_sites=4), RunConfig(clients=3, seed=5))
    assert asked == [Site(0, 3, 5), Site(0, 4, 5)]


# Loading a task by reference


def write_module(directory: Path, module: str, model: str = "nn.Linear(4, 1)") -> None:
    """A module in `directory` defining `task` (a valid Task with `model` unless `model`
    says otherwise), `make_task` (a function of the RunConfig) and `not_a_task`."""
    source = f"""
        import torch
        from torch import nn
        from torch.utils.data import TensorDataset

        from fedmodel.task import Task


        def rows(seed):
            generator = torch.Generator().manual_seed(seed)
            return TensorDataset(
                torch.randn(16, 4, generator=generator), torch.arange(16.0) % 2
            )


        def loss(outputs, targets):
            return nn.functional.binary_cross_entropy_with_logits(
                outputs.squeeze(-1), targets, reduction="none"
            )


        task = Task(
            name="{module}",
            model=lambda: {model},
            loss=loss,
            train_data=lambda site: rows(site.partition_id),
            test_data=rows,
        )
        not_a_task = {{"name": "{module}"}}


        def make_task(config):
            return task
    """
    (directory / f"{module}.py").write_text(textwrap.dedent(source))


def test_a_task_in_a_file_outside_the_repository_loads_and_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_module(tmp_path, "outside_task")
    monkeypatch.syspath_prepend(tmp_path)
    task = task_from_reference("outside_task:task", CONFIG)
    assert task.name == "outside_task"
    assert check_task(task, CONFIG) == []


def test_a_factory_function_of_the_run_config_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_module(tmp_path, "factory_task")
    monkeypatch.syspath_prepend(tmp_path)
    assert task_from_reference("factory_task:make_task", CONFIG).name == "factory_task"


def test_an_object_that_is_not_a_task_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_module(tmp_path, "dict_task")
    monkeypatch.syspath_prepend(tmp_path)
    with pytest.raises(TaskError, match=r"'dict_task:not_a_task' is a dict, not a fedmodel.Task"):
        task_from_reference("dict_task:not_a_task", CONFIG)


def test_a_module_that_cannot_be_imported_is_refused_naming_it() -> None:
    with pytest.raises(TaskError, match=r"cannot import task module 'nosuchmodule'.*PYTHONPATH"):
        task_from_reference("nosuchmodule:task", CONFIG)


def test_a_missing_attribute_is_refused_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_module(tmp_path, "attribute_task")
    monkeypatch.syspath_prepend(tmp_path)
    with pytest.raises(TaskError, match=r"module 'attribute_task' has no attribute 'tsak'"):
        task_from_reference("attribute_task:tsak", CONFIG)


def test_a_reference_without_a_colon_is_refused() -> None:
    with pytest.raises(TaskError, match=r"neither module:attribute nor an installed task"):
        task_from_reference("outside_task", CONFIG)


@pytest.mark.parametrize(
    "options",
    [{}, {"scenario": "digits", "dataset": "mnist-5k", "model": "cnn"}],
    ids=["medical-mlp", "digits-cnn"],
)
def test_the_built_in_scenarios_pass_their_own_checks(options: dict[str, Any]) -> None:
    config = RunConfig(**options)
    assert check_task(load_task(config), config) == []
