"""Accounting specifications, each checked against an independent computation."""

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from fedmodel.data import TabularData, make_loader
from fedmodel.models import ClassifierLoss, build_model
from fedmodel.privacy.accountant import (
    epsilon_of,
    history_fields,
    history_from_fields,
    merge_segments,
)
from fedmodel.privacy.analysis import RDP_ORDERS
from fedmodel.privacy.calibration import calibrate_noise_multiplier
from fedmodel.training import train_dp
from tests.conftest import dp_accounting_epsilon

LOSS = ClassifierLoss(reduction="none")

DELTA = 1e-5


@pytest.mark.parametrize(("target", "rate", "steps"), [(1.0, 1 / 13, 65), (3.0, 0.02, 500)])
def test_calibrated_noise_meets_the_target_over_the_whole_plan(
    target: float, rate: float, steps: int
) -> None:
    noise = calibrate_noise_multiplier(target, DELTA, rate, steps)
    spent = dp_accounting_epsilon([(noise, rate, steps)], DELTA)
    assert spent <= target * 1.01  # dp-accounting's RDP agrees with Opacus's to <1%
    assert spent >= target * 0.95  # and the noise is not wastefully large
    # calibrating per round instead would spend the target every round
    per_round = calibrate_noise_multiplier(target, DELTA, rate, steps // 5)
    assert per_round < noise


def test_epsilon_of_history_matches_dp_accounting() -> None:
    history = [(1.0, 0.25, 12)]
    assert epsilon_of(history, DELTA) == pytest.approx(7.328, abs=0.01)  # measured in notes
    assert epsilon_of(history, DELTA) == pytest.approx(
        dp_accounting_epsilon(history, DELTA), rel=0.01
    )
    # RDP is an upper bound: never below the tight PLD number
    assert epsilon_of(history, DELTA) >= dp_accounting_epsilon(history, DELTA, pld=True)
    assert epsilon_of([], DELTA) == 0.0


def test_merge_segments_joins_only_identical_mechanisms() -> None:
    assert merge_segments([(1.0, 0.1, 5), (1.0, 0.1, 7), (2.0, 0.1, 1), (1.0, 0.1, 1)]) == [
        (1.0, 0.1, 12),
        (2.0, 0.1, 1),
        (1.0, 0.1, 1),
    ]


def test_history_fields_round_trip() -> None:
    history = [(1.5, 0.0625, 48), (2.0, 0.125, 8)]
    assert history_from_fields(history_fields(history)) == history


def _tiny_task(rows: int = 256) -> TabularData:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(rows, 5)).astype(np.float32)
    labels = (features[:, 0] + 0.3 * rng.normal(size=rows) > 0).astype(np.float32)
    return TabularData(features, labels, tuple("abcde"))


def test_restored_history_composes_across_rounds_and_a_fresh_one_under_reports() -> None:
    torch.manual_seed(0)
    data = _tiny_task()
    model = build_model("logreg", data.num_features)
    history: list = []
    epsilons = []
    for round_seed in range(3):
        loader = make_loader(data.dataset(), batch_size=64, seed=round_seed)
        result = train_dp(
            model, LOSS, loader, 1, 0.1, 1.0, 1.0, history, torch.device("cpu"), seed=round_seed
        )
        history = result.history
        epsilons.append(epsilon_of(history, DELTA))
    assert history == [(1.0, 0.25, 12)]  # 3 rounds x 4 steps at q = 1/len(loader)
    assert epsilons[0] < epsilons[1] < epsilons[2]
    one_accountant = RDPAccountant()
    for _ in range(12):
        one_accountant.step(noise_multiplier=1.0, sample_rate=0.25)
    assert epsilons[2] == pytest.approx(one_accountant.get_epsilon(DELTA), rel=1e-9)
    assert epsilons[2] == pytest.approx(7.33, abs=0.01)
    assert epsilons[0] == pytest.approx(4.87, abs=0.01)  # what a per-round accountant reports


def test_dp_training_returns_plain_weight_names_and_learns() -> None:
    torch.manual_seed(0)
    data = _tiny_task(1024)
    model = build_model("mlp", data.num_features)
    names = set(model.state_dict())
    loader = make_loader(data.dataset(), batch_size=64, seed=0)
    first = train_dp(model, LOSS, loader, 1, 0.5, 0.8, 1.0, [], torch.device("cpu"), seed=0)
    later = train_dp(
        model, LOSS, loader, 3, 0.5, 0.8, 1.0, first.history, torch.device("cpu"), seed=1
    )
    assert set(model.state_dict()) == names
    assert not any(name.startswith("_module.") for name in model.state_dict())
    assert later.loss < first.loss
    assert later.history == [(0.8, 1 / 16, 64)]


def test_cached_epsilon_equals_opacus_exactly_on_varied_histories() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        history = [
            (
                float(rng.uniform(0.5, 3.0)),
                float(1 / rng.integers(2, 200)),
                int(rng.integers(1, 5000)),
            )
            for _ in range(int(rng.integers(1, 4)))
        ]
        reference = RDPAccountant()
        reference.load_state_dict({"history": history, "mechanism": "rdp"})
        assert epsilon_of(history, DELTA) == reference.get_epsilon(DELTA)
    assert list(RDP_ORDERS) == RDPAccountant.DEFAULT_ALPHAS
