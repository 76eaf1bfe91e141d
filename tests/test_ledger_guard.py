"""A deployed node's ledger cannot be reset, cut, replayed into, or charged for less than ran."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import charge_distributed_round, train_local_model
from client.ledger_guard import check_ledger, ledger_path, record_head, replay_refusal
from client.policy import OwnerPolicy, PolicyError, content_refusal, load_policy, save_policy
from fedmodel.config import RunConfig
from fedmodel.data import TabularData
from fedmodel.distributed_secagg import distributed_parameters
from fedmodel.models import build_model
from fedmodel.privacy.budget import BudgetExhausted, OwnerBudget
from fedmodel.privacy.ledger import NODE_BUDGET, LedgerError, PrivacyLedger
from tests.conftest import deployed_node_context, table_rows

DELTA = 1e-5
ROUND = (1.1, 0.02, 50)


def spend(ledger: PrivacyLedger, run_id: str, server_round: int) -> None:
    pending, _ = ledger.write_ahead(
        NODE_BUDGET, run_id, server_round, ROUND, 1.0, DELTA, 3.0,
        OwnerBudget(3.0, DELTA).projector(ROUND),
    )  # fmt: skip
    ledger.commit(pending, ROUND, 0.5)


@pytest.fixture
def node(tmp_path: Path) -> Path:
    save_policy(tmp_path, OwnerPolicy(budget_epsilon=3.0))
    ledger = PrivacyLedger(ledger_path(tmp_path))
    for server_round in (1, 2):
        spend(ledger, "run-a", server_round)
    record_head(tmp_path)
    return tmp_path


def test_the_policy_keeps_the_ledgers_chain_head(node: Path) -> None:
    policy = load_policy(node)
    assert policy.ledger_entries == 4  # two rounds, each pending + committed
    assert policy.ledger_head == PrivacyLedger(ledger_path(node)).entries()[-1].entry_hash
    check_ledger(node, policy)
    spend(PrivacyLedger(ledger_path(node)), "run-a", 3)  # longer than the head: fine
    check_ledger(node, policy)


def test_a_deleted_ledger_stops_the_node(node: Path) -> None:
    ledger_path(node).unlink()
    with pytest.raises(PolicyError, match="is missing, but this node's policy records 4"):
        check_ledger(node, load_policy(node))


def test_a_truncated_ledger_stops_the_node(node: Path) -> None:
    with sqlite3.connect(ledger_path(node)) as connection:
        connection.execute("DELETE FROM entries WHERE seq > 2")
    with pytest.raises(PolicyError, match="holds 2 entries, but this node's policy records 4"):
        check_ledger(node, load_policy(node))


def test_a_rewritten_ledger_stops_the_node(node: Path) -> None:
    ledger_path(node).unlink()
    ledger = PrivacyLedger(ledger_path(node))  # as long as before, other entries
    for server_round in (1, 2):
        spend(ledger, "run-b", server_round)
    with pytest.raises(PolicyError, match="entry #4 is not the one this node recorded"):
        check_ledger(node, load_policy(node))


def test_an_edited_entry_stops_the_node(node: Path) -> None:
    spend(PrivacyLedger(ledger_path(node)), "run-a", 3)
    with sqlite3.connect(ledger_path(node)) as connection:
        connection.execute("UPDATE entries SET noise_multiplier = 9 WHERE seq = 5")
    with pytest.raises(PolicyError, match="entry #5 content does not match its SHA-256"):
        check_ledger(node, load_policy(node))


def test_a_trained_round_is_not_trained_again(node: Path) -> None:
    refusal = replay_refusal(node, "run-a", 2)
    assert refusal is not None and refusal.startswith("replayed-round: round 2 of run run-a")
    assert replay_refusal(node, "run-a", 3) is None
    assert replay_refusal(node, "run-b", 1) is None


def test_a_distributed_round_is_not_trained_again(tmp_path: Path) -> None:
    """Distributed DP trains without DP-SGD, but its owner's ledger pays for each round
    before the noisy update leaves: the same entry refuses a replay, on a node whose
    ledger held nothing before."""
    config = RunConfig(
        dp="distributed", secagg=True, secagg_shares=3, secagg_threshold=2, clients=3,
        distributed_noise=4.0, run_uid="run-d",
    )  # fmt: skip
    context = deployed_node_context(tmp_path, config, budget_epsilon=100.0)
    charge_distributed_round(config, context, distributed_parameters(config, 100), 1)
    refusal = replay_refusal(tmp_path, "run-d", 1)
    assert refusal is not None and refusal.startswith("replayed-round: round 1 of run run-d")
    assert "ledger entry #1" in refusal
    assert replay_refusal(tmp_path, "run-d", 2) is None
    assert replay_refusal(tmp_path, "run-e", 1) is None


def test_a_mechanism_larger_than_planned_is_never_committed(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    for ran in [(1.0, 0.02, 50), (1.1, 0.03, 50), (1.1, 0.02, 51)]:
        unlimited = OwnerBudget(None, DELTA).projector(ROUND)
        pending, _ = ledger.write_ahead(NODE_BUDGET, "run", 1, ROUND, 1.0, DELTA, None, unlimited)
        with pytest.raises(LedgerError, match="more than the planned"):
            ledger.commit(pending, ran, 0.5)
    ledger.commit(pending, (1.2, 0.01, 50), 0.4)  # smaller is the truth: recorded as ran
    assert [entry.status for entry in ledger.entries()] == ["pending"] * 3 + ["committed"]


def test_a_model_with_non_finite_values_is_refused() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1  # as a task's
    weights = np.ones((2, 3), dtype=np.float32)
    honest = Message(
        RecordDict({"arrays": ArrayRecord({"w": Array(weights)})}), 1, MessageType.TRAIN
    )
    assert content_refusal(honest) is None
    for bad in (np.nan, np.inf, -np.inf):
        crafted = weights.copy()
        crafted[1, 2] = bad
        message = Message(
            RecordDict({"arrays": ArrayRecord({"w": Array(crafted)})}), 1, MessageType.TRAIN
        )
        assert "non-finite values (NaN or inf) in 'arrays/w'" in str(content_refusal(message))


def test_every_file_a_node_trains_on_spends_its_one_budget(
    tmp_path: Path, flchain: tuple[TabularData, TabularData]
) -> None:
    """Re-exporting or appending to the data file must not buy a fresh budget."""
    train, _ = flchain
    config = RunConfig(epsilon=1.0, rounds=1, batch_size=40, device="cpu")
    context = deployed_node_context(tmp_path, config, budget_epsilon=1.2)
    start = build_model(config.model, train.num_features).state_dict()
    first = train.subset(np.arange(400))
    _, metrics = train_local_model(
        config, context, table_rows(config, first), start, server_round=1
    )
    assert 0.9 < float(metrics["epsilon"]) <= 1.0 + 1e-6
    exported_again = train.subset(np.arange(401))  # one row more: another fingerprint once
    with pytest.raises(BudgetExhausted):
        train_local_model(
            config.replace(run_uid="second"),
            context,
            table_rows(config, exported_again),
            start,
            server_round=1,
        )
    assert {entry.fingerprint for entry in PrivacyLedger(ledger_path(tmp_path)).entries()} == {
        NODE_BUDGET
    }
