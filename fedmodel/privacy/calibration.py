"""Noise calibration: Opacus's own binary search, decided by a vectorised epsilon.

Opacus's `get_noise_multiplier` bisects over the noise multiplier, evaluating its RDP
accountant (151 orders, term by term in pure Python) about a dozen times: 0.3-3 s of
CPU for every new (sample rate, steps), which a federation of differently sized clients
pays once per size (issue 7). The search uses its epsilons only in comparisons with
two thresholds (the target, and the target less the tolerance). Here each epsilon is
computed with the same formulas vectorised in NumPy (fedmodel.privacy.analysis), which
agree with Opacus's to about 1e-13; whenever one lies within DECISION_MARGIN of a
threshold, Opacus's accountant computes it instead. Every comparison therefore comes
out as in Opacus, the search takes Opacus's path and returns Opacus's noise
multiplier, bit for bit (tests/test_calibration.py), in milliseconds.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

import numpy as np

from fedmodel.privacy.accountant import ACCOUNTANT
from fedmodel.privacy.analysis import vectorised_epsilon

DECISION_MARGIN = 1e-7  # relative; the vectorised epsilon is within ~1e-13 of Opacus's
EPSILON_TOLERANCE = 0.01  # Opacus's default precision of the search


@lru_cache(maxsize=1024)
def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int
) -> float:
    """Smallest noise multiplier whose epsilon after `steps` stays within the target.

    Calibrated once for the client's whole planned participation (rounds x local epochs
    x batches), not per round: per-round calibration would spend the budget every round.
    Opacus's answer, found along Opacus's search path in milliseconds
    (`calibrated_noise_multiplier`), and memoised in this process and on this machine
    (fedmodel.privacy.accounting_cache), whichever worker or run asks.
    """
    from fedmodel.privacy.accounting_cache import remembered

    inputs = (target_epsilon, delta, sample_rate, steps, ACCOUNTANT)
    (noise,) = remembered(
        "noise-multiplier",
        inputs,
        lambda: np.array([calibrated_noise_multiplier(target_epsilon, delta, sample_rate, steps)]),
    )
    return float(noise)


def calibrated_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int
) -> float:
    """What `opacus.accountants.utils.get_noise_multiplier` returns for these inputs
    (RDP accountant, default tolerance), found along the same search path."""
    from opacus.accountants.utils import MAX_SIGMA

    thresholds = (target_epsilon, target_epsilon - EPSILON_TOLERANCE)

    def epsilon(sigma: float) -> float:
        return _decided_epsilon(sigma, sample_rate, steps, delta, thresholds)

    eps_high = float("inf")
    sigma_low, sigma_high = 0.0, 10.0
    while eps_high > target_epsilon:
        sigma_high = 2 * sigma_high
        eps_high = epsilon(sigma_high)
        if sigma_high > MAX_SIGMA:
            raise ValueError("The privacy budget is too low.")
    while target_epsilon - eps_high > EPSILON_TOLERANCE:
        sigma = (sigma_low + sigma_high) / 2
        eps = epsilon(sigma)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high


def _decided_epsilon(
    sigma: float, q: float, steps: int, delta: float, thresholds: tuple[float, ...]
) -> float:
    """The vectorised epsilon, or Opacus's where it could fall on either side of a threshold."""
    fast = vectorised_epsilon(sigma, q, steps, delta)
    if math.isfinite(fast) and all(
        abs(fast - threshold) > DECISION_MARGIN * max(1.0, abs(threshold))
        for threshold in thresholds
    ):
        return fast
    return opacus_epsilon(sigma, q, steps, delta)


def opacus_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Epsilon exactly as Opacus's RDP accountant computes it inside its search."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(sigma, q, steps)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(accountant.get_epsilon(delta=delta))
