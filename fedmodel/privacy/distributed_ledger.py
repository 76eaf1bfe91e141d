"""The record of a run's distributed-DP releases, its budget, and its audit.

Federation ledger entries (fedmodel.privacy.central) are Gaussian segments; a distributed
discrete Gaussian release is not one, so it has its own record: each round's public
`DistributedDpParameters` and the survivors whose noise is in its sum
(`DistributedRelease`), with the cumulative epsilon the coordinator computed
(fedmodel.privacy.distributed_accounting). The budget is checked before each round at
the planned cohort; a release is recorded once its sum is unmasked, whatever it costs
(the coordinator has seen it), so drop-outs in the last round can take epsilon past the
budget by that round's shortfall, and the run then stops. `audit_distributed` recomputes
every epsilon with the audit's independent implementation (`ddg_epsilon`).

The record is a JSON file in the run directory, written atomically; unlike the SQLite
ledgers it is not hash-chained or signed yet.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmodel.errors import FedModelError
from fedmodel.privacy.distributed_accounting import DistributedRelease, distributed_epsilon
from fedmodel.privacy.distributed_dp import DistributedDpParameters
from fedmodel.run_directory import DISTRIBUTED_DP_FILE, write_json_atomic

DISTRIBUTED_LEDGER = DISTRIBUTED_DP_FILE  # in the run directory
AUDIT_TOLERANCE = 0.005  # relative: the two implementations agree within 0.5% (tests)


class DistributedBudgetStop(Exception):
    """The next release would take client-level epsilon past --distributed-epsilon."""


class DistributedLedger:
    """A run's distributed-DP releases, appended as their sums are unmasked."""

    def __init__(self, run_dir: Path, delta: float, budget: float | None) -> None:
        self.path = Path(run_dir) / DISTRIBUTED_LEDGER
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
        self.releases.append(release)
        self.epsilons.append(distributed_epsilon(self.releases, self.delta))
        write_json_atomic(
            self.path,
            {
                "delta": self.delta,
                "budget_epsilon": self.budget,
                "releases": [
                    {
                        "round": r.server_round,
                        "clients": r.clients,
                        "parameters": dataclasses.asdict(r.parameters),
                        "epsilon": epsilon,
                    }
                    for r, epsilon in zip(self.releases, self.epsilons, strict=True)
                ],
            },
        )
        return self.epsilons[-1]


@dataclass
class DistributedAudit:
    """What `fedmodel audit` found in a run's distributed-DP record."""

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


def audit_distributed(path: Path) -> DistributedAudit:
    """Recompute every recorded cumulative epsilon with `ddg_epsilon` (independent code).

    A recorded epsilon below the recompute beyond AUDIT_TOLERANCE is under-reporting; a
    final epsilon over the budget is overspending.
    """
    from fedmodel.privacy.audit_accounting import ddg_epsilon

    try:
        record: dict[str, Any] = json.loads(path.read_text())
        delta = float(record["delta"])
        entries = record["releases"]
        releases = [
            DistributedRelease(
                int(entry["round"]),
                DistributedDpParameters(**entry["parameters"]),
                int(entry["clients"]),
            )
            for entry in entries
        ]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise FedModelError(f"{path}: not a distributed-DP record ({error})") from None
    problems, recomputed = [], 0.0
    for index, entry in enumerate(entries):
        recomputed = ddg_epsilon(releases[: index + 1], delta)
        recorded = float(entry["epsilon"])
        if recorded < recomputed * (1 - AUDIT_TOLERANCE):
            problems.append(
                f"round {entry['round']}: records epsilon {recorded:.6g}, the independent "
                f"recompute gives {recomputed:.6g}"
            )
    recorded_final = float(entries[-1]["epsilon"]) if entries else 0.0
    budget = record.get("budget_epsilon")
    if (
        budget is not None
        and max(recorded_final, recomputed) > budget
        and not math.isclose(max(recorded_final, recomputed), budget)
    ):
        problems.append(
            f"epsilon {max(recorded_final, recomputed):.6g} is over the budget {budget:g}"
        )
    return DistributedAudit(
        str(path), len(entries), delta, budget, recorded_final, recomputed, problems
    )
