"""The local engine runs the same federation as Flower's Ray engine, and cleans up after itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fedmodel.protocol import PARTITION_ID_KEY
from fedmodel.runtime.processes import group_alive
from simulations.local_engine import FIRST_NODE_ID, LocalGrid, WorkerPool
from simulations.local_worker import run_client_app
from simulations.runner import engine_environment
from tests.conftest import assert_epsilons_recompute
from tests.test_simulation import engine_processes
from tests.test_user_task import documented_task, run_cli

# FedAvg sums the replies in arrival order, which differs between engines: the global
# model may differ in the last float32 bits after a round, so round metrics agree to 1e-5
# relative; privacy accounting depends only on each client's own history and is exact.
METRIC_TOLERANCE = 1e-5
ROUND_METRICS = ("auroc", "accuracy", "loss", "train_loss", "max_epsilon", "auprc", "clients")


@pytest.mark.slow
def test_local_engine_reproduces_the_ray_engine_on_a_seeded_dp_run(tmp_path: Path) -> None:
    """On a user's task, in a file outside the repository, found through a relative
    PYTHONPATH as a user types it: Ray's workers, which run from directories of their
    own, must see it too (the one Ray run of the suite, so it carries that check)."""
    (tmp_path / "my-tasks").mkdir()
    (tmp_path / "my-tasks" / "risk_task.py").write_text(documented_task())
    args = ("--clients", "4", "--rounds", "2", "--seed", "7", "--no-baselines")
    summaries: dict[str, dict[str, Any]] = {}
    for engine in ("ray", "local"):
        result = run_cli(
            "simulate", "task", "risk_task:task", *args, "--engine", engine, "--output", engine,
            cwd=tmp_path, pythonpath="my-tasks",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        run_dir = tmp_path / engine
        assert engine_processes(run_dir) == []
        summaries[engine] = json.loads((run_dir / "summary.json").read_text())
        # A run directory can be moved or shared: only Ray's own logs name local paths.
        for path in (path for path in run_dir.rglob("*") if path.is_file()):
            if engine == "local" or "engine" not in path.relative_to(run_dir).parts:
                assert str(tmp_path).encode() not in path.read_bytes(), f"{path} names a path"
    ray, local = summaries["ray"], summaries["local"]
    assert ray["completed"] and local["completed"] and ray["rounds"] == local["rounds"] == 2
    for ray_round, local_round in zip(ray["per_round"], local["per_round"], strict=True):
        for metric in ROUND_METRICS:
            assert local_round[metric] == pytest.approx(ray_round[metric], rel=METRIC_TOLERANCE)
    assert [c["client"] for c in local["clients"]] == ["0", "1", "2", "3"]
    for ray_client, local_client in zip(ray["clients"], local["clients"], strict=True):
        assert local_client["history"] == ray_client["history"]
        assert local_client["epsilon"] == ray_client["epsilon"] > 0
        assert local_client["epsilon_by_round"] == ray_client["epsilon_by_round"]
    assert_epsilons_recompute(local)


def test_a_raising_client_app_becomes_flowers_error_reply() -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    message = Message(RecordDict(), FIRST_NODE_ID, "train", group_id="1")
    message.metadata.__dict__["_message_id"] = "m1"
    context = Context(1, FIRST_NODE_ID, {}, RecordDict(), {})

    def broken(msg: Message, ctx: Context) -> Message:
        raise RuntimeError("disk on fire")

    reply = run_client_app(broken, message, context)
    assert reply.has_error() and reply.metadata.reply_to_message_id == "m1"
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason == f"{ClientAppException}:<'{ClientAppException('disk on fire')}'>"


@pytest.mark.slow
def test_worker_pool_answers_every_node_keeps_contexts_and_stops_its_workers(
    tmp_path: Path,
) -> None:
    """Real workers running the simulation's ClientApp: a query, which only a deployed
    node answers, fails on each node and comes back as one error reply per node; every
    worker is gone after close."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    pool = WorkerPool(2, tmp_path / "workers.log", engine_environment(tmp_path))
    try:
        grid = LocalGrid(pool, 3, {"scenario": "medical"})
        nodes = list(grid.get_node_ids())
        messages = [
            Message(RecordDict({"config": ConfigRecord({})}), node, "query", group_id="0")
            for node in nodes
        ]
        replies = list(grid.send_and_receive(messages, timeout=120))
        assert sorted(r.metadata.src_node_id for r in replies) == nodes
        assert all(r.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION for r in replies)
        assert "No query function registered" in replies[0].error.reason
        contexts = [grid.node_context(node) for node in nodes]
        assert [c.node_config[PARTITION_ID_KEY] for c in contexts] == [0, 1, 2]
        assert all(c.node_config["num-partitions"] == 3 for c in contexts)
    finally:
        pool.close()
    assert not group_alive(pool.process_group)
