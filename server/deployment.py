"""ServerApp side of a deployed federation: nodes hold the only data there is.

There is no server-side test set, and the server does not know the data's columns.
So before training, a query round asks every node for its table's FeatureStatistics
(column sums, sums of squares, counts, category vocabularies) and its node name; the
merge gives every node the same encoding (global means and deviations, union of
categories) and gives the server the model's input width. These statistics are
aggregates of raw data released WITHOUT differential privacy. Evaluation is
federated: each node scores the global model on a held-out part of its own file.

Nodes are untrusted. A run's members are the nodes enrolled in the federation's
registry (nodes.json), by the node ID Flower authenticated; a node Flower knows but
the registry does not is kept out. A node's name is the registry's. Statistics outside
`FeatureStatistics.bounds_violation`'s bounds leave their node out of the run, with the
reason recorded (round 0 of `rejected_updates`). Weights are uniform, or capped by the
`max_rows` the operator gave every member at enrollment; no node's report raises them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARN
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedmodel.config import RunConfig
from fedmodel.errors import DataError
from fedmodel.feature_statistics import FeatureStatistics
from fedmodel.models import build_model
from fedmodel.protocol import (
    ARRAYS_KEY,
    CLIENT_INDEX_KEY,
    CONFIG_KEY,
    EVALUATION_PREFIX,
    METRICS_KEY,
    QUESTION_KEY,
    REFUSAL_MARKER,
    SERVER_ROUND_KEY,
    STATISTICS_KEY,
    STATISTICS_RECORD_KEY,
)
from fedmodel.run_directory import write_json_atomic
from server.aggregators import build_aggregator
from server.central_dp import with_central_dp
from server.enrollment import load_registry
from server.federated_evaluation import combine_evaluations
from server.polling_grid import PollingGrid
from server.reply_schema import InvalidReply, evaluation_report
from server.resume import open_run_record, run_rounds
from server.strategy import FederationStopped, GuardedStrategy, Members, aggregate_train_metrics
from server.superlink import Federation

DEPLOYMENT_SCENARIO = "deployment"  # RunConfig.scenario of a run on enrolled nodes
NODES_FILE = "nodes.json"  # node name -> client number, stable across --resume


def run_deployment(grid: Grid, config: RunConfig) -> None:
    """Query round, then FedAvg with federated evaluation; files land in output-dir."""
    run_dir = Path(config.output_dir).absolute()
    enrolled = enrolled_nodes(config)
    # replies are picked up in 0.1 s, not Flower's 3 s; too few members end the run
    grid = MemberGrid(grid, enrolled, config.min_clients, config.round_timeout)
    statistics, left_out = query_feature_statistics(grid, config, enrolled)
    torch.manual_seed(config.seed)
    model = build_model(config.model, len(statistics.feature_names()))
    recorder, resume = open_run_record(config, run_dir)
    for node, reason in left_out.items():
        recorder.record_rejection(0, node, None, reason)
    names = {node: enrolled[node].name for node in grid.get_node_ids()}

    inner = build_aggregator(
        config.aggregator,
        config.clients,
        config.byzantine,
        config.proximal_mu,
        train_metrics_aggr_fn=aggregate_train_metrics,
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=config.clients,
        min_evaluate_nodes=config.clients,
        min_available_nodes=config.clients,
    )
    positions = client_positions(run_dir, names)
    strategy = EvaluatingInTraining(
        with_central_dp(inner, config, recorder),
        recorder,
        min_clients=config.min_clients,
        max_update_norm=config.max_update_norm or None,
        members=Members(
            clients={node: str(position) for node, position in positions.items()},
            weight_caps=weight_caps({node: enrolled[node] for node in names}),
        ),
    )
    index = {str(node): position for node, position in positions.items()}
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
    for node, position in positions.items():
        entry = recorder.clients.get(str(position))
        if entry is not None:
            entry |= {"node": names[node], "node_id": str(node)}
    recorder.write_summary(completed=True, stopped_early=stopped)


@dataclass(frozen=True)
class EnrolledNode:
    """What the federation's registry says about a node: its name and, if the operator
    vouched for one at enrollment (`server enroll --max-rows`), its most rows."""

    name: str
    max_rows: int | None


def enrolled_nodes(config: RunConfig) -> dict[int, EnrolledNode]:
    """The registry's nodes that are not revoked, by Flower node ID."""
    if not config.federation_dir:
        raise RuntimeError("a deployed run needs federation-dir (fedmodel run sets it)")
    registry = load_registry(Federation.load(Path(config.federation_dir)))
    return {
        int(entry["node_id"]): EnrolledNode(name, _max_rows(entry))
        for name, entry in registry.items()
        if entry.get("status") != "revoked"
    }


def _max_rows(entry: Mapping[str, Any]) -> int | None:
    value = entry.get("max_rows")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def weight_caps(members: Mapping[int, EnrolledNode]) -> dict[int, int]:
    """Each member's weight cap: its max_rows when every member has one, else 1 (uniform).

    Mixing would let a node with a vouched count of N outweigh N nodes without one.
    """
    if members and all(node.max_rows is not None for node in members.values()):
        return {node: int(member.max_rows or 1) for node, member in members.items()}
    capped = sorted(member.name for member in members.values() if member.max_rows is not None)
    if capped:
        log(WARN, "uniform weights: only %s have --max-rows, not every node", ", ".join(capped))
    return dict.fromkeys(members, 1)


class MemberGrid(PollingGrid):
    """The Grid as far as a run's members go: other nodes are not sampled or asked.

    Starts with every enrolled node (by authenticated node ID); `leave` takes one out.
    """

    def __init__(
        self,
        grid: Grid,
        enrolled: Mapping[int, EnrolledNode],
        min_nodes: int = 0,
        node_wait_s: float = float("inf"),
    ) -> None:
        super().__init__(grid, min_nodes, node_wait_s)
        self.members = set(enrolled)
        self._outsiders: set[int] = set()

    def leave(self, node: int) -> None:
        self.members.discard(node)
        self._outsiders.add(node)

    def get_node_ids(self) -> Iterable[int]:
        online = list(self.connected_node_ids())
        for node in set(online) - self.members - self._outsiders:
            log(WARN, "node %d is not enrolled in this federation: kept out of the run", node)
            self._outsiders.add(node)
        return self.enough([node for node in online if node in self.members])


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
        config = ConfigRecord({**shared, SERVER_ROUND_KEY: model_round})
        question = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
        messages = [Message(question, node, MessageType.EVALUATE) for node in grid.get_node_ids()]
        self._record_evaluation(model_round, grid.send_and_receive(messages, timeout=timeout))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        previous = server_round - 1
        if previous not in {row["round"] for row in self.recorder.rounds}:  # paused: done
            self._record_evaluation(previous, replies, EVALUATION_PREFIX)
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The last round's evaluate replies, validated and combined (never Flower's mean,
        which weighs nodes by their own counts and raises on inconsistent replies)."""
        scores = self._record_evaluation(server_round, replies)
        return None if scores is None else MetricRecord(dict(scores))

    def _record_evaluation(
        self, model_round: int, replies: Iterable[Message], prefix: str = ""
    ) -> dict[str, float] | None:
        """Validate each node's score of `model_round`'s model; record their combination.

        `prefix`: the scores ride on train replies, whose own checks follow separately.
        """
        reports = []
        for reply in replies:
            if reply.has_error():
                continue
            node = reply.metadata.src_node_id
            try:
                metrics = reply.content.metric_records.get(METRICS_KEY)
                if metrics is None and not prefix:
                    raise InvalidReply("no MetricRecord 'metrics'")
                report = None if metrics is None else evaluation_report(metrics, prefix)
                if report is not None:
                    reports.append((report, self._weight_cap(node)))
            except InvalidReply as invalid:
                self.reject(model_round, node, f"evaluation of round {model_round}: {invalid}")
        if not reports:
            return None
        scores = combine_evaluations(reports, self.recorder.config.evaluation)
        self.recorder.record_evaluation(model_round, scores)
        return scores

    def _weight_cap(self, node: int) -> int:
        if self.members is None or node not in self.members.weight_caps:
            raise InvalidReply(f"node {node} is not a member of this run")
        return self.members.weight_caps[node]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        run = self.recorder.config
        last = min(run.rounds, run.stop_after_round or run.rounds)
        if server_round < last:
            return []  # the next round's train replies evaluate this model
        return super().configure_evaluate(server_round, arrays, config, grid)


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
    grid: MemberGrid, config: RunConfig, enrolled: Mapping[int, EnrolledNode]
) -> tuple[FeatureStatistics, dict[int, str]]:
    """Wait for `clients` members (the grid gives up after --round-timeout), ask each
    for its statistics; merge the valid ones.

    Returns the merge and, by node, why a node was left out (the grid's members are
    then the nodes that described their data within bounds).
    """
    try:
        while len(node_ids := list(grid.get_node_ids())) < config.clients:
            log(INFO, "Waiting for nodes: %d of %d connected", len(node_ids), config.clients)
            time.sleep(2)
    except FederationStopped as stop:  # nothing trained yet: the run fails
        raise RuntimeError(str(stop)) from None
    question = RecordDict({CONFIG_KEY: ConfigRecord({QUESTION_KEY: STATISTICS_KEY})})
    messages = [Message(question, node, MessageType.QUERY) for node in node_ids]
    merged: FeatureStatistics | None = None
    described: set[int] = set()
    left_out: dict[int, str] = {}
    for reply in grid.send_and_receive(messages, timeout=config.round_timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log(WARN, "%s %d: %s", REFUSAL_MARKER, node, reply.error.reason)
            continue
        try:
            local = _node_statistics(reply, enrolled[node].max_rows)
            merged = local if merged is None else merged.merge(local)
        except DataError as error:
            left_out[node] = f"feature statistics: {error}"
            log(WARN, "node %d is left out of the run: %s", node, left_out[node])
            continue
        described.add(node)
    for node in set(node_ids) - described:
        grid.leave(node)
    if merged is None or len(described) < config.clients:
        raise RuntimeError(
            f"only {len(described)} of {config.clients} nodes described their data (the others "
            "refused or failed: see their reasons above)"
        )
    log(INFO, "Feature statistics of %d rows from %d nodes: %d features", merged.rows,
        len(described), len(merged.feature_names()))  # fmt: skip
    return merged, left_out


def _node_statistics(reply: Message, max_rows: int | None) -> FeatureStatistics:
    """A node's answer to the query round, within bounds; DataError says why not."""
    answer = reply.content.config_records.get(STATISTICS_RECORD_KEY)
    if answer is None or not isinstance(answer.get(STATISTICS_KEY), str):
        raise DataError(f"no ConfigRecord 'statistics' with a '{STATISTICS_KEY}' text")
    statistics = FeatureStatistics.from_json(str(answer[STATISTICS_KEY]))
    violation = statistics.bounds_violation()
    if violation is None and max_rows is not None and statistics.rows > max_rows:
        violation = f"{statistics.rows} rows, above the {max_rows} enrolled for this node"
    if violation is not None:
        raise DataError(violation)
    return statistics
