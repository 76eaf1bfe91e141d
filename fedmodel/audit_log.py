"""Append-only, hash-chained JSON-lines logs: the server's and each node's audit trail.

Every line carries the SHA-256 of the line before it (`previous`), so an edited,
inserted or deleted line breaks the chain and `verify_chain` names where. The file is
created 0600: it names nodes, runs and reasons, which are nobody else's business.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from fedmodel.errors import FedModelError


class AuditLogError(FedModelError):
    """An audit log whose hash chain is broken."""

    exit_code = 8


def append_event(path: Path, event: str, **details: Any) -> dict[str, Any]:
    """Append one event whose `previous` is the SHA-256 of the preceding line."""
    lines = read_lines(path) if path.exists() else []
    previous = sha256_text(lines[-1]) if lines else ""
    record = {"time": utc_now(), "event": event, **details, "previous": previous}
    line = json.dumps(record, sort_keys=True) + "\n"
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(descriptor, "a") as handle:
        handle.write(line)
    return record


def verify_chain(path: Path) -> list[dict[str, Any]]:
    """The events of `path` in order, after checking the chain; a break raises."""
    if not path.exists():
        return []
    events, previous = [], ""
    for number, line in enumerate(read_lines(path), start=1):
        record = json.loads(line)
        if record.get("previous") != previous:
            raise AuditLogError(f"audit log {path} was altered at line {number}")
        events.append(record)
        previous = sha256_text(line)
    return events


def read_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
