"""Owner-side budgets: projected before training, refused when over, never overspent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from client.app import _train_private, ledger_path, owner_budget
from fedmodel.config import RunConfig
from fedmodel.data import TabularData, make_loader
from fedmodel.errors import ConfigError
from fedmodel.models import build_model
from fedmodel.privacy.budget import BudgetExhausted, OwnerBudget, new_segments
from fedmodel.privacy.ledger import PrivacyLedger
from fedmodel.privacy.ledger_chain import COMMITTED, PENDING, verify_chain
from fedmodel.protocol import PARTITION_ID_KEY
from fedmodel.training import select_device
from tests.conftest import dp_accounting_epsilon, opacus_stepped_epsilon, table_rows

CPU = select_device("cpu")

DELTA = 1e-5


def context(config: RunConfig, run_id: int = 7, **node: str | float) -> Context:
    return Context(
        run_id=run_id,
        node_id=1,
        node_config={PARTITION_ID_KEY: 0, **node},
        state=RecordDict(),
        run_config=dict(config.to_run_config()),
    )


@pytest.fixture(scope="module")
def hospital(flchain: tuple[TabularData, TabularData]) -> TabularData:
    train, _ = flchain
    return train.subset(torch.arange(600).numpy())


def test_projection_refuses_exactly_when_a_fresh_accountant_would_exceed() -> None:
    spent = [(1.0, 0.02, 200)]
    round_ = (1.0, 0.02, 50)
    projected = OwnerBudget(10.0, DELTA).projector(round_)(spent)
    assert projected == pytest.approx(opacus_stepped_epsilon([(1.0, 0.02, 250)], DELTA), rel=1e-9)
    OwnerBudget(projected * 1.0001, DELTA).projector(round_)(spent)  # fits: no refusal
    with pytest.raises(BudgetExhausted, match="budget-exhausted") as refusal:
        OwnerBudget(projected * 0.9999, DELTA).projector(round_)(spent)
    assert refusal.value.spent == pytest.approx(opacus_stepped_epsilon(spent, DELTA), rel=1e-9)


@pytest.mark.parametrize(
    "greedy_round",
    [(1.0, 0.02, 500), (1.0, 0.2, 50), (0.3, 0.02, 50)],
    ids=["more-epochs", "smaller-batch", "less-noise"],
)
def test_a_greedy_coordinator_cannot_make_the_client_overspend(
    tmp_path: Path, greedy_round: tuple[float, float, int]
) -> None:
    ledger = PrivacyLedger(tmp_path / "owner.sqlite")
    budget = OwnerBudget(2.0, DELTA)
    modest = (1.0, 0.02, 50)  # epsilon 1.6
    ledger.write_ahead("data", "run", 1, modest, 1.0, DELTA, 2.0, budget.projector(modest))
    with pytest.raises(BudgetExhausted):
        ledger.write_ahead(
            "data", "run", 2, greedy_round, 1.0, DELTA, 2.0, budget.projector(greedy_round)
        )
    assert len(ledger.entries()) == 1  # a refused round leaves no trace and spends nothing
    assert ledger.spent_history("data") == [modest]


def test_new_segments_is_what_training_appended() -> None:
    assert new_segments([], [(1.0, 0.1, 5)]) == [(1.0, 0.1, 5)]
    assert new_segments([(1.0, 0.1, 5)], [(1.0, 0.1, 8)]) == [(1.0, 0.1, 3)]
    assert new_segments([(2.0, 0.1, 5)], [(2.0, 0.1, 5), (1.0, 0.1, 8)]) == [(1.0, 0.1, 8)]
    with pytest.raises(ValueError, match="rewritten"):
        new_segments([(1.0, 0.1, 5)], [(1.0, 0.1, 4)])


def test_budget_exhausted_client_refuses_to_train(tmp_path: Path, hospital: TabularData) -> None:
    """The ClientApp's own round protocol, on real data, until the owner's budget stops it."""
    config = RunConfig(
        rounds=8, epsilon=1.3, budget_epsilon=1.0, output_dir=str(tmp_path), batch_size=60
    )
    trained_rounds = 0
    for server_round in range(1, 9):
        model = build_model("mlp", hospital.num_features)
        loader = make_loader(hospital.dataset(), config.batch_size, server_round)
        before = [p.detach().clone() for p in model.parameters()]
        try:
            result, _ = _train_private(
                model, table_rows(config, hospital), loader, config, context(config), server_round,
                0.0, CPU, server_round,
            )  # fmt: skip
        except BudgetExhausted:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
            break
        trained_rounds += 1
        assert opacus_stepped_epsilon(result.history, DELTA) <= 1.0
    ledger = PrivacyLedger(ledger_path(config, context(config)))
    history = [tuple(segment) for segment in ledger.spent_history(ledger.entries()[0].fingerprint)]
    ((noise, rate, steps),) = history
    per_round = steps // trained_rounds
    assert 2 <= trained_rounds < 8
    assert (
        opacus_stepped_epsilon(history, DELTA)
        <= 1.0
        < opacus_stepped_epsilon([(noise, rate, steps + per_round)], DELTA)
    )
    assert dp_accounting_epsilon(history, DELTA, pld=True) <= opacus_stepped_epsilon(history, DELTA)
    assert [e.status for e in ledger.entries()] == [PENDING, COMMITTED] * trained_rounds
    assert verify_chain(ledger.entries()) is None


def test_a_restarted_client_resumes_with_the_same_noise_and_history(
    tmp_path: Path, hospital: TabularData
) -> None:
    config = RunConfig(rounds=3, epsilon=1.0, output_dir=str(tmp_path))
    loader = make_loader(hospital.dataset(), config.batch_size, 0)
    model = build_model("mlp", hospital.num_features)
    _train_private(
        model, table_rows(config, hospital), loader, config, context(config), 1, 0.0, CPU, 1
    )
    # the SuperNode restarts: no memory survives, only the ledger
    result, _ = _train_private(
        model, table_rows(config, hospital), loader, config, context(config), 2, 0.0, CPU, 2
    )
    ((noise, rate, steps),) = result.history
    assert steps == 2 * len(loader) and rate == 1 / len(loader)
    entries = PrivacyLedger(ledger_path(config, context(config))).entries()
    assert {e.noise_multiplier for e in entries} == {noise}


def test_owner_budget_comes_from_node_config_over_run_config(tmp_path: Path) -> None:
    config = RunConfig(epsilon=3.0, output_dir=str(tmp_path))
    assert owner_budget(config, context(config)) == OwnerBudget(3.0, 1e-5)
    assert owner_budget(config.replace(budget_epsilon=2.0), context(config)).epsilon == 2.0
    node = context(config, **{"budget-epsilon": 0.5, "ledger-path": str(tmp_path / "l.db")})
    assert owner_budget(config, node).epsilon == 0.5
    assert ledger_path(config, node) == tmp_path / "l.db"
    deployed = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ConfigError, match="ledger-path"):
        ledger_path(config, deployed)
