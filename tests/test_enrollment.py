"""Audit log and refusal parsing: what the operator's records say, from real log lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from fedmodel.pki import create_node_identity
from server.enrollment import (
    append_audit,
    enroll_node,
    parse_refusal,
    record_refusals,
    registry_lock,
    save_registry,
    verify_audit,
)
from server.superlink import Federation, ServerError


def _federation(tmp_path: Path) -> Federation:
    return Federation(tmp_path, ("127.0.0.1",), "127.0.0.1", 29092, 29093)


def superlink_2004_line(public_key_path: Path) -> str:
    """The line Flower 1.39's SuperLink logs for an unknown key (format copied from it)."""
    key = serialization.load_ssh_public_key(public_key_path.read_bytes())
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return (
        "\x1b[91mERROR \x1b[0m:     [/flwr.proto.Fleet/ActivateNode][ApiError:2004] Attempted "
        f"to register SuperNode with public key: {pem!r}, exception: No SuperNode found"
    )


def test_unknown_key_refusal_names_the_revoked_node_without_key_material(tmp_path: Path) -> None:
    federation = _federation(tmp_path)
    node = create_node_identity(tmp_path / "node")
    save_registry(
        federation,
        {"hospital-c": {"name": "hospital-c", "node_id": "7", "fingerprint": node.fingerprint,
                        "status": "revoked"}},
    )  # fmt: skip
    line = superlink_2004_line(node.public_key)
    (tmp_path / "superlink.log").write_text("INFO : started\n" + (line + "\n") * 3)
    assert record_refusals(federation) == 1  # a retrying node is one event with a count
    assert record_refusals(federation) == 0  # the scan resumes where it stopped
    (event,) = [e for e in verify_audit(federation)[0] if e["event"] == "refused"]
    assert event["node"] == "hospital-c" and event["node_status"] == "revoked"
    assert event["fingerprint"] == node.fingerprint and event["count"] == 3
    assert "BEGIN" not in (tmp_path / "audit.jsonl").read_text()


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (
            "I1128 14:58:19.555948 17611 ssl_transport_security.cc:2563] Handshake failed with "
            "error SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:"
            "WRONG_VERSION_NUMBER: Invalid certificate verification context",
            "plaintext",
        ),
        ("ERROR : [/flwr.proto.Fleet/ActivateNode][ApiError:2001] no key", "no authentication"),
        ("INFO : [Fleet.PushMessages] Push replies from node_id=1", None),
    ],
)
def test_refusal_lines_are_classified(line: str, reason: str | None) -> None:
    refusal = parse_refusal(line)
    assert (refusal is None) if reason is None else (reason in refusal["reason"])  # type: ignore[index]


def test_audit_log_is_authenticated_by_a_key_born_with_it(tmp_path: Path) -> None:
    federation = _federation(tmp_path)
    with registry_lock(federation):
        append_audit(federation, "enrolled", node="a")
        append_audit(federation, "revoked", node="a")
    events, head = verify_audit(federation)
    assert [e["event"] for e in events] == ["enrolled", "revoked"] and head.startswith("2:")
    for name in ("audit.jsonl", "audit.jsonl.head", "audit.key"):
        assert (tmp_path / name).stat().st_mode & 0o077 == 0, name
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    first = json.loads(lines[0]) | {"node": "b"}
    (tmp_path / "audit.jsonl").write_text(
        json.dumps(first, sort_keys=True) + "\n" + lines[1] + "\n"
    )
    with pytest.raises(ServerError, match="line 1 is not authentic"):
        verify_audit(federation)
    (tmp_path / "audit.jsonl").unlink()
    (tmp_path / "audit.jsonl.head").unlink()
    with pytest.raises(ServerError, match="audit.key exists: the audit log was deleted"):
        verify_audit(federation)
    (tmp_path / "audit.jsonl").write_text(lines[0] + "\n")
    (tmp_path / "audit.key").unlink()
    with pytest.raises(ServerError, match="audit.key is missing"):
        verify_audit(federation)


@pytest.mark.parametrize("max_rows", [0, -5, True])
def test_max_rows_must_be_a_positive_whole_number(tmp_path: Path, max_rows: int) -> None:
    node = create_node_identity(tmp_path / "node")
    with pytest.raises(ServerError, match="--max-rows must be a positive whole number"):
        enroll_node(_federation(tmp_path), node.public_key, "hospital-a", max_rows=max_rows)
    assert not (tmp_path / "nodes.json").exists()
