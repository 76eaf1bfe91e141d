"""ServerApp: the configured aggregation rule, central evaluation and a checkpoint every round."""

from __future__ import annotations

from logging import WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedmodel.config import RunConfig
from fedmodel.datasets.scenarios import global_test_set
from fedmodel.evaluation import evaluate
from fedmodel.models import build_model
from server.aggregators import build_aggregator
from server.central_dp import with_central_dp
from server.deployment import DEPLOYMENT_SCENARIO, run_deployment
from server.resume import open_run_record, run_rounds
from server.secagg import run_secagg
from server.strategy import FederationStopped, GuardedStrategy, aggregate_train_metrics

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `rounds` rounds of FedAvg and leave summary, metrics and checkpoints in the run dir."""
    config = RunConfig.from_run_config(context.run_config)
    if config.scenario == DEPLOYMENT_SCENARIO:  # nodes hold all the data; no test set here
        run_deployment(grid, config)
        return
    run_dir = Path(config.output_dir).absolute()
    test = global_test_set(config)
    torch.manual_seed(config.seed)
    model = build_model(config.model, test.num_features, test.num_classes)
    recorder, resume = open_run_record(config, run_dir)

    def evaluate_global_model(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics = evaluate(model, test)
        recorder.record_evaluation(server_round, metrics)
        record: dict[str, int | float | list[int] | list[float]] = {**metrics}
        return MetricRecord(record)

    if config.secagg:  # the coordinator sees only sums: Flower's legacy SecAgg+ path
        run_secagg(grid, context, config, model, evaluate_global_model, recorder)
        return

    inner = build_aggregator(
        config.aggregator,
        config.clients_per_round,
        config.byzantine,
        config.proximal_mu,
        fraction_train=config.fraction,
        fraction_evaluate=0.0,
        min_train_nodes=config.clients_per_round,
        min_available_nodes=config.clients,
        train_metrics_aggr_fn=aggregate_train_metrics,
    )
    strategy = GuardedStrategy(
        with_central_dp(inner, config, recorder),
        recorder,
        min_clients=config.min_clients,
        max_update_norm=config.max_update_norm or None,
    )
    try:
        run_rounds(
            grid, strategy, recorder, ArrayRecord(model.state_dict()), resume, evaluate_global_model
        )
    except FederationStopped as stop:
        # The last evaluated round's checkpoint is the final model; the run ends cleanly.
        log(WARNING, "stopping the run early: %s", stop)
        recorder.write_summary(completed=True, stopped_early=str(stop))
        return
    recorder.write_summary(completed=True)
