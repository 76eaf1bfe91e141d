"""FedProx: the proximal term really changes local training (plain and DP-SGD), mu=0 is FedAvg."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from fedmodel.data import TabularData, make_loader
from fedmodel.models import ClassifierLoss, build_model
from fedmodel.training import train_dp, train_plain
from server.aggregators import build_aggregator

LOSS = ClassifierLoss(reduction="none")

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def tiny_table(rows: int = 256, features: int = 5) -> TabularData:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    y = (x @ rng.normal(size=features) + 0.3 * rng.normal(size=rows) > 0).astype(np.float32)
    return TabularData(x, y, tuple(f"x{i}" for i in range(features)))


def start_model(data: TabularData) -> nn.Module:
    torch.manual_seed(1)
    return build_model("logreg", data.num_features)


@torch.no_grad()
def distance(model: nn.Module, reference: nn.Module) -> float:
    return float(
        sum(
            ((p - q) ** 2).sum()
            for p, q in zip(model.parameters(), reference.parameters(), strict=True)
        )
        ** 0.5
    )


def test_plain_fedprox_is_sgd_on_the_loss_plus_the_proximal_term() -> None:
    data, mu, lr = tiny_table(), 2.0, 0.3
    global_model = start_model(data)
    ours = copy.deepcopy(global_model)
    train_plain(ours, LOSS, make_loader(data.dataset(), 32, seed=5), 2, lr, CPU, proximal_mu=mu)

    # independent: autograd on BCE + mu/2 * ||w - w_global||^2, same batches
    reference = copy.deepcopy(global_model)
    optimizer = torch.optim.SGD(reference.parameters(), lr=lr)
    anchors = [p.detach().clone() for p in global_model.parameters()]
    loader = make_loader(data.dataset(), 32, seed=5)
    for _ in range(2):
        for features, labels in loader:
            optimizer.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(
                reference(features).squeeze(-1), labels
            )
            proximal = sum(
                ((p - a) ** 2).sum() for p, a in zip(reference.parameters(), anchors, strict=True)
            )
            (loss + mu / 2 * proximal).backward()
            optimizer.step()
    for p, q in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # and the term matters: without it the model ends somewhere else, farther away
    fedavg = copy.deepcopy(global_model)
    train_plain(fedavg, LOSS, make_loader(data.dataset(), 32, seed=5), 2, lr, CPU)
    assert distance(ours, global_model) < 0.8 * distance(fedavg, global_model)


def test_plain_mu_zero_is_exactly_fedavg_training() -> None:
    data = tiny_table()
    with_zero, without = start_model(data), start_model(data)
    train_plain(
        with_zero, LOSS, make_loader(data.dataset(), 32, seed=2), 1, 0.5, CPU, proximal_mu=0.0
    )
    train_plain(without, LOSS, make_loader(data.dataset(), 32, seed=2), 1, 0.5, CPU)
    for p, q in zip(with_zero.parameters(), without.parameters(), strict=True):
        assert torch.equal(p, q)


def dp_update(mu: float) -> tuple[nn.Module, nn.Module]:
    data = tiny_table()
    global_model = start_model(data)
    local = copy.deepcopy(global_model)
    loader = make_loader(data.dataset(), 32, seed=3)
    train_dp(
        local, LOSS, loader, 3, 0.5, 0.5, 1.0, [], CPU, proximal_mu=mu, seed=11
    )  # noise, batches
    return local, global_model


def test_dp_fedprox_pulls_the_update_towards_the_global_model() -> None:
    plain_a, global_model = dp_update(0.0)
    plain_b, _ = dp_update(0.0)
    prox, _ = dp_update(1.0)
    # same seed, mu = 0 twice: identical, so any difference below is the proximal term's
    assert distance(plain_a, plain_b) == 0.0
    assert distance(prox, global_model) < 0.7 * distance(plain_a, global_model)


def reply(node: int, vector: list[float], examples: int) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": torch.tensor(vector)}),
            "metrics": MetricRecord({"num-examples": examples}),
        }
    )
    return Message(content=content, reply_to=instruction)


def test_fedprox_aggregates_like_fedavg_and_sends_mu_to_clients() -> None:
    replies = [reply(1, [1.0, 2.0], 10), reply(2, [3.0, -1.0], 30)]
    fedprox, _ = build_aggregator("fedprox", 2, 0, proximal_mu=0.1).aggregate_train(1, replies)
    fedavg, _ = build_aggregator("fedavg", 2, 0).aggregate_train(1, replies)
    assert fedprox is not None and fedavg is not None
    np.testing.assert_array_equal(fedprox["w"].numpy(), fedavg["w"].numpy())

    strategy = build_aggregator("fedprox", 2, 0, proximal_mu=0.1, min_available_nodes=2)
    nodes = SimpleNamespace(get_node_ids=lambda: [5, 6])  # all sampling needs of a Grid
    sent = strategy.configure_train(1, ArrayRecord({"w": torch.zeros(2)}), ConfigRecord(), nodes)
    assert [m.content["config"]["proximal-mu"] for m in sent] == [0.1, 0.1]
