"""`fedmodel audit`: chains verified byte for byte, epsilons recomputed independently."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedmodel.privacy.accountant import epsilon_of
from fedmodel.privacy.audit import audit
from fedmodel.privacy.budget import OwnerBudget
from fedmodel.privacy.ledger import PrivacyLedger

BIN = Path(sys.executable).parent
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


def fresh_accountant_epsilon(history: list[tuple[float, float, int]], kind: str) -> float:
    accountant = RDPAccountant() if kind == "rdp" else PRVAccountant()
    for noise, rate, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=noise, sample_rate=rate)
    return float(accountant.get_epsilon(DELTA))


@pytest.fixture
def ledgers(tmp_path: Path) -> Path:
    """Two hospitals; hospital 0 trained in two runs, hospital 1 in one."""
    directory = tmp_path / "ledgers"
    first = PrivacyLedger(directory / "client-0.sqlite")
    spend(first, "a" * 64, "run-a", 3, RUN_A, budget=5.0)
    spend(first, "a" * 64, "run-b", 2, RUN_B, budget=5.0)
    spend(PrivacyLedger(directory / "client-1.sqlite"), "b" * 64, "run-a", 3, RUN_A, budget=5.0)
    return directory


def audit_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "fedmodel"), "audit", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


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
    assert (owner.rounds, owner.runs, owner.uncommitted) == (5, 2, 0)
    assert owner.remaining == pytest.approx(5.0 - rdp)
    assert len(report.plots) == 2
    assert all(Path(p).read_bytes().startswith(b"\x89PNG") for p in report.plots)


def test_audit_at_another_delta_reports_epsilon_at_that_delta(ledgers: Path) -> None:
    report = audit(ledgers / "client-1.sqlite", delta=1e-3)
    (owner,) = report.ledgers[0].owners
    assert owner.delta == 1e-3
    assert owner.spent_epsilon == pytest.approx(epsilon_of([RUN_A[:2] + (150,)], 1e-3))


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


def test_audit_cli_prints_the_owner_table_and_json(ledgers: Path) -> None:
    result = audit_cli(str(ledgers))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "client-0" in result.stdout and "verified" in result.stdout
    report = json.loads(audit_cli(str(ledgers), "--json").stdout)
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
