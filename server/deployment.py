"""ServerApp side of a deployed federation: nodes hold the only data there is.

There is no server-side test set, and the server does not know the data's columns.
So before training, a query round asks every node for its table's FeatureStatistics
(column sums, sums of squares, counts, category vocabularies) and its node name; the
merge gives every node the same encoding (global means and deviations, union of
categories) and gives the server the model's input width. These statistics are
aggregates of raw data released WITHOUT differential privacy. Evaluation is
federated: each node scores the global model on a held-out part of its own file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from logging import INFO, WARN
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedmodel.config import RunConfig
from fedmodel.data import FeatureStatistics
from fedmodel.models import build_model
from fedmodel.protocol import EVALUATION_PREFIX, REFUSAL_MARKER
from server.aggregators import build_aggregator
from server.central_dp import with_central_dp
from server.polling_grid import PollingGrid
from server.resume import open_run_record, run_rounds
from server.run_record import write_json_atomic
from server.strategy import FederationStopped, GuardedStrategy, aggregate_train_metrics

DEPLOYMENT_SCENARIO = "deployment"  # RunConfig.scenario of a run on enrolled nodes
STATISTICS_KEY = "feature-statistics"  # client/local_data.py reads these two keys
CLIENT_INDEX_KEY = "client-index"
NODES_FILE = "nodes.json"  # node name -> client number, stable across --resume


def run_deployment(grid: Grid, config: RunConfig) -> None:
    """Query round, then FedAvg with federated evaluation; files land in output-dir."""
    run_dir = Path(config.output_dir).absolute()
    # replies are picked up in 0.1 s, not Flower's 3 s; too few nodes end the run
    grid = PollingGrid(grid, config.min_clients, config.round_timeout)
    statistics, names = query_feature_statistics(grid, config)
    torch.manual_seed(config.seed)
    model = build_model(config.model, len(statistics.feature_names()))
    recorder, resume = open_run_record(config, run_dir)

    inner = build_aggregator(
        config.aggregator,
        config.clients,
        config.byzantine,
        config.proximal_mu,
        evaluate_metrics_aggr_fn=aggregate_evaluation,
        train_metrics_aggr_fn=aggregate_train_metrics,
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=config.clients,
        min_evaluate_nodes=config.clients,
        min_available_nodes=config.clients,
    )
    strategy = EvaluatingInTraining(
        with_central_dp(inner, config, recorder),
        recorder,
        min_clients=config.min_clients,
        max_update_norm=config.max_update_norm or None,
        records_federated_evaluation=True,
    )
    positions = client_positions(run_dir, names)
    index = {str(node): positions[node] for node in names}
    shared = ConfigRecord(
        {STATISTICS_KEY: statistics.to_json(), CLIENT_INDEX_KEY: json.dumps(index)}
    )
    stopped: str | None = None
    try:
        run_rounds(
            grid,
            strategy,
            recorder,
            ArrayRecord(model.state_dict()),
            resume,
            lambda server_round, arrays: None,  # evaluation is federated (the nodes')
            train_config=shared,
            evaluate_config=shared,
        )
    except FederationStopped as stop:
        log(WARN, "stopping the run early: %s", stop)
        stopped = str(stop)
        strategy.evaluate_final_model(grid, shared, config.round_timeout)
    for name, position in positions_by_name(run_dir).items():
        entry = recorder.clients.get(str(position))
        if entry is not None:  # node ids only for nodes of this run (not resumed-away ones)
            entry["node"] = name
    for node, position in index.items():
        entry = recorder.clients.get(str(position))
        if entry is not None:
            entry |= {"node": names[int(node)], "node_id": node}
    recorder.write_summary(completed=True, stopped_early=stopped)


class EvaluatingInTraining(GuardedStrategy):
    """Federated evaluation rides on the next round's train message.

    A deployed node scores the global model it receives on its held-out rows before it
    trains (metrics prefixed `eval-`), so round r's train replies evaluate round r-1's
    model, and only the last round of the run sends evaluate messages. A round is then
    one message per node instead of two, and Flower's SuperNode, which sleeps 3 s
    after each empty pull, waits once per round instead of twice.
    """

    _sent_model: tuple[int, ArrayRecord | None] = (0, None)  # (round it ends, the model)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent_model = (server_round - 1, arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def evaluate_final_model(self, grid: Grid, shared: ConfigRecord, timeout: float) -> None:
        """The run stopped early: have the nodes score the model it ends with, which no
        later train message will evaluate (say, every node refused a replayed round)."""
        model_round, arrays = self._sent_model
        if arrays is None or model_round < 1:
            return
        if model_round in {row["round"] for row in self.recorder.rounds}:
            return
        config = ConfigRecord({**shared, "server-round": model_round})
        question = RecordDict({"arrays": arrays, "config": config})
        messages = [Message(question, node, MessageType.EVALUATE) for node in grid.get_node_ids()]
        replies = [
            reply.content
            for reply in grid.send_and_receive(messages, timeout=timeout)
            if not reply.has_error()
        ]
        if replies:
            metrics = aggregate_evaluation(replies, "num-examples")
            self.recorder.record_evaluation(model_round, _scores(metrics))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        evaluations = [
            reply.content
            for reply in replies
            if not reply.has_error()
            and EVALUATION_PREFIX + "num-examples" in reply.content.metric_records["metrics"]
        ]
        previous = server_round - 1
        recorded = {row["round"] for row in self.recorder.rounds}
        if evaluations and previous not in recorded:  # a paused run evaluated it already
            metrics = aggregate_evaluation(evaluations, "num-examples", EVALUATION_PREFIX)
            self.recorder.record_evaluation(previous, _scores(metrics))
        return super().aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        run = self.recorder.config
        last = min(run.rounds, run.stop_after_round or run.rounds)
        if server_round < last:
            return []  # the next round's train replies evaluate this model
        return super().configure_evaluate(server_round, arrays, config, grid)


def _scores(metrics: MetricRecord) -> dict[str, float]:
    return {key: float(metrics[key]) for key in ("auroc", "accuracy", "loss")}  # type: ignore[arg-type]


def client_positions(run_dir: Path, names: dict[int, str]) -> dict[int, int]:
    """Each node's client number in the run record: 0, 1, ... in node-name order.

    Kept in the run directory's nodes.json (name -> number), so a resumed run, which
    may have lost or gained nodes, gives every node the number it had before.
    """
    known = positions_by_name(run_dir)
    key = {node: names[node] or f"node-{node}" for node in names}
    for node in sorted(names, key=lambda node: (key[node], node)):
        known.setdefault(key[node], len(known))
    write_json_atomic(run_dir / NODES_FILE, known)
    return {node: known[key[node]] for node in names}


def positions_by_name(run_dir: Path) -> dict[str, int]:
    path = run_dir / NODES_FILE
    return dict(json.loads(path.read_text())) if path.exists() else {}


def query_feature_statistics(
    grid: Grid, config: RunConfig
) -> tuple[FeatureStatistics, dict[int, str]]:
    """Wait for `clients` nodes (the grid gives up after --round-timeout), ask each for
    its statistics; merge them."""
    try:
        while len(node_ids := list(grid.get_node_ids())) < config.clients:
            log(INFO, "Waiting for nodes: %d of %d connected", len(node_ids), config.clients)
            time.sleep(2)
    except FederationStopped as stop:  # nothing trained yet: the run fails
        raise RuntimeError(str(stop)) from None
    question = RecordDict({"config": ConfigRecord({"ask": STATISTICS_KEY})})
    messages = [Message(question, node, MessageType.QUERY) for node in node_ids]
    merged: FeatureStatistics | None = None
    names: dict[int, str] = {}
    for reply in grid.send_and_receive(messages, timeout=config.round_timeout):
        if reply.has_error():
            log(WARN, "%s %d: %s", REFUSAL_MARKER, reply.metadata.src_node_id,
                reply.error.reason)  # fmt: skip
            continue
        answer = reply.content.config_records["statistics"]
        local = FeatureStatistics.from_json(str(answer[STATISTICS_KEY]))
        merged = local if merged is None else merged.merge(local)
        names[reply.metadata.src_node_id] = str(answer.get("node-name", ""))
    if merged is None or len(names) < config.clients:
        raise RuntimeError(
            f"only {len(names)} of {config.clients} nodes described their data (the others "
            "refused or failed: see their reasons above)"
        )
    log(INFO, "Feature statistics of %d rows from %d nodes: %d features", merged.rows,
        len(names), len(merged.feature_names()))  # fmt: skip
    return merged, names


def aggregate_evaluation(
    replies: list[RecordDict], weighted_by_key: str, prefix: str = ""
) -> MetricRecord:
    """Example-weighted means over nodes; AUROC only over nodes where it is defined.

    This is the mean of the nodes' local AUROCs, not the AUROC of the pooled hold-outs
    (which would need every score on the server). `prefix` reads the evaluation that
    rides on train replies (`eval-loss`, ...).
    """
    metrics = [reply.metric_records["metrics"] for reply in replies]

    def values(key: str) -> list[float]:
        return [float(m[prefix + key]) for m in metrics]  # type: ignore[arg-type]

    def mean(key: str, by: list[float]) -> float:
        total = sum(by)
        return sum(w * v for w, v in zip(by, values(key), strict=True)) / total if total else 0.0

    weights, auroc_weights = values(weighted_by_key), values("auroc-weight")
    return MetricRecord(
        {
            "loss": mean("loss", weights),
            "accuracy": mean("accuracy", weights),
            "auroc": mean("auroc", auroc_weights),
            "num-examples": sum(weights),
        }
    )
