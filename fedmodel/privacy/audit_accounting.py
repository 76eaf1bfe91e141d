"""The audit's own epsilon: accountants recomputed from recorded mechanisms, nothing cached.

`FreshRdp` is Opacus's RDP analysis computed inside one audit; `RunningPld` is Google's
dp-accounting PLD accountant (Doroshenko et al. 2022, "Connect the Dots"), code that
shares nothing with Opacus. Neither reads the training path's on-disk accounting cache.
`ddg_epsilon` is a second implementation of distributed discrete Gaussian accounting
(dp-accounting has no such mechanism), written apart from
fedmodel.privacy.distributed_accounting.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedmodel.privacy.accountant import Segment
from fedmodel.privacy.analysis import RDP_ORDERS, opacus_rdp
from fedmodel.privacy.distributed_accounting import DistributedRelease

Mechanism = tuple[float, float]  # (noise multiplier, sample rate) of one DP-SGD step


def spent_steps(history: Sequence[Segment]) -> Counter[Mechanism]:
    """Steps per mechanism: all an accountant needs, since composition commutes."""
    steps: Counter[Mechanism] = Counter()
    for noise, rate, count in history:
        steps[(float(noise), float(rate))] += int(count)
    return steps


class FreshRdp:
    """Opacus's RDP accountant, recomputed inside one audit from the recorded mechanisms.

    Each mechanism's per-step RDP comes from Opacus's RDP analysis (`compute_rdp` at
    `RDPAccountant.DEFAULT_ALPHAS`, which RDP_ORDERS equals, as `RDPAccountant.get_epsilon`
    calls it), computed in this process and kept only by this object: no disk cache, no
    memo the training path shares. RDP composes by addition, so every entry of a long
    ledger costs one conversion (microseconds) rather than a new accountant (about 45 ms
    per mechanism); the numbers are a new `RDPAccountant`'s to rounding
    (tests/test_audit.py checks).
    """

    def __init__(self) -> None:
        self._per_step: dict[Mechanism, np.ndarray] = {}

    def epsilon(self, spent: Mapping[Mechanism, int], delta: float) -> float:
        """Epsilon at `delta` after `spent` (steps per mechanism); 0 when nothing was spent.

        Never negative: at a large delta the RDP conversion can return eps < 0, and
        (eps, delta)-DP with eps < 0 is (0, delta)-DP.
        """
        curves = [self._curve(mechanism) * steps for mechanism, steps in spent.items() if steps]
        if not curves:
            return 0.0
        rdp = sum(curves[1:], start=curves[0])
        epsilon, _ = opacus_rdp().get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
        return max(float(epsilon), 0.0)

    def _curve(self, mechanism: Mechanism) -> np.ndarray:
        if mechanism not in self._per_step:
            noise, rate = mechanism
            self._per_step[mechanism] = opacus_rdp().compute_rdp(
                q=rate, noise_multiplier=noise, steps=1, orders=list(RDP_ORDERS)
            )
        return self._per_step[mechanism]


class RunningPld:
    """dp-accounting's PLD accounting over one owner's growing history.

    Composition commutes, so each query composes only the steps added since the last one
    (a 1000-round run is composed once, not once per run end); a history that lost steps
    (a pending entry replaced by a shorter commit, interleaved runs) starts afresh. Each
    step composes as dp-accounting's `PLDAccountant` composes a `PoissonSampledDpEvent` of a
    `GaussianDpEvent`, from the same calls in the same order, so the numbers are its own;
    only the one-step PLD of a mechanism is built once per process (`_subsampled_gaussian`).
    """

    def __init__(self) -> None:
        self._pld: Any = None
        self._composed: Counter[Mechanism] = Counter()

    def epsilon(self, spent: Mapping[Mechanism, int], delta: float) -> float:
        """Epsilon at `delta` after `spent` (steps per mechanism); 0 when nothing was spent."""
        from dp_accounting.pld import privacy_loss_distribution

        if self._pld is None or any(
            spent.get(mechanism, 0) < steps for mechanism, steps in self._composed.items()
        ):
            logging.getLogger("absl").setLevel(logging.ERROR)
            self._pld = privacy_loss_distribution.identity(PLD_DISCRETIZATION)
            self._composed = Counter()
        for mechanism, steps in spent.items():
            added = steps - self._composed[mechanism]
            if added > 0:
                if all(mechanism):  # as PLDAccountant: no noise is handled below, no sampling is 0
                    pld = _subsampled_gaussian(*mechanism).self_compose(added)
                    self._pld = self._pld.compose(pld)
                self._composed[mechanism] = steps
        if not any(steps > 0 for steps in spent.values()):
            return 0.0
        if any(steps > 0 and noise == 0 < rate for (noise, rate), steps in spent.items()):
            return math.inf  # a step without noise: not private at all
        return max(float(self._pld.get_epsilon_for_delta(delta)), 0.0)


PLD_DISCRETIZATION = 1e-4  # dp-accounting's PLDAccountant default


@functools.lru_cache(maxsize=64)
def _subsampled_gaussian(noise: float, rate: float) -> Any:
    """One step's PLD: about a second to build, and shared by every owner (and audit) that
    ran this mechanism. Held in memory only; PLDs are immutable (composing returns anew)."""
    from dp_accounting import NeighboringRelation
    from dp_accounting.pld import privacy_loss_distribution

    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise,
        value_discretization_interval=PLD_DISCRETIZATION,
        sampling_prob=rate,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
    )


def pld_epsilon(history: Sequence[Segment], delta: float) -> float:
    """Epsilon of the Poisson-subsampled Gaussian mechanisms in `history`, by dp-accounting PLD."""
    return RunningPld().epsilon(spent_steps(history), delta)


AUDIT_ORDERS = np.concatenate((np.linspace(1.01, 16, 1500), np.geomspace(16, 4096, 400)[1:]))


def ddg_epsilon(releases: Sequence[DistributedRelease], delta: float) -> float:
    """Epsilon at `delta` of distributed discrete Gaussian releases, recomputed from their
    raw recorded numbers (clip norm, noise, granularity, beta, dimension, survivors).

    Kairouz, Liu and Steinke 2021, Prop. 14 as a bound of the form
    min(a rho_1 + xi, a rho_2) per release, summed at each of 1,899 orders in [1.01, 4096]
    (denser and wider than the training path's), converted by dp-accounting's
    `compute_epsilon` (Canonne et al. 2020, Prop. 12, with its KL bound near order 1).
    """
    if not releases:
        return 0.0
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    total = np.zeros_like(AUDIT_ORDERS)
    for release in releases:
        rho_1, xi, rho_2 = _ddg_zcdp(release)
        total += np.minimum(AUDIT_ORDERS * rho_1 + xi, AUDIT_ORDERS * rho_2)
    epsilon, _ = compute_epsilon(AUDIT_ORDERS, total, delta)
    return max(float(epsilon), 0.0)


def ddg_owner_multiplier(release: DistributedRelease, orders: Sequence[float]) -> float:
    """The largest Gaussian noise multiplier (rate 1, one step) whose RDP covers, at each
    of `orders`, one owner's record-level loss in `release` (`release.clients`: the noise
    shares it counts on; the shift: up to twice the norm bound): what its ledger may
    charge at most (fedmodel.privacy.distributed_accounting.owner_segment)."""
    rho_1, xi, rho_2 = _ddg_zcdp(release, shift_scale=2.0)
    alphas = np.asarray(orders, dtype=np.float64)
    rdp = np.minimum(alphas * rho_1 + xi, alphas * rho_2)
    return float(np.min(np.sqrt(alphas / (2 * rdp))))


def _ddg_zcdp(release: DistributedRelease, shift_scale: float = 1.0) -> tuple[float, float, float]:
    """(rho_1, xi, rho_2) of one release, for a shift up to `shift_scale` times the
    rounded vector's norm bound: D_a <= min(a rho_1 + xi, a rho_2)."""
    used = release.parameters
    sigma = used.local_stddev / used.granularity  # per client, in integer steps
    dimension = 2 ** math.ceil(math.log2(used.dimension)) if used.dimension > 1 else 1
    clip = used.clip_norm / used.granularity
    l2_squared = (clip + math.sqrt(dimension)) ** 2
    if used.beta > 0:
        l2_squared = min(
            l2_squared,
            clip**2
            + dimension / 4
            + math.sqrt(2 * math.log(1 / used.beta)) * (clip + math.sqrt(dimension) / 2),
        )
    l2_squared *= shift_scale**2
    l1 = math.sqrt(l2_squared) * min(math.sqrt(dimension), math.sqrt(l2_squared))
    tau = 10 * math.fsum(
        math.exp(-2 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, release.clients)
    )
    variance = release.clients * sigma**2
    rho_1 = l2_squared / (2 * variance)
    rho_2 = rho_1 + tau * l1 / math.sqrt(variance) + tau**2 * dimension / 2
    return rho_1, tau * dimension, rho_2
