"""`fedmodel audit`: verify privacy ledgers and recompute every epsilon independently.

What is checked, per ledger file:
1. the hash chain (and that every commit answers a pending entry): the first bad entry
   is named;
2. every entry's epsilon against the mechanisms recorded before it, recomputed by
   Opacus's RDP accountant afresh in this audit (`FreshRdp`): a number that does not
   follow from the recorded mechanisms is flagged;
3. each dataset's epsilon at the end of every run against Google's dp-accounting PLD
   accountant (Doroshenko et al. 2022, "Connect the Dots"), code that shares nothing with
   Opacus: a recomputed epsilon below the PLD value beyond `PLD_TOLERANCE` is flagged as
   under-reporting. RDP is a valid upper bound, so it is normally 10-80% above PLD;
4. the spent epsilon against the owner's budget, at the delta the budget was set at.

Nothing the training path memoises is trusted: its per-step RDP curves live in an
on-disk cache (fedmodel.privacy.accounting_cache) that nothing authenticates, so an audit
through `fedmodel.privacy.accountant.epsilon_of` would confirm an edited cache row.

On a run directory the ledgers are also checked against the server's summary.json:
a ledger holding less epsilon than the server saw reported (a truncated or replaced
ledger, which the chain alone cannot reveal) is flagged, for each owner and for the
federation ledger's client-level epsilon. Distributed-DP releases in the federation
ledger (fedmodel.privacy.distributed_ledger) are chained like every entry and
recomputed with their own accountant, the DDG bound.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmodel.errors import FedModelError
from fedmodel.privacy.accountant import Segment
from fedmodel.privacy.audit_accounting import FreshRdp, Mechanism, RunningPld, spent_steps
from fedmodel.privacy.central import FEDERATION_LEDGER, mechanism_problem
from fedmodel.privacy.distributed_ledger import (
    DISTRIBUTED_FINGERPRINT,
    DistributedAudit,
    audit_distributed,
    is_owner_release,
    owner_release_problem,
)
from fedmodel.privacy.ledger import LedgerError, PrivacyLedger
from fedmodel.privacy.ledger_chain import (
    COMMITTED,
    PENDING,
    ChainProblem,
    LedgerEntry,
    spent_history,
    verify_chain,
)
from fedmodel.run_directory import LEDGERS_DIR, SUMMARY_FILE, RunSummary

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Absolute slack on epsilon: Opacus's PRV accountant's documented eps_error (0.01); our
# notes measured the tight accountants (PRV, PLD) within that of each other.
PLD_TOLERANCE = 0.01
RDP_CONSISTENCY = 1e-6  # relative: the same accountant on the same mechanisms


@dataclass
class OwnerAudit:
    """One dataset (fingerprint) in one ledger: what was spent, and how it checks out.

    `delta` is the owner's (the last entry's: the delta its budget was set at), and
    `spent_epsilon`, `pld_epsilon` and `remaining` are at that delta. An audit asked for
    another delta reports the same spending there too (`at_delta`, `epsilon_at_delta`,
    `pld_epsilon_at_delta`); the budget is still checked at the owner's delta. The PLD
    numbers are None for a history holding a distributed-DP charge: PLD is tight for
    Gaussian mechanisms, and that charge is a Gaussian that covers the release in RDP only.
    """

    ledger: str
    owner: str
    fingerprint: str
    delta: float
    budget_epsilon: float | None
    spent_epsilon: float
    pld_epsilon: float | None
    remaining: float | None
    rounds: int
    runs: int
    uncommitted: int
    history: list[Segment]
    timeline: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    at_delta: float | None = None
    epsilon_at_delta: float | None = None
    pld_epsilon_at_delta: float | None = None


@dataclass
class LedgerAudit:
    path: str
    entries: int
    chain_ok: bool
    first_bad_entry: int | None
    problems: list[str] = field(default_factory=list)
    owners: list[OwnerAudit] = field(default_factory=list)
    signed: int = 0
    distributed: DistributedAudit | None = None  # a --dp distributed run's releases

    @property
    def ok(self) -> bool:
        distributed_ok = self.distributed is None or self.distributed.ok
        owners_ok = not any(o.problems for o in self.owners)
        return self.chain_ok and not self.problems and owners_ok and distributed_ok


@dataclass
class AuditReport:
    target: str
    ledgers: list[LedgerAudit]
    problems: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(ledger.ok for ledger in self.ledgers)

    @property
    def distributed(self) -> DistributedAudit | None:
        """The distributed-DP releases audited, if a ledger holds any."""
        return next((ledger.distributed for ledger in self.ledgers if ledger.distributed), None)

    def all_problems(self) -> list[str]:
        found = list(self.problems)
        for ledger in self.ledgers:
            found += ledger.problems
            if ledger.distributed is not None:
                found += [f"distributed DP: {problem}" for problem in ledger.distributed.problems]
            for owner in ledger.owners:
                found += [f"{owner.owner}: {problem}" for problem in owner.problems]
        return found

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"ok": self.ok, "problems": self.all_problems(), **asdict(self)}


LedgerProgress = Callable[[int, int, LedgerAudit], None]
"""Called after each ledger: its number, how many there are, its audit."""


def find_ledgers(target: Path) -> tuple[list[Path], RunSummary | None]:
    """Ledger files under `target` (a file, a directory of ledgers or a run directory)."""
    if not target.exists():
        raise FedModelError(f"nothing to audit at {target}: no such file or directory")
    if target.is_file():
        return [target], None
    summary = RunSummary.load(target) if (target / SUMMARY_FILE).is_file() else None
    directories = [target, target / LEDGERS_DIR]
    if summary and summary.config.get("ledger_dir"):  # relative to the run (or, before, absolute)
        directories.append(target / summary.config["ledger_dir"])
    paths = sorted({p for d in directories if d.is_dir() for p in d.glob("*.sqlite")})
    if not paths:
        raise FedModelError(f"no ledgers (*.sqlite) in {target} or {target / LEDGERS_DIR}")
    return paths, summary


def audit(
    target: Path,
    delta: float | None = None,
    plot_dir: Path | None = None,
    public_key: Path | None = None,
    on_progress: LedgerProgress | None = None,
) -> AuditReport:
    """Audit every ledger under `target`; write plots to `plot_dir` when given.

    With `public_key` (a node's `node.pub`) every entry must carry a valid signature.
    A run of many sites has as many ledgers, each recomputed afresh (about a second):
    `on_progress` hears of each one audited.
    """
    paths, summary = find_ledgers(target)
    ledgers = []
    for number, path in enumerate(paths, start=1):
        ledgers.append(audit_ledger(path, delta, public_key))
        if on_progress is not None:
            on_progress(number, len(paths), ledgers[-1])
    report = AuditReport(str(target), ledgers)
    if summary is not None:
        report.problems += check_against_summary(report, summary)
    if plot_dir is not None:
        report.plots = write_plots(report, plot_dir)
    return report


def audit_ledger(
    path: Path, delta: float | None = None, public_key: Path | None = None
) -> LedgerAudit:
    try:
        entries = PrivacyLedger.open_existing(path).entries()
    except LedgerError as error:
        return LedgerAudit(str(path), 0, False, None, [str(error)])
    problem = verify_chain(entries)
    if problem is None and public_key is not None:
        from fedmodel.privacy.signing import load_public_key, signature_is_valid

        key = load_public_key(public_key)
        unsigned = next(
            (e for e in entries if not signature_is_valid(key, e.entry_hash, e.signature)), None
        )
        if unsigned is not None:
            problem = ChainProblem(unsigned.seq, f"has no valid signature by {public_key.name}")
    result = LedgerAudit(
        str(path), len(entries), problem is None, None if problem is None else problem.seq
    )
    result.signed = sum(1 for e in entries if e.signature)
    if problem is not None:
        result.problems.append(f"{path.name}: entry #{problem.seq} {problem.reason}")
    distributed = [entry for entry in entries if entry.fingerprint == DISTRIBUTED_FINGERPRINT]
    if distributed:  # discrete Gaussian releases: recomputed by their own accountant
        result.distributed = audit_distributed(str(path), distributed)
    fingerprints = list(
        dict.fromkeys(e.fingerprint for e in entries if e.fingerprint != DISTRIBUTED_FINGERPRINT)
    )
    for fingerprint in fingerprints:
        owner = path.stem if len(fingerprints) == 1 else f"{path.stem}/{fingerprint[:12]}"
        mine = [entry for entry in entries if entry.fingerprint == fingerprint]
        result.owners.append(audit_owner(str(path), owner, mine, delta))
    return result


def _mechanism_problem(entry: LedgerEntry) -> str | None:
    """Why an entry's accounted noise does not follow from the mechanism it records: a
    distributed round an owner charged, or a client-level release."""
    if is_owner_release(entry):
        return owner_release_problem(entry)
    return mechanism_problem(entry)


def audit_owner(
    ledger: str, owner: str, entries: list[LedgerEntry], delta: float | None
) -> OwnerAudit:
    """Recompute every epsilon of one dataset from its recorded mechanisms.

    `delta` (optional) is an extra delta to report the spending at; the budget check stays
    at the owner's own delta, where the budget means something.
    """
    rdp, pld = FreshRdp(), RunningPld()
    problems: list[str] = []
    timeline: list[dict[str, Any]] = []
    spent: Counter[Mechanism] = Counter()
    open_pending: dict[int, Segment] = {}
    tight = not any(is_owner_release(entry) for entry in entries)  # see OwnerAudit
    for index, entry in enumerate(entries):
        _count_spent(entry, spent, open_pending)
        recomputed = rdp.epsilon(spent, entry.delta)
        if not math.isclose(entry.epsilon, recomputed, rel_tol=RDP_CONSISTENCY, abs_tol=1e-12):
            problems.append(
                f"entry #{entry.seq} reports epsilon {entry.epsilon:.6g}, but its recorded "
                f"mechanisms give {recomputed:.6g} ({entry.accountant.upper()})"
            )
        if (reason := _mechanism_problem(entry)) is not None:
            problems.append(f"entry #{entry.seq} {reason}")
        last_of_run = index + 1 == len(entries) or entries[index + 1].run_id != entry.run_id
        if entry.status == COMMITTED or (entry.status == PENDING and last_of_run):
            timeline.append(
                {"seq": entry.seq, "run_id": entry.run_id, "round": entry.server_round,
                 "status": entry.status, "epsilon": recomputed, "pld_epsilon": None}
            )  # fmt: skip
        if last_of_run and tight:
            run_pld = pld.epsilon(spent, entry.delta)
            if timeline:
                timeline[-1]["pld_epsilon"] = run_pld
            if recomputed < run_pld - max(PLD_TOLERANCE, PLD_TOLERANCE * run_pld):
                problems.append(
                    f"run {entry.run_id}: epsilon {recomputed:.4f} is below the independent "
                    f"PLD recompute {run_pld:.4f}: under-reported"
                )
    last = entries[-1]
    spent_epsilon = rdp.epsilon(spent, last.delta)
    budget = last.budget_epsilon
    if budget is not None and spent_epsilon > budget * (1 + RDP_CONSISTENCY):
        problems.append(
            f"spent epsilon {spent_epsilon:.4f} at delta {last.delta:g} is over the budget "
            f"{budget:g}"
        )
    committed = {e.refers_to for e in entries if e.status == COMMITTED}
    return OwnerAudit(
        ledger=ledger,
        owner=owner,
        fingerprint=last.fingerprint,
        delta=last.delta,
        budget_epsilon=budget,
        spent_epsilon=spent_epsilon,
        pld_epsilon=pld.epsilon(spent, last.delta) if tight else None,
        remaining=None if budget is None else max(budget - spent_epsilon, 0.0),
        rounds=sum(1 for e in entries if e.status == PENDING),
        runs=len({e.run_id for e in entries}),
        uncommitted=sum(1 for e in entries if e.status == PENDING and e.seq not in committed),
        history=spent_history(entries),
        timeline=timeline,
        problems=problems,
        at_delta=delta,
        epsilon_at_delta=None if delta is None else rdp.epsilon(spent, delta),
        pld_epsilon_at_delta=None if delta is None or not tight else pld.epsilon(spent, delta),
    )


def _count_spent(
    entry: LedgerEntry, spent: Counter[Mechanism], open_pending: dict[int, Segment]
) -> None:
    """Add `entry` to the running steps per mechanism, counted as `spent_history` counts.

    A pending entry counts until its commit replaces it with the mechanism as run; kept
    as a running tally so auditing n entries costs O(n), not O(n^2) prefix histories.
    """
    if entry.status == COMMITTED and entry.refers_to in open_pending:
        noise, rate, steps = open_pending.pop(entry.refers_to)
        spent[(noise, rate)] -= steps
    elif entry.status == PENDING:
        open_pending[entry.seq] = entry.segment
    if entry.status in (PENDING, COMMITTED):
        spent[(entry.noise_multiplier, entry.sample_rate)] += entry.steps


def check_against_summary(report: AuditReport, summary: RunSummary) -> list[str]:
    """The server's record of each client's reported epsilon, and of the run's client-level
    epsilon, must be covered by the ledgers: a truncated or replaced ledger holds less."""
    problems = _check_client_level(report, summary)
    if not summary.dp or summary.delta is None:
        return problems
    by_name = {Path(o.ledger).stem: o for ledger in report.ledgers for o in ledger.owners}
    rdp = FreshRdp()
    for client in summary.clients:
        name = f"client-{client['client']}"
        owner = by_name.get(name)
        if owner is None:
            problems.append(f"client {client['client']} reported epsilon but has no ledger")
            continue
        reported = rdp.epsilon(spent_steps([tuple(s) for s in client["history"]]), summary.delta)
        held = rdp.epsilon(spent_steps(owner.history), summary.delta)
        if held < reported * (1 - RDP_CONSISTENCY):
            problems.append(
                f"{name}: ledger holds epsilon {held:.4f}, less than the {reported:.4f} the "
                "server recorded (entries removed or ledger replaced)"
            )
    return problems


def _check_client_level(report: AuditReport, summary: RunSummary) -> list[str]:
    """The federation ledger's client-level epsilon against summary.json's."""
    recorded = summary.client_level_dp
    if not recorded or not recorded.get("releases"):
        return []
    federation = [found for found in report.ledgers if Path(found.path).name == FEDERATION_LEDGER]
    held = 0.0
    for ledger in federation:  # its chain and every recorded epsilon are checked already
        if ledger.distributed is not None:
            held = max(held, ledger.distributed.recorded_epsilon)
        held = max([held, *(owner.spent_epsilon for owner in ledger.owners)])
    if held < recorded["epsilon"] * (1 - RDP_CONSISTENCY):
        return [
            f"{FEDERATION_LEDGER}: holds client-level epsilon {held:.4f}, less than the "
            f"{recorded['epsilon']:.4f} summary.json records (entries removed or ledger replaced)"
        ]
    return []


def write_plots(report: AuditReport, plot_dir: Path) -> list[str]:
    """One PNG per owner with a timeline (`owner_figure`); returns their paths."""
    from fedmodel.plotting import save  # matplotlib: only when plots are asked for

    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for ledger in report.ledgers:
        for owner in ledger.owners:
            if owner.timeline:
                path = plot_dir / f"epsilon-{owner.owner.replace('/', '-')}.png"
                save(owner_figure(owner), path)
                written.append(str(path))
    return written


def owner_figure(owner: OwnerAudit) -> Figure:
    """An owner's epsilon after every round it trained (RDP, and PLD at run ends) and its
    budget, over whole rounds counted across runs (a dotted line where a run starts)."""
    from fedmodel.plotting import new_figure, round_axis

    figure, axis = new_figure()
    xs = list(range(1, len(owner.timeline) + 1))
    axis.plot(xs, [p["epsilon"] for p in owner.timeline], marker=".", label="RDP")
    pld = [(x, p["pld_epsilon"]) for x, p in zip(xs, owner.timeline, strict=True)]
    pld = [(x, y) for x, y in pld if y is not None]
    axis.plot([x for x, _ in pld], [y for _, y in pld], "s", label="PLD (run end)")
    for x, (a, b) in enumerate(zip(owner.timeline, owner.timeline[1:], strict=False), start=1):
        if a["run_id"] != b["run_id"]:
            axis.axvline(x + 0.5, color="grey", linestyle=":")
    if owner.budget_epsilon is not None:
        axis.axhline(owner.budget_epsilon, color="red", linestyle="--", label="budget")
    round_axis(axis, len(xs))
    axis.set(
        xlabel="round (all runs on this data; dotted: a new run)",
        ylabel=f"epsilon at delta {owner.delta:g}",
        title=f"Privacy spent: {owner.owner}",
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    return figure
