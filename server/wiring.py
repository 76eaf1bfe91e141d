"""One ServerApp wiring for every run: in simulation, in deployment and with SecAgg+.

Every run seeds and builds its model, opens (or resumes) its run record, wires the
aggregation - the configured rule under central DP under `GuardedStrategy`, or with
`--secagg` Flower's legacy SecAgg+ workflow, which shares everything here but that
step - runs its rounds, ends cleanly when too few clients are left
(`FederationStopped`) and writes summary.json. The one thing that differs is the
evaluation mode, and the caller passes it in:
- `CentralEvaluation`: the server scores every global model on a test set the caller
  holds (the simulation harness passes its scenario's: simulations/apps.py);
- `FederatedEvaluation`: the server holds no data; the enrolled nodes describe their
  columns, train, and score each model on their own held-out rows (server/deployment.py).
So the ServerApp never chooses data: the deployed one (server/app.py) imports no dataset
catalogue.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch.utils.data import Dataset

from fedmodel.config import RunConfig
from fedmodel.errors import ConfigError
from fedmodel.evaluation import evaluate
from fedmodel.run_directory import Scoring
from fedmodel.task import Task
from server.aggregators import build_aggregator
from server.central_dp import with_central_dp
from server.deployment import DeployedSetting
from server.distributed_dp import distributed_dp_strategy
from server.model_files import write_model_files
from server.resume import RoundEvaluation, open_run_record, run_rounds
from server.run_record import RunRecorder
from server.secagg import SecAggNodes, run_secagg
from server.strategy import FederationStopped, GuardedStrategy, aggregate_train_metrics


@dataclass(frozen=True)
class CentralEvaluation:
    """Score each global model on `test_set`, on the server, as `task` scores."""

    task: Task
    test_set: Dataset


@dataclass(frozen=True)
class FederatedEvaluation:
    """Have the enrolled nodes score each global model on their own held-out rows."""


Evaluation = CentralEvaluation | FederatedEvaluation


class RunSetting(Protocol):
    """What an evaluation mode decides about a run; `run_federation` wires the rest."""

    @property
    def grid(self) -> Grid:
        """What the rounds run on."""
        ...

    @property
    def task(self) -> Task:
        """What the run trains: the model factory, the loss and the metrics."""
        ...

    @property
    def shared(self) -> ConfigRecord | None:
        """What every train and evaluate message carries besides the round's own config."""
        ...

    def begin(self, recorder: RunRecorder, model: torch.nn.Module) -> RoundEvaluation:
        """The record is open: note what came before it; say how a round's model is scored."""
        ...

    def sampling(self, config: RunConfig) -> dict[str, float]:
        """FedAvg's node-sampling arguments (`fraction_*`, `min_*_nodes`) for this run."""
        ...

    def guard(self, strategy: Strategy, recorder: RunRecorder) -> GuardedStrategy:
        """`strategy` behind the reply checks and the run record."""
        ...

    def end(self, recorder: RunRecorder, stopped: bool) -> None:
        """The rounds are over (`stopped`: early); complete the record before its summary."""
        ...


def run_federation(
    grid: Grid,
    context: Context,
    config: RunConfig,
    evaluation: Evaluation,
    largest_client: int | None = None,
) -> None:
    """Run `config.rounds` rounds; leave summary, metrics, checkpoints and the model file
    (fedmodel.model_file) in output-dir.

    `largest_client`: in simulation, the most examples any client trains on, which SecAgg+
    divides the weights by so that no masked sum overflows (the harness knows it). Deployed
    nodes weigh their updates 1 under SecAgg+, so none of their sizes is needed.
    """
    if config.secagg and isinstance(evaluation, CentralEvaluation) and largest_client is None:
        raise ConfigError("a simulated --secagg run needs its largest client's size")
    if isinstance(evaluation, CentralEvaluation):
        setting: RunSetting = CentralSetting(grid, evaluation.task, evaluation.test_set)
    else:
        setting = DeployedSetting.join(grid, config)  # nodes hold all the data
    torch.manual_seed(config.seed)
    model = setting.task.model()
    recorder, resume = open_run_record(
        config, Path(config.output_dir).absolute(), Scoring.of(setting.task)
    )
    evaluate_round = setting.begin(recorder, model)
    stopped: str | None = None
    try:
        if config.secagg:  # SecAgg+: the server sees only sums
            nodes = None
            if isinstance(setting, DeployedSetting):
                assert setting.shared is not None  # begin() set it
                nodes = SecAggNodes(setting.members(), setting.shared)
            run_secagg(
                setting.grid, context, config, model, evaluate_round, recorder,
                largest_client or 1, nodes,
                distributed_dp_strategy if config.distributed_dp else None, resume,
            )  # fmt: skip
        else:
            sampling = setting.sampling(config)
            rule = build_aggregator(
                config.aggregator,
                int(sampling["min_train_nodes"]),  # the replies the rule's precondition counts
                config.byzantine,
                config.proximal_mu,
                config.server_lr,
                config.server_momentum,
                train_metrics_aggr_fn=aggregate_train_metrics,
                **sampling,
            )
            inner = with_central_dp(rule, config, recorder)
            run_rounds(
                setting.grid,
                setting.guard(inner, recorder),
                recorder,
                ArrayRecord(model.state_dict()),
                resume,
                evaluate_round,
                train_config=setting.shared,
                evaluate_config=setting.shared,
            )
    except FederationStopped as stop:
        # The last evaluated round's checkpoint is the final model; the run ends cleanly.
        log(WARNING, "stopping the run early: %s", stop)
        stopped = str(stop)
    setting.end(recorder, stopped is not None)
    summary = recorder.write_summary(completed=True, stopped_early=stopped)
    write_model_files(recorder.run_dir, setting.task, config, summary)


class CentralSetting:
    """A run whose server holds a test set: every node is sampled as `config` says."""

    shared: ConfigRecord | None = None

    def __init__(self, grid: Grid, task: Task, test_set: Dataset) -> None:
        self.grid = grid
        self.task = task
        self.test_set = test_set

    def begin(self, recorder: RunRecorder, model: torch.nn.Module) -> RoundEvaluation:
        def evaluate_global_model(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            metrics = evaluate(model, self.test_set, self.task.loss, self.task.metrics)
            recorder.record_evaluation(server_round, metrics)
            record: dict[str, int | float | list[int] | list[float]] = {**metrics}
            return MetricRecord(record)

        return evaluate_global_model

    def sampling(self, config: RunConfig) -> dict[str, float]:
        """`fraction` of the clients train each round; the server evaluates, no node does."""
        return {
            "fraction_train": config.fraction,
            "fraction_evaluate": 0.0,
            "min_train_nodes": config.clients_per_round,
            "min_available_nodes": config.clients,
        }

    def guard(self, strategy: Strategy, recorder: RunRecorder) -> GuardedStrategy:
        config = recorder.config
        return GuardedStrategy(
            strategy,
            recorder,
            min_clients=config.min_clients,
            max_update_norm=config.max_update_norm or None,
        )

    def end(self, recorder: RunRecorder, stopped: bool) -> None:
        """Nothing to add: the server scored every round itself."""
