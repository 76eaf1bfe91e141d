"""FedAvg that hands every client's training metrics to the run recorder.

Federated Averaging: McMahan et al. 2017, "Communication-Efficient Learning of Deep
Networks from Decentralized Data". Aggregated epsilon is the maximum over clients, never
a mean: a mean would hide the client whose data is least protected.

A client that refuses a round because its owner's privacy budget is spent (error code
`BUDGET_EXHAUSTED_CODE`) is a normal dropout: it is logged and recorded, not asked again
in this run, and the run stops cleanly (`FederationStopped`) once fewer than
`min_clients` clients train in a round.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmodel.privacy.budget import BUDGET_EXHAUSTED_CODE
from server.run_record import RunRecorder


class FederationStopped(Exception):
    """Too few clients are left to train; the run ends here, cleanly, with what it has."""


def aggregate_train_metrics(replies: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Example-weighted mean training loss; maximum epsilon over the replying clients."""
    metrics = [reply.metric_records["metrics"] for reply in replies]
    weights = [_scalar(m[weighted_by_key]) for m in metrics]
    losses = [_scalar(m["train-loss"]) for m in metrics]
    aggregated = MetricRecord(
        {
            "train-loss": sum(w * x for w, x in zip(weights, losses, strict=True))
            / (sum(weights) or 1.0),
            "clients": len(metrics),
        }
    )
    epsilons = [_scalar(m["epsilon"]) for m in metrics if "epsilon" in m]
    if epsilons:
        aggregated["max-epsilon"] = max(epsilons)
    return aggregated


def _scalar(value: object) -> float:
    if not isinstance(value, int | float):
        raise TypeError(f"expected a number in the reply's metrics, got {type(value).__name__}")
    return float(value)


class RecordingFedAvg(FedAvg):
    """FedAvg whose training replies, and budget dropouts, are also recorded per client."""

    def __init__(self, recorder: RunRecorder, min_clients: int = 1, **kwargs: object) -> None:
        super().__init__(train_metrics_aggr_fn=aggregate_train_metrics, **kwargs)  # type: ignore[arg-type]
        self.recorder = recorder
        self.min_clients = min_clients
        self.exhausted: set[int] = set()
        self.client_of_node: dict[int, str] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling, minus the nodes whose owners have no budget left."""
        messages = [
            message
            for message in super().configure_train(server_round, arrays, config, grid)
            if message.metadata.dst_node_id not in self.exhausted
        ]
        if len(messages) < self.min_clients:
            raise FederationStopped(
                f"only {len(messages)} clients have privacy budget left for round "
                f"{server_round}; at least {self.min_clients} needed"
            )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        trained = [reply for reply in replies if not reply.has_error()]
        for reply in trained:
            reported = reply.content.metric_records["metrics"]
            if "partition-id" in reported:
                client = str(int(reported["partition-id"]))  # type: ignore[arg-type]
                self.client_of_node[reply.metadata.src_node_id] = client
        for reply in replies:
            if reply.has_error() and reply.error.code == BUDGET_EXHAUSTED_CODE:
                node = reply.metadata.src_node_id
                self.exhausted.add(node)
                log(WARNING, "node %d leaves the run: %s", node, reply.error.reason)
                self.recorder.record_dropout(
                    server_round, node, self.client_of_node.get(node), str(reply.error.reason)
                )
        # What the clients spent is recorded even when their updates are not aggregated.
        self.recorder.record_replies(server_round, [reply.content["metrics"] for reply in trained])
        if len(trained) < self.min_clients:
            raise FederationStopped(
                f"only {len(trained)} clients trained in round {server_round}; "
                f"at least {self.min_clients} needed"
            )
        return super().aggregate_train(server_round, replies)
