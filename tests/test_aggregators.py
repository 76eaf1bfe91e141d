"""Aggregation rules: real Flower strategies on real Messages, with one hostile reply."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmodel.errors import ConfigError
from server.aggregators import AGGREGATORS, build_aggregator, check_aggregator
from tests.test_central_dp import NodesGrid


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Flower refuses to build Messages outside a running app without an identity."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def replies(vectors: list[np.ndarray]) -> list[Message]:
    out = []
    for node, vector in enumerate(vectors, start=10):
        instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": torch.tensor(vector, dtype=torch.float32)}),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        )
        out.append(Message(content=content, reply_to=instruction))
    return out


HONEST = [np.array([1.0, 2.0]) + 0.01 * i for i in range(6)]
ATTACK = np.array([1000.0, -1000.0])


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "krum", "multikrum"])
def test_robust_rules_ignore_one_hostile_update(name: str) -> None:
    strategy = build_aggregator(name, replies_per_round=7, byzantine=1)
    arrays, _ = strategy.aggregate_train(1, replies([*HONEST, ATTACK]))
    assert arrays is not None
    result = arrays["w"].numpy()
    assert np.all(np.abs(result - np.array([1.025, 2.025])) < 0.05), result


def test_fedavg_is_dragged_by_the_hostile_update() -> None:
    arrays, _ = build_aggregator("fedavg", 7, 0).aggregate_train(1, replies([*HONEST, ATTACK]))
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), (sum(HONEST) + ATTACK) / 7, rtol=1e-5)


def test_fedadam_steps_towards_the_replies_and_keeps_the_models_float32() -> None:
    """Each round's replies are checked against the global model's dtypes: a float64
    model would have every float32 reply of round 2 rejected."""
    strategy = build_aggregator("fedadam", 6, 0)
    model = ArrayRecord({"w": torch.zeros(2, dtype=torch.float32)})
    for server_round in (1, 2):
        grid = NodesGrid(6)  # FedAvg's sampling asks it which nodes are connected
        strategy.configure_train(server_round, model, ConfigRecord(), grid)  # type: ignore[arg-type]
        arrays, _ = strategy.aggregate_train(server_round, replies(HONEST))
        assert arrays is not None and arrays["w"].dtype == "float32"
        step = arrays["w"].numpy() - model["w"].numpy()
        assert np.all(step > 0)  # towards the replies (all above zero), by Adam's step
        model = arrays


def test_fedadams_step_scales_with_the_server_lr() -> None:
    model = ArrayRecord({"w": torch.zeros(2, dtype=torch.float32)})
    steps = []
    for server_lr in (0.1, 0.2):
        strategy = build_aggregator("fedadam", 6, 0, server_lr=server_lr)
        strategy.configure_train(1, model, ConfigRecord(), NodesGrid(6))  # type: ignore[arg-type]
        arrays, _ = strategy.aggregate_train(1, replies(HONEST))
        assert arrays is not None
        steps.append(arrays["w"].numpy())
    np.testing.assert_allclose(steps[1], 2 * steps[0], rtol=1e-6)
    assert np.all(steps[0] > 0.05)  # about the server lr per coordinate: Adam's sign step


def test_fedavgms_second_step_is_the_mean_update_plus_momentum_times_the_first() -> None:
    """Server momentum, computed here independently: step_t = mean_t + beta * step_{t-1},
    where mean_t is the average reply minus the current model; float32 throughout."""
    beta = 0.5
    strategy = build_aggregator("fedavgm", 6, 0, server_momentum=beta)
    model = ArrayRecord({"w": torch.zeros(2, dtype=torch.float32)})
    previous_step = np.zeros(2)
    for server_round, offset in ((1, 0.0), (2, 3.0)):
        strategy.configure_train(server_round, model, ConfigRecord(), NodesGrid(6))  # type: ignore[arg-type]
        arrays, _ = strategy.aggregate_train(server_round, replies([v + offset for v in HONEST]))
        assert arrays is not None and arrays["w"].dtype == "float32"
        mean_update = np.mean([v + offset for v in HONEST], axis=0) - model["w"].numpy()
        expected_step = mean_update + beta * previous_step
        np.testing.assert_allclose(
            arrays["w"].numpy() - model["w"].numpy(), expected_step, rtol=1e-5
        )
        previous_step, model = expected_step, arrays
    assert np.all(previous_step > mean_update)  # momentum carried round 1's step into round 2


@pytest.mark.slow
def test_a_fedadam_run_completes_every_round_with_the_server_lr_it_was_given(
    tmp_path: Path,
) -> None:
    """The user's path that broke: round 2 rejected every reply of a fedadam run. Adam's
    first step moves a weight by at most about 0.74 x the server lr; at the default 0.1
    the largest move would be ~0.07, so a move under 0.01 shows that 0.01 arrived."""
    from tests.test_simulation import simulate

    result, run_dir = simulate(
        tmp_path,
        *("--dataset", "breast-cancer", "--clients", "2", "--rounds", "2", "--no-baselines"),
        *("--aggregator", "fedadam", "--server-lr", "0.01"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] and summary["stopped_early"] is None
    assert [row["clients"] for row in summary["per_round"]] == [2, 2]
    assert summary["rejected_updates"] == []
    before, after = (
        torch.load(run_dir / "checkpoints" / f"round-{n:04d}.pt", weights_only=True)["state_dict"]
        for n in (0, 1)
    )
    largest = max(float((after[key] - before[key]).abs().max()) for key in before)
    assert 0.005 < largest < 0.01, largest


def test_bulyan_needs_four_f_plus_three_replies() -> None:
    with pytest.raises(ConfigError, match="bulyan tolerating 1 Byzantine clients needs at least 7"):
        check_aggregator("bulyan", replies_per_round=6, byzantine=1)
    check_aggregator("bulyan", replies_per_round=7, byzantine=1)


def test_krum_needs_two_f_plus_three_replies() -> None:
    with pytest.raises(ConfigError, match="at least 7 replies"):
        check_aggregator("krum", replies_per_round=6, byzantine=2)


def test_unknown_aggregator_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match=", ".join(AGGREGATORS)):
        check_aggregator("average", 5, 0)
