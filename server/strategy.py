"""The coordinator's strategy: any aggregation rule, behind checks and a run record.

`GuardedStrategy` wraps a Flower Message-API strategy (FedAvg, FedMedian, Krum, ...) and
adds what every FedModel run needs around aggregation:
- each training reply is validated (`fedmodel.records.reply_rejection`); an invalid one
  is dropped with a logged, recorded reason instead of crashing the round or the run;
- every client's metrics (examples, loss, epsilon, mechanism history) are recorded;
- a client that refuses a round because its owner's privacy budget is spent (error code
  `BUDGET_EXHAUSTED_CODE`) or its owner's policy forbids the request
  (`POLICY_REFUSED_CODE`) is a normal dropout: logged with its reason (which
  `fedmodel run` shows the operator), recorded, not asked again in this run, and the
  run stops cleanly (`FederationStopped`) once fewer than `min_clients` clients train
  in a round.
Aggregated epsilon is the maximum over clients, never a mean: a mean would hide the
client whose data is least protected.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmodel.privacy.budget import BUDGET_EXHAUSTED_CODE
from fedmodel.protocol import POLICY_REFUSED_CODE, REFUSAL_MARKER
from fedmodel.records import reply_rejection
from server.run_record import RunRecorder

# A node's owner said no: its budget is spent, or its policy forbids what the run asks
REFUSAL_CODES = (BUDGET_EXHAUSTED_CODE, POLICY_REFUSED_CODE)


class FederationStopped(Exception):
    """Too few clients are left to train; the run ends here, cleanly, with what it has."""


def aggregate_train_metrics(replies: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Example-weighted mean training loss; maximum epsilon over the replying clients."""
    metrics = [reply.metric_records["metrics"] for reply in replies]
    aggregated = MetricRecord({"clients": len(metrics)})
    if all("train-loss" in m for m in metrics):  # deployed owners may withhold it
        weights = [_scalar(m[weighted_by_key]) for m in metrics]
        losses = [_scalar(m["train-loss"]) for m in metrics]
        aggregated["train-loss"] = sum(w * x for w, x in zip(weights, losses, strict=True)) / (
            sum(weights) or 1.0
        )
    epsilons = [_scalar(m["epsilon"]) for m in metrics if "epsilon" in m]
    if epsilons:
        aggregated["max-epsilon"] = max(epsilons)
    return aggregated


def with_common_metrics(replies: list[Message]) -> list[Message]:
    """Replies whose metrics keep only the keys every reply has.

    Flower's rules abort the round when replies' metric keys differ, and owners choose
    what they release (one withholds its training loss, another does not).
    """
    if not replies:
        return replies
    common = set.intersection(*(set(r.content.metric_records["metrics"]) for r in replies))
    for reply in replies:
        metrics = reply.content.metric_records["metrics"]
        reply.content["metrics"] = MetricRecord({k: metrics[k] for k in metrics if k in common})
    return replies


def _scalar(value: object) -> float:
    if not isinstance(value, int | float):
        raise TypeError(f"expected a number in the reply's metrics, got {type(value).__name__}")
    return float(value)


class GuardedStrategy(Strategy):
    """Validates, records and budget-checks around an inner aggregation strategy."""

    def __init__(
        self,
        inner: Strategy,
        recorder: RunRecorder,
        min_clients: int = 1,
        max_update_norm: float | None = None,
        records_federated_evaluation: bool = False,
    ) -> None:
        self.inner = inner
        self.recorder = recorder
        self.min_clients = min_clients
        self.max_update_norm = max_update_norm
        self.records_federated_evaluation = records_federated_evaluation
        self.exhausted: set[int] = set()
        self.client_of_node: dict[int, str] = {}
        self._global_arrays: ArrayRecord | None = None
        self._sent = 0

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner rule's sampling, minus the nodes whose owners have no budget left."""
        self._global_arrays = arrays
        messages = [
            message
            for message in self.inner.configure_train(server_round, arrays, config, grid)
            if message.metadata.dst_node_id not in self.exhausted
        ]
        if len(messages) < self.min_clients:
            raise FederationStopped(
                f"only {len(messages)} clients have privacy budget left for round "
                f"{server_round}; at least {self.min_clients} needed"
            )
        self._sent = len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        failed = [reply for reply in replies if reply.has_error()]
        dropouts = sum(reply.error.code in REFUSAL_CODES for reply in failed)
        self.recorder.record_failures(
            server_round,
            errors=len(failed) - dropouts,
            timeouts=self._sent - len(replies),
            dropouts=dropouts,
        )
        for reply in failed:
            if reply.error.code in REFUSAL_CODES:
                node = reply.metadata.src_node_id
                self.exhausted.add(node)
                log(WARNING, "%s %d: %s", REFUSAL_MARKER, node, reply.error.reason)
                self.recorder.record_dropout(
                    server_round, node, self.client_of_node.get(node), str(reply.error.reason)
                )
        trained = []
        for reply in replies:
            if reply.has_error():
                continue
            node = reply.metadata.src_node_id
            reason = reply_rejection(reply.content, self._reference(), self.max_update_norm)
            if reason is not None:
                log(WARNING, "rejected the update of node %d: %s", node, reason)
                self.recorder.record_rejection(server_round, node, self._client_of(reply), reason)
                continue
            self.client_of_node[node] = self._client_of(reply) or str(node)
            trained.append(reply)
        # What the clients spent is recorded even when their updates are not aggregated.
        self.recorder.record_replies(server_round, [reply.content["metrics"] for reply in trained])
        if len(trained) < self.min_clients:
            raise FederationStopped(
                f"only {len(trained)} clients trained in round {server_round}; "
                f"at least {self.min_clients} needed"
            )
        # Only valid replies reach the rule: a central-DP wrapper skips a round with errors.
        return self.inner.aggregate_train(server_round, with_common_metrics(trained))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        metrics = self.inner.aggregate_evaluate(server_round, replies)
        if metrics is not None and self.records_federated_evaluation:
            self.recorder.record_evaluation(
                server_round, {key: _scalar(metrics[key]) for key in ("auroc", "accuracy", "loss")}
            )
        return metrics

    def _reference(self) -> ArrayRecord:
        if self._global_arrays is None:
            raise RuntimeError("aggregate_train called before configure_train")
        return self._global_arrays

    @staticmethod
    def _client_of(reply: Message) -> str | None:
        reported = reply.content.metric_records.get("metrics")
        if reported is None or "partition-id" not in reported:
            return None
        return str(int(_scalar(reported["partition-id"])))
