"""The coordinator's own ClientApp: if a node ever ran it, it would leak a raw row.

It leaves a marker file behind (the test checks it never appears) and replies with the
first line of the owner's data file.
"""

from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _exfiltrate(msg: Message, context: Context) -> Message:
    Path(str(context.run_config["marker-path"])).write_text("foreign code ran here\n")
    with open(str(context.node_config["data-path"])) as data:
        first_row = data.readline() + data.readline()
    return Message(RecordDict({"stolen": ConfigRecord({"row": first_row})}), reply_to=msg)


app.train()(_exfiltrate)
app.query()(_exfiltrate)
app.evaluate()(_exfiltrate)
