"""`fedmodel audit`: chains verified byte for byte, epsilons recomputed independently."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedmodel.privacy import accountant
from fedmodel.privacy.accountant import epsilon_of
from fedmodel.privacy.accounting_cache import CACHE_DIR_VARIABLE, cache_path
from fedmodel.privacy.audit import audit
from fedmodel.privacy.budget import BudgetExhausted, OwnerBudget
from fedmodel.privacy.ledger import PrivacyLedger
from fedmodel.privacy.ledger_chain import spent_history
from tests.conftest import dp_accounting_epsilon
from tests.federation import FEDMODEL

DELTA = 1e-5
RUN_A = (1.3, 0.02, 50)  # the mechanism of one round: (noise multiplier, sample rate, steps)
RUN_B = (1.5, 0.04, 25)


def spend(
    ledger: PrivacyLedger, fingerprint: str, run_id: str, rounds: int, segment: tuple, budget: float
) -> None:
    for server_round in range(1, rounds + 1):
        pending, _ = ledger.write_ahead(
            fingerprint, run_id, server_round, segment, 1.0, DELTA, budget,
            OwnerBudget(budget, DELTA).projector(segment),
        )  # fmt: skip
        ledger.commit(pending, segment, epsilon_of(ledger.spent_history(fingerprint), DELTA))


def fresh_accountant_epsilon(
    history: list[tuple[float, float, int]], kind: str, delta: float = DELTA
) -> float:
    fresh = RDPAccountant() if kind == "rdp" else PRVAccountant()
    for noise, rate, steps in history:
        for _ in range(steps):
            fresh.step(noise_multiplier=noise, sample_rate=rate)
    return float(fresh.get_epsilon(delta))


def opacus_rdp_epsilon(history: list[tuple[float, float, int]], delta: float = DELTA) -> float:
    """A new Opacus RDPAccountant holding `history`: no cache, no memo, Opacus's own code."""
    fresh = RDPAccountant()
    fresh.history = list(history)
    return float(fresh.get_epsilon(delta))


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The training path's accounting cache, in this test's own directory and memory."""
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "cache"))
    accountant._rdp_per_step.cache_clear()
    yield cache_path()
    accountant._rdp_per_step.cache_clear()


def poison_rdp_curves(cache: Path, factor: float) -> None:
    """Scale every cached per-step RDP curve, as someone editing the cache file would."""
    with closing(sqlite3.connect(cache)) as connection, connection:
        rows = connection.execute("SELECT key, value FROM memo WHERE key LIKE '%rdp-per-step%'")
        for key, value in rows.fetchall():
            edited = (np.frombuffer(value, dtype=np.float64) * factor).tobytes()
            connection.execute("UPDATE memo SET value = ? WHERE key = ?", (edited, key))
    accountant._rdp_per_step.cache_clear()  # as a new process reading the file would


@pytest.fixture(scope="module")
def written_ledgers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two hospitals; hospital 0 trained in two runs, hospital 1 in one. Never modified:
    tests that edit ledgers get a copy (`ledgers`)."""
    directory = tmp_path_factory.mktemp("written") / "ledgers"
    first = PrivacyLedger(directory / "client-0.sqlite")
    spend(first, "a" * 64, "run-a", 3, RUN_A, budget=5.0)
    spend(first, "a" * 64, "run-b", 2, RUN_B, budget=5.0)
    spend(PrivacyLedger(directory / "client-1.sqlite"), "b" * 64, "run-a", 3, RUN_A, budget=5.0)
    return directory


@pytest.fixture
def ledgers(written_ledgers: Path, tmp_path: Path) -> Path:
    """This test's own copy of the two hospitals' ledgers, free to edit."""
    return Path(shutil.copytree(written_ledgers, tmp_path / "ledgers"))


def audit_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FEDMODEL, "audit", *args], capture_output=True, text=True, timeout=300, check=False
    )


def contents(directory: Path) -> dict[str, str]:
    """Every file under `directory` (SQLite's -wal and -journal files too) by its SHA-256."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@dataclass(frozen=True)
class CommandAudit:
    """`fedmodel audit` on the two hospitals' ledgers: a table with plots, and JSON."""

    before: dict[str, str]
    after: dict[str, str]
    table: subprocess.CompletedProcess[str]
    as_json: subprocess.CompletedProcess[str]
    plots: Path


@pytest.fixture(scope="module")
def audited_by_command(
    written_ledgers: Path, tmp_path_factory: pytest.TempPathFactory
) -> CommandAudit:
    """Two runs of the command, checked by several tests: each recomputes every epsilon."""
    plots = tmp_path_factory.mktemp("command") / "plots"
    before = contents(written_ledgers)
    table = audit_cli(str(written_ledgers), "--plots", str(plots))
    as_json = audit_cli(str(written_ledgers), "--json")
    return CommandAudit(before, contents(written_ledgers), table, as_json, plots)


def test_audit_recomputes_every_epsilon_and_agrees_with_the_live_numbers(ledgers: Path) -> None:
    report = audit(ledgers, plot_dir=ledgers / "plots")
    assert report.ok, report.all_problems()
    owner = next(o for ledger in report.ledgers for o in ledger.owners if o.owner == "client-0")
    history = [RUN_A[:2] + (150,), RUN_B[:2] + (50,)]
    assert owner.history == history
    rdp = fresh_accountant_epsilon(history, "rdp")
    prv = fresh_accountant_epsilon(history, "prv")
    assert owner.spent_epsilon == pytest.approx(rdp, rel=1e-9)  # the live number
    assert owner.pld_epsilon <= owner.spent_epsilon <= 1.8 * owner.pld_epsilon
    assert owner.pld_epsilon == pytest.approx(prv, rel=0.05)  # two tight accountants
    assert owner.pld_epsilon == pytest.approx(
        dp_accounting_epsilon(history, DELTA, pld=True), rel=1e-12
    )  # dp-accounting's own PLDAccountant
    assert (owner.rounds, owner.runs, owner.uncommitted) == (5, 2, 0)
    assert owner.remaining == pytest.approx(5.0 - rdp)
    assert len(report.plots) == 2
    assert all(Path(p).read_bytes().startswith(b"\x89PNG") for p in report.plots)


def test_a_fresh_process_audits_with_opacus_numbers_without_importing_torch_or_opacus(
    ledgers: Path,
) -> None:
    """The audit loads Opacus's RDP analysis module alone (fedmodel.privacy.analysis): a
    process that audits never imports torch or the Opacus package (about 6 s of CPU), and
    its epsilons are what Opacus's own RDPAccountant gives."""
    script = (
        "import json, sys; from pathlib import Path; from fedmodel.privacy.audit import audit; "
        "report = audit(Path(sys.argv[1])); "
        "print(json.dumps({'imported': sorted(m for m in ('torch', 'opacus') if m in sys.modules),"
        " 'spent': {o.owner: o.spent_epsilon for l in report.ledgers for o in l.owners}}))"
    )
    ran = subprocess.run(
        [sys.executable, "-c", script, str(ledgers)], capture_output=True, text=True, check=True
    )
    shown = json.loads(ran.stdout.splitlines()[-1])
    assert shown["imported"] == []
    owners = [owner for ledger in audit(ledgers).ledgers for owner in ledger.owners]
    assert sorted(shown["spent"]) == sorted(owner.owner for owner in owners) != []
    for owner in owners:
        assert shown["spent"][owner.owner] == pytest.approx(
            opacus_rdp_epsilon(owner.history), rel=1e-12
        )


def test_the_audit_command_writes_nothing_into_what_it_audits(
    audited_by_command: CommandAudit,
) -> None:
    done = audited_by_command
    assert done.table.returncode == 0 and done.as_json.returncode == 0, done.table.stderr
    assert done.after == done.before  # an auditor's read leaves no trace, not even a -wal
    assert sorted(p.name for p in done.plots.iterdir()) == [
        "epsilon-client-0.png",
        "epsilon-client-1.png",
    ]


def test_audit_at_another_delta_reports_epsilon_at_that_delta_too(ledgers: Path) -> None:
    report = audit(ledgers / "client-1.sqlite", delta=1e-3)
    (owner,) = report.ledgers[0].owners
    history = [RUN_A[:2] + (150,)]
    assert (owner.delta, owner.at_delta) == (DELTA, 1e-3)
    assert owner.spent_epsilon == pytest.approx(opacus_rdp_epsilon(history), rel=1e-12)
    assert owner.epsilon_at_delta == pytest.approx(opacus_rdp_epsilon(history, 1e-3), rel=1e-12)
    assert owner.pld_epsilon_at_delta is not None
    assert owner.pld_epsilon_at_delta < owner.epsilon_at_delta < owner.spent_epsilon
    assert owner.remaining == pytest.approx(5.0 - owner.spent_epsilon)
    result = audit_cli(str(ledgers), "--delta", "1e-3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "at delta 0.001" in result.stdout and f"{owner.epsilon_at_delta:.4f}" in result.stdout


def test_audit_at_another_delta_still_holds_the_budget_at_the_owners_delta(
    tmp_path: Path,
) -> None:
    """A budget is an (epsilon, delta) pair: at a laxer delta an overspent owner looks fine."""
    history = [RUN_A[:2] + (150,)]
    lax, strict = opacus_rdp_epsilon(history, 1e-3), opacus_rdp_epsilon(history)
    budget = (lax + strict) / 2
    ledger = PrivacyLedger(tmp_path / "client-0.sqlite")
    for server_round in (1, 2, 3):  # a client that records its budget but never checks it
        pending, _ = ledger.write_ahead(
            "e" * 64, "run", server_round, RUN_A, 1.0, DELTA, budget,
            OwnerBudget(None, DELTA).projector(RUN_A),
        )  # fmt: skip
        ledger.commit(pending, RUN_A, epsilon_of(ledger.spent_history("e" * 64), DELTA))
    report = audit(tmp_path, delta=1e-3)
    (owner,) = report.ledgers[0].owners
    assert owner.epsilon_at_delta is not None and owner.epsilon_at_delta < budget
    assert not report.ok
    assert report.all_problems() == [
        f"client-0: spent epsilon {strict:.4f} at delta 1e-05 is over the budget {budget:g}"
    ]
    assert owner.remaining == 0.0


def test_audit_never_reports_a_negative_epsilon(ledgers: Path) -> None:
    """At a large delta the RDP conversion goes below zero; (eps < 0, delta) is (0, delta)."""
    assert opacus_rdp_epsilon([RUN_A[:2] + (150,)], 0.9) < 0  # what Opacus itself returns
    report = audit(ledgers, delta=0.9)
    owners = [owner for ledger in report.ledgers for owner in ledger.owners]
    assert [owner.epsilon_at_delta for owner in owners] == [0.0, 0.0]
    assert all(owner.pld_epsilon_at_delta == 0.0 for owner in owners)
    result = audit_cli(str(ledgers), "--delta", "0.9")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not re.search(r"(?<!\w)-\d", result.stdout), result.stdout


def test_every_entry_is_checked_against_a_fresh_accountant_on_what_preceded_it(
    tmp_path: Path,
) -> None:
    """Crashed rounds count as spent, and a commit replaces its pending entry."""
    ledger = PrivacyLedger(tmp_path / "client-0.sqlite")
    spend(ledger, "f" * 64, "run-a", 2, RUN_A, budget=5.0)
    ledger.write_ahead(  # a crash: never committed
        "f" * 64, "run-a", 3, RUN_A, 1.0, DELTA, 5.0, OwnerBudget(5.0, DELTA).projector(RUN_A)
    )
    pending, _ = ledger.write_ahead(
        "f" * 64, "run-b", 1, RUN_B, 1.0, DELTA, 5.0, OwnerBudget(5.0, DELTA).projector(RUN_B)
    )
    shorter = RUN_B[:2] + (10,)  # the round stopped early: fewer steps than planned
    ledger.commit(pending, shorter, epsilon_of(ledger.spent_history("f" * 64)[:-1] + [shorter],
                                               DELTA))  # fmt: skip
    entries = ledger.entries()
    report = audit(ledger.path)
    assert report.ok, report.all_problems()
    (owner,) = report.ledgers[0].owners
    by_seq = {point["seq"]: point["epsilon"] for point in owner.timeline}
    for seq, epsilon in by_seq.items():
        prefix = spent_history(entries[:seq])
        assert epsilon == pytest.approx(opacus_rdp_epsilon(prefix), rel=1e-12), seq
    assert owner.history == [RUN_A[:2] + (150,), shorter]
    assert owner.uncommitted == 1


def test_an_edited_accounting_cache_changes_the_live_epsilon_but_not_the_audit(
    private_cache: Path, tmp_path: Path
) -> None:
    """The training path trusts its on-disk cache; the audit recomputes without it."""
    directory = tmp_path / "ledgers"
    ledger = PrivacyLedger(directory / "client-0.sqlite")
    history = [RUN_A[:2] + (150,)]
    true_epsilon = opacus_rdp_epsilon(history)
    spend(ledger, "g" * 64, "run-a", 3, RUN_A, budget=5.0)
    assert private_cache.is_file()  # the live path did use it
    before = audit(directory)
    assert before.ok, before.all_problems()

    poison_rdp_curves(private_cache, 0.5)
    assert epsilon_of(history, DELTA) < 0.9 * true_epsilon  # the live number is fooled
    after = audit(directory)
    assert after.ok, after.all_problems()  # the ledger itself was written honestly
    (owner,) = after.ledgers[0].owners
    assert owner.spent_epsilon == pytest.approx(true_epsilon, rel=1e-12)
    assert owner.spent_epsilon == before.ledgers[0].owners[0].spent_epsilon
    assert owner.pld_epsilon == before.ledgers[0].owners[0].pld_epsilon


def test_entries_written_through_an_edited_cache_are_flagged_and_the_overspend_too(
    private_cache: Path, tmp_path: Path
) -> None:
    """A client whose cache was edited under-reports with a valid chain; the audit names it."""
    directory = tmp_path / "ledgers"
    ledger = PrivacyLedger(directory / "client-0.sqlite")
    four_rounds = opacus_rdp_epsilon([RUN_A[:2] + (200,)])
    budget = round(four_rounds * 0.99, 3)  # room for three rounds, not four
    spend(ledger, "h" * 64, "run-a", 3, RUN_A, budget=budget)
    with pytest.raises(BudgetExhausted):
        spend(ledger, "h" * 64, "run-b", 1, RUN_A, budget=budget)  # the budget bites

    poison_rdp_curves(private_cache, 0.5)
    spend(ledger, "h" * 64, "run-b", 2, RUN_A, budget=budget)  # now it lets two more through
    report = audit(directory)
    assert not report.ok
    problems = report.all_problems()
    flagged = sorted(int(m[1]) for p in problems if (m := re.search(r"entry #(\d+) reports", p)))
    assert flagged == [7, 8, 9, 10]  # every entry written through the edited cache
    (owner,) = report.ledgers[0].owners
    assert owner.spent_epsilon == pytest.approx(opacus_rdp_epsilon([RUN_A[:2] + (250,)]), rel=1e-12)
    assert f"client-0: spent epsilon {owner.spent_epsilon:.4f} at delta 1e-05 is over the " \
        f"budget {budget:g}" in problems  # fmt: skip


def test_editing_one_byte_of_an_entry_fails_the_audit_and_names_it(ledgers: Path) -> None:
    path = ledgers / "client-0.sqlite"
    target = PrivacyLedger(path).entries()[5]  # entry #6: the first commit of run-b
    content = path.read_bytes()
    stored = struct.pack(">d", target.created_at)  # SQLite's REAL: a big-endian double
    assert content.count(stored) == 1
    position = content.index(stored) + 7
    path.write_bytes(content[:position] + bytes([content[position] ^ 1]) + content[position + 1 :])

    result = audit_cli(str(ledgers))
    assert result.returncode == 1, result.stdout
    assert "client-0.sqlite: entry #6 content does not match its SHA-256" in result.stdout
    assert "Traceback" not in result.stderr
    report = json.loads(audit_cli(str(path), "--json").stdout)
    assert report["ok"] is False and report["ledgers"][0]["first_bad_entry"] == 6


def test_editing_a_text_byte_is_caught_too(ledgers: Path) -> None:
    path = ledgers / "client-1.sqlite"
    content = path.read_bytes()
    position = content.index(b"committed") + 3
    path.write_bytes(content[:position] + b"\xff" + content[position + 1 :])
    report = audit(path)
    assert not report.ok and report.ledgers[0].first_bad_entry is not None


def test_an_under_reported_epsilon_is_flagged_even_with_a_valid_chain(tmp_path: Path) -> None:
    """A client that restarts its accountant every round: a valid chain, wrong numbers."""
    ledger = PrivacyLedger(tmp_path / "client-0.sqlite")
    for server_round in (1, 2, 3):
        pending, _ = ledger.write_ahead(
            "c" * 64, "run", server_round, RUN_A, 1.0, DELTA, None,
            OwnerBudget(None, DELTA).projector(RUN_A),
        )  # fmt: skip
        ledger.commit(pending, RUN_A, epsilon_of([RUN_A], DELTA))  # one round's epsilon
    report = audit(tmp_path)
    assert not report.ok
    assert any("entry #4 reports epsilon" in p for p in report.all_problems())


def test_audit_cli_prints_the_owner_table_and_json_and_its_progress_to_stderr(
    audited_by_command: CommandAudit,
) -> None:
    result, as_json = audited_by_command.table, audited_by_command.as_json
    assert result.returncode == 0, result.stdout + result.stderr
    assert "client-0" in result.stdout and "verified" in result.stdout
    report = json.loads(as_json.stdout)  # progress lines would break the JSON
    progress = [
        re.sub(r"\d+ s elapsed$", "N s elapsed", line) for line in as_json.stderr.splitlines()
    ]
    assert progress == [
        "ledger 1/2  client-0.sqlite  verified  N s elapsed",
        "ledger 2/2  client-1.sqlite  verified  N s elapsed",
    ]
    assert report["ok"] is True
    owners = {o["owner"]: o for ledger in report["ledgers"] for o in ledger["owners"]}
    assert owners["client-1"]["runs"] == 1 and owners["client-0"]["runs"] == 2


def test_audit_of_nothing_is_one_clear_line(tmp_path: Path) -> None:
    result = audit_cli(str(tmp_path / "missing"))
    assert result.returncode != 0
    assert result.stderr.strip().startswith("error: nothing to audit at")


def test_entries_signed_with_the_node_key_verify_and_a_forged_ledger_does_not(
    tmp_path: Path,
) -> None:
    from flwr.app import Context, RecordDict

    from client.app import ledger_signer
    from fedmodel.pki import create_node_identity

    node = create_node_identity(tmp_path / "node")
    other = create_node_identity(tmp_path / "someone-else")
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"ledger-path": str(tmp_path / "node" / "privacy-ledger.sqlite")},
        state=RecordDict(),
        run_config={},
    )
    signer = ledger_signer(context)
    assert signer is not None  # the node.key beside the ledger
    genuine = PrivacyLedger(tmp_path / "node" / "privacy-ledger.sqlite", signer)
    spend(genuine, "d" * 64, "run-a", 2, RUN_A, budget=5.0)
    report = audit(genuine.path, public_key=node.public_key)
    assert report.ok and report.ledgers[0].signed == 4

    # Someone rebuilds a plausible ledger with a key that is not the node's.
    forged = PrivacyLedger(tmp_path / "forged" / "privacy-ledger.sqlite", ledger_signer(
        Context(run_id=1, node_id=1, node_config={"node-key-path": str(other.private_key)},
                state=RecordDict(), run_config={})
    ))  # fmt: skip
    spend(forged, "d" * 64, "run-a", 1, RUN_A, budget=5.0)
    assert audit(forged.path).ok  # the chain alone cannot tell
    result = audit_cli(str(forged.path), "--public-key", str(node.public_key))
    assert result.returncode == 1
    assert "entry #1 has no valid signature by node.pub" in result.stdout
