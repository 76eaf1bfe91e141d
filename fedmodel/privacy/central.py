"""Client-level (central) DP accounting: the coordinator's Gaussian mechanism over rounds.

Guarantee: (epsilon, delta)-DP with respect to adding or removing one client's whole
contribution (all its records, every round), for the sequence of global models the
coordinator releases (DP-FedAvg, McMahan et al. 2018, "Learning Differentially Private
Recurrent Language Models"). Each round is one Gaussian mechanism on the sum of clipped
client updates, subsampled with rate q = clients sampled per round / clients; RDP
accounting of the subsampled Gaussian (Mironov et al. 2019), the same arithmetic as the
owners' sample-level ledgers (fedmodel.privacy.accountant). Flower samples a fixed-size
cohort; treating it as Poisson with rate q is the usual approximation, and with every
client in every round (q = 1) no amplification is involved at all.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping") also releases a noisy count of unclipped updates. By their Theorem 1 the
update noise z_update and the count noise sigma_count together cost as much as one
Gaussian mechanism with the effective noise multiplier
    z = (z_update**-2 + (2 * sigma_count)**-2) ** -0.5,
which is what is accounted; z_update is what the server adds to the updates.

The record is the federation ledger: a `PrivacyLedger` file in the run directory. The
budget is checked before each round (a round that would overspend is not started), and
a pending entry (budget re-checked in its transaction) and its commit are written as the
noisy aggregate is about to leave the server; a round that releases nothing (no valid
replies) records nothing. `fedmodel audit RUN_DIR` verifies the chain and recomputes its
epsilon with dp-accounting like every owner's ledger.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from fedmodel.privacy.accountant import Segment
from fedmodel.privacy.budget import BudgetExhausted, OwnerBudget
from fedmodel.privacy.ledger import PrivacyLedger
from fedmodel.privacy.ledger_chain import LedgerEntry

FEDERATION_LEDGER = "central-dp.sqlite"  # in the run directory; audit lists it as "central-dp"
CLIENT_LEVEL_FINGERPRINT = "client-level"
T = TypeVar("T")


def effective_noise_multiplier(update_noise: float, count_stddev: float) -> float:
    """Andrew et al. 2021, Thm 1: one Gaussian mechanism equivalent to update + count noise.

    `count_stddev` 0 means no count is released (fixed clipping): z = z_update.
    """
    if count_stddev == 0:
        return update_noise
    return float((update_noise**-2 + (2 * count_stddev) ** -2) ** -0.5)


def update_noise_multiplier(effective: float, count_stddev: float) -> float:
    """The update noise that, with the count noise, gives `effective` (inverse of the above)."""
    if not 0 < effective < 2 * count_stddev:
        raise ValueError(
            f"noise multiplier {effective:g} needs a clipped-count stddev above {effective / 2:g}"
        )
    return float((effective**-2 - (2 * count_stddev) ** -2) ** -0.5)


@dataclass(frozen=True)
class CentralRelease:
    """The mechanism of one round's release, exactly as the server runs it."""

    server_round: int
    noise_multiplier: float  # on the clipped-update sum
    count_stddev: float  # on the unclipped count (adaptive clipping); 0 when none
    clipping_norm: float  # the norm this round's updates are clipped to
    sample_rate: float

    @property
    def effective_noise_multiplier(self) -> float:
        return effective_noise_multiplier(self.noise_multiplier, self.count_stddev)

    @property
    def segment(self) -> Segment:
        return (self.effective_noise_multiplier, self.sample_rate, 1)

    def mechanism_json(self) -> str:
        """What the ledger entry carries beyond the accounted segment (canonical JSON)."""
        return json.dumps(
            {
                "noise_multiplier": self.noise_multiplier,
                "clipped_count_stddev": self.count_stddev,
                "clipping_norm": self.clipping_norm,
            },
            sort_keys=True,
        )


def mechanism_problem(entry: LedgerEntry) -> str | None:
    """Why a client-level entry's accounted noise does not follow from the noise it used."""
    if entry.mechanism is None:
        return None
    used = json.loads(entry.mechanism)
    effective = effective_noise_multiplier(used["noise_multiplier"], used["clipped_count_stddev"])
    if not math.isclose(entry.noise_multiplier, effective, rel_tol=1e-9):
        return (
            f"accounts noise multiplier {entry.noise_multiplier:.6g}, but its update and count "
            f"noise give {effective:.6g}"
        )
    if entry.max_grad_norm != used["clipping_norm"]:
        return "records two different clipping norms"
    return None


class CentralBudgetStop(Exception):
    """The next release would take client-level epsilon past its budget."""


class FederationLedger:
    """Client-level DP events of one run, checked against its budget before each round."""

    def __init__(self, run_dir: Path, run_id: str, delta: float, budget: float | None) -> None:
        self.ledger = PrivacyLedger(Path(run_dir) / FEDERATION_LEDGER)
        self.run_id = run_id
        self.budget = OwnerBudget(budget, delta)

    @property
    def delta(self) -> float:
        return self.budget.delta

    def check(self, release: CentralRelease) -> None:
        """Before a round: raise CentralBudgetStop if its release would overspend."""
        self._stop_if_over(
            release, lambda: self.budget.projector(release.segment)(self.spent_history())
        )

    def record(self, release: CentralRelease) -> float:
        """Pending entry (budget re-checked in the same transaction), then its commit, for
        a release about to leave the server; returns the cumulative client-level epsilon."""
        pending, _ = self._stop_if_over(
            release,
            lambda: self.ledger.write_ahead(
                CLIENT_LEVEL_FINGERPRINT,
                self.run_id,
                release.server_round,
                release.segment,
                release.clipping_norm,
                self.delta,
                self.budget.epsilon,
                self.budget.projector(release.segment),
                release.mechanism_json(),
            ),
        )
        return self.ledger.commit(pending, pending.segment, pending.epsilon).epsilon

    def _stop_if_over(self, release: CentralRelease, step: Callable[[], T]) -> T:
        try:
            return step()
        except BudgetExhausted as stop:
            raise CentralBudgetStop(
                f"client-level DP budget: round {release.server_round} would take epsilon from "
                f"{stop.spent:.4f} to {stop.projected:.4f} at delta {stop.delta:g}, over "
                f"--central-epsilon {stop.budget:g}"
            ) from None

    def spent_history(self) -> list[Segment]:
        return self.ledger.spent_history(CLIENT_LEVEL_FINGERPRINT)

    def spent_epsilon(self) -> float:
        return self.ledger.spent_epsilon(CLIENT_LEVEL_FINGERPRINT, self.delta)
