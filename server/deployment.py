"""A deployed federation's run: the enrolled nodes hold the only data there is.

There is no server-side test set, and the server does not know the data's columns.
So before training, a query round asks every node for its table's FeatureStatistics
(column sums, sums of squares, counts, category vocabularies) and its node name; the
merge gives every node the same encoding (global means and deviations, union of
categories) and gives the server the model's input width. These statistics are
aggregates of raw data released WITHOUT differential privacy. Evaluation is
federated: each node scores the global model on a held-out part of its own file
(server/federated_evaluation.py).

Nodes are untrusted. A run's members are the nodes enrolled in the federation's
registry (nodes.json), by the node ID Flower authenticated; a node Flower knows but
the registry does not is kept out. A node's name is the registry's. Statistics outside
`FeatureStatistics.bounds_violation`'s bounds leave their node out of the run, with the
reason recorded (round 0 of `rejected_updates`). Weights are uniform, or capped by the
`max_rows` the operator gave every member at enrollment; no node's report raises them.

A run of a user's installed task (`fedmodel run --installed-task NAME`) asks the nodes for their
names only: the task's `local_data` encodes its own rows, and the model is the task's,
built from the same task package installed on the coordinator's machine. The coordinator
names the task; it never sends code (client/tasks.py checks the owner's approval).
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
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmodel.config import TABULAR_TASK, RunConfig
from fedmodel.errors import DataError
from fedmodel.feature_statistics import FeatureStatistics
from fedmodel.protocol import (
    CLIENT_INDEX_KEY,
    CONFIG_KEY,
    QUESTION_KEY,
    REFUSAL_MARKER,
    STATISTICS_KEY,
    STATISTICS_RECORD_KEY,
)
from fedmodel.run_directory import NODES_FILE, write_json_atomic
from fedmodel.table_schema import TableSchema
from fedmodel.table_task import table_task
from fedmodel.task import Task
from fedmodel.task_loading import task_from_reference
from server.enrollment import load_registry
from server.federated_evaluation import EvaluatingInTraining
from server.polling_grid import PollingGrid
from server.recording_grid import RECEIVED_DIR, RecordingGrid
from server.resume import RoundEvaluation
from server.run_record import RunRecorder
from server.strategy import FederationStopped, GuardedStrategy, Members
from server.superlink import Federation

STATISTICS_FILE = "feature_statistics.json"  # the encoding every node was sent, kept on resume


class DeployedSetting:
    """A run on the enrolled nodes, as `server.wiring.run_federation` wires it.

    `join` runs the query round, which gives the tabular model its input width (a user
    task's model is its own: `statistics` is None); then every member trains in every
    round and scores each model on its own held-out rows.
    """

    def __init__(
        self,
        grid: MemberGrid,
        config: RunConfig,
        enrolled: Mapping[int, EnrolledNode],
        statistics: FeatureStatistics | None,
        left_out: Mapping[int, str],
        task: Task,
    ) -> None:
        self.grid = grid
        self.config = config
        self.enrolled = enrolled
        self.statistics = statistics
        self.left_out = left_out
        self.task = task
        self.shared: ConfigRecord | None = None  # the encoding and client numbers, once known
        self._names: dict[int, str] = {}
        self._positions: dict[int, int] = {}
        self._strategy: EvaluatingInTraining | None = None

    @classmethod
    def join(cls, grid: Grid, config: RunConfig) -> DeployedSetting:
        """Wait for the enrolled nodes and merge their feature statistics (tabular task).

        A user task is loaded from the coordinator's own installation (its operator's
        choice) before any node is asked, so a task missing here fails the run at once.
        """
        user_task = None
        if config.app_task != TABULAR_TASK:
            user_task = task_from_reference(config.app_task, config)
        enrolled = enrolled_nodes(config)
        if config.record_messages:
            grid = RecordingGrid(grid, Path(config.output_dir).absolute() / RECEIVED_DIR)
        # replies are picked up in 0.1 s, not Flower's 3 s; too few members end the run
        members = MemberGrid(grid, enrolled, config.min_clients, config.round_timeout)
        statistics, left_out = query_feature_statistics(members, config, enrolled)
        if statistics is not None:  # a node's label column is binary: one logit per row
            run_dir = Path(config.output_dir).absolute()
            statistics = released_statistics(run_dir, statistics, config.resume)
            # the model file keeps only what every node was sent: the merged statistics
            schema = TableSchema(config.label, statistics=statistics)
            task = table_task(config, len(statistics.feature_names()), 2, table=schema)
        else:
            assert user_task is not None  # only a user task's query returns no statistics
            task = user_task
        return cls(members, config, enrolled, statistics, left_out, task)

    def begin(self, recorder: RunRecorder, model: torch.nn.Module) -> RoundEvaluation:
        """Record who the query round left out and number the members; the server scores
        nothing itself (the nodes' scores arrive with their replies)."""
        for node, reason in self.left_out.items():
            recorder.record_rejection(0, node, None, reason)
        self._names = {node: self.enrolled[node].name for node in self.grid.get_node_ids()}
        self._positions = client_positions(recorder.run_dir, self._names)
        index = {str(node): position for node, position in self._positions.items()}
        self.shared = ConfigRecord({CLIENT_INDEX_KEY: json.dumps(index)})
        if self.statistics is not None:
            self.shared[STATISTICS_KEY] = self.statistics.to_json()
        return lambda server_round, arrays: None

    def sampling(self, config: RunConfig) -> dict[str, float]:
        """Every member trains in every round and scores every model it receives."""
        everyone = ("min_train_nodes", "min_evaluate_nodes", "min_available_nodes")
        return {"fraction_train": 1.0, "fraction_evaluate": 1.0} | dict.fromkeys(
            everyone, config.clients
        )

    def members(self) -> Members:
        """Identity and weight of a reply are the registry's, not the node's."""
        members = {node: self.enrolled[node] for node in self._names}
        return Members(
            clients={node: str(position) for node, position in self._positions.items()},
            weight_caps=weight_caps(members),
        )

    def guard(self, strategy: Strategy, recorder: RunRecorder) -> GuardedStrategy:
        """`strategy` behind the reply checks, with the registry's `members`."""
        self._strategy = EvaluatingInTraining(
            strategy,
            recorder,
            min_clients=self.config.min_clients,
            max_update_norm=self.config.max_update_norm or None,
            members=self.members(),
        )
        return self._strategy

    def end(self, recorder: RunRecorder, stopped: bool) -> None:
        """Have the nodes score the final model if the run stopped early; name the nodes."""
        if stopped and self._strategy is not None and self.shared is not None:
            self._strategy.evaluate_final_model(self.grid, self.shared, self.config.round_timeout)
        for name, position in positions_by_name(recorder.run_dir).items():
            entry = recorder.clients.get(str(position))
            if entry is not None:  # node ids only for nodes of this run (not resumed-away ones)
                entry["node"] = name
        for node, position in self._positions.items():
            entry = recorder.clients.get(str(position))
            if entry is not None:
                entry |= {"node": self._names[node], "node_id": str(node)}


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


def released_statistics(
    run_dir: Path, merged: FeatureStatistics, resumed: bool
) -> FeatureStatistics:
    """The encoding of the whole run: the first query round's merge, kept in the run
    directory. A resumed run, whose nodes may be fewer, encodes with it too: its model
    was trained on that encoding, and the model file stores it."""
    path = run_dir / STATISTICS_FILE
    if resumed and path.is_file():
        return FeatureStatistics.from_json(path.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, json.loads(merged.to_json()))
    return merged


def positions_by_name(run_dir: Path) -> dict[str, int]:
    path = run_dir / NODES_FILE
    return dict(json.loads(path.read_text())) if path.exists() else {}


def query_feature_statistics(
    grid: MemberGrid, config: RunConfig, enrolled: Mapping[int, EnrolledNode]
) -> tuple[FeatureStatistics | None, dict[int, str]]:
    """Wait for `clients` members (the grid gives up after --round-timeout), ask each
    for its statistics; merge the valid ones.

    Returns the merge (None for a user task: its nodes answer with their names only)
    and, by node, why a node was left out (the grid's members are then the nodes that
    answered, with statistics within bounds).
    """
    tabular = config.app_task == TABULAR_TASK
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
            if tabular:
                local = _node_statistics(reply, enrolled[node].max_rows)
                merged = local if merged is None else merged.merge(local)
        except DataError as error:
            left_out[node] = f"feature statistics: {error}"
            log(WARN, "node %d is left out of the run: %s", node, left_out[node])
            continue
        described.add(node)
    for node in set(node_ids) - described:
        grid.leave(node)
    if (tabular and merged is None) or len(described) < config.clients:
        raise RuntimeError(
            f"only {len(described)} of {config.clients} nodes described their data (the others "
            "refused or failed: see their reasons above)"
        )
    if merged is not None:
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
