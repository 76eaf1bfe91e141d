"""The data owner's privacy ledger: an append-only, hash-chained SQLite log of DP spending.

Why a ledger and not Flower's `context.state`: that state lives in SuperNode memory for
one run, so a budget kept there resets with every run and every restart. Entries are
keyed by the budget they spend from: a deployed node keys every entry with
`NODE_BUDGET`, so everything the node ever trained on shares the owner's one budget (a
re-exported or appended file gets no fresh budget); a simulated client keys them by a
fingerprint of its partition's content. The ledger file lives with the owner (deployed
node: its node directory; simulation: one file per virtual client in the run's `ledgers/`).

Write-ahead: a *pending* entry (the mechanism about to run) is appended before training
and a *committed* entry (the mechanism exactly as Opacus ran it) after. Nothing is ever
updated or deleted. A pending entry without a commit - a crash, a killed SuperNode -
counts as spent, because the noisy update may have left the machine.

Entries, their hash chain and what counts as spent: fedmodel.privacy.ledger_chain.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

from fedmodel.errors import ExitCode, FedModelError
from fedmodel.privacy.accountant import ACCOUNTANT, Segment, epsilon_of
from fedmodel.privacy.ledger_chain import (
    COMMITTED,
    GENESIS_HASH,
    PENDING,
    LedgerEntry,
    spent_history,
    spent_segments,
)

NODE_BUDGET = "node"  # a deployed node's budget key: all its data shares one budget
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 120_000  # a writer holds the lock while it checks the budget: seconds under load

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    run_id TEXT NOT NULL,
    server_round INTEGER NOT NULL,
    status TEXT NOT NULL,
    refers_to INTEGER,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    max_grad_norm REAL NOT NULL,
    delta REAL NOT NULL,
    accountant TEXT NOT NULL,
    epsilon REAL NOT NULL,
    budget_epsilon REAL,
    created_at REAL NOT NULL,
    prev_hash TEXT NOT NULL,
    entry_hash TEXT NOT NULL,
    signature TEXT,
    mechanism TEXT
);
CREATE INDEX IF NOT EXISTS entries_by_fingerprint ON entries (fingerprint, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class LedgerError(FedModelError):
    """A ledger that cannot be opened or read (not a FedModel ledger, corrupt file)."""

    exit_code = ExitCode.LEDGER


_COLUMNS = tuple(f.name for f in fields(LedgerEntry))


def dataset_fingerprint(features: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 of the training tensors' content (dtype, shape and bytes).

    Any change to the rows (one value, their order, one row more) gives another
    fingerprint, i.e. another dataset with its own budget; the same rows give the same
    fingerprint in every run, so their spending composes.
    """
    digest = hashlib.sha256()
    for array in (features, labels):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class PrivacyLedger:
    """Append-only ledger file of one data owner; safe with concurrent writers.

    Every append runs in an IMMEDIATE transaction (one writer at a time, others wait up
    to 2 min) in WAL mode, so the chain stays linear when several processes - Ray actors
    of a simulation, a restarted SuperNode - write the same file.
    """

    def __init__(self, path: Path, signer: Callable[[str], str] | None = None) -> None:
        """`signer` (deployed nodes: the node key, fedmodel.privacy.signing) signs each hash."""
        self.path = Path(path)
        self.signer = signer
        self._shared: sqlite3.Connection | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as connection:
            if _schema_is_current(connection):  # no write lock taken by every client call
                return
            connection.executescript(_SCHEMA)
            if "mechanism" not in _present_columns(connection):  # a ledger from before it
                connection.execute("ALTER TABLE entries ADD COLUMN mechanism TEXT")
            connection.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)",
                (str(SCHEMA_VERSION),),
            )

    @classmethod
    def open_existing(cls, path: Path) -> PrivacyLedger:
        """Open a ledger for reading; a missing or foreign file is a user mistake."""
        path = Path(path)
        if not path.is_file():
            raise LedgerError(f"no ledger at {path}")
        try:
            with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
                connection.execute("SELECT seq FROM entries LIMIT 1").fetchall()
        except sqlite3.DatabaseError as error:
            raise LedgerError(f"{path} is not a readable FedModel ledger ({error})") from error
        ledger = cls.__new__(cls)
        ledger.path, ledger.signer, ledger._shared = path, None, None
        return ledger

    def __enter__(self) -> PrivacyLedger:
        """Share one connection among the calls inside `with` (a client's round).

        Closing a file's last connection checkpoints its WAL into the database and
        deletes it, with fsyncs of its own; one connection per call paid that each time.
        Every call still runs in its own transaction, so nothing waits for the `with` to end.
        """
        if self._shared is None:
            self._shared = self._open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._shared is not None:
            self._shared.close()
            self._shared = None

    def _open(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000)
        # An edited byte inside a text value must surface as a hash mismatch on that entry.
        connection.text_factory = lambda raw: raw.decode("utf-8", errors="replace")
        try:
            connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = FULL")  # a commit survives power loss
        except BaseException:
            connection.close()
            raise
        return connection

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """One transaction: committed on leaving, rolled back on an exception."""
        connection = self._shared or self._open()
        try:
            with connection:
                yield connection
        finally:
            if connection is not self._shared:
                connection.close()

    def entries(self, fingerprint: str | None = None) -> list[LedgerEntry]:
        """Every entry in append order (optionally only those of one dataset)."""
        query = "FROM entries"
        parameters: tuple[str, ...] = ()
        if fingerprint is not None:
            query += " WHERE fingerprint = ?"
            parameters = (fingerprint,)
        try:
            with self._connect() as connection:
                select = f"SELECT {_select_list(connection)} {query} ORDER BY seq"
                rows = connection.execute(select, parameters).fetchall()
        except sqlite3.DatabaseError as error:
            raise LedgerError(f"{self.path} cannot be read ({error})") from error
        return [LedgerEntry(*row) for row in rows]

    def write_ahead(
        self,
        fingerprint: str,
        run_id: str,
        server_round: int,
        planned: Segment,
        max_grad_norm: float,
        delta: float,
        budget_epsilon: float | None,
        project: Callable[[list[Segment]], float],
        mechanism: str | None = None,
    ) -> tuple[LedgerEntry, list[Segment]]:
        """Write-ahead record of a round about to train, and the spent history it was
        checked against; the entry's seq commits it.

        `project` gets the dataset's spent history inside the writing transaction and
        returns the epsilon after `planned`, or raises to refuse (nothing is written):
        check and append are atomic, so two concurrent writers cannot both pass a check
        that only one of them fits in. The history is what training continues from, so
        the caller need not read the ledger again (reads dominate a long ledger's cost).
        """
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            rows = connection.execute(
                "SELECT seq, status, refers_to, noise_multiplier, sample_rate, steps "
                "FROM entries WHERE fingerprint = ? ORDER BY seq",
                (fingerprint,),
            ).fetchall()
            spent = spent_segments(
                [(seq, status, ref, (nm, q, n)) for seq, status, ref, nm, q, n in rows]
            )
            entry = self._append(
                connection, fingerprint, run_id, server_round, PENDING, None, planned,
                max_grad_norm, delta, project(spent), budget_epsilon, mechanism,
            )  # fmt: skip
        return entry, spent

    def commit(self, pending: LedgerEntry, used: Segment, epsilon: float) -> LedgerEntry:
        """Record what the round actually spent (`used`: the mechanism as Opacus ran it).

        Raises LedgerError, writing nothing, when `used` is larger than what was written
        ahead (less noise, a higher sample rate or more steps): the pending entry then
        stands as the round's record and the caller must not release the result.
        """
        noise, rate, steps = used
        if noise < pending.noise_multiplier or rate > pending.sample_rate or steps > pending.steps:
            raise LedgerError(
                f"{self.path}: round {pending.server_round} ran (noise {noise:g}, sample rate "
                f"{rate:g}, {steps} steps), more than the planned (noise "
                f"{pending.noise_multiplier:g}, sample rate {pending.sample_rate:g}, "
                f"{pending.steps} steps); its update is withheld"
            )
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            return self._append(
                connection, pending.fingerprint, pending.run_id, pending.server_round,
                COMMITTED, pending.seq, used, pending.max_grad_norm, pending.delta, epsilon,
                pending.budget_epsilon, pending.mechanism,
            )  # fmt: skip

    def _append(
        self,
        connection: sqlite3.Connection,
        fingerprint: str,
        run_id: str,
        server_round: int,
        status: str,
        refers_to: int | None,
        segment: Segment,
        max_grad_norm: float,
        delta: float,
        epsilon: float,
        budget_epsilon: float | None,
        mechanism: str | None,
    ) -> LedgerEntry:
        """Chain and insert one entry, inside the caller's IMMEDIATE transaction."""
        last = connection.execute(
            "SELECT seq, entry_hash FROM entries ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        seq, prev_hash = (last[0] + 1, last[1]) if last else (1, GENESIS_HASH)
        entry = LedgerEntry(
            seq=seq,
            fingerprint=fingerprint,
            run_id=str(run_id),
            server_round=int(server_round),
            status=status,
            refers_to=refers_to,
            noise_multiplier=float(segment[0]),
            sample_rate=float(segment[1]),
            steps=int(segment[2]),
            max_grad_norm=float(max_grad_norm),
            delta=float(delta),
            accountant=ACCOUNTANT,
            epsilon=float(epsilon),
            budget_epsilon=None if budget_epsilon is None else float(budget_epsilon),
            created_at=time.time(),
            prev_hash=prev_hash,
            entry_hash="",
            mechanism=mechanism,
        )
        entry = replace(entry, entry_hash=entry.computed_hash())
        if self.signer is not None:
            entry = replace(entry, signature=self.signer(entry.entry_hash))
        connection.execute(
            f"INSERT INTO entries ({', '.join(_COLUMNS)}) "
            f"VALUES ({', '.join('?' for _ in _COLUMNS)})",
            tuple(getattr(entry, c) for c in _COLUMNS),
        )
        return entry

    def spent_history(self, fingerprint: str) -> list[Segment]:
        """Every mechanism that counts as spent on this dataset, merged into segments."""
        return spent_history(self.entries(fingerprint))

    def spent_epsilon(self, fingerprint: str, delta: float) -> float:
        return epsilon_of(self.spent_history(fingerprint), delta)

    def trained_round(self, run_id: str, server_round: int) -> int | None:
        """The seq of the first entry this ledger holds for (run, round), if any."""
        row = self._read_one(
            "SELECT seq FROM entries WHERE run_id = ? AND server_round = ? ORDER BY seq LIMIT 1",
            (str(run_id), int(server_round)),
        )
        return None if row is None else int(row[0])

    def head(self) -> tuple[int, str]:
        """(entry count, hash of the last entry): what a later read must still start with."""
        row = self._read_one("SELECT seq, entry_hash FROM entries ORDER BY seq DESC LIMIT 1", ())
        return (0, GENESIS_HASH) if row is None else (int(row[0]), str(row[1]))

    def entry_hash(self, seq: int) -> str | None:
        row = self._read_one("SELECT entry_hash FROM entries WHERE seq = ?", (int(seq),))
        return None if row is None else str(row[0])

    def _read_one(self, query: str, parameters: tuple[str | int, ...]) -> tuple | None:
        try:
            with self._connect() as connection:
                row: tuple | None = connection.execute(query, parameters).fetchone()
        except sqlite3.DatabaseError as error:
            raise LedgerError(f"{self.path} cannot be read ({error})") from error
        return row

    def run_noise_multiplier(self, fingerprint: str, run_id: str) -> float | None:
        """The noise multiplier this run chose in its first round on this data, if any.

        Kept in the ledger (not in SuperNode memory) so a restarted client continues the
        run with the same calibration.
        """
        row = self._read_one(
            "SELECT noise_multiplier FROM entries WHERE fingerprint = ? AND run_id = ? "
            "ORDER BY seq LIMIT 1",
            (fingerprint, str(run_id)),
        )
        return None if row is None else float(row[0])


def _schema_is_current(connection: sqlite3.Connection) -> bool:
    """Tables, the `mechanism` column and the schema row are all there already."""
    if "mechanism" not in _present_columns(connection):
        return False
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    if not {"meta", "entries_by_fingerprint"} <= tables:
        return False
    return connection.execute("SELECT 1 FROM meta WHERE key = 'schema'").fetchone() is not None


def _present_columns(connection: sqlite3.Connection) -> set[str]:
    return {row[1] for row in connection.execute("PRAGMA table_info(entries)")}


def _select_list(connection: sqlite3.Connection) -> str:
    """Every entry column; `mechanism` reads as NULL in a ledger written before it existed."""
    present = _present_columns(connection)
    return ", ".join(c if c in present else f"NULL AS {c}" for c in _COLUMNS)
