"""Federated evaluation: the nodes score each global model, the coordinator combines.

`EvaluatingInTraining` collects the scores (riding on train replies, so a round is one
message per node); `combine_evaluations` turns them into the federation's, bounded per
node.

In deployment the server has no test set: each node scores the model on its own
held-out rows and reports loss, accuracy, AUROC and how many rows they rest on. Those
counts are the node's word, so each is capped (`cap`: 1 for uniform weights, or the
rows the operator vouched for): a node cannot buy the federation's AUROC by reporting
a vast hold-out. `median` takes the per-metric median over the nodes instead, which a
minority of nodes cannot move past the honest nodes' range (Yin et al. 2018,
"Byzantine-Robust Distributed Learning", coordinate-wise median).

The AUROC is a combination of the nodes' local AUROCs, not the AUROC of the pooled
hold-outs (that would need every score on the server); it rests only on nodes where
it is defined (`auroc_weight` > 0), and accuracy only on nodes that report one. A task
that is not a classifier (a regression, or a user's task with its own metrics) is
scored by its loss alone, the mean of its per-sample loss on the hold-outs (for
squared error, the MSE); its AUROC and accuracy are then 0, as any score no node can
speak to.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedmodel.config import EVALUATION_METHODS
from fedmodel.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    EVALUATION_PREFIX,
    METRICS_KEY,
    SERVER_ROUND_KEY,
)
from server.reply_schema import EvaluationReport, InvalidReply, evaluation_report
from server.run_record import RunRecorder
from server.strategy import FederationStopped, GuardedStrategy

SCORES = ("auroc", "accuracy", "loss")


def combine_evaluations(
    reports: Sequence[tuple[EvaluationReport, int]], method: str = "mean"
) -> dict[str, float]:
    """The federation's scores from (node's report, node's weight cap) pairs.

    A score no node can speak to (all hold-outs empty, AUROC undefined everywhere) is 0.
    """
    if method not in EVALUATION_METHODS:
        raise ValueError(f"unknown evaluation method {method!r}")
    rows = [(report, min(report.num_examples, cap)) for report, cap in reports]
    curves = [(report, min(report.auroc_weight, cap)) for report, cap in reports]
    scored = {
        "loss": [(report.loss, weight) for report, weight in rows],
        "accuracy": [
            (report.accuracy, weight) for report, weight in rows if report.accuracy is not None
        ],
        "auroc": [(report.auroc, weight) for report, weight in curves],
    }
    combine = _median if method == "median" else _mean
    return {name: combine([(value, w) for value, w in scored[name] if w > 0]) for name in SCORES}


def _mean(values: list[tuple[float, int]]) -> float:
    total = sum(weight for _, weight in values)
    return sum(value * weight for value, weight in values) / total if total else 0.0


def _median(values: list[tuple[float, int]]) -> float:
    return float(statistics.median(value for value, _ in values)) if values else 0.0


class Rejecting(Protocol):
    """Who records a node's invalid reply (a GuardedStrategy, or SecAgg+'s strategy)."""

    recorder: RunRecorder

    def reject(self, server_round: int, node: int, reason: str, client: str | None = None) -> None:
        """Log and record why `node`'s reply in `server_round` is not used."""
        ...


def record_node_scores(
    judge: Rejecting,
    model_round: int,
    scored: Iterable[tuple[int, Mapping[str, Any] | None]],
    weight_caps: Mapping[int, int],
    prefix: str = "",
) -> dict[str, float] | None:
    """Validate each (node, metrics) score of `model_round`'s model, capped by the node's
    weight cap; record their combination (None when no node scored it).

    `prefix`: scores riding on train replies (`eval-loss`, ...), which may carry none; an
    evaluate reply without metrics, or from a node that is not a member, is rejected.
    """
    reports = []
    for node, metrics in scored:
        try:
            if metrics is None and not prefix:
                raise InvalidReply("no MetricRecord 'metrics'")
            report = None if metrics is None else evaluation_report(metrics, prefix)
            if report is not None:
                if node not in weight_caps:
                    raise InvalidReply(f"node {node} is not a member of this run")
                reports.append((report, weight_caps[node]))
        except InvalidReply as invalid:
            judge.reject(model_round, node, f"evaluation of round {model_round}: {invalid}")
    if not reports:
        return None
    scores = combine_evaluations(reports, judge.recorder.config.evaluation)
    judge.recorder.record_evaluation(model_round, scores)
    return scores


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
        try:
            nodes = list(grid.get_node_ids())
        except FederationStopped:  # the run stopped for want of nodes: none left to score it
            return
        messages = [Message(question, node, MessageType.EVALUATE) for node in nodes]
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
        scored = [
            (reply.metadata.src_node_id, reply.content.metric_records.get(METRICS_KEY))
            for reply in replies
            if not reply.has_error()
        ]
        caps = {} if self.members is None else self.members.weight_caps
        return record_node_scores(self, model_round, scored, caps, prefix)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        run = self.recorder.config
        last = min(run.rounds, run.stop_after_round or run.rounds)
        if server_round < last:
            return []  # the next round's train replies evaluate this model
        return super().configure_evaluate(server_round, arrays, config, grid)
