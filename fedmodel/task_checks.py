"""Checks that a user's Task can train under DP-SGD, run before anything starts.

A task that cannot train privately should fail in one line on the user's machine, not
minutes later inside a simulated client: a BatchNorm model (each row's output depends
on its batch-mates, which per-sample clipping cannot bound), a loss averaged over the
batch (DP-SGD clips each row's gradient, so it needs each row's loss), an empty client,
outputs that do not fit the metrics. Each check is cheap: one model, the first rows of
client 0's training data and of the test set, one forward pass, no training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from fedmodel.config import RunConfig
from fedmodel.dp_modes import GRAD_SAMPLE_MODES
from fedmodel.errors import TaskError
from fedmodel.fused_dp import linear_only
from fedmodel.task import METRIC_NAMES, MetricFunction, MetricKind, PerSampleLoss, Site, Task
from fedmodel.task_loading import FixedModel

SAMPLE_ROWS = 8
"""Rows of each dataset the checks read and run the model on."""


class Sample(NamedTuple):
    """The first rows of a dataset, collated as training collates them."""

    name: str  # "the train data of client 0", "the test data"
    inputs: Tensor
    targets: Tensor


class RefusedLayer(NamedTuple):
    """A layer Opacus's ModuleValidator refuses, and the layer its fixer puts in place."""

    path: str  # module path in the model, "" for the model itself
    layer: type[nn.Module]
    reason: str  # Opacus's, first sentence
    replacement: type[nn.Module]

    @property
    def where(self) -> str:
        name = self.layer.__name__
        return f"layer '{self.path}' ({name})" if self.path else f"the model ({name})"


def check_task(task: Task, config: RunConfig) -> list[str]:
    """Raise TaskError naming the first problem that would stop `task` training under
    DP-SGD with `config`; else return notes to print (what `--fix-model` changed).

    `task` is what `load_task(config)` returns (its `--fix-model` factory is unwrapped
    here, to see the user's own layers). The model's outputs are checked before the
    loss, so a model with the wrong number of outputs is named as such rather than
    failing inside the loss. The global torch RNG is left as it was: a run's numbers do
    not depend on whether it was checked.
    """
    with torch.random.fork_rng(devices=[]):
        model, notes = _checked_model(task, config)
        takes_indices = any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in model.modules())
        _check_metrics(task)
        site = Site(0, task.num_sites or config.clients, config.seed)
        train = _sample(task.train_data(site), "the train data of client 0", takes_indices)
        test = _sample(task.test_data(config.seed), "the test data", takes_indices)
        for sample in (train, test):
            _check_targets(sample, task.metrics)
        outputs = model(train.inputs)
        _check_outputs(outputs, train, task.metrics)
        with torch.no_grad():
            _check_outputs(model(test.inputs), test, task.metrics)
        _check_loss(task.loss, outputs, train)
    _check_grad_sample_mode(task.grad_sample_mode, model)
    return notes


def _checked_model(task: Task, config: RunConfig) -> tuple[nn.Module, list[str]]:
    """The model training would get (fixed under --fix-model), once Opacus accepts it."""
    factory = task.model.unfixed if isinstance(task.model, FixedModel) else task.model
    model = factory()
    if not isinstance(model, nn.Module):
        raise TaskError(
            f"the task's model() returned a {type(model).__name__}, not a torch nn.Module; "
            "return a fresh model"
        )
    if not any(parameter.requires_grad for parameter in model.parameters()):
        raise TaskError(
            "the task's model has no trainable parameters; return a model with layers to "
            "train (parameters with requires_grad=True)"
        )
    if not model.training:
        raise TaskError(
            "the task's model() returns a model in eval mode; return it in training mode "
            "(drop the .eval() call)"
        )
    refused, fixed = _refused_layers(model)
    if not config.fix_model:
        if refused:
            raise TaskError(_refusal(refused[0]))
        return model, []
    if not refused:
        return model, ["--fix-model: no layer needed replacing"]
    replaced = "; ".join(f"{r.where} with {r.replacement.__name__}" for r in refused)
    return fixed, [f"--fix-model replaced {replaced}"]


def _refused_layers(model: nn.Module) -> tuple[list[RefusedLayer], nn.Module]:
    """The layers `ModuleValidator.validate(model)` refuses, found by path (its errors
    name none: these are the same trainable modules and registered validators it runs),
    and the model `ModuleValidator.fix` makes of `model` (`model` itself if none is)."""
    found = [
        (path, layer, errors)
        for path, layer in trainable_modules(model)
        if (validator := ModuleValidator.VALIDATORS.get(type(layer)))
        and (errors := validator(layer))
    ]
    if not found:
        return [], model
    fixed = ModuleValidator.fix(model)
    refused = [
        RefusedLayer(path, type(layer), _first_sentence(errors[0]), type(fixed.get_submodule(path)))
        for path, layer, errors in found
    ]
    return refused, fixed


def _refusal(refused: RefusedLayer) -> str:
    replacement = refused.replacement.__name__
    remedy = f"rerun with --fix-model, which replaces it with {replacement}"
    if refused.replacement.__module__.startswith("opacus.layers"):
        remedy += f", or build the model with opacus.layers.{replacement}"
    return f"{refused.where} is refused by Opacus ({refused.reason}); {remedy}"


def _check_metrics(task: Task) -> None:
    """The task names a built-in kind or gives functions, and a headline among them."""
    if isinstance(task.metrics, str) and task.metrics not in METRIC_NAMES:
        raise TaskError(
            f"task metrics '{task.metrics}' is not one of {', '.join(METRIC_NAMES)}; "
            "use one of them or a mapping of names to functions"
        )
    reported = (*task.metric_names, "loss")
    if task.headline and task.headline not in reported:
        raise TaskError(
            f"task headline '{task.headline}' is not a metric it reports; use one of "
            f"{', '.join(reported)}"
        )


def _sample(data: Dataset, name: str, takes_indices: bool) -> Sample:
    """The first rows of `data` as training batches them, once they can be trained on."""
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise TaskError(
            f"{name} has type {type(data).__name__}, not a torch Dataset; return a Dataset of "
            "(input, target) pairs, e.g. TensorDataset(inputs, targets)"
        )
    if len(data) == 0:
        raise TaskError(f"{name} is empty; return at least one (input, target) row")
    rows = [data[index] for index in range(min(SAMPLE_ROWS, len(data)))]
    for index, row in enumerate(rows):
        if not isinstance(row, (tuple, list)) or len(row) != 2:
            found = f"{len(row)} items" if isinstance(row, (tuple, list)) else type(row).__name__
            raise TaskError(
                f"item {index} of {name} is not an (input, target) pair ({found}); return "
                "each row as (input, target)"
            )
    try:
        inputs, targets = default_collate(rows)
    except (RuntimeError, TypeError) as error:
        raise TaskError(
            f"the first {len(rows)} rows of {name} cannot be batched ({_first_line(error)}); "
            "every row's input must be a tensor of the same shape"
        ) from error
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise TaskError(
            f"the rows of {name} batch into a {type(inputs).__name__} input and a "
            f"{type(targets).__name__} target; each must be a tensor or a number"
        )
    if not inputs.is_floating_point() and not takes_indices:
        raise TaskError(
            f"{name} has inputs of dtype {inputs.dtype}; the model needs floating-point "
            "inputs (convert them with .float(); token ids need an nn.Embedding layer)"
        )
    return Sample(name, inputs, targets)


def _check_targets(sample: Sample, metrics: MetricKind | Mapping[str, MetricFunction]) -> None:
    """Targets fit the built-in metric kind (user metrics take any targets)."""
    targets = sample.targets
    if metrics == "regression" and not targets.is_floating_point():
        raise TaskError(
            f"{sample.name} has targets of dtype {targets.dtype}; regression needs "
            "floating-point targets (convert them with .float())"
        )
    if metrics == "binary" and not bool(((targets == 0) | (targets == 1)).all()):
        raise TaskError(
            f"{sample.name} has targets {_listed(targets)}; binary metrics need targets 0 and 1 "
            "(use metrics='multiclass' for class indices)"
        )
    if metrics == "multiclass" and not bool(((targets >= 0) & (targets == targets.round())).all()):
        raise TaskError(
            f"{sample.name} has targets {_listed(targets)}; multiclass metrics need class "
            "indices 0, 1, 2..."
        )


def _check_outputs(
    outputs: object, sample: Sample, metrics: MetricKind | Mapping[str, MetricFunction]
) -> None:
    """The model's outputs on `sample` fit the metric kind, or the user's metrics score them."""
    if not isinstance(outputs, Tensor):
        raise TaskError(
            f"the model returned a {type(outputs).__name__}, not a tensor; return one tensor "
            "of outputs (an LSTM returns a tuple: take the output you score)"
        )
    if not isinstance(metrics, str):
        _check_user_metrics(metrics, outputs, sample)
        return
    rows, shape = len(sample.targets), tuple(outputs.shape)
    seen = f"the model returned shape {shape} for {rows} rows of {sample.name}"
    if metrics in ("binary", "regression") and shape not in ((rows,), (rows, 1)):
        per_row = "one logit" if metrics == "binary" else "one output"
        raise TaskError(
            f"{seen}; {metrics} metrics need {per_row} per row, shape ({rows},) or ({rows}, 1)"
        )
    if metrics != "multiclass":
        return
    if len(shape) != 2 or shape[0] != rows or shape[1] < 2:
        raise TaskError(
            f"{seen}; multiclass metrics need one logit per class, shape ({rows}, classes) "
            "with 2 classes or more"
        )
    top = int(sample.targets.max())
    if top >= shape[1]:
        raise TaskError(
            f"{sample.name} has class index {top} but the model returns {shape[1]} logits "
            f"per row; return one logit per class ({top + 1} or more)"
        )


def _check_user_metrics(
    metrics: Mapping[str, MetricFunction], outputs: Tensor, sample: Sample
) -> None:
    """Each user metric scores a few rows as NumPy arrays, to a number or NaN."""
    rows = len(sample.targets)
    for name, function in metrics.items():
        try:
            value = float(function(outputs.detach().numpy(), sample.targets.numpy()))
        except Exception as error:  # whatever the user's function raises makes it unusable
            raise TaskError(
                f"metric '{name}' failed on {rows} rows of {sample.name} "
                f"({type(error).__name__}: {_first_line(error)}); it must take (outputs, "
                "targets) as NumPy arrays and return a number"
            ) from error
        if math.isinf(value):
            raise TaskError(
                f"metric '{name}' returned {value} on {rows} rows of {sample.name}; return a "
                "finite number (NaN where it is undefined)"
            )


def _check_loss(loss: PerSampleLoss, outputs: Tensor, sample: Sample) -> None:
    """One finite loss per row, with a gradient to the model's parameters."""
    losses = loss(outputs, sample.targets)
    rows = len(sample.targets)
    if not isinstance(losses, Tensor) or tuple(losses.shape) != (rows,):
        returned = (
            f"shape {tuple(losses.shape)}"
            if isinstance(losses, Tensor)
            else f"a {type(losses).__name__}"
        )
        raise TaskError(
            f"the loss returned {returned} for a batch of {rows} rows; return one loss per "
            "row (reduction='none')"
        )
    if not bool(torch.isfinite(losses).all()):
        raise TaskError(
            f"the loss is not finite on the first {rows} rows of {sample.name}; check the "
            "loss (e.g. log of 0) and the scale of the inputs"
        )
    if not losses.requires_grad:
        raise TaskError(
            "the loss has no gradient to the model's parameters; compute it from the outputs "
            "with torch operations (no .detach(), .item() or NumPy)"
        )


def _check_grad_sample_mode(mode: str, model: nn.Module) -> None:
    """A known mode, and `fused` only for the Linear-only models it handles."""
    if mode not in GRAD_SAMPLE_MODES:
        raise TaskError(
            f"task grad_sample_mode '{mode}' is not one of {', '.join(GRAD_SAMPLE_MODES)}; "
            "hooks works for every layer Opacus supports"
        )
    if mode == "fused" and not linear_only(model):
        raise TaskError(
            "task grad_sample_mode 'fused' needs a model whose only trainable layers are "
            "nn.Linear; use hooks (or ew) for this model"
        )


def _listed(targets: Tensor) -> str:
    """The first few distinct target values, for a message."""
    return ", ".join(f"{value:g}" for value in torch.unique(targets)[:6].tolist())


def _first_sentence(error: Exception) -> str:
    return str(error).split(". ")[0].rstrip(".")


def _first_line(error: Exception) -> str:
    return next(iter(str(error).splitlines()), "")
