"""One-run empirical audit (Steinke, Nasr, Jagielski 2023): the bound and the audit itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

from fedmodel.privacy.canaries import one_run_epsilon_lower_bound, one_run_p_value

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


def empirical(*args: str) -> dict[str, object]:
    result = subprocess.run(
        [str(BIN / "fedmodel"), "audit", "empirical", "--seed", "1", "--json", *args],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, object] = json.loads(result.stdout)
    return report


@pytest.mark.slow
def test_non_private_control_with_1000_canaries_has_teeth() -> None:
    report = empirical("--no-dp", "--canaries", "1000", "--epochs", "30")
    assert report["canaries"] == 1000 and report["dp"] is False
    assert report["epsilon_lower_bound"] >= 1.0  # type: ignore[operator]


@pytest.mark.slow
def test_dp_run_stays_below_the_accountants_epsilon() -> None:
    report = empirical("--epsilon", "1.0", "--canaries", "1000", "--epochs", "5")
    assert report["dp"] is True and report["accounting_bug"] is False
    assert report["accountant_epsilon"] <= 1.0  # type: ignore[operator]
    assert report["epsilon_lower_bound"] < report["pld_epsilon"]  # type: ignore[operator]
