"""A privacy ledger's entries, their hash chain and what counts as spent (no storage).

Tamper evidence: each entry stores the previous entry's hash and its own SHA-256 over a
canonical encoding of every field (a hash chain), so editing, removing or reordering
entries is detected by `verify_chain`. On deployed nodes each hash is also signed with
the node's key (fedmodel.privacy.signing), so only that node can have written the
chain. Truncating the tail or deleting the file is not detectable from the chain
alone: a deployed node keeps the chain head (entry count and last hash) in its owner's
policy file and refuses to start on a ledger that is missing, shorter or diverging
(client/ledger_guard.py); the server's run record is a second cross-check.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from fedmodel.privacy.accountant import Segment, merge_segments

GENESIS_HASH = "0" * 64
PENDING, COMMITTED = "pending", "committed"


@dataclass(frozen=True)
class LedgerEntry:
    """One appended row. `epsilon` is cumulative for `fingerprint` at `delta`, by `accountant`.

    Pending entries carry the planned mechanism and the projected epsilon; committed
    entries carry the mechanism Opacus's accountant recorded and the epsilon it reported.
    """

    seq: int
    fingerprint: str
    run_id: str
    server_round: int
    status: str
    refers_to: int | None
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str
    epsilon: float
    budget_epsilon: float | None
    created_at: float
    prev_hash: str
    entry_hash: str
    signature: str | None = None
    # Parameters of a mechanism beyond its accounted segment, as canonical JSON (the
    # server's client-level releases: update noise, count noise, clipping norm); None
    # for owners' DP-SGD entries, whose segment is the whole mechanism.
    mechanism: str | None = None

    @property
    def segment(self) -> Segment:
        return (self.noise_multiplier, self.sample_rate, self.steps)

    def computed_hash(self) -> str:
        """SHA-256 over every field but the hash and its signature, in canonical JSON."""
        content = {k: v for k, v in asdict(self).items() if k not in ("entry_hash", "signature")}
        if content["mechanism"] is None:  # entries without it hash as they always have
            del content["mechanism"]
        encoded = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(encoded.encode()).hexdigest()


@dataclass(frozen=True)
class ChainProblem:
    """The first entry at which a ledger's hash chain breaks, and why."""

    seq: int
    reason: str


def spent_history(entries: Sequence[LedgerEntry]) -> list[Segment]:
    """Committed mechanisms plus every pending one never committed (a crash counts as spent).

    Consecutive identical mechanisms are merged, so the accountant sees one segment per
    run rather than one per round: epsilon stays fast to compute after thousands of rounds.
    """
    return spent_segments([(e.seq, e.status, e.refers_to, e.segment) for e in entries])


def spent_segments(entries: Sequence[tuple[int, str, int | None, Segment]]) -> list[Segment]:
    """`spent_history` over (seq, status, refers_to, segment): all it needs of an entry."""
    committed = {refers_to for _, status, refers_to, _ in entries if status == COMMITTED}
    spent = [
        segment
        for seq, status, _, segment in entries
        if status == COMMITTED or (status == PENDING and seq not in committed)
    ]
    return merge_segments(spent)


def verify_chain(entries: Sequence[LedgerEntry]) -> ChainProblem | None:
    """The first entry whose hash, link or content is wrong; None when the chain holds."""
    prev_hash = GENESIS_HASH
    pending: set[int] = set()
    for position, entry in enumerate(entries, start=1):
        if entry.seq != position:
            return ChainProblem(entry.seq, f"expected entry #{position}, found #{entry.seq}")
        if entry.prev_hash != prev_hash:
            return ChainProblem(entry.seq, "does not link to the entry before it")
        try:
            computed = entry.computed_hash()
        except (TypeError, ValueError) as error:
            return ChainProblem(entry.seq, f"content cannot be encoded ({error})")
        if computed != entry.entry_hash:
            return ChainProblem(entry.seq, "content does not match its SHA-256")
        if entry.status == PENDING:
            pending.add(entry.seq)
        elif entry.status == COMMITTED:
            if entry.refers_to not in pending:
                return ChainProblem(entry.seq, "commits no pending entry before it")
            pending.discard(entry.refers_to)
        else:
            return ChainProblem(entry.seq, f"unknown status {entry.status!r}")
        prev_hash = entry.entry_hash
    return None
