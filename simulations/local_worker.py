"""A worker process of the local simulation engine: runs the ClientApp on tasks it is sent.

Started by simulations/local_engine.py as `python -m simulations.local_worker FD` with
one end of a socket pair as FD. It imports the ClientApp once, keeps torch at one
thread, answers each (message, context) task with (reply, context), and exits when the
engine closes its end or dies. Ctrl-C is ignored: the engine decides when workers stop.
"""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection

from flwr.app import Context, Error, Message
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import ErrorCode
from flwr.common.logger import FLOWER_LOGGER as flower_logger

READY = "ready"


def run_client_app(
    app: Callable[[Message, Context], Message], message: Message, context: Context
) -> Message:
    """Call the ClientApp; an exception becomes the error reply Flower's engine makes.

    Flower's simulation wraps the exception in ClientAppException and replies with
    code CLIENT_APP_RAISED_EXCEPTION and reason "<type>:<'<message>'>"; so do we.
    """
    try:
        return app(message, context)
    except Exception as raised:  # noqa: BLE001 - a client's failure is a reply, as in Flower
        error = ClientAppException(str(raised))
        flower_logger.error("%s\n%s", error, traceback.format_exc())
        reason = str(type(error)) + ":<'" + str(error) + "'>"
        failure = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
        return Message(failure, reply_to=message)


def serve(connection: Connection) -> None:
    """Import the ClientApp, say so, then answer tasks until the engine hangs up."""
    import torch

    torch.set_num_threads(1)
    from client.app import app

    connection.send(READY)
    while True:
        try:
            message, context = connection.recv()
        except (EOFError, OSError):
            return
        connection.send((run_client_app(app, message, context), context))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(Connection(int(sys.argv[1])))
