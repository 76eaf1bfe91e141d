"""Single-machine simulation engine: the same ServerApp and ClientApp, no SuperLink, no Ray.

`LocalGrid` implements Flower 1.39's `Grid` contract in memory: the ServerApp
(`simulations.apps.server_app`) runs in this process and every message goes straight to
a warm pool of worker processes, one per core, each of which imports the ClientApp
(`simulations.apps.client_app`) once and keeps torch at one thread. Replies come back as soon as
they are ready: nothing polls. As in Flower's simulation engine, each virtual node has
one persistent Context (node config `partition-id`/`num-partitions`, state kept across
rounds, the run config), shipped with each message and stored again with the reply;
a ClientApp that raises becomes an error reply with Flower's code and reason. Contexts
are made when a node first gets a message, so 10,000 virtual nodes cost nothing until
sampled.

Why: on one machine most of a Ray simulation's time is engine start-up, actor
warm-up, 0.1 s polling per phase and a driver that scans every node every 0.1 s
(shared/notes/perf-baseline.md). Ray stays the engine for multi-machine (Ray cluster)
simulation.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, cast
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY, SUPERLINK_NODE_ID
from flwr.common.logger import FLOWER_LOGGER as flower_logger
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedmodel.config import RunConfig
from fedmodel.errors import FedModelError, SimulationError
from fedmodel.runtime.flwr_run import progress_row
from fedmodel.runtime.processes import group_alive, start_detached, stop_group
from simulations.local_worker import READY

RUN_ID = 1
FIRST_NODE_ID = 1_000  # node ids are FIRST_NODE_ID + partition id (the SuperLink is 1)
WORKER_START_TIMEOUT_S = 300.0
STOP_GRACE_S = 5.0  # a worker finishes the call it is in, then sees end of input

Task = tuple[Message, Context]
Reply = tuple[Message, Context]


def worker_count(clients_per_round: int | None) -> int:
    """One worker per core this process may use, never more than a round's clients
    (when that is known yet)."""
    cores = len(os.sched_getaffinity(0))
    return max(1, cores if clients_per_round is None else min(cores, clients_per_round))


class WorkerPool:
    """Warm worker processes (simulations/local_worker.py) fed (message, context) tasks.

    Workers start at once, so their imports overlap the ServerApp's set-up. They share
    one process group (a session of their own, away from the terminal's Ctrl-C), which
    `close` stops whatever state they are in; each talks over its own socket pair and
    exits by itself if this process dies.
    """

    def __init__(self, size: int, log_path: Path, environment: dict[str, str]) -> None:
        self._queue: deque[tuple[str, Task]] = deque()
        self._idle: list[Connection] = []
        self._busy: dict[Connection, str] = {}
        self._done: dict[str, Reply] = {}
        self._starting: list[Connection] = []
        pairs = [socket.socketpair() for _ in range(size)]
        theirs = [pair[1].fileno() for pair in pairs]
        self._leader = start_detached(
            [sys.executable, "-m", "simulations.local_worker", *map(str, theirs)],
            log_path,
            environment,
            pass_fds=tuple(theirs),
        )
        for ours, their_end in pairs:
            their_end.close()
            self._starting.append(Connection(ours.detach()))

    @property
    def process_group(self) -> int:
        """The workers' process group (the first worker's pid)."""
        return self._leader.pid

    def submit(self, message_id: str, task: Task) -> None:
        self._queue.append((message_id, task))
        self._dispatch()

    def collect(self, timeout: float | None) -> None:
        """Wait up to `timeout` seconds (None: until one arrives) for replies; keep them."""
        self._await_workers()
        if not self._busy:
            return
        for connection in wait(list(self._busy), timeout):
            conn = cast(Connection, connection)
            try:
                reply = conn.recv()
            except (EOFError, OSError) as died:
                raise SimulationError(_worker_died_message(self._busy[conn])) from died
            self._done[self._busy.pop(conn)] = reply
            self._idle.append(conn)
        self._dispatch()

    def take(self, message_id: str) -> Reply | None:
        return self._done.pop(message_id, None)

    @property
    def in_flight(self) -> int:
        return len(self._queue) + len(self._busy)

    def close(self) -> None:
        """Stop every worker: end of input first, then SIGTERM and SIGKILL to the group.

        Workers still importing (the run failed or ended before its first call) get
        SIGTERM at once: they would not look at their input for seconds.
        """
        importing = bool(self._starting)
        for connection in [*self._idle, *self._busy, *self._starting]:
            connection.close()
        deadline = time.monotonic() + (0.0 if importing else STOP_GRACE_S)
        while group_alive(self._leader.pid) and time.monotonic() < deadline:
            self._leader.poll()  # reaps the first worker; the others are init's to reap
            time.sleep(0.05)
        stop_group(self._leader.pid, timeout=STOP_GRACE_S)
        self._leader.wait()

    def _await_workers(self) -> None:
        """Block until every worker has imported the ClientApp (first call only)."""
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while self._starting:
            ready = wait(self._starting, max(0.0, deadline - time.monotonic()))
            if not ready:
                raise SimulationError("the simulation workers did not start within 300 s")
            for connection in ready:
                conn = cast(Connection, connection)
                try:
                    greeting = conn.recv()
                except EOFError as died:
                    raise SimulationError(_worker_died_message(None)) from died
                if greeting != READY:
                    raise SimulationError(f"a simulation worker said {greeting!r} at start")
                self._starting.remove(conn)
                self._idle.append(conn)
        self._dispatch()

    def _dispatch(self) -> None:
        while self._idle and self._queue:
            message_id, task = self._queue.popleft()
            connection = self._idle.pop()
            connection.send(task)
            self._busy[connection] = message_id


def _worker_died_message(message_id: str | None) -> str:
    which = "" if message_id is None else f" while handling message {message_id}"
    return f"a simulation worker process died{which}; see engine/workers.log in the run dir"


class LocalGrid(Grid):
    """Flower's Grid contract over a WorkerPool: push, pull, send_and_receive, no polling."""

    def __init__(self, pool: WorkerPool, num_nodes: int, run_config: dict[str, Any]) -> None:
        self._pool = pool
        self._num_nodes = num_nodes
        self._run_config = run_config
        self._contexts: dict[int, Context] = {}
        self._run = Run.create_empty(RUN_ID)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return Run(**vars(self._run))

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return range(FIRST_NODE_ID, FIRST_NODE_ID + self._num_nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            node_id = message.metadata.dst_node_id
            if not FIRST_NODE_ID <= node_id < FIRST_NODE_ID + self._num_nodes:
                raise ValueError(f"message for unknown node {node_id}")
            message_id = str(uuid4())
            message.metadata.__dict__["_message_id"] = message_id
            self._pool.submit(message_id, (message, self.node_context(node_id)))
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        if self._pool.in_flight:
            self._pool.collect(timeout=0)
        replies = (self._take(message_id) for message_id in message_ids)
        return [reply for reply in replies if reply is not None]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            self._pool.collect(remaining)
            for message_id in list(waiting):
                if (reply := self._take(message_id)) is not None:
                    replies.append(reply)
                    waiting.discard(message_id)
        return replies

    def _take(self, message_id: str) -> Message | None:
        done = self._pool.take(message_id)
        if done is None:
            return None
        reply, context = done
        self._contexts[context.node_id] = context  # state carries over to the next round
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        return reply

    def node_context(self, node_id: int) -> Context:
        """The persistent Context of a virtual node (made on its first message)."""
        if node_id not in self._contexts:
            self._contexts[node_id] = Context(
                run_id=RUN_ID,
                node_id=node_id,
                node_config={
                    PARTITION_ID_KEY: node_id - FIRST_NODE_ID,
                    NUM_PARTITIONS_KEY: self._num_nodes,
                },
                state=RecordDict(),
                run_config=dict(self._run_config),
            )
        return self._contexts[node_id]


def run_local(
    config: RunConfig,
    pool: WorkerPool,
    engine_dir: Path,
    on_progress: Callable[[dict[str, Any]], None],
    on_log_line: Callable[[str], None] | None,
) -> None:
    """Run the ServerApp here against a LocalGrid on `pool` (its owner closes it).

    Flower's log lines go to engine_dir/flwr-run.log (and `on_log_line`), progress
    lines to `on_progress`; workers write theirs to engine_dir/workers.log.
    """
    from simulations.apps import server_app

    run_config = config.to_run_config()
    with _flower_log(engine_dir / "flwr-run.log", on_progress, on_log_line):
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = RUN_ID
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        grid = LocalGrid(pool, config.clients, run_config)
        context = Context(
            run_id=RUN_ID,
            node_id=SUPERLINK_NODE_ID,
            node_config={},
            state=RecordDict(),
            run_config=dict(run_config),
        )
        try:
            server_app(grid=grid, context=context)
        except (FedModelError, KeyboardInterrupt):
            raise
        except Exception:  # noqa: BLE001 - reported like the Ray path: see the log
            flower_logger.error("ServerApp failed:\n%s", traceback.format_exc())


class _ProgressHandler(logging.Handler):
    """Flower log records -> the run's log file, progress callbacks and --verbose."""

    def __init__(
        self,
        log_file: Any,
        on_progress: Callable[[dict[str, Any]], None],
        on_log_line: Callable[[str], None] | None,
    ) -> None:
        super().__init__()
        self._log_file = log_file
        self._on_progress = on_progress
        self._on_log_line = on_log_line

    def emit(self, record: logging.LogRecord) -> None:
        line = f"{record.levelname:<8}: {record.getMessage()}"
        self._log_file.write(line + "\n")
        self._log_file.flush()
        if self._on_log_line is not None:
            self._on_log_line(line)
        if (row := progress_row(line)) is not None:
            self._on_progress(row)


@contextmanager
def _flower_log(
    path: Path,
    on_progress: Callable[[dict[str, Any]], None],
    on_log_line: Callable[[str], None] | None,
) -> Iterator[None]:
    """Route Flower's logger to the run's log instead of the console, for this run.

    Not to the root logger either: importing Opacus gives it a stderr handler
    (opacus/utils/module_utils.py calls logging.basicConfig), which would print every
    Flower line on the console again.
    """
    saved, propagated = flower_logger.handlers[:], flower_logger.propagate
    with path.open("w") as log_file:
        handler = _ProgressHandler(log_file, on_progress, on_log_line)
        handler.setLevel(logging.INFO)
        flower_logger.handlers, flower_logger.propagate = [handler], False
        try:
            yield
        finally:
            flower_logger.handlers, flower_logger.propagate = saved, propagated
