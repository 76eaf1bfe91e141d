"""Checkpoints and resume: round trip, atomic writes, and a resumed run equal to an unbroken one.

The in-process federation below is a real Flower `Strategy.start` loop (FedAdam, or
client-level DP over FedAvg, behind our GuardedStrategy) over a tiny Grid whose nodes
answer from their node id and the server round; half the nodes are sampled per round, so
Python's RNG decides who trains.
"""

from __future__ import annotations

import csv
import json
import math
import random
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedmodel.config import RunConfig
from fedmodel.errors import ConfigError
from fedmodel.privacy.accountant import history_fields
from fedmodel.protocol import PARTITION_ID_KEY
from fedmodel.run_directory import CLASSIFIER_SCORING
from server.aggregators import build_aggregator
from server.central_dp import with_central_dp
from server.checkpoint import (
    load_checkpoint,
    load_resume_point,
    restore_rng,
    restore_strategy_state,
    rng_state,
    save_checkpoint,
    strategy_state,
)
from server.resume import RunPaused, open_run_record, resume_config, run_rounds
from server.run_record import RunRecorder
from server.strategy import GuardedStrategy

NODES = list(range(100, 106))
# Six nodes, three sampled per round; FedAdam keeps state across rounds for resume to restore.
FEDERATION = RunConfig(clients=len(NODES), fraction=0.5, aggregator="fedadam")


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Flower refuses to build Messages outside a running app without an identity."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def node_update(node: int, server_round: int, dimensions: int) -> torch.Tensor:
    """What a node adds to the global weights: 0.1 * (node, round), repeated to size."""
    return 0.1 * torch.tensor([node - 100.0, float(server_round)]).repeat(dimensions // 2)


class NodesThatAnswer(Grid):
    """Six nodes; each replies global weights + `node_update`, a fixed function."""

    def __init__(self) -> None:
        self.trained: list[tuple[int, int]] = []  # (server round, node)

    def get_node_ids(self) -> Iterable[int]:
        return list(NODES)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for message in messages:
            server_round = int(str(message.content["config"]["server-round"]))
            node = message.metadata.dst_node_id
            self.trained.append((server_round, node))
            weights = message.content["arrays"].to_torch_state_dict()["w"]
            update = weights + node_update(node, server_round, len(weights))
            metrics = {
                "num-examples": 10 + node % 3,
                PARTITION_ID_KEY: node - 100,
                "train-loss": 1.0 / server_round,
                "epsilon": 0.1 * server_round,
                "delta": 1e-5,
                **history_fields([(1.0, 0.1, 10 * server_round)]),
            }
            content = RecordDict(
                {"arrays": ArrayRecord({"w": update}), "metrics": MetricRecord(metrics)}
            )
            replies.append(Message(content=content, reply_to=message))
        return replies

    def set_run(self, run: Run) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Run:
        raise NotImplementedError

    def create_message(self, *args: object, **kwargs: object) -> Message:  # type: ignore[override]
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError


def federate(run_dir: Path, config: RunConfig, dimensions: int = 2) -> NodesThatAnswer:
    """What server/app.py does, over the in-process nodes and a `dimensions`-weight model."""
    config = config.replace(output_dir=str(run_dir))
    if not config.resume:  # as the CLI does
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text(json.dumps(config.to_run_config()))
    recorder, resume = open_run_record(config, run_dir, CLASSIFIER_SCORING)
    inner = build_aggregator(
        config.aggregator, config.clients_per_round, 0, fraction_train=config.fraction,
        fraction_evaluate=0.0, min_train_nodes=config.clients_per_round,
        min_available_nodes=config.clients,
    )  # fmt: skip
    strategy = GuardedStrategy(with_central_dp(inner, config, recorder), recorder)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        loss = float(arrays.to_torch_state_dict()["w"].norm())
        recorder.record_evaluation(server_round, {"auroc": 0.5, "accuracy": 0.5, "loss": loss})
        return MetricRecord({"loss": loss})

    grid = NodesThatAnswer()
    initial = ArrayRecord({"w": torch.zeros(dimensions)})
    try:
        run_rounds(grid, strategy, recorder, initial, resume, evaluate)
        recorder.write_summary(completed=True)
    except RunPaused as paused:
        recorder.write_summary(completed=True, stopped_early=str(paused))
    return grid


@pytest.mark.parametrize(
    ("aggregator", "state"), [("fedadam", {"m_t", "v_t"}), ("fedavgm", {"momentum_vector"})]
)
def test_resumed_run_equals_an_unbroken_one_with_a_server_optimizer_and_sampling(
    tmp_path: Path, aggregator: str, state: set[str]
) -> None:
    config = FEDERATION.replace(rounds=4, run_uid="fixed", aggregator=aggregator)
    random.seed(7)
    federate(tmp_path / "unbroken", config)

    random.seed(7)
    first = federate(tmp_path / "broken", config.replace(stop_after_round=2))
    assert sorted({r for r, _ in first.trained}) == [1, 2]
    random.seed(12345)  # a restarted coordinator's generator is anywhere
    resumed = resume_config(tmp_path / "broken")
    second = federate(tmp_path / "broken", resumed)
    assert sorted({r for r, _ in second.trained}) == [3, 4]  # the clients see the true rounds

    unbroken = load_resume_point(tmp_path / "unbroken" / "checkpoints")
    broken = load_resume_point(tmp_path / "broken" / "checkpoints")
    assert unbroken is not None and broken is not None
    assert broken.completed_round == 4
    torch.testing.assert_close(broken.state_dict, unbroken.state_dict, rtol=0, atol=0)
    torch.testing.assert_close(broken.strategy_state, unbroken.strategy_state, rtol=0, atol=0)
    assert set(unbroken.strategy_state) == state

    summaries = [
        json.loads((tmp_path / d / "summary.json").read_text()) for d in ("unbroken", "broken")
    ]
    assert summaries[1]["rounds"] == 4 and summaries[1]["stopped_early"] is None
    assert [r["round"] for r in summaries[1]["per_round"]] == [1, 2, 3, 4]
    assert summaries[1]["per_round"] == summaries[0]["per_round"]
    assert summaries[1]["clients"] == summaries[0]["clients"]
    for name in ("metrics.csv", "clients.csv"):
        assert (tmp_path / "broken" / name).read_text() == (
            tmp_path / "unbroken" / name
        ).read_text()
    checkpoints = sorted(p.name for p in (tmp_path / "broken" / "checkpoints").glob("round-*"))
    assert checkpoints == [f"round-{r:04d}.pt" for r in range(5)]


def test_a_resumed_rounds_central_noise_is_fresh_and_latest_pt_cannot_regenerate_it(
    tmp_path: Path,
) -> None:
    """Issue 12: a reader of `latest.pt` sets NumPy's generator to the state it holds, draws
    the noise a resumed round would add and subtracts it from the released model. It must
    not get the clipped mean back, and resuming twice must not release the same model."""
    dimensions, stddev = 20_000, 1.0 * 1.0 / 3  # z * C / n
    config = FEDERATION.replace(
        rounds=2, aggregator="fedavg", dp="client", central_noise=1.0, central_clipping_norm=1.0
    )
    random.seed(5)
    federate(tmp_path / "original", config.replace(stop_after_round=1), dimensions)
    shutil.copytree(tmp_path / "original", tmp_path / "again")  # the same checkpoint twice
    leaked = load_resume_point(tmp_path / "original" / "checkpoints")
    assert leaked is not None and leaked.completed_round == 1
    released, cohorts = [], []
    for name in ("original", "again"):
        grid = federate(tmp_path / name, resume_config(tmp_path / name), dimensions)
        _, state_dict = load_checkpoint(tmp_path / name / "checkpoints" / "round-0002.pt")
        released.append(state_dict["w"].double().numpy())
        cohorts.append(sorted(node for r, node in grid.trained if r == 2))
    assert cohorts[0] == cohorts[1]  # node sampling still follows the checkpoint

    updates = [node_update(node, 2, dimensions).double() for node in cohorts[0]]
    clipped = torch.stack([u / u.norm() for u in updates]).sum(0)  # every norm is above C = 1
    clipped_mean = leaked.state_dict["w"].double().numpy() + clipped.numpy() / 3
    for model in released:
        assert np.std(model - clipped_mean) == pytest.approx(stddev, rel=0.02)
    assert np.std(released[0] - released[1]) == pytest.approx(math.sqrt(2) * stddev, rel=0.02)

    restore_rng(leaked.rng_state)  # then draw as Flower 1.39's add_gaussian_noise_inplace
    regenerated = np.random.normal(0.0, stddev, dimensions).astype(np.float32)
    left = released[0] - regenerated - clipped_mean
    assert np.std(left) == pytest.approx(math.sqrt(2) * stddev, rel=0.02)  # two noises, not 0


def test_rows_of_a_round_in_flight_at_the_crash_are_dropped_on_resume(tmp_path: Path) -> None:
    config = FEDERATION.replace(rounds=4)
    random.seed(1)
    federate(tmp_path / "run", config.replace(stop_after_round=2))
    with (tmp_path / "run" / "clients.csv").open("a", newline="") as handle:
        csv.writer(handle).writerow([3, "0", 10, 0.5, 0.3])  # written before the crash
    federate(tmp_path / "run", resume_config(tmp_path / "run"))
    with (tmp_path / "run" / "clients.csv").open() as handle:
        rounds = [int(row["round"]) for row in csv.DictReader(handle)]
    assert rounds == sorted(rounds) and rounds.count(3) == 3  # 3 sampled clients, once each


def test_resume_refuses_a_complete_run_and_a_directory_without_a_checkpoint(
    tmp_path: Path,
) -> None:
    random.seed(0)
    federate(tmp_path / "done", FEDERATION.replace(rounds=2))
    with pytest.raises(ConfigError, match="already complete \\(2 of 2 rounds\\)"):
        resume_config(tmp_path / "done")
    with pytest.raises(ConfigError, match="no config.json"):
        resume_config(tmp_path / "empty")
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.json").write_text(json.dumps(RunConfig().to_run_config()))
    with pytest.raises(ConfigError, match="no resumable checkpoint"):
        resume_config(tmp_path / "fresh")
    with pytest.raises(ConfigError, match="'medical' run; use 'fedmodel simulate medical"):
        resume_config(tmp_path / "done", scenario="digits")


def test_rng_state_round_trips_for_python_numpy_and_torch() -> None:
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in NumPy's state
    saved = rng_state()
    expected = (random.random(), np.random.normal(), torch.rand(1).item())
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng(saved)
    assert (random.random(), np.random.normal(), torch.rand(1).item()) == expected


def test_fedadam_moments_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    strategy = build_aggregator("fedadam", 2, 0)
    strategy.m_t = {"w": np.array([0.5, -1.0], dtype=np.float32)}
    strategy.v_t = {"w": np.array([0.25, 1.0], dtype=np.float32)}
    save_checkpoint(
        tmp_path, 3, {"w": torch.ones(2)},
        {"strategy": strategy_state(strategy), "rng": rng_state(), "record": {"rounds": []}},
    )  # fmt: skip
    point = load_resume_point(tmp_path)
    assert point is not None and point.completed_round == 3
    fresh = build_aggregator("fedadam", 2, 0)
    guarded = GuardedStrategy(fresh, RunRecorder(tmp_path / "run", RunConfig(), CLASSIFIER_SCORING))
    restore_strategy_state(guarded, point.strategy_state)  # found through the wrapper
    assert fresh.m_t is not None and fresh.v_t is not None
    np.testing.assert_array_equal(fresh.m_t["w"], strategy.m_t["w"])
    np.testing.assert_array_equal(fresh.v_t["w"], strategy.v_t["w"])
    assert fresh.m_t["w"].dtype == np.float32
    assert strategy_state(build_aggregator("fedavg", 2, 0)) == {}


def test_a_crash_while_writing_leaves_the_previous_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path, 1, {"w": torch.ones(2)})

    def crash_mid_write(payload: object, path: Path) -> None:
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)})
    monkeypatch.undo()
    round_number, state_dict = load_checkpoint(tmp_path / "latest.pt")
    assert round_number == 1 and torch.equal(state_dict["w"], torch.ones(2))
    assert not (tmp_path / "round-0002.pt").exists()  # never a torn file under the real name


def test_deployed_nodes_keep_their_client_numbers_when_a_resumed_run_lost_one(
    tmp_path: Path,
) -> None:
    from server.deployment import client_positions

    first = client_positions(tmp_path, {51: "hospital-b", 37: "hospital-a", 90: "hospital-c"})
    assert first == {37: 0, 51: 1, 90: 2}
    # resumed after a restart: hospital-a is gone, a new node joined
    resumed = client_positions(tmp_path, {51: "hospital-b", 90: "hospital-c", 12: "hospital-d"})
    assert resumed == {51: 1, 90: 2, 12: 3}
