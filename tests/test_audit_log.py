"""Audit logs: a keyed log cannot be rewritten, truncated or corrupted without it showing."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from fedmodel.audit_log import AuditLog, AuditLogError, sha256_text

KEY = secrets.token_bytes(32)


def _log(tmp_path: Path, events: int = 3) -> AuditLog:
    log = AuditLog(tmp_path / "audit.jsonl", KEY)
    for number in range(events):
        log.append("enrolled", node=f"node-{number}")
    return log


def _rechain(records: list[dict[str, object]]) -> str:
    """What a forger without the key can do: fix every `previous` after an edit."""
    lines, previous = [], ""
    for record in records:
        line = json.dumps({**record, "previous": previous}, sort_keys=True)
        lines.append(line)
        previous = sha256_text(line)
    return "\n".join(lines) + "\n"


def test_a_rewrite_with_a_recomputed_chain_is_detected(tmp_path: Path) -> None:
    log = _log(tmp_path)
    records = [json.loads(line) for line in log.path.read_text().splitlines()]
    records[1]["node"] = "intruder"
    log.path.write_text(_rechain(records))
    assert AuditLog(log.path).verify()  # the bare chain is fine: only the MAC catches it
    with pytest.raises(AuditLogError, match="line 2 is not authentic"):
        log.verify()
    log.path.write_text(_rechain([{k: v for k, v in r.items() if k != "mac"} for r in records]))
    with pytest.raises(AuditLogError, match="line 1 is not authentic"):
        log.verify()


def test_truncation_is_detected_by_the_head(tmp_path: Path) -> None:
    log = _log(tmp_path)
    lines = log.path.read_text().splitlines()
    log.path.write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(AuditLogError, match="does not hold its head at line 3"):
        log.verify()
    head = json.loads(log.head_path.read_text())
    log.head_path.write_text(json.dumps({**head, "entries": 2, "last": sha256_text(lines[1])}))
    with pytest.raises(AuditLogError, match="not authentic"):
        log.verify()  # the head cannot be moved back without the key
    log.path.unlink()
    with pytest.raises(AuditLogError, match="missing but its head exists"):
        log.verify()


def test_only_an_anchor_kept_elsewhere_catches_the_key_holder(tmp_path: Path) -> None:
    """Whoever holds the key can write a whole new log; the anchor the operator wrote
    down still tells."""
    log = _log(tmp_path)
    anchor = log.head()
    assert len(log.verify(anchor)) == 3
    log.path.unlink()
    for node in ("node-0", "node-1", "nobody", "node-2"):  # a forged history, MACs valid
        log.append("enrolled", node=node)
    assert len(log.verify()) == 4
    with pytest.raises(AuditLogError, match="does not hold its anchor at line 3"):
        log.verify(anchor)
    with pytest.raises(AuditLogError, match="not of the form N:SHA256"):
        log.verify("3:nothex")


def test_concurrent_appends_from_processes_keep_the_chain_valid(tmp_path: Path) -> None:
    path, start, writers, each = tmp_path / "audit.jsonl", tmp_path / "go", 6, 40
    script = (
        "import sys; from pathlib import Path; from fedmodel.audit_log import AuditLog\n"
        "log = AuditLog(Path(sys.argv[1]), bytes.fromhex(sys.argv[2]))\n"
        "while not Path(sys.argv[4]).exists(): pass\n"  # all start appending at once
        f"for n in range({each}): log.append('refused', writer=sys.argv[3], n=n)\n"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(path), KEY.hex(), str(writer), str(start)]
        )
        for writer in range(writers)
    ]
    start.touch()
    assert [process.wait(timeout=60) for process in processes] == [0] * writers
    events = AuditLog(path, KEY).verify()
    assert len(events) == writers * each
    assert {(e["writer"], e["n"]) for e in events} == {
        (str(w), n) for w in range(writers) for n in range(each)
    }


def test_a_malformed_line_is_one_error_naming_file_and_line(tmp_path: Path) -> None:
    log = _log(tmp_path, events=2)
    lines = log.path.read_text().splitlines()
    log.path.write_text(f"{lines[0]}\n{{not json\n{lines[1]}\n")
    with pytest.raises(AuditLogError) as raised:
        log.verify()
    assert str(raised.value) == f"audit log {log.path} line 2 is malformed (not a JSON object " \
        "with time, event and previous)"  # fmt: skip


def test_an_unkeyed_log_is_a_plain_chain(tmp_path: Path) -> None:
    """A node's own log: no key, so the chain is all it has, and no head is written."""
    log = AuditLog(tmp_path / "node-audit.jsonl")
    log.append("served", run=1)
    log.append("refused", run=1, reason="budget")
    assert [e["event"] for e in log.verify()] == ["served", "refused"]
    assert "mac" not in log.path.read_text() and not log.head_path.exists()
    assert log.path.stat().st_mode & 0o077 == 0
