"""A Grid that keeps every reply the ServerApp receives, for checking what it saw.

`fedmodel run --record-messages` (a hidden debug option) wraps the run's Grid in this:
each reply pulled from the SuperLink is written, as Flower serializes it, to
RUN_DIR/received/NNNNNN-node-ID.pb, with its metadata beside it in index.jsonl. That is
everything the coordinator learns from the nodes, so a test (or an auditor) can check
what, say, SecAgg+ leaves it: masked vectors only, never an update.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611
from flwr.serverapp import Grid

from server.polling_grid import PollingGrid

RECEIVED_DIR = "received"
INDEX_FILE = "index.jsonl"


class RecordingGrid(PollingGrid):
    """Delegates to `grid`; keeps each pulled reply in `directory`."""

    def __init__(self, grid: Grid, directory: Path) -> None:
        super().__init__(grid)
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._count = sum(1 for _ in received_index(directory))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(super().pull_messages(message_ids))
        for reply in replies:
            self._keep(reply)
        return replies

    def _keep(self, reply: Message) -> None:
        self._count += 1
        meta = reply.metadata
        name = f"{self._count:06d}-node-{meta.src_node_id}.pb" if reply.has_content() else None
        entry = {
            "file": name,
            "node_id": meta.src_node_id,
            "message_type": meta.message_type,
            "group_id": meta.group_id,
            "error": reply.error.reason if reply.has_error() else None,
        }
        if name is not None:
            (self.directory / name).write_bytes(
                recorddict_to_proto(reply.content).SerializeToString()
            )
        with (self.directory / INDEX_FILE).open("a") as index:
            index.write(json.dumps(entry) + "\n")


def received_index(directory: Path) -> Iterator[dict[str, object]]:
    """The index entries of the replies kept in `directory`, in the order received."""
    path = directory / INDEX_FILE
    if path.exists():
        for line in path.read_text().splitlines():
            yield json.loads(line)


def received_content(directory: Path, entry: dict[str, object]) -> RecordDict:
    """The content of the reply `entry` names (one with content: no error)."""
    proto = ProtoRecordDict()
    proto.ParseFromString((directory / str(entry["file"])).read_bytes())
    return recorddict_from_proto(proto)
