"""Worker processes of the local simulation engine: run the ClientApp on tasks they are sent.

Started by simulations/local_engine.py as `python -m simulations.local_worker FD...`,
one socket (the worker's end of a socket pair) per worker. The first process imports
the ClientApp (torch, Opacus, Flower: seconds of CPU) once and then forks one worker
per further socket, so every worker starts warm and shares those pages; no torch
operation has run before the fork. Each worker keeps torch at one thread, answers each
(message, context) task with (reply, context), and exits when the engine closes its
end or dies. Ctrl-C is ignored: the engine decides when workers stop.
"""

from __future__ import annotations

import importlib
import os
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
CLIENT_APP_VARIABLE = "FEDMODEL_CLIENT_APP"  # module:attribute; the runner sets it


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


def serve(app: Callable[[Message, Context], Message], connection: Connection) -> None:
    """Say we are ready, then answer tasks until the engine hangs up."""
    connection.send(READY)
    while True:
        try:
            message, context = connection.recv()
        except (EOFError, OSError):
            return
        connection.send((run_client_app(app, message, context), context))


def main(sockets: list[int]) -> None:
    """Import once, fork a worker per further socket, serve the first socket here."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(1)
    reference = os.environ.get(CLIENT_APP_VARIABLE, "simulations.apps:client_app")
    module, _, name = reference.partition(":")
    # simulations.apps imports the scenarios: before the fork, so no worker pays again
    app = getattr(importlib.import_module(module), name)

    for index, mine in enumerate(sockets[1:], start=1):
        if os.fork() == 0:
            for other, fd in enumerate(sockets):
                if other != index:
                    os.close(fd)  # so the engine sees EOF when a sibling dies
            serve(app, Connection(mine))
            os._exit(0)
    for fd in sockets[1:]:
        os.close(fd)
    serve(app, Connection(sockets[0]))


if __name__ == "__main__":
    main([int(fd) for fd in sys.argv[1:]])
