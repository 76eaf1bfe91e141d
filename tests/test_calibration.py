"""The fast noise calibration returns Opacus's noise multiplier, bit for bit.

The reference is Opacus's own `get_noise_multiplier` (and its RDP accountant), called
directly: an independent computation of every number checked here.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedmodel.privacy import calibration
from fedmodel.privacy.analysis import vectorised_epsilon
from fedmodel.privacy.calibration import DECISION_MARGIN, calibrated_noise_multiplier


def _opacus_epsilon(sigma: float, rate: float, steps: int, delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = [(sigma, rate, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta))


@pytest.mark.parametrize(
    ("rate", "sigma", "steps"),
    list(itertools.product([1.0, 0.5, 1 / 3, 0.1, 1 / 37, 1e-3], [0.5, 1.3, 4.0, 25.0], [40])),
)
def test_vectorised_epsilon_agrees_with_opacus_far_inside_the_margin(
    rate: float, sigma: float, steps: int
) -> None:
    expected = _opacus_epsilon(sigma, rate, steps, 1e-5)
    got = vectorised_epsilon(sigma, rate, steps, 1e-5)
    assert abs(got - expected) <= DECISION_MARGIN / 1000 * max(1.0, expected)


# (epsilon, delta, sample rate, steps): client sizes of 1 to 100 batches, tight and loose
# budgets; q = 1 and q = 1/2 are the federation's smallest sites.
SETTINGS = [
    (1.0, 1e-5, 1.0, 3),
    (1.0, 1e-5, 0.5, 6),
    (1.0, 1e-5, 1 / 3, 9),
    (2.0, 1e-5, 0.1, 40),
    (0.5, 1e-6, 1 / 40, 120),
    (3.0, 1e-5, 0.01, 3000),
    (1.0, 1e-5, 1 / 7, 21),
    (10.0, 1e-3, 1 / 13, 26),
]


@pytest.mark.parametrize("setting", SETTINGS)
def test_calibration_is_opacus_answer_bit_for_bit(setting: tuple[float, float, float, int]) -> None:
    epsilon, delta, rate, steps = setting
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = get_noise_multiplier(
            target_epsilon=epsilon, target_delta=delta, sample_rate=rate, steps=steps
        )
    assert calibrated_noise_multiplier(epsilon, delta, rate, steps) == expected


def test_a_value_near_a_decision_is_left_to_opacus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the vectorised epsilon lies within the margin of a threshold, the search
    uses Opacus's: a fast value that is off there cannot change the answer."""
    epsilon, delta, rate, steps = SETTINGS[3]
    asked = []

    def off_near_the_target(sigma: float, q: float, n: int, d: float) -> float:
        exact = _opacus_epsilon(sigma, q, n, d)
        return epsilon + (DECISION_MARGIN * epsilon / 2 if exact < epsilon else 0.0)

    def opacus(sigma: float, q: float, n: int, d: float) -> float:
        asked.append(sigma)
        return _opacus_epsilon(sigma, q, n, d)

    monkeypatch.setattr(calibration, "vectorised_epsilon", off_near_the_target)
    monkeypatch.setattr(calibration, "opacus_epsilon", opacus)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = get_noise_multiplier(
            target_epsilon=epsilon, target_delta=delta, sample_rate=rate, steps=steps
        )
    assert calibrated_noise_multiplier(epsilon, delta, rate, steps) == expected
    assert asked  # every value below the target was within the margin: Opacus decided


def test_a_budget_too_small_fails_as_in_opacus() -> None:
    with pytest.raises(ValueError, match="privacy budget is too low"):
        calibrated_noise_multiplier(1e-9, 1e-12, 1.0, 1000)
