"""The base of our strategy wrappers: one copy of the steps they hand on unchanged."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


class WrappingStrategy(Strategy):
    """A strategy around `inner` that hands it the summary and both evaluation steps.

    `GuardedStrategy`, `FixedCohortMean` and `ShiftedRounds` each wrap a Flower strategy
    to change its training steps, and each used to carry its own copy of these
    forwarding methods. The training steps stay abstract here on purpose: every wrapper
    exists to change training (validate, clip, renumber), and one that forgot to
    override a step would otherwise hand replies to the inner rule unchecked; Python
    refuses to instantiate such a wrapper instead.
    """

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def summary(self) -> None:
        self.inner.summary()

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
