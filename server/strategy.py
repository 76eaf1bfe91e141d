"""FedAvg that hands every client's training metrics to the run recorder.

Federated Averaging: McMahan et al. 2017, "Communication-Efficient Learning of Deep
Networks from Decentralized Data". Aggregated epsilon is the maximum over clients, never
a mean: a mean would hide the client whose data is least protected.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from server.run_record import RunRecorder


def aggregate_train_metrics(replies: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Example-weighted mean training loss; maximum epsilon over the replying clients."""
    metrics = [reply["metrics"] for reply in replies]
    weights = [float(m[weighted_by_key]) for m in metrics]  # type: ignore[arg-type]
    total = sum(weights) or 1.0
    aggregated = MetricRecord(
        {
            "train-loss": sum(w * float(m["train-loss"]) for w, m in zip(weights, metrics)) / total,  # type: ignore[arg-type]
            "clients": len(metrics),
        }
    )
    epsilons = [float(m["epsilon"]) for m in metrics if "epsilon" in m]  # type: ignore[arg-type]
    if epsilons:
        aggregated["max-epsilon"] = max(epsilons)
    return aggregated


class RecordingFedAvg(FedAvg):
    """FedAvg whose training replies are also recorded per client."""

    def __init__(self, recorder: RunRecorder, **kwargs: object) -> None:
        super().__init__(train_metrics_aggr_fn=aggregate_train_metrics, **kwargs)  # type: ignore[arg-type]
        self.recorder = recorder

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.recorder.record_replies(
            server_round, [reply.content["metrics"] for reply in replies if not reply.has_error()]
        )
        return arrays, metrics
