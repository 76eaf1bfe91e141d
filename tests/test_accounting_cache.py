"""Noise calibrations and RDP curves are Opacus's own answers, computed once per machine."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp
from opacus.accountants.utils import get_noise_multiplier

from fedmodel.privacy import accountant, calibration
from fedmodel.privacy.accounting_cache import CACHE_DIR_VARIABLE, cache_path, remembered
from fedmodel.privacy.analysis import RDP_ORDERS

INPUTS = (4.0, 1e-5, 1 / 3, 9)  # epsilon, delta, sample rate, steps


@pytest.fixture(scope="module")
def opacus_answer() -> float:
    """Opacus's calibration, computed directly: the independent reference."""
    epsilon, delta, rate, steps = INPUTS
    return float(
        get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=rate,
            steps=steps,
            accountant="rdp",
        )
    )


def _never(*_: object) -> float:
    raise AssertionError("the calibration should have come from the cache")


def test_a_calibration_is_opacus_answer_and_later_calls_read_it_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opacus_answer: float
) -> None:
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path))
    calibration.calibrate_noise_multiplier.cache_clear()
    first = calibration.calibrate_noise_multiplier(*INPUTS)
    assert first == opacus_answer  # bit for bit
    with sqlite3.connect(cache_path()) as connection:
        assert connection.execute("SELECT count(*) FROM memo").fetchone() == (1,)

    calibration.calibrate_noise_multiplier.cache_clear()  # as a fresh worker would start
    monkeypatch.setattr(calibration, "calibrated_noise_multiplier", _never)
    assert calibration.calibrate_noise_multiplier(*INPUTS) == first
    calibration.calibrate_noise_multiplier.cache_clear()


def test_an_unusable_cache_only_costs_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(blocker))
    calls = []

    def compute() -> np.ndarray:
        calls.append(1)
        return np.array([0.5, 1.5])

    for _ in range(2):
        assert remembered("twice", (1.0,), compute).tolist() == [0.5, 1.5]
    assert len(calls) == 2  # computed each time, never an error


def test_an_rdp_curve_read_back_is_bit_identical_to_opacus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path))
    noise, rate, steps = 1.1, 0.25, 40
    accountant._rdp_per_step.cache_clear()
    computed = accountant._rdp_per_step(noise, rate)
    accountant._rdp_per_step.cache_clear()  # as a fresh worker would start
    stored = accountant._rdp_per_step(noise, rate)
    accountant._rdp_per_step.cache_clear()
    opacus = compute_rdp(q=rate, noise_multiplier=noise, steps=1, orders=list(RDP_ORDERS))
    assert computed.tobytes() == stored.tobytes() == opacus.tobytes()
    reference = RDPAccountant()
    reference.history = [(noise, rate, steps)]
    assert accountant.epsilon_of([(noise, rate, steps)], 1e-5) == reference.get_epsilon(1e-5)
