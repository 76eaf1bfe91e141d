"""The privacy page's data: per owner budget, spent and remaining, as `fedmodel audit` finds them.

It calls the audit itself (fedmodel.privacy.audit.audit, what `fedmodel audit PATH
--json` prints): hash chains verified, every epsilon recomputed afresh with Opacus's RDP
and dp-accounting's PLD, nothing read from the training path's cache. The federation
ledger (client-level DP, central-dp.sqlite) is one of the ledgers it audits. Empirical
canary audits are shown when a run directory holds the JSON `fedmodel audit empirical
--json` prints, saved as empirical-audit*.json.

A deployed run's directory holds no owner's ledger (each stays on its node): for it, the
page shows what each node released of its budget with its train replies, as summary.json
keeps it; unverifiable by the coordinator, and said so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmodel.console.runs import RunView
from fedmodel.errors import FedModelError
from fedmodel.privacy.audit import AuditReport, OwnerAudit, audit
from fedmodel.privacy.central import FEDERATION_LEDGER
from fedmodel.privacy.distributed_ledger import DistributedAudit
from fedmodel.run_directory import DISTRIBUTED_MECHANISM

EMPIRICAL_AUDITS = "empirical-audit*.json"
_EMPIRICAL_KEYS = (
    "epsilon_lower_bound",
    "accountant_epsilon",
    "claimed_epsilon",
    "canaries",
    "guesses",
    "correct",
    "delta",
    "accounting_bug",
)


@dataclass(frozen=True)
class OwnerRow:
    """One data owner at a glance; `problems` are the audit's failures, highlighted."""

    owner: str
    federation_ledger: bool  # the server's client-level DP ledger, not a data owner's
    budget: float | None
    spent: float
    pld: float | None  # None for distributed DP: dp-accounting has no discrete Gaussian
    remaining: float | None
    delta: float
    rounds: int
    runs: int
    problems: list[str]

    @property
    def used_share(self) -> float | None:
        """Spent over budget, 0 to 1 (for the bar); None without a budget."""
        if not self.budget:
            return None
        return min(self.spent / self.budget, 1.0)


@dataclass(frozen=True)
class ReleasedBudgetRow:
    """One node's budget at a glance, as it released it with its last train reply of a
    run: the owner's budget, the epsilon it has spent (all runs, at the owner's delta) and
    what is left. None where the node released nothing of it."""

    owner: str  # the node's name
    run: str | None  # None: no deployed run of this node under the federation's runs/
    round: int | None  # the last round it trained in that run
    budget: float | None
    spent: float | None
    remaining: float | None
    delta: float | None

    @property
    def used_share(self) -> float | None:
        """Spent over budget, 0 to 1 (for the bar); None where not released."""
        if self.budget is None or self.remaining is None:
            return None
        return min(max(1.0 - self.remaining / self.budget, 0.0), 1.0)


def released_budgets(run: RunView) -> list[ReleasedBudgetRow]:
    """Each client's released budget in `run`, by node name, from summary.json alone."""
    if run.summary is None:
        return []
    rows = []
    for client in run.summary.clients:
        budget = client.get("budget") or {}
        rounds = client.get("epsilon_by_round") or []
        rows.append(
            ReleasedBudgetRow(
                owner=str(client.get("node") or run.client_name(str(client["client"]))),
                run=run.name,
                round=int(rounds[-1][0]) if rounds else None,
                budget=budget.get("epsilon"),
                spent=client.get("epsilon") if budget else None,
                remaining=budget.get("left"),
                delta=budget.get("delta"),
            )
        )
    return sorted(rows, key=lambda row: row.owner)


def latest_released(runs: list[RunView], nodes: list[str]) -> list[ReleasedBudgetRow]:
    """Each of `nodes` with its budget as last released over `runs` (oldest first): the
    latest run where it released one, else its latest run, else a row with no run."""
    latest: dict[str, ReleasedBudgetRow] = {}
    for run in runs:
        for row in released_budgets(run) if run.deployed else []:
            known = latest.get(row.owner)
            if known is None or known.budget is None or row.budget is not None:
                latest[row.owner] = row
    return [latest.get(node, ReleasedBudgetRow(node, None, None, None, None, None, None))
            for node in nodes]  # fmt: skip


@dataclass(frozen=True)
class PrivacyView:
    """What `fedmodel audit` says of one run directory, or why it could say nothing."""

    owners: list[OwnerRow]
    ok: bool | None  # None: nothing to audit
    problems: list[str]  # every failure, as the CLI prints them
    entries: int
    signed: int
    unavailable: str | None  # why there is no audit (no ledgers), else None
    empirical: list[dict[str, Any]]
    released: list[ReleasedBudgetRow]  # a deployed run's, as its nodes released them

    @classmethod
    def of_run(cls, run: RunView) -> PrivacyView:
        empirical = empirical_audits(run.directory)
        released = released_budgets(run) if run.deployed else []
        try:
            report = audit(run.directory)
        except FedModelError as error:
            return cls([], None, [], 0, 0, str(error), empirical, released)
        return cls.of_report(report, empirical, released)

    @classmethod
    def of_report(
        cls,
        report: AuditReport,
        empirical: list[dict[str, Any]],
        released: list[ReleasedBudgetRow],
    ) -> PrivacyView:
        owners = [
            _row(owner, ledger.problems) for ledger in report.ledgers for owner in ledger.owners
        ]
        owners += [
            _distributed_row(ledger.distributed)
            for ledger in report.ledgers
            if ledger.distributed is not None
        ]
        return cls(
            owners,
            report.ok,
            report.all_problems(),
            sum(ledger.entries for ledger in report.ledgers),
            sum(ledger.signed for ledger in report.ledgers),
            None,
            empirical,
            released,
        )


def _row(owner: OwnerAudit, ledger_problems: list[str]) -> OwnerRow:
    """`owner` at a glance; a failure of its ledger file (a broken hash chain) is its too:
    none of the ledger's numbers can then be trusted."""
    return OwnerRow(
        owner=owner.owner,
        federation_ledger=Path(owner.ledger).name == FEDERATION_LEDGER,
        budget=owner.budget_epsilon,
        spent=owner.spent_epsilon,
        pld=owner.pld_epsilon,
        remaining=owner.remaining,
        delta=owner.delta,
        rounds=owner.rounds,
        runs=owner.runs,
        problems=[*ledger_problems, *owner.problems],
    )


def _distributed_row(found: DistributedAudit) -> OwnerRow:
    """The --dp distributed releases of the federation ledger, as one client-level row."""
    return OwnerRow(
        owner=f"{Path(found.path).stem} ({DISTRIBUTED_MECHANISM})",
        federation_ledger=True,
        budget=found.budget_epsilon,
        spent=found.recomputed_epsilon,
        pld=None,
        remaining=None
        if found.budget_epsilon is None
        else max(found.budget_epsilon - found.recomputed_epsilon, 0.0),
        delta=found.delta,
        rounds=found.releases,
        runs=1,  # a --dp distributed run cannot be resumed: one run per ledger
        problems=found.problems,
    )


def empirical_audits(run_dir: Path) -> list[dict[str, Any]]:
    """The canary audits saved in `run_dir` (name, and the numbers that judge them)."""
    found: list[dict[str, Any]] = []
    for path in sorted(run_dir.glob(EMPIRICAL_AUDITS)):
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            found.append({"file": path.name, "error": f"unreadable ({error})"})
            continue
        if not isinstance(raw, dict) or "epsilon_lower_bound" not in raw:
            found.append({"file": path.name, "error": "not `fedmodel audit empirical --json`"})
            continue
        found.append({"file": path.name, **{key: raw.get(key) for key in _EMPIRICAL_KEYS}})
    return found
