"""The privacy ledger: durable, append-only, hash-chained, safe with concurrent writers."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import numpy as np
import pytest

from fedmodel.privacy.accountant import epsilon_of
from fedmodel.privacy.budget import BudgetExhausted, OwnerBudget
from fedmodel.privacy.ledger import PrivacyLedger, dataset_fingerprint
from fedmodel.privacy.ledger_chain import COMMITTED, PENDING, verify_chain
from tests.conftest import dp_accounting_epsilon, opacus_stepped_epsilon

DELTA = 1e-5
ROUND = (1.1, 0.02, 50)  # (noise multiplier, sample rate, steps) of one round


def spend_round(
    ledger: PrivacyLedger,
    fingerprint: str,
    run_id: str,
    server_round: int,
    segment: tuple[float, float, int] = ROUND,
    commit: bool = True,
) -> None:
    """One round of the client protocol, without the training itself."""
    pending, _ = ledger.write_ahead(
        fingerprint, run_id, server_round, segment, 1.0, DELTA, None,
        OwnerBudget(None, DELTA).projector(segment),
    )  # fmt: skip
    if commit:
        history = ledger.spent_history(fingerprint)
        ledger.commit(pending, segment, epsilon_of(history, DELTA))


def test_fingerprint_is_the_content_not_the_object() -> None:
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(50, 4)).astype(np.float32), rng.integers(0, 2, 50)
    same = dataset_fingerprint(features.copy(), labels.copy())
    assert dataset_fingerprint(features, labels) == same
    changed = features.copy()
    changed[3, 2] += 1e-3
    assert dataset_fingerprint(changed, labels) != same
    assert dataset_fingerprint(features[::-1], labels[::-1]) != same
    assert dataset_fingerprint(features[:-1], labels[:-1]) != same


def test_spending_composes_across_runs_and_reopenings(tmp_path: Path) -> None:
    path = tmp_path / "owner.sqlite"
    second = (0.9, 0.04, 25)
    for server_round in (1, 2, 3):
        spend_round(PrivacyLedger(path), "data", "run-a", server_round)
    for server_round in (1, 2):  # another run, another coordinator, same data
        spend_round(PrivacyLedger(path), "data", "run-b", server_round, second)
    spend_round(PrivacyLedger(path), "other-data", "run-b", 1)

    ledger = PrivacyLedger(path)
    assert ledger.spent_history("data") == [(1.1, 0.02, 150), (0.9, 0.04, 50)]
    expected = opacus_stepped_epsilon([ROUND] * 3 + [second] * 2, DELTA)
    assert ledger.spent_epsilon("data", DELTA) == pytest.approx(expected, rel=1e-12)
    assert ledger.entries("data")[-1].epsilon == pytest.approx(expected, rel=1e-12)
    assert ledger.spent_history("other-data") == [ROUND]
    assert [e.status for e in ledger.entries("data")] == [PENDING, COMMITTED] * 5
    assert ledger.run_noise_multiplier("data", "run-b") == 0.9


def test_a_pending_entry_left_by_a_crash_counts_as_spent(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "owner.sqlite")
    spend_round(ledger, "data", "run-a", 1)
    spend_round(ledger, "data", "run-a", 2, commit=False)  # the process died while training
    spend_round(ledger, "data", "run-a", 2)  # the restarted client retries the round
    assert ledger.spent_history("data") == [(1.1, 0.02, 150)]
    assert verify_chain(ledger.entries()) is None


def test_write_ahead_returns_the_history_training_continues_from(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "owner.sqlite")
    spend_round(ledger, "data", "run-a", 1)
    spend_round(ledger, "data", "run-a", 2, commit=False)  # a crash: counts as spent
    spend_round(ledger, "other-data", "run-a", 1)
    before = ledger.spent_history("data")
    pending, history = ledger.write_ahead(
        "data", "run-a", 3, ROUND, 1.0, DELTA, None, OwnerBudget(None, DELTA).projector(ROUND)
    )
    assert history == before == [(1.1, 0.02, 100)]
    assert ledger.entries("data")[-1] == pending
    assert pending.epsilon == pytest.approx(epsilon_of([*before, ROUND], DELTA))


def test_a_ledger_written_before_the_mechanism_column_stays_usable(tmp_path: Path) -> None:
    path = tmp_path / "owner.sqlite"
    spend_round(PrivacyLedger(path), "data", "run-a", 1)
    with sqlite3.connect(path) as connection:
        connection.execute("ALTER TABLE entries DROP COLUMN mechanism")
    connection.close()
    ledger = PrivacyLedger(path)
    spend_round(ledger, "data", "run-a", 2)
    assert ledger.spent_history("data") == [(1.1, 0.02, 100)]
    assert ledger.run_noise_multiplier("data", "run-a") == 1.1
    assert verify_chain(ledger.entries()) is None


def test_many_rounds_merge_into_one_segment_so_checks_stay_fast(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "owner.sqlite")
    for server_round in range(1, 301):
        spend_round(ledger, "data", "run-a", server_round, (3.0, 0.01, 10), commit=False)
    started = time.perf_counter()
    assert ledger.spent_history("data") == [(3.0, 0.01, 3_000)]
    epsilon = ledger.spent_epsilon("data", DELTA)
    assert time.perf_counter() - started < 1.0  # Flower's replaying accountant: 5 s at 100
    assert epsilon == pytest.approx(dp_accounting_epsilon([(3.0, 0.01, 3_000)], DELTA), rel=0.01)


def separate_processes() -> multiprocessing.context.ForkServerContext:
    """Writers in processes of their own, forked from one server that imported the
    accounting (Opacus, hence torch) once: spawning imported it in every writer, inside
    its first write lock."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.test_ledger", "opacus.accountants.analysis.rdp"])
    return context


def _writer(path: str, worker: int) -> None:
    ledger = PrivacyLedger(Path(path))
    for server_round in range(1, 11):
        spend_round(ledger, "data", f"worker-{worker}", server_round)


def test_concurrent_writers_keep_one_linear_chain(tmp_path: Path) -> None:
    path = tmp_path / "owner.sqlite"
    PrivacyLedger(path)
    context = separate_processes()
    workers = [context.Process(target=_writer, args=(str(path), w)) for w in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)  # a loaded machine: the first writer waits for the preload
        assert worker.exitcode == 0
    entries = PrivacyLedger(path).entries()
    assert len(entries) == 3 * 10 * 2
    assert verify_chain(entries) is None
    assert PrivacyLedger(path).spent_history("data") == [(1.1, 0.02, 30 * 50)]


RACERS = 5


def _racer(path: str, budget: float, start: Barrier, outcomes: Queue) -> None:
    """One client's round, as client/app.py runs it: project, write ahead, train, commit."""
    ledger = PrivacyLedger(Path(path))
    start.wait(timeout=120)  # every racer has opened the ledger: now all at once
    try:
        pending, before = ledger.write_ahead(
            "data", "run-race", 3, ROUND, 1.0, DELTA, budget,
            OwnerBudget(budget, DELTA).projector(ROUND),
        )  # fmt: skip
    except BudgetExhausted as refusal:
        outcomes.put(("refused", str(refusal)))
        return
    except Exception as error:  # reported, so the test fails now rather than at its timeout
        outcomes.put(("crashed", repr(error)))
        raise
    ledger.commit(pending, ROUND, epsilon_of([*before, ROUND], DELTA))
    outcomes.put(("trained", str(pending.seq)))


def test_concurrent_writers_cannot_both_squeeze_into_the_last_round_of_budget(
    tmp_path: Path,
) -> None:
    path = tmp_path / "owner.sqlite"
    ledger = PrivacyLedger(path)
    for server_round in (1, 2):
        spend_round(ledger, "data", "run-race", server_round)
    three, four = (epsilon_of([(1.1, 0.02, 50 * n)], DELTA) for n in (3, 4))
    budget = (three + four) / 2  # one more round fits, a second does not
    context = separate_processes()
    start, outcomes = context.Barrier(RACERS), context.Queue()
    racers = [
        context.Process(target=_racer, args=(str(path), budget, start, outcomes))
        for _ in range(RACERS)
    ]
    for racer in racers:
        racer.start()
    results = [outcomes.get(timeout=180) for _ in racers]
    trained = [detail for outcome, detail in results if outcome == "trained"]
    refused = [detail for outcome, detail in results if outcome == "refused"]
    assert len(trained) == 1 and len(refused) == RACERS - 1, results
    assert all(r.startswith("budget-exhausted") for r in refused)
    for racer in racers:
        racer.join(timeout=60)
        assert racer.exitcode == 0
    entries = PrivacyLedger(path).entries()
    assert verify_chain(entries) is None
    assert [e.status for e in entries] == [PENDING, COMMITTED] * 3
    assert ledger.spent_history("data") == [(1.1, 0.02, 150)]
    assert ledger.spent_epsilon("data", DELTA) <= budget


def test_editing_an_entry_breaks_the_chain_at_that_entry(tmp_path: Path) -> None:
    path = tmp_path / "owner.sqlite"
    ledger = PrivacyLedger(path)
    for server_round in (1, 2, 3):
        spend_round(ledger, "data", f"run-{server_round}", server_round)
    with sqlite3.connect(path) as connection:  # an editor that knows SQL, not the chain
        connection.execute("UPDATE entries SET steps = 1 WHERE seq = 4")
    problem = verify_chain(ledger.entries())
    assert problem is not None and problem.seq == 4 and "SHA-256" in problem.reason


def test_deleting_an_entry_breaks_the_chain_after_it(tmp_path: Path) -> None:
    path = tmp_path / "owner.sqlite"
    ledger = PrivacyLedger(path)
    for server_round in (1, 2, 3):
        spend_round(ledger, "data", "run-a", server_round)
    with sqlite3.connect(path) as connection:
        connection.execute("DELETE FROM entries WHERE seq = 3")
    problem = verify_chain(ledger.entries())
    assert problem is not None and problem.seq == 4
