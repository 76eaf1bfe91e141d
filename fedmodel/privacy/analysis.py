"""The RDP of the subsampled Gaussian mechanism, vectorised over Opacus's orders.

Pure maths below the accountant (as Opacus keeps `accountants/analysis/rdp.py`): the same
formulas as Opacus's RDP analysis (Mironov, Talwar and Zhang 2019, "Renyi Differential
Privacy of the Sampled Gaussian Mechanism"), computed for all 151 orders at once in
NumPy, which agrees with Opacus to about 1e-13. fedmodel.privacy.calibration decides
its search with it and leaves values near a decision to Opacus. `opacus_rdp` gives
Opacus's own analysis module, which the accountant and the audit call, without the rest
of Opacus.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

OPACUS_RDP = "opacus.accountants.analysis.rdp"
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))  # Opacus's
SERIES_CUTOFF = -30.0  # Opacus stops a fractional order's series below exp(-30)
MAX_SERIES_TERMS = 1 << 16

_ORDERS = np.array(RDP_ORDERS, dtype=np.float64)
_INTEGER = np.array([float(order).is_integer() for order in RDP_ORDERS])


def vectorised_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Opacus's RDP epsilon of `steps` subsampled Gaussian steps, over its 151 orders at
    once; NaN where Opacus would raise or a series would not converge (the caller then
    asks Opacus)."""
    if q == 1.0:
        rdp = _ORDERS / (2 * sigma**2)
    else:
        log_a = np.empty_like(_ORDERS)
        log_a[_INTEGER] = _log_a_integer_orders(q, sigma, _ORDERS[_INTEGER])
        log_a[~_INTEGER] = _log_a_fractional_orders(q, sigma, _ORDERS[~_INTEGER])
        rdp = log_a / (_ORDERS - 1)
    rdp = rdp * steps
    eps = rdp - (np.log(delta) + np.log(_ORDERS)) / (_ORDERS - 1) + np.log((_ORDERS - 1) / _ORDERS)
    if np.isnan(eps).any():
        return math.nan
    return float(eps.min())


def _log_a_integer_orders(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log A_alpha for integer orders: a finite binomial sum (Mironov et al. 2019, 3.3)."""
    from scipy import special

    i = np.arange(int(alphas.max()) + 1, dtype=np.float64)[None, :]
    alpha = alphas[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = (
            np.log(special.binom(alpha, i))
            + i * math.log(q)
            + (alpha - i) * math.log(1 - q)
            + (i * i - i) / (2 * sigma**2)
        )
    terms = np.where(i <= alpha, terms, -np.inf)
    return _log_sum_exp(terms)


def _log_a_fractional_orders(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log A_alpha for fractional orders: Opacus's two alternating series, each summed up
    to and including the first index where both terms fall below exp(-30).

    Summed in growing blocks of indices; an order leaves once its series has ended
    (large noise at large sample rates needs thousands of terms for a few orders).
    """
    from scipy import special

    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    sums = np.full((2, len(alphas)), -np.inf)  # log of each series' running sum
    running = np.ones(len(alphas), dtype=bool)
    start, block = 0, 64
    while running.any():
        if start >= MAX_SERIES_TERMS:
            sums[:, running] = np.nan
            break
        alpha = alphas[running][:, None]
        i = np.arange(start, start + block, dtype=np.float64)[None, :]
        j = alpha - i
        coef = special.binom(alpha, i)
        log_coef = np.log(np.abs(coef))
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_coef + i * math.log(q) + j * math.log(1 - q)
        log_s0 = log_s0 + (i * i - i) / (2 * sigma**2) + log_e0
        log_s1 = log_coef + j * math.log(q) + i * math.log(1 - q)
        log_s1 = log_s1 + (j * j - j) / (2 * sigma**2) + log_e1
        below = np.maximum(log_s0, log_s1) < SERIES_CUTOFF
        ends = below.any(axis=1)
        included = i - start <= np.where(ends, below.argmax(axis=1), block)[:, None]
        signs = np.where(coef > 0, 1.0, -1.0)
        for series, log_s in enumerate((log_s0, log_s1)):
            sums[series, running] = _log_alternating_sum(
                sums[series, running], np.where(included, log_s, -np.inf), signs
            )
        running[np.flatnonzero(running)[ends]] = False
        start, block = start + block, 2 * block
    return np.logaddexp(sums[0], sums[1])


def _log_erfc(x: np.ndarray) -> np.ndarray:
    from scipy import special

    return math.log(2) + special.log_ndtr(-x * 2**0.5)


def _log_sum_exp(log_terms: np.ndarray) -> np.ndarray:
    """Row-wise log(sum(exp(term)))."""
    peak = np.max(log_terms, axis=1, keepdims=True)
    return np.log(np.sum(np.exp(log_terms - peak), axis=1)) + peak[:, 0]


def _log_alternating_sum(
    log_before: np.ndarray, log_terms: np.ndarray, signs: np.ndarray
) -> np.ndarray:
    """Row-wise log(exp(before) + sum(sign * exp(term))); NaN for a row where a partial
    sum is not positive (Opacus's running log-space subtraction raises there)."""
    peak = np.maximum(log_before, np.max(log_terms, axis=1))[:, None]
    with np.errstate(invalid="ignore"):
        partial = np.exp(log_before[:, None] - peak) + np.cumsum(
            signs * np.exp(log_terms - peak), axis=1
        )
        positive = (partial > 0).all(axis=1)
        total = np.where(positive, partial[:, -1], 1.0)
        return np.where(positive, np.log(total) + peak[:, 0], np.nan)


@functools.cache
def opacus_rdp() -> ModuleType:
    """Opacus's RDP analysis (`opacus/accountants/analysis/rdp.py`, what its RDPAccountant
    calls), loaded by itself unless Opacus is imported already. It needs only NumPy and
    SciPy, while `import opacus` imports torch and all of Opacus, about 6 s of CPU that
    `fedmodel audit` and the CLI's accounting would pay for two functions."""
    if OPACUS_RDP in sys.modules:
        return sys.modules[OPACUS_RDP]
    package = importlib.util.find_spec("opacus")  # finds the package without importing it
    if package is None or package.origin is None:
        raise ModuleNotFoundError("opacus is not installed", name="opacus")
    source = Path(package.origin).parent / "accountants" / "analysis" / "rdp.py"
    spec = importlib.util.spec_from_file_location("fedmodel_opacus_rdp", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
