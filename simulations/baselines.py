"""Baselines for every simulated federation, trained in-process after the federated run.

The question a federation answers is "does pooling knowledge under DP beat each site
alone, and what does privacy cost?", so every report sets the federated model beside
the same model trained

- centrally without DP (all training rows pooled: the ceiling),
- centrally with DP-SGD at the same (epsilon, delta) (the cost of privacy alone),
- at each site alone with DP at the same budget (what a site gets without the
  federation; mean and worst site),
- and beside no model at all: one constant output for every row, the one that best fits
  the pooled training rows (for a yes/no outcome, its base rate). A loss above the
  constant's means the model's probabilities are worse than knowing no feature.

Every model sees each training row `rounds x local_epochs` times, like a client that
takes part in every round, with the same learning rate and batch size, and is scored on
the same global test set. With many sites the local baseline runs on a fixed random
sample of them (`max_sites`), because each needs its own noise calibration.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from fedmodel.config import RunConfig
from fedmodel.data import make_loader, row_count
from fedmodel.evaluation import evaluate, predict
from fedmodel.privacy.accountant import epsilon_of
from fedmodel.privacy.calibration import calibrate_noise_multiplier
from fedmodel.run_directory import Scoring
from fedmodel.sampling import client_batch_size, poisson_plan
from fedmodel.task import Task
from fedmodel.training import select_device, train_dp, train_plain


def train_and_score(
    config: RunConfig, task: Task, train: Dataset, test: Dataset, private: bool, seed: int
) -> dict[str, Any]:
    """One model of `task` trained on `train` (DP-SGD at the run's budget if `private`),
    scored on `test`; includes the epsilon actually spent when private."""
    torch.manual_seed(seed)
    model = task.model()
    rows = row_count(train)
    batch_size = client_batch_size(rows, config.batch_size)  # a small site's, as in the run
    loader = make_loader(train, batch_size, seed)
    epochs = config.rounds * config.local_epochs
    device = select_device("cpu")
    result: dict[str, Any] = {"rows": rows}
    if private:
        plan = poisson_plan(rows, batch_size)
        steps = epochs * plan.steps_per_epoch
        noise = _noise_multiplier(config.epsilon, config.delta, plan.sample_rate, steps)
        trained = train_dp(
            model, task.loss, loader, epochs, config.lr, noise, config.max_grad_norm, [],
            device, grad_sample_mode=task.grad_sample_mode, seed=seed,
        )  # fmt: skip
        result |= {"epsilon": epsilon_of(trained.history, config.delta), "noise_multiplier": noise}
    else:
        train_plain(model, task.loss, loader, epochs, config.lr, device)
    metrics = evaluate(model.to("cpu"), test, task.loss, task.metrics)
    return result | {name: _finite_or_none(value) for name, value in metrics.items()}


class ConstantModel(nn.Module):
    """Gives every row the same `output` (one row's output of the task's model)."""

    def __init__(self, output: Tensor) -> None:
        super().__init__()
        self.output = nn.Parameter(output, requires_grad=False)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.output.expand(len(inputs), *self.output.shape)


def constant_prediction(task: Task, train: Dataset, test: Dataset) -> dict[str, Any]:
    """Scores on `test` of the constant output that minimises the task's mean loss on
    `train`: the base rate for a yes/no outcome, class shares, a regression's mean.

    Fitted numerically with the task's own loss, so a user's task gets its own reference.
    """
    shape = predict(task.model(), Subset(train, [0]))[0].shape[1:]  # one row's output
    _, targets = predict(ConstantModel(torch.zeros(shape)), train)  # any dataset's targets
    output = torch.zeros(shape, requires_grad=True)
    optimizer = torch.optim.LBFGS([output], max_iter=100, line_search_fn="strong_wolfe")

    def mean_loss() -> Tensor:
        optimizer.zero_grad()
        value = task.loss(output.expand(len(targets), *shape), targets).mean()
        value.backward()
        return value

    optimizer.step(mean_loss)
    metrics = evaluate(ConstantModel(output.detach()), test, task.loss, task.metrics)
    return {name: _finite_or_none(value) for name, value in metrics.items()}


@lru_cache(maxsize=256)
def _noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Calibration is the slow part (a search over RDP epsilons); small sites share
    (sample rate, steps), so each distinct mechanism is calibrated once."""
    return calibrate_noise_multiplier(epsilon, delta, sample_rate, steps)


BaselineProgress = Callable[[int, int, str, Mapping[str, Any]], None]
"""Called after each baseline model: its number, how many there are, its name, its scores."""


def run_baselines(
    config: RunConfig,
    task: Task,
    clients: Sequence[Dataset],
    test: Dataset,
    federated: dict[str, Any],
    max_sites: int = 10,
    on_progress: BaselineProgress | None = None,
) -> dict[str, Any]:
    """The `baselines` block of summary.json: central, central-DP, local-only, the constant
    prediction, and gains.

    At scale they take minutes (a DP model per sampled site), so `on_progress` hears of
    each model as it is scored.
    """
    started = time.monotonic()
    pooled = _concatenate(clients)
    chosen = np.sort(
        np.random.default_rng(config.seed).choice(
            len(clients), size=min(max_sites, len(clients)), replace=False
        )
    )
    # (name, rows, private, seed) of each model, in the order they train
    models = [("central, no DP", pooled, False, config.seed)]
    if config.sample_dp:
        models.append(("central, DP", pooled, True, config.seed))
    models += [
        (
            f"site {_site_name(task, site)} alone",
            clients[site],
            config.sample_dp,
            config.seed + site,
        )
        for site in map(int, chosen)
    ]
    scores = []
    for number, (name, rows, private, seed) in enumerate(models, start=1):
        scores.append(train_and_score(config, task, rows, test, private, seed))
        if on_progress is not None:
            on_progress(number, len(models), name, scores[-1])
    central = scores[0]
    central_dp = scores[1] if config.sample_dp else None
    local = [
        {"client": str(site)} | score
        for site, score in zip(chosen, scores[len(models) - len(chosen) :], strict=True)
    ]
    scoring = Scoring.of(task)
    headline = scoring.headline
    scored = [row for row in local if row[headline] is not None]
    worst = min(scored, key=lambda row: scoring.improvement(headline, row[headline]), default=None)
    mean = (
        {name: _mean([row[name] for row in scored]) for name in scoring.columns} if scored else None
    )
    baselines: dict[str, Any] = {
        "epochs": config.rounds * config.local_epochs,
        "constant": constant_prediction(task, pooled, test),
        "central": central,
        "central_dp": central_dp,
        "local_mean": mean,
        "local_worst": worst,
        "local_sites": len(local),
        "local_sites_total": len(clients),
        "local": local,
        "seconds": round(time.monotonic() - started, 1),
    }
    baselines["comparison"] = compare_to_baselines(federated, baselines, headline)
    return baselines


def _site_name(task: Task, site: int) -> str:
    return task.site_names[site] if site < len(task.site_names) else str(site)


def _concatenate(parts: Sequence[Dataset]) -> Dataset:
    """Every client's rows pooled; tensors are concatenated, so batches stay one slice."""
    datasets = list(parts)
    if all(isinstance(part, TensorDataset) for part in datasets):
        columns = zip(*(part.tensors for part in datasets), strict=True)  # type: ignore[attr-defined]
        return TensorDataset(*(torch.cat(column) for column in columns))
    return ConcatDataset(datasets)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def compare_to_baselines(
    federated: Mapping[str, Any], baselines: Mapping[str, Any], headline: str
) -> dict[str, Any]:
    """The `comparison` block: differences in the `headline` metric that the report states
    in words (gain over local training, cost of privacy), each None where a side lacks it.

    Raw differences (first minus second, in the metric's units): the report knows whether
    lower is better (summary.json `scoring`) and signs them for its sentences.
    """

    def difference(
        first: Mapping[str, Any] | None, second: Mapping[str, Any] | None
    ) -> float | None:
        if not first or not second or first.get(headline) is None or second.get(headline) is None:
            return None
        return float(first[headline] - second[headline])

    central, central_dp = baselines["central"], baselines["central_dp"]
    return {
        "metric": headline,
        "federated_minus_local_mean": difference(federated, baselines["local_mean"]),
        "federated_minus_local_worst": difference(federated, baselines["local_worst"]),
        "central_minus_central_dp": difference(central, central_dp),
        "central_dp_minus_federated": difference(central_dp, federated),
        "central_minus_federated": difference(central, federated),
    }
