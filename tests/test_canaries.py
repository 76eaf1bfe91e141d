"""One-run empirical audit (Steinke, Nasr, Jagielski 2023): the bound and the audit itself."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from scipy import stats

from fedmodel.canaries import (
    EmpiricalAudit,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)

BIN = Path(sys.executable).parent


def reference_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The paper's reference loop (arXiv 2305.08846, Algorithm/appendix code), verbatim logic."""
    q = 1 / (1 + 2.718281828459045 ** (-epsilon))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += stats.binom.pmf(v - i, r, q)
        if total > i * alpha:
            alpha = total / i
    return float(min(beta + alpha * delta * 2 * m, 1))


@pytest.mark.parametrize(("r", "v"), [(100, 90), (100, 75), (200, 120), (1000, 1000), (10, 10)])
def test_p_value_matches_the_papers_reference_loop(r: int, v: int) -> None:
    for epsilon in (0.0, 0.5, 1.0, 2.0, 4.0):
        assert one_run_p_value(1000, r, v, epsilon, 1e-5) == pytest.approx(
            reference_p_value(1000, r, v, epsilon, 1e-5), rel=1e-9, abs=1e-15
        )


def test_lower_bounds_match_the_independently_computed_ceilings() -> None:
    """Values computed in our DP notes (section 5) with a separate implementation."""
    assert one_run_epsilon_lower_bound(1000, 10, 10, 1e-5) == pytest.approx(1.02, abs=0.01)
    assert one_run_epsilon_lower_bound(1000, 100, 100, 1e-5) == pytest.approx(3.47, abs=0.01)
    assert one_run_epsilon_lower_bound(1000, 1000, 1000, 1e-5) == pytest.approx(5.78, abs=0.01)
    assert one_run_epsilon_lower_bound(10_000, 10_000, 10_000, 1e-5) == pytest.approx(
        7.83, abs=0.01
    )
    precision = [one_run_epsilon_lower_bound(1000, 100, v, 1e-5) for v in (90, 75, 60)]
    assert precision == pytest.approx([1.63, 0.70, 0.05], abs=0.01)


def test_chance_level_guessing_proves_nothing() -> None:
    assert one_run_epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0
    with pytest.raises(ValueError):
        one_run_epsilon_lower_bound(10, 20, 5, 1e-5)


def empirical(*args: str) -> tuple[int, dict[str, object]]:
    """`fedmodel audit empirical ... --json`: its exit code and report."""
    result = subprocess.run(
        [str(BIN / "fedmodel"), "audit", "empirical", "--seed", "1", "--json", *args],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr
    report: dict[str, object] = json.loads(result.stdout)
    return result.returncode, report


@pytest.mark.slow
def test_non_private_control_with_1000_canaries_has_teeth() -> None:
    code, report = empirical("--no-dp", "--canaries", "1000", "--epochs", "30")
    assert code == 0 and report["canaries"] == 1000 and report["dp"] is False
    assert report["epsilon_lower_bound"] >= 1.0  # type: ignore[operator]


@pytest.mark.slow
def test_dp_run_stays_below_the_accountants_epsilon() -> None:
    code, report = empirical("--epsilon", "1.0", "--canaries", "1000", "--epochs", "5")
    assert code == 0 and report["dp"] is True and report["accounting_bug"] is False
    assert report["accountant_epsilon"] <= 1.0  # type: ignore[operator]
    assert report["epsilon_lower_bound"] < report["pld_epsilon"]  # type: ignore[operator]


def test_an_epsilon_claimed_below_what_the_attack_proves_fails_the_audit() -> None:
    """Negative control for the test above: an under-reported epsilon must trip the alarm.

    A non-private run whose owner claims epsilon 0.1: the attack proves more than that, so
    the command exits 1. Small (200 canaries, 5 epochs) to stay quick.
    """
    code, report = empirical(
        "--no-dp", "--claimed-epsilon", "0.1", "--canaries", "200", "--guesses", "25",
        "--epochs", "5",
    )  # fmt: skip
    assert report["claimed_epsilon"] == 0.1 and report["accountant_epsilon"] is None
    assert report["epsilon_lower_bound"] > 0.1  # type: ignore[operator]
    assert report["accounting_bug"] is True and code == 1


def test_the_alarm_holds_the_bound_against_the_claim_when_there_is_one() -> None:
    measured = EmpiricalAudit(
        canaries=1000, included=500, guesses=100, correct=90, beta=0.05, delta=1e-5,
        epsilon_lower_bound=1.63, ceiling=3.47, dp=True, accountant_epsilon=2.0,
        pld_epsilon=1.8, noise_multiplier=1.0, sample_rate=0.01, steps=100,
    )  # fmt: skip
    assert not measured.accounting_bug
    assert replace(measured, claimed_epsilon=1.0).accounting_bug  # under-reported
    assert not replace(measured, claimed_epsilon=3.0).accounting_bug
    assert replace(measured, accountant_epsilon=1.5).accounting_bug
