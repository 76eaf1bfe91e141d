"""The coordinator's strategy: any aggregation rule, behind checks and a run record.

`GuardedStrategy` wraps a Flower Message-API strategy (FedAvg, FedMedian, Krum, ...) and
adds what every FedModel run needs around aggregation:
- each training reply is validated: its arrays against the global model
  (`fedmodel.records.reply_rejection`), its metrics against the reply schema
  (`server.reply_schema`); an invalid one is dropped with a logged, recorded reason
  instead of crashing the round or the run;
- who sent a reply, and how much it weighs, is the coordinator's to say. In deployment
  (`Members`) a reply belongs to the client its authenticated Flower node ID was given,
  and a reply claiming another client's `partition-id` is rejected; its weight is
  capped, so no node's own report of its size can make it dominate. In simulation the
  harness is trusted: `partition-id` names the client and `num-examples` weighs it;
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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmodel.privacy.budget import BUDGET_EXHAUSTED_CODE
from fedmodel.protocol import (
    EPSILON_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    PARTITION_ID_KEY,
    POLICY_REFUSED_CODE,
    REFUSAL_MARKER,
    TRAIN_LOSS_KEY,
)
from fedmodel.records import reply_rejection
from server.reply_schema import InvalidReply, TrainReport, train_report
from server.run_record import RunRecorder
from server.wrapping import WrappingStrategy

# A node's owner said no: its budget is spent, or its policy forbids what the run asks
REFUSAL_CODES = (BUDGET_EXHAUSTED_CODE, POLICY_REFUSED_CODE)


class FederationStopped(Exception):
    """Too few clients are left to train; the run ends here, cleanly, with what it has."""


@dataclass(frozen=True)
class Members:
    """The nodes of a deployed run, by authenticated Flower node ID.

    `clients` gives each node its client number in the run record; `weight_caps` the
    most weight its replies may carry (1 for uniform weights, or the row count the
    operator vouched for at enrollment). A node's report of its size only ever lowers
    its weight below the cap.
    """

    clients: Mapping[int, str]
    weight_caps: Mapping[int, int]

    def weight(self, node: int, reported: int | None) -> int:
        """min(reported count, cap); a withheld count earns the cap."""
        cap = self.weight_caps[node]
        return cap if reported is None else min(reported, cap)


def aggregate_train_metrics(replies: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Weighted mean training loss; maximum epsilon over the replying clients.

    The metrics are the strategy's own (`GuardedStrategy._aggregated_metrics`), built
    from validated reports.
    """
    metrics = [reply.metric_records[METRICS_KEY] for reply in replies]
    aggregated = MetricRecord({"clients": len(metrics)})
    if all(TRAIN_LOSS_KEY in m for m in metrics):  # deployed owners may withhold it
        weights = [float(m[weighted_by_key]) for m in metrics]  # type: ignore[arg-type]
        losses = [float(m[TRAIN_LOSS_KEY]) for m in metrics]  # type: ignore[arg-type]
        aggregated[TRAIN_LOSS_KEY] = sum(w * x for w, x in zip(weights, losses, strict=True)) / (
            sum(weights) or 1.0
        )
    epsilons = [float(m[EPSILON_KEY]) for m in metrics if EPSILON_KEY in m]  # type: ignore[arg-type]
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
    common = set.intersection(*(set(r.content.metric_records[METRICS_KEY]) for r in replies))
    for reply in replies:
        metrics = reply.content.metric_records[METRICS_KEY]
        reply.content[METRICS_KEY] = MetricRecord({k: metrics[k] for k in metrics if k in common})
    return replies


class GuardedStrategy(WrappingStrategy):
    """Validates, records and budget-checks around an inner aggregation strategy."""

    def __init__(
        self,
        inner: Strategy,
        recorder: RunRecorder,
        min_clients: int = 1,
        max_update_norm: float | None = None,
        members: Members | None = None,
    ) -> None:
        """`members`: a deployed run's nodes (identity and weight from the coordinator);
        None in simulation, where the harness's reports are trusted."""
        super().__init__(inner)
        self.recorder = recorder
        self.min_clients = min_clients
        self.max_update_norm = max_update_norm
        self.members = members
        self.exhausted: set[int] = set()
        self.client_of_node: dict[int, str] = dict(members.clients) if members else {}
        self._global_arrays: ArrayRecord | None = None
        self._sent = 0

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
        reports: dict[str, TrainReport] = {}
        weights: dict[str, float] = {}
        for reply in replies:
            if reply.has_error():
                continue
            node = reply.metadata.src_node_id
            try:
                client, report, weight = self._accepted(reply)
            except InvalidReply as invalid:
                self.reject(server_round, node, str(invalid), self._simulated_client(reply))
                continue
            self.client_of_node[node] = client
            reports[client], weights[client] = report, weight
            reply.content[METRICS_KEY] = _aggregated_metrics(report, weight)
            trained.append(reply)
        # What the clients spent is recorded even when their updates are not aggregated.
        self.recorder.record_replies(server_round, reports, weights)
        if len(trained) < self.min_clients:
            raise FederationStopped(
                f"only {len(trained)} clients trained in round {server_round}; "
                f"at least {self.min_clients} needed"
            )
        # Only valid replies reach the rule: a central-DP wrapper skips a round with errors.
        return self.inner.aggregate_train(server_round, with_common_metrics(trained))

    def reject(self, server_round: int, node: int, reason: str, client: str | None = None) -> None:
        """Log and record why `node`'s reply in `server_round` is not used."""
        log(WARNING, "rejected the reply of node %d: %s", node, reason)
        client = self.client_of_node.get(node, client)
        self.recorder.record_rejection(server_round, node, client, reason)

    def _simulated_client(self, reply: Message) -> str | None:
        """In simulation, the client a rejected reply came from: its partition-id, which
        the harness (not the client) sets; None in deployment or when it is unreadable."""
        if self.members is not None or METRICS_KEY not in reply.content.metric_records:
            return None
        claimed = reply.content.metric_records[METRICS_KEY].get(PARTITION_ID_KEY)
        return str(claimed) if isinstance(claimed, int) and claimed >= 0 else None

    def _accepted(self, reply: Message) -> tuple[str, TrainReport, float]:
        """(client, validated report, aggregation weight) of a reply; InvalidReply if not."""
        node = reply.metadata.src_node_id
        if self.members is not None and node not in self.members.clients:
            raise InvalidReply(f"node {node} is not a member of this run")
        reason = reply_rejection(reply.content, self._reference(), self.max_update_norm)
        if reason is not None:
            raise InvalidReply(reason)
        report = train_report(reply.content.metric_records[METRICS_KEY], self._sample_dp)
        if self.members is None:  # simulation: the harness says who it is and its size
            if report.num_examples is None:
                raise InvalidReply("missing 'num-examples', which weighs its update")
            return str(report.partition_id), report, report.num_examples
        client = self.members.clients[node]
        if str(report.partition_id) != client:
            raise InvalidReply(
                f"reports partition-id {report.partition_id}, but node {node} is client {client}"
            )
        return client, report, self.members.weight(node, report.num_examples)

    @property
    def _sample_dp(self) -> bool:
        return self.recorder.config.sample_dp

    def _reference(self) -> ArrayRecord:
        if self._global_arrays is None:
            raise RuntimeError("aggregate_train called before configure_train")
        return self._global_arrays


def _aggregated_metrics(report: TrainReport, weight: float) -> MetricRecord:
    """What the inner rule sees of a reply: the coordinator's weight, validated values."""
    metrics = MetricRecord({NUM_EXAMPLES_KEY: weight})
    if report.train_loss is not None:
        metrics[TRAIN_LOSS_KEY] = report.train_loss
    if report.epsilon is not None:
        metrics[EPSILON_KEY] = report.epsilon
    return metrics
