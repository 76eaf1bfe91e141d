"""A coordinator's crafted global model cannot turn a node's reply into a membership signal.

The model is finite (so it passes the node's review) but one hidden unit fires only on
a target record of the node's own table and overflows float32 two layers later. Before
per-sample gradients with a non-finite norm were dropped, the reply came back NaN
exactly when the target was in the batch. Here the node trains a round on it as a
deployed node does (its own ledger, the owner's budget and delta) with the target in
every batch: the reply is finite and the round is charged as any other round.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from opacus.accountants import RDPAccountant

from client.app import train_local_model
from fedmodel.config import RunConfig
from fedmodel.data import TabularData
from fedmodel.models import ClassifierLoss, build_model
from fedmodel.privacy.calibration import calibrate_noise_multiplier
from fedmodel.privacy.ledger import PrivacyLedger
from fedmodel.sampling import client_batch_size, poisson_plan
from tests.conftest import deployed_node_context, dp_accounting_epsilon, table_rows

DELTA = 1e-5


def crafted_state(data: TabularData) -> tuple[dict[str, torch.Tensor], int]:
    """An MLP whose first hidden unit is 0 on every row but the target's; the target."""
    feature = 0
    column = data.features[:, feature]
    target = int(np.argmax(column))
    threshold = (column[target] + np.sort(column)[-2]) / 2
    model = build_model("mlp", data.num_features)
    first, second, _ = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        first.weight[0] = 0.0
        first.weight[0, feature] = 1e30
        first.bias[0] = float(-threshold * 1e30)
        second.weight[:, 0] = 1e30
    return model.state_dict(), target


def test_a_crafted_overflow_model_gets_a_finite_reply_charged_normally(
    tmp_path: Path, flchain: tuple[TabularData, TabularData]
) -> None:
    train, _ = flchain
    data = train.subset(np.arange(300))
    state, target = crafted_state(data)
    model = build_model("mlp", data.num_features)
    model.load_state_dict(state)
    features, labels = data.tensors()
    losses = ClassifierLoss(reduction="none")(model(features), labels)
    others = torch.arange(len(data)) != target
    assert not losses[target].isfinite() and losses[others].isfinite().all()  # the probe works

    # batch size >= rows: the client takes a quarter of its rows per batch (small-site rule)
    config = RunConfig(epsilon=1.0, rounds=2, local_epochs=2, batch_size=512, device="cpu")
    ledger_path = tmp_path / "privacy-ledger.sqlite"
    context = deployed_node_context(tmp_path, config, budget_epsilon=3.0)
    reply, metrics = train_local_model(
        config, context, table_rows(config, data), state, server_round=1
    )
    assert all(torch.isfinite(tensor).all() for tensor in reply.values())
    assert np.isfinite(float(metrics["train-loss"]))

    # charged as planned: the ledger's mechanism, from the config alone, recomputed twice
    plan = poisson_plan(len(data), client_batch_size(len(data), config.batch_size))
    steps = config.local_epochs * plan.steps_per_epoch
    noise = calibrate_noise_multiplier(1.0, DELTA, plan.sample_rate, config.rounds * steps)
    (entry,) = [e for e in PrivacyLedger(ledger_path).entries() if e.status == "committed"]
    assert entry.segment == (noise, plan.sample_rate, steps) == (noise, 0.25, 8)
    accountant = RDPAccountant()
    accountant.history = [entry.segment]
    assert float(metrics["epsilon"]) == accountant.get_epsilon(DELTA)
    assert float(metrics["epsilon"]) >= dp_accounting_epsilon([entry.segment], DELTA, pld=True)
