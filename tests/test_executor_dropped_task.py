"""A task whose message never arrives is answered as failed, and the executor goes on.

Flower 1.39's SuperNode creates a task, then downloads its message's objects; when the
run stops meanwhile, it drops the download but keeps the task (start_client_internal's
RunNotRunningException branch). This test builds that state in Flower's own SuperNode
Runtime API (its FastAPI app and in-memory NodeState, on 127.0.0.1) and serves it with
the node executor: each such task must end FAILED within the executor's bound, one after
the other. Before session 20's fix the executor waited on the first for two hours.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from flwr.app import Context, Message, Metadata, RecordDict
from flwr.common.constant import Status, SubStatus
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import get_object_tree
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run, RunStatus
from flwr.supernode.main import create_app
from flwr.supernode.nodestate import NodeState, NodeStateFactory

from client import executor
from client.executor import NodeExecutor
from fedmodel.runtime.processes import free_port

NODE_ID, RUN_ID, SECRET = 7, 42, b"s" * 32
FAB_CONTENT = b"an app bundle the executor never reads"
FAB = Fab(hash_str=hashlib.sha256(FAB_CONTENT).hexdigest(), content=FAB_CONTENT, verifications={})


@pytest.fixture
def runtime() -> Iterator[tuple[NodeState, str]]:
    """Flower's SuperNode Runtime API with a running run, served on a free local port."""
    factory = NodeStateFactory(ObjectStoreFactory())
    state = factory.state()
    state.set_node_id(NODE_ID)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(state_factory=factory, superexec_auth_secret=SECRET),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the Runtime API did not start"
        time.sleep(0.05)
    run = Run.create_empty(RUN_ID)
    run.fab_hash, run.status = FAB.hash_str, RunStatus(Status.RUNNING, "", "")
    state.store_run(run)
    state.store_fab(FAB)
    state.set_run_series_context(
        run.series_id, Context(RUN_ID, NODE_ID, {}, RecordDict(), {}, run.series_id)
    )
    try:
        yield state, f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _task_without_its_objects(state: NodeState) -> int:
    """A task and its message as the SuperNode leaves them when the run stops mid-download:
    the message's object tree is registered, its objects never come."""
    metadata = Metadata(RUN_ID, "", 0, NODE_ID, "", "1", time.time(), 3600.0, "train")
    message = Message(RecordDict(), metadata=metadata)
    message.metadata.__dict__["_message_id"] = message.object_id  # as the SuperLink sets it
    task_id = state.create_task(task_type=TaskType.CLIENT_APP, run_id=RUN_ID, fab_hash=FAB.hash_str)
    assert task_id is not None
    state.object_store.preregister(RUN_ID, get_object_tree(message))
    state.store_message(message)
    return task_id


def _finished(state: NodeState, task_id: int, timeout: float) -> str:
    """The task's sub-status once it has finished (waits for that state)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        (task,) = state.get_tasks(task_ids=[task_id])
        if task.status.status == Status.FINISHED:
            return task.status.sub_status
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} was still unanswered after {timeout:.0f} s")


def test_a_task_whose_message_never_arrives_fails_and_the_next_is_served(
    runtime: tuple[NodeState, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state, address = runtime
    monkeypatch.setattr(executor, "MESSAGE_PULL_MAX_S", 1.0)
    serving = threading.Event()
    serving.set()
    node = NodeExecutor(tmp_path, address, SECRET)
    thread = threading.Thread(target=node.serve, args=(serving.is_set,), daemon=True)
    thread.start()
    try:
        first = _task_without_its_objects(state)
        assert _finished(state, first, timeout=30) == SubStatus.FAILED
        second = _task_without_its_objects(state)  # the executor is still serving
        assert _finished(state, second, timeout=30) == SubStatus.FAILED
    finally:
        serving.clear()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert capsys.readouterr().out.count("task dropped: its message never arrived") == 2
