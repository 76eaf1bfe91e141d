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
