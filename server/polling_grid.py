"""A Grid that checks for replies within 0.1-0.5 s instead of Flower's 3 s, and gives up
waiting for nodes that do not come.

Flower 1.39's deployment Grid (`flwr.superlink.grid.http_grid`) sleeps 3 s between
pulls in `send_and_receive`, so every message round trip of a deployed run paid up to
3 s after the last node had answered. This wrapper uses the Grid's own push and pull
calls (the public API, no patching): 0.1 s after a push or a reply, doubling up to 0.5 s
while nodes train (at a steady 0.1 s, ten pulls a second cost the ServerApp and the
SuperLink CPU for nothing); everything else is the wrapped Grid's.

Flower's node sampling waits, with no deadline, until enough nodes are connected: after
a revocation or a dropout below the run's minimum, a run would hang forever. Here the
node list itself answers for that: once fewer than `min_nodes` have been connected for
`node_wait_s` on end, it raises FederationStopped, and the run ends cleanly.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedmodel.runtime.polling import backoff_waits
from server.strategy import FederationStopped

REPLY_POLL_INTERVAL_S = 0.1  # after a push or a reply
SLOW_REPLY_POLL_INTERVAL_S = 0.5  # the longest wait, while nodes train


class PollingGrid(Grid):
    """Delegates to `grid`; only `send_and_receive` polls faster."""

    def __init__(
        self,
        grid: Grid,
        min_nodes: int = 0,
        node_wait_s: float = float("inf"),
        intervals: tuple[float, float] = (REPLY_POLL_INTERVAL_S, SLOW_REPLY_POLL_INTERVAL_S),
    ) -> None:
        self._grid = grid
        self._intervals = intervals
        self._min_nodes, self._node_wait_s = min_nodes, node_wait_s
        self._short_since: float | None = None  # since when too few nodes are connected

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self._grid.get_nodes()

    def get_node_ids(self) -> Iterable[int]:
        return self.enough(list(self.connected_node_ids()))

    def connected_node_ids(self) -> Iterable[int]:
        """Every node the SuperLink has connected, without the wait's bookkeeping."""
        return self._grid.get_node_ids()

    def enough(self, nodes: list[int]) -> list[int]:
        """`nodes`; raises FederationStopped once too few have been there for too long."""
        if len(nodes) >= self._min_nodes:
            self._short_since = None
            return nodes
        now = time.monotonic()
        self._short_since = self._short_since or now
        if now - self._short_since >= self._node_wait_s:
            raise FederationStopped(
                f"only {len(nodes)} of the {self._min_nodes} nodes the run needs have been "
                f"connected for {self._node_wait_s:.0f} s (--round-timeout)"
            )
        return nodes

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull until all replied or `timeout` passed: after waits that grow
        from the first of `intervals` to the second, and start short after a reply."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        waits = backoff_waits(*self._intervals)
        while waiting and (deadline is None or time.monotonic() < deadline):
            pulled = list(self.pull_messages(waiting))
            replies.extend(pulled)
            waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
            if pulled:
                waits = backoff_waits(*self._intervals)
            if waiting:
                time.sleep(next(waits))
        return replies
