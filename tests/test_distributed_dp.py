"""Distributed discrete Gaussian DP (Kairouz, Liu and Steinke 2021): the mechanism's
round trip and noise, and its accounting checked against exact divergences, the
continuous Gaussian it approaches and the audit's second implementation."""

from __future__ import annotations

import dataclasses
import functools
import math

import dp_accounting
import numpy as np
import pytest
from scipy.special import logsumexp

from fedmodel.errors import ConfigError
from fedmodel.privacy.analysis import RDP_ORDERS
from fedmodel.privacy.audit_accounting import ddg_epsilon
from fedmodel.privacy.discrete_gaussian import (
    discrete_gaussian_variance,
    sample_discrete_gaussian,
)
from fedmodel.privacy.distributed_accounting import (
    DistributedRelease,
    ddg_rdp,
    distributed_epsilon,
)
from fedmodel.privacy.distributed_dp import (
    DistributedDpParameters,
    clip,
    decode,
    encode,
    modular_sum,
    overflow_probability_bound,
    plan_granularity,
    quantize,
    rounding_error_bound,
)


def test_round_trip_of_rotation_scaling_rounding_and_modular_sum_recovers_the_clipped_sum() -> None:
    clients, dimension = 20, 300
    parameters = plan_granularity(
        clip_norm=1.0, local_stddev=0.05, bits=14, clients=clients, dimension=dimension
    )
    generator = np.random.default_rng(5)
    # A shared direction, as clients of one model have; half the updates are clipped.
    shared = generator.normal(size=dimension) * 0.03
    updates = [
        shared + generator.normal(size=dimension) * (0.17 if i % 2 else 0.01)
        for i in range(clients)
    ]
    residues = [
        np.mod(quantize(update, parameters, 11, generator), parameters.modulus)
        for update in updates
    ]
    summed = modular_sum(residues, parameters.modulus)
    assert (summed >= parameters.modulus // 2).any()  # negative coordinates wrapped

    error = np.linalg.norm(
        decode(summed, parameters, 11) - sum(clip(update, 1.0) for update in updates)
    )
    bound = rounding_error_bound(parameters, clients)
    assert 0 < error <= bound < 0.05 * np.linalg.norm(sum(clip(u, 1.0) for u in updates))
    with pytest.raises(ValueError, match="non-finite"):  # not 1000 failed roundings
        quantize(np.full(dimension, np.nan), parameters, 11, generator)


def test_discrete_gaussian_sampler_matches_its_exact_variance() -> None:
    generator = np.random.default_rng(2)
    for sigma in (0.5, 3.0):
        draws = sample_discrete_gaussian(sigma, 200_000, generator)
        assert draws.var() == pytest.approx(discrete_gaussian_variance(sigma), rel=0.05)
        assert abs(draws.mean()) < 0.02 * sigma + 0.01
    # Below sigma = 1 the variance is well under sigma^2: the exact one is what to expect.
    assert discrete_gaussian_variance(0.5) < 0.9 * 0.5**2


def test_discrete_gaussian_is_sigma_squared_sub_gaussian_as_the_overflow_bound_assumes() -> None:
    """Its log moment generating function is at most the continuous Gaussian's (to float
    precision: above sigma = 1 the two agree to about 1e-15)."""
    support = np.arange(-400, 401)
    for sigma in (0.5, 1.3, 4.0):
        log_mass = -(support**2) / (2 * sigma**2)
        for t in (0.1, 0.5, 1.0, 2.0):
            log_mgf = logsumexp(log_mass + t * support) - logsumexp(log_mass)
            assert log_mgf <= t**2 * sigma**2 / 2 + 1e-12


def test_decoded_noise_has_the_summed_discrete_gaussians_variance_within_5_percent() -> None:
    clients, dimension = 10, 2**14
    parameters = DistributedDpParameters(
        clip_norm=1.0, local_stddev=0.005, granularity=0.01, bits=16, dimension=dimension
    )
    generator = np.random.default_rng(3)
    decoded = np.concatenate(
        [
            decode(
                modular_sum(
                    [
                        encode(np.zeros(dimension), parameters, seed, generator)
                        for _ in range(clients)
                    ],
                    parameters.modulus,
                ),
                parameters,
                seed,
            )
            for seed in range(3)
        ]
    )
    expected = clients * discrete_gaussian_variance(0.5) * parameters.granularity**2
    assert decoded.var() == pytest.approx(expected, rel=0.05)
    assert decoded.var() < 0.95 * clients * parameters.local_stddev**2  # not sigma^2


def _log_convolve(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """log(exp(first) * exp(second)), the convolution of two log pmfs, without underflow."""
    result = np.empty(first.size + second.size - 1)
    for k in range(result.size):
        low, high = max(0, k - second.size + 1), min(k, first.size - 1)
        result[k] = logsumexp(first[low : high + 1] + second[k - high : k - low + 1][::-1])
    return result


@functools.cache
def _log_pmf_of_sum(sigma: float, clients: int) -> np.ndarray:
    """The log pmf of the sum of `clients` N_Z(0, sigma^2) on its support (+-60 each)."""
    support = np.arange(-60, 61)
    single = -(support**2) / (2 * sigma**2)
    single -= logsumexp(single)
    summed = single
    for _ in range(clients - 1):
        summed = _log_convolve(summed, single)
    return summed


def _exact_renyi_divergence(sigma: float, clients: int, shift: int, order: float) -> float:
    """D_order(Z + shift || Z), Z the sum of `clients` N_Z(0, sigma^2), in log space (at
    high orders the terms that matter are far below the smallest float)."""
    summed = _log_pmf_of_sum(sigma, clients)
    log_terms = order * summed[:-shift] + (1 - order) * summed[shift:]
    return float(logsumexp(log_terms) / (order - 1))


@pytest.mark.parametrize("sigma, clients", [(0.5, 1), (0.5, 2), (0.5, 3), (0.6, 2)])
def test_ddg_bound_holds_for_the_exact_divergence_of_summed_discrete_gaussians(
    sigma: float, clients: int
) -> None:
    """Coordinates are independent, so the exact divergence of a shift vector is the sum of
    its coordinates'. (1, 1, 1, 1) at sigma 0.5 and 2 clients exceeds the bound if tau is
    not multiplied by d; every case with 2 or more clients exceeds the continuous bound."""
    orders = np.array([1.5, 2.0, 4.0, 8.0, 16.0])
    for shift in [(1,), (2,), (1, 1), (2, 1), (1, 1, 1, 1)]:
        exact = np.array(
            [
                sum(_exact_renyi_divergence(sigma, clients, s, order) for s in shift if s)
                for order in orders
            ]
        )
        l2, l1 = math.sqrt(sum(s * s for s in shift)), sum(shift)
        assert (exact <= ddg_rdp(orders, l2, l1, sigma, clients, len(shift)) * (1 + 1e-9)).all()
        continuous = orders * l2**2 / (2 * clients * sigma**2)
        if clients > 1:  # summed discrete Gaussians leak more than one of their variance
            assert (exact > continuous).any()
        else:  # Canonne et al. 2020: one discrete Gaussian is exactly as private at integer orders
            assert exact[1:] == pytest.approx(continuous[1:])


def test_ddg_epsilon_approaches_the_continuous_gaussians_as_noise_grows() -> None:
    """The DDG paper's analytic limit (its Theorem 1 with tau -> 0 and the rounding
    inflation -> 0): epsilon of the sum tends to the Gaussian mechanism's with noise
    multiplier sqrt(n) sigma / c, from above. No published table value is reproduced."""
    clients, rounds, dimension = 100, 50, 2**12

    def ratio(granularity: float) -> float:
        parameters = DistributedDpParameters(
            clip_norm=1.0, local_stddev=0.08, granularity=granularity, bits=32, dimension=dimension
        )
        ddg = distributed_epsilon([DistributedRelease(1, parameters, clients)] * rounds, 1e-5)
        gaussian = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
        event = dp_accounting.GaussianDpEvent(math.sqrt(clients) * 0.08 / 1.0)
        gaussian.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
        return ddg / gaussian.get_epsilon(1e-5)

    coarse, fine = ratio(0.01), ratio(1e-4)
    assert coarse > 1.05  # rounding inflates the sensitivity of a coarse grid
    assert 1.0 <= fine < 1.001


def test_audit_recomputes_distributed_epsilon_and_dropouts_cost_privacy() -> None:
    planned = plan_granularity(1.0, 0.1, bits=16, clients=100, dimension=10_000)
    full = [DistributedRelease(r, planned, 100) for r in range(1, 21)]
    dropped = full[:10] + [DistributedRelease(r, planned, 60) for r in range(11, 21)]
    # Few, coarse steps of noise (0.8 per client): tau adds about 100 to the bound.
    coarse = DistributedDpParameters(
        clip_norm=30.0, local_stddev=0.8, granularity=1.0, bits=32, dimension=4000
    )
    for releases in (full, dropped, [DistributedRelease(1, coarse, 50)] * 5):
        assert distributed_epsilon(releases, 1e-5) == pytest.approx(
            ddg_epsilon(releases, 1e-5), rel=0.005
        )
    assert distributed_epsilon(dropped, 1e-5) > 1.2 * distributed_epsilon(full, 1e-5)
    assert distributed_epsilon([], 1e-5) == ddg_epsilon([], 1e-5) == 0.0


def test_planned_granularity_meets_the_overflow_target_and_refuses_too_few_bits() -> None:
    parameters = plan_granularity(
        clip_norm=1.0, local_stddev=0.1, bits=16, clients=100, dimension=1000
    )
    assert overflow_probability_bound(parameters, 100) == pytest.approx(1e-6, rel=1e-6)
    assert overflow_probability_bound(parameters, 40) < 1e-6  # drop-outs only help
    assert overflow_probability_bound(dataclasses.replace(parameters, bits=15), 100) > 1e-6
    with pytest.raises(ConfigError, match="cannot sum 100 clients"):
        plan_granularity(1.0, 0.1, bits=6, clients=100, dimension=1000)
    with pytest.raises(ConfigError, match="raise the noise or the bits"):
        plan_granularity(1.0, 0.001, bits=12, clients=100, dimension=1000)
