"""A run's distributed-DP releases in the federation ledger, their budget, and their audit.

Each round's noisy sum is one entry pair (pending, then committed) in the run's federation
ledger (fedmodel.privacy.central's `PrivacyLedger` file, the one `--dp client` writes), under
its own key `DISTRIBUTED_FINGERPRINT`: the same hash chain, so an edited or reordered entry
breaks it, and `fedmodel audit` checks the chain's client-level epsilon against the
summary's, so a truncated chain is caught too. A discrete Gaussian release is not a
Gaussian segment: the entry's `mechanism` holds the public `DistributedDpParameters` and
the survivors whose noise is in the sum (`DistributedRelease`), and its segment carries the
noise multiplier of that sum (`sqrt(n) sigma / c`, rate 1) for reading only; the epsilon is
the cumulative DDG one (fedmodel.privacy.distributed_accounting).

The budget is checked before each round at the planned cohort; a release is recorded once
its sum is unmasked, whatever it costs (the coordinator has seen it), so drop-outs in the
last round can take epsilon past the budget by that round's shortfall, and the run then
stops. `audit_distributed` recomputes every epsilon with the audit's independent
implementation (`ddg_epsilon`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedmodel.errors import FedModelError
from fedmodel.privacy.accountant import Segment
from fedmodel.privacy.analysis import RDP_ORDERS
from fedmodel.privacy.central import FEDERATION_LEDGER
from fedmodel.privacy.distributed_accounting import DistributedRelease, distributed_epsilon
from fedmodel.privacy.distributed_dp import DistributedDpParameters
from fedmodel.privacy.ledger import PrivacyLedger
from fedmodel.privacy.ledger_chain import COMMITTED, PENDING, LedgerEntry
from fedmodel.run_directory import DISTRIBUTED_MECHANISM

DISTRIBUTED_FINGERPRINT = "client-level-distributed"  # the ledger key of these releases
OWNER_RELEASE_KIND = "distributed discrete Gaussian, charged per record by its owner"
OWNER_MULTIPLIER_TOLERANCE = 1e-6  # relative: two implementations of the same bound
AUDIT_TOLERANCE = 0.005  # relative: the two implementations agree within 0.5% (tests)


class DistributedBudgetStop(Exception):
    """The next release would take client-level epsilon past --distributed-epsilon."""


def release_segment(release: DistributedRelease) -> Segment:
    """The sum's noise multiplier (its noise over the clip norm), at rate 1: for reading."""
    parameters = release.parameters
    multiplier = math.sqrt(release.clients) * parameters.local_stddev / parameters.clip_norm
    return (multiplier, 1.0, 1)


def release_json(release: DistributedRelease) -> str:
    """The entry's `mechanism`: everything the audit needs to recompute the release."""
    return json.dumps(
        {
            "kind": DISTRIBUTED_MECHANISM,
            "clients": release.clients,
            "parameters": dataclasses.asdict(release.parameters),
        },
        sort_keys=True,
    )


def release_of(entry: LedgerEntry) -> DistributedRelease:
    """The release an entry records (raises ValueError, KeyError, TypeError or ConfigError
    when it holds none)."""
    recorded = json.loads(entry.mechanism or "")
    if recorded["kind"] != DISTRIBUTED_MECHANISM:
        raise ValueError(f"mechanism {recorded['kind']!r}")
    parameters = DistributedDpParameters(**recorded["parameters"])
    return DistributedRelease(entry.server_round, parameters, int(recorded["clients"]))


def owner_release_json(release: DistributedRelease) -> str:
    """An owner's ledger entry's `mechanism` for a distributed round (`owner_segment`):
    the public parameters and the noise shares the owner counts on, for the audit."""
    return json.dumps(
        {
            "kind": OWNER_RELEASE_KIND,
            "noise_shares": release.clients,
            "parameters": dataclasses.asdict(release.parameters),
        },
        sort_keys=True,
    )


def owner_release_problem(entry: LedgerEntry) -> str | None:
    """Why an owner's distributed-round entry charges less than its release costs, by the
    audit's own DDG implementation; None when its noise multiplier is covered."""
    from fedmodel.privacy.audit_accounting import ddg_owner_multiplier

    recorded = json.loads(entry.mechanism or "")
    release = DistributedRelease(
        entry.server_round,
        DistributedDpParameters(**recorded["parameters"]),
        int(recorded["noise_shares"]),
    )
    allowed = ddg_owner_multiplier(release, RDP_ORDERS)
    if entry.segment != (entry.noise_multiplier, 1.0, 1) or entry.noise_multiplier > allowed * (
        1 + OWNER_MULTIPLIER_TOLERANCE
    ):
        return (
            f"charges a distributed round as noise multiplier {entry.noise_multiplier:.6g} at "
            f"sample rate {entry.sample_rate:g} over {entry.steps} step(s), but its release "
            f"({release.clients} noise share(s)) allows at most {allowed:.6g} at rate 1, one step"
        )
    return None


def is_owner_release(entry: LedgerEntry) -> bool:
    """Whether `entry` is an owner's charge for a distributed round."""
    if entry.mechanism is None:
        return False
    recorded = json.loads(entry.mechanism)
    return isinstance(recorded, dict) and recorded.get("kind") == OWNER_RELEASE_KIND


class DistributedLedger:
    """A run's distributed-DP releases, appended to its federation ledger as sums are unmasked."""

    def __init__(self, run_dir: Path, run_id: str, delta: float, budget: float | None) -> None:
        self.ledger = PrivacyLedger(Path(run_dir) / FEDERATION_LEDGER)
        self.run_id = run_id
        self.delta = delta
        self.budget = budget
        self.releases: list[DistributedRelease] = []
        self.epsilons: list[float] = []

    def check(self, planned: DistributedRelease) -> None:
        """Before a round: raise DistributedBudgetStop if `planned` would overspend."""
        if self.budget is None:
            return
        spent = self.epsilons[-1] if self.epsilons else 0.0
        projected = distributed_epsilon([*self.releases, planned], self.delta)
        if projected > self.budget:
            raise DistributedBudgetStop(
                f"distributed DP budget: round {planned.server_round} would take epsilon from "
                f"{spent:.4f} to {projected:.4f} at delta {self.delta:g}, over "
                f"--distributed-epsilon {self.budget:g}"
            )

    def record(self, release: DistributedRelease) -> float:
        """Append an unmasked sum's release; returns the cumulative client-level epsilon."""
        epsilon = distributed_epsilon([*self.releases, release], self.delta)
        segment = release_segment(release)
        pending, _ = self.ledger.write_ahead(
            DISTRIBUTED_FINGERPRINT,
            self.run_id,
            release.server_round,
            segment,
            release.parameters.clip_norm,
            self.delta,
            self.budget,
            lambda _: epsilon,
            release_json(release),
        )
        self.ledger.commit(pending, segment, epsilon)
        self.releases.append(release)
        self.epsilons.append(epsilon)
        return epsilon


@dataclass
class DistributedAudit:
    """What `fedmodel audit` found in a ledger's distributed-DP releases."""

    path: str
    releases: int
    delta: float
    budget_epsilon: float | None
    recorded_epsilon: float
    recomputed_epsilon: float
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def audit_distributed(path: str, entries: Sequence[LedgerEntry]) -> DistributedAudit:
    """Recompute every recorded cumulative epsilon with `ddg_epsilon` (independent code).

    `entries` are one ledger's `DISTRIBUTED_FINGERPRINT` entries, their chain verified by
    the caller. What counts is what `spent_history` counts: every commit, and a pending
    entry never committed. A recorded epsilon below the recompute beyond AUDIT_TOLERANCE
    is under-reporting; a final epsilon over the budget is overspending.
    """
    from fedmodel.privacy.audit_accounting import ddg_epsilon

    committed = {entry.refers_to for entry in entries if entry.status == COMMITTED}
    spent = [
        entry
        for entry in entries
        if entry.status == COMMITTED or (entry.status == PENDING and entry.seq not in committed)
    ]
    problems: list[str] = []
    releases: list[DistributedRelease] = []
    recomputed = 0.0
    for entry in spent:
        try:
            releases.append(release_of(entry))
        except (ValueError, KeyError, TypeError, FedModelError) as error:
            problems.append(f"entry #{entry.seq} records no distributed release ({error})")
            continue
        recomputed = ddg_epsilon(releases, entry.delta)
        if entry.epsilon < recomputed * (1 - AUDIT_TOLERANCE):
            problems.append(
                f"round {entry.server_round}: records epsilon {entry.epsilon:.6g}, the "
                f"independent recompute gives {recomputed:.6g}"
            )
    last = entries[-1]
    recorded = spent[-1].epsilon if spent else 0.0
    budget = last.budget_epsilon
    worst = max(recorded, recomputed)
    if budget is not None and worst > budget and not math.isclose(worst, budget):
        problems.append(f"epsilon {worst:.6g} is over the budget {budget:g}")
    return DistributedAudit(path, len(spent), last.delta, budget, recorded, recomputed, problems)
