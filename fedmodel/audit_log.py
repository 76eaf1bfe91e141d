"""Append-only, hash-chained JSON-lines logs: the server's and each node's audit trail.

Every line carries the SHA-256 of the line before it (`previous`), so an edited,
inserted or deleted line breaks the chain. A chain alone proves little: whoever can
write the file can rewrite it with a recomputed chain, or cut off its tail. A keyed
log (the server's) closes both holes:

- each line also carries `mac`, HMAC-SHA256 of the line under a secret key, so a
  rewrite by anyone without the key fails verification;
- its head (how many lines, the last one's SHA-256) is kept MAC-ed in PATH.head, so a
  truncated log no longer reaches its head.

Whoever holds the key (the account that appends, or root) can still forge the whole
log and its head, or roll both back to an old copy. Only an anchor kept off the host
defeats that: `AuditLog.head` gives "N:SHA256" for the operator to write down elsewhere,
and `AuditLog.verify(anchor=...)` checks that the log still holds that line there.

Appends hold an exclusive `flock` on the log and readers a shared one, so concurrent
writers never interleave. Files are created 0600: they name nodes, runs and reasons.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmodel.errors import ExitCode, FedModelError
from fedmodel.file_lock import locked_descriptor
from fedmodel.pki import write_private_file

_ANCHOR = re.compile(r"^([1-9][0-9]*):([0-9a-f]{64})$")


class AuditLogError(FedModelError):
    """An audit log that is malformed, altered, truncated or not authentic."""

    exit_code = ExitCode.AUDIT_LOG


@dataclass(frozen=True)
class AuditLog:
    """The log at `path`; MAC-ed under `key` (32 random bytes) when one is given."""

    path: Path
    key: bytes | None = None

    @property
    def head_path(self) -> Path:
        return self.path.with_name(self.path.name + ".head")

    def append(self, event: str, **details: Any) -> dict[str, Any]:
        """Append one event chained to the line before it; MAC-ed, with a new head, if keyed."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        with locked_descriptor(self.path, flags) as descriptor:
            lines = read_lines(self.path)
            previous = sha256_text(lines[-1]) if lines else ""
            record = {"time": utc_now(), "event": event, **details, "previous": previous}
            if self.key is not None:
                record["mac"] = _mac(self.key, _canonical(record))
            line = _canonical(record)
            os.write(descriptor, (line + "\n").encode())
            if self.key is not None:
                self._write_head(self.key, len(lines) + 1, sha256_text(line))
        return record

    def verify(self, anchor: str | None = None) -> list[dict[str, Any]]:
        """The events in order, after checking the chain (and MACs, head, anchor).

        Every problem raises one AuditLogError line naming the file and the line.
        """
        path = self.path
        wanted = [] if anchor is None else [("anchor", *parse_anchor(anchor))]
        if not path.exists():
            if self.key is not None and self.head_path.exists():
                raise AuditLogError(f"audit log {path} is missing but its head exists: deleted")
            if wanted:
                raise AuditLogError(f"audit log {path} is missing, so it cannot reach the anchor")
            return []
        with locked_descriptor(path, os.O_RDONLY, shared=True):
            lines = read_lines(path)
            if self.key is not None:
                wanted.append(("head", *self._read_head(self.key)))
        events, previous = [], ""
        for number, line in enumerate(lines, start=1):
            record = _parse(path, number, line)
            if record["previous"] != previous:
                raise AuditLogError(f"audit log {path} was altered at line {number}")
            if self.key is not None:
                mac = record.pop("mac", None)
                if not isinstance(mac, str) or not hmac.compare_digest(
                    mac, _mac(self.key, _canonical(record))
                ):
                    raise AuditLogError(
                        f"audit log {path} line {number} is not authentic (its MAC does not "
                        "match: written or rewritten without the audit key)"
                    )
            events.append(record)
            previous = sha256_text(line)
        for name, count, digest in wanted:
            if count > len(lines) or sha256_text(lines[count - 1]) != digest:
                raise AuditLogError(
                    f"audit log {path} does not hold its {name} at line {count} (it has "
                    f"{len(lines)} lines): it was truncated or rewritten"
                )
        return events

    def head(self) -> str:
        """'N:SHA256' of the last line: write it down off the host, check it with `anchor`."""
        lines = read_lines(self.path) if self.path.exists() else []
        return f"{len(lines)}:{sha256_text(lines[-1])}" if lines else ""

    def _write_head(self, key: bytes, count: int, digest: str) -> None:
        head = {"entries": count, "last": digest, "mac": _mac(key, f"{count}:{digest}")}
        write_private_file(self.head_path, (json.dumps(head) + "\n").encode(), force=True)

    def _read_head(self, key: bytes) -> tuple[int, str]:
        """The (entries, last line's SHA-256) the head vouches for; forged or missing raises."""
        try:
            head = json.loads(self.head_path.read_text())
            count, digest, mac = int(head["entries"]), str(head["last"]), str(head["mac"])
            if count < 1:
                raise ValueError(count)
        except FileNotFoundError:
            raise AuditLogError(f"{self.head_path} is missing: the head was deleted") from None
        except (ValueError, TypeError, KeyError):
            raise AuditLogError(f"{self.head_path} is malformed") from None
        if not hmac.compare_digest(mac, _mac(key, f"{count}:{digest}")):
            raise AuditLogError(f"{self.head_path} is not authentic (forged without the key)")
        return count, digest


def parse_anchor(anchor: str) -> tuple[int, str]:
    match = _ANCHOR.match(anchor.strip().lower())
    if match is None:
        raise AuditLogError(
            f"anchor '{anchor}' is not of the form N:SHA256 (as 'fedmodel server audit' prints)"
        )
    return int(match.group(1)), match.group(2)


def read_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _parse(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict) or not all(
        isinstance(record.get(field), str) for field in ("time", "event", "previous")
    ):
        raise AuditLogError(
            f"audit log {path} line {number} is malformed (not a JSON object with "
            "time, event and previous)"
        )
    return record


def _canonical(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True)


def _mac(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()
