"""Client-level epsilon of distributed discrete Gaussian releases (DDG accounting).

Guarantee: (epsilon, delta)-DP for one client's update, with the neighbouring relation
"the client's update replaced by zero" (the set of participants is fixed: the server
sees who took part), for the sequence of noisy sums secure aggregation reveals, against
every party that sees only those sums: the server included. Each round's sum carries
the noise of the clients that survived to the sum, n of them, so its discrete Gaussian
noise has variance n sigma^2 (integer steps): fewer survivors, less privacy. Clients are
assumed not to collude with the server; if some may, count only the honest survivors.

The bound is Kairouz, Liu and Steinke 2021 (DDG), Proposition 14 with Theorem 1: the sum
Z of n independent N_Z(0, sigma^2)^d and an integer shift of L2 norm <= D2 and L1 norm
<= D1 (the client's rounded vector: `rounded_norm_bound`) satisfy, for every order a >= 1,
    D_a(Z + shift || Z) <= min(a/2 D2^2 / (n sigma^2) + tau d,
                               a/2 (D2^2 / (n sigma^2) + 2 tau D1 / sqrt(n sigma^2) + tau^2 d))
with tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1)), valid for sigma >= 1/2.
D1 <= D2 min(sqrt(d), D2) since the shift is an integer vector. Rounds compose by
adding RDP; the conversion to (epsilon, delta) is Opacus's, as for every other ledger.

No amplification by client sampling is claimed: the server chooses and knows the
cohort, and it is the adversary here, so every release is accounted at rate 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedmodel.privacy.accountant import Segment
from fedmodel.privacy.analysis import RDP_ORDERS, opacus_rdp
from fedmodel.privacy.distributed_dp import DistributedDpParameters


def ddg_tau(integer_stddev: float, clients: int) -> float:
    """DDG Theorem 1's tau: how far n summed discrete Gaussians are from one of n sigma^2."""
    k = np.arange(1, clients, dtype=np.float64)
    return float(10 * np.exp(-2 * math.pi**2 * integer_stddev**2 * k / (k + 1)).sum())


def ddg_rdp(
    orders: np.ndarray,
    l2_sensitivity: float,
    l1_sensitivity: float,
    integer_stddev: float,
    clients: int,
    dimension: int,
) -> np.ndarray:
    """DDG Proposition 14's Renyi DP at each order, all quantities in integer steps."""
    total_stddev = math.sqrt(clients) * integer_stddev
    tau = ddg_tau(integer_stddev, clients)
    l2_scale, l1_scale = l2_sensitivity / total_stddev, l1_sensitivity / total_stddev
    approximate_zcdp = orders / 2 * l2_scale**2 + tau * dimension
    pure_zcdp = orders / 2 * (l2_scale**2 + 2 * tau * l1_scale + tau**2 * dimension)
    return np.minimum(approximate_zcdp, pure_zcdp)


@dataclass(frozen=True)
class DistributedRelease:
    """One round's noisy sum: the public parameters and how many clients' noise it holds."""

    server_round: int
    parameters: DistributedDpParameters
    clients: int  # the survivors whose noise is in the sum

    def rdp(self, orders: np.ndarray) -> np.ndarray:
        """This release's RDP at `orders`: one client's rounded vector as the shift."""
        if self.clients < 1:
            raise ValueError(f"a release needs at least one client, got {self.clients}")
        parameters = self.parameters
        dimension = parameters.padded_dimension
        l2 = parameters.norm_bound
        return ddg_rdp(
            orders,
            l2,
            l2 * min(math.sqrt(dimension), l2),
            parameters.integer_stddev,
            self.clients,
            dimension,
        )


def owner_segment(parameters: DistributedDpParameters, noise_shares: int) -> Segment:
    """What a deployed owner's ledger charges for one distributed round of its data.

    The owner trusts no survivor count from the coordinator: it counts only
    `noise_shares` clients' noise in the sum (its policy; 1 = its own), each as large as
    its own. Its budget is per record, like DP-SGD's: two neighbouring datasets may give
    updates anywhere in the clipping ball, so the shift is up to twice the norm bound.
    The DDG RDP of that release is charged as the Gaussian mechanism (rate 1, one step)
    whose RDP is at least as large at every order the accountant uses, so it composes
    with the owner's DP-SGD rounds in one history and one epsilon.
    """
    orders = np.array(RDP_ORDERS)
    dimension = parameters.padded_dimension
    shift = 2 * parameters.norm_bound
    rdp = ddg_rdp(
        orders,
        shift,
        shift * min(math.sqrt(dimension), shift),
        parameters.integer_stddev,
        noise_shares,
        dimension,
    )
    multiplier = float(np.sqrt(orders / (2 * rdp)).min())  # a / (2 z^2) >= rdp at every a
    return (multiplier, 1.0, 1)


def distributed_epsilon(releases: Sequence[DistributedRelease], delta: float) -> float:
    """Client-level epsilon at `delta` after `releases` (0 when there are none)."""
    if not releases:
        return 0.0
    orders = np.array(RDP_ORDERS)
    rdp = sum(release.rdp(orders) for release in releases)
    epsilon, _ = opacus_rdp().get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return max(float(epsilon), 0.0)
