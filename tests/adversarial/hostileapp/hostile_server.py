"""The coordinator's own ServerApp: sends one message to every node, records the replies.

The message carries what a hostile coordinator wants run (the run config decides the
rest); `report-path` receives, per node, the error code and reason or the reply's content.
"""

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 60
    while not (nodes := list(grid.get_node_ids())) and time.monotonic() < deadline:
        time.sleep(0.5)
    content = RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"server-round": 1})})
    kind = str(context.run_config["message-type"])
    messages = [Message(content, node, kind) for node in nodes]
    waiting = set(grid.push_messages(messages))
    replies: list[Message] = []
    pause = 0.1  # Flower's own loop sleeps 3 s; this one polls often at first only
    while waiting and time.monotonic() < deadline + 120:
        pulled = list(grid.pull_messages(waiting))
        replies += pulled
        waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
        time.sleep(pause)
        pause = min(2 * pause, 0.5)
    report = []
    for reply in replies:
        entry = {"node": reply.metadata.src_node_id}
        if reply.has_error():
            entry |= {"error_code": reply.error.code, "reason": reply.error.reason}
        else:
            entry |= {"content": {key: str(value) for key, value in reply.content.items()}}
        report.append(entry)
    path = Path(str(context.run_config["report-path"]))
    path.with_suffix(".partial").write_text(json.dumps(report))
    path.with_suffix(".partial").replace(path)  # the test reads it as soon as it exists
