"""Enrollment and revocation of nodes, join bundles, and the server's audit log.

Flower's SuperNode registry (in the SuperLink's state.db) is the enforcement point:
`flwr supernode register` admits a public key, `unregister` cuts the node off at once
and blocks that key for good. We drive it through Flower's own CLI against the
federation's private connection, and keep beside it what Flower does not: a name per
node (nodes.json) and an append-only audit log (audit.jsonl) whose every entry carries
the SHA-256 of the line before it and an HMAC under DIR/audit.key (see
fedmodel/audit_log.py for what that does and does not prove).

Every change to the registry, the audit log or the refusal scan's offset happens under
one lock (DIR/federation.lock), held across Flower's register/unregister call too, so
concurrent `server enroll` runs neither lose entries nor enroll a name twice.

Refused connections are read from the SuperLink's log (Flower emits no event for
them). What the log shows: `ApiError:2004` (a key that is unknown or revoked; the key
is printed, so we can name the node), `ApiError:2001` (no key at all), and gRPC's
`Handshake failed` lines (plaintext or wrong-CA clients; gRPC gives no peer address).
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmodel.audit_log import AuditLog, AuditLogError, utc_now
from fedmodel.file_lock import exclusive_lock
from fedmodel.pki import (
    JoinBundle,
    load_node_public_key,
    private_directory,
    public_key_fingerprint,
    write_private_file,
    write_public_file,
)
from fedmodel.runtime.processes import plain_lines
from server.superlink import CONNECTION, Federation, ServerError, _executable, server_environment

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_PEM_KEY = re.compile(r"-----BEGIN PUBLIC KEY-----(?:\\n|\s)+(.+?)(?:\\n|\s)+-----END PUBLIC KEY")


def enroll_node(
    federation: Federation,
    public_key: Path,
    name: str,
    bundle_path: Path | None = None,
    max_rows: int | None = None,
) -> tuple[dict[str, Any], Path]:
    """Register `public_key` as node `name`; write and return its join bundle.

    `max_rows` caps the rows the node's update may weigh in aggregation (None: no cap
    beyond the aggregator's own rule); it is stored in the registry entry.
    """
    if not NAME_PATTERN.match(name):
        raise ServerError(
            f"node name '{name}' is not allowed; use letters, digits, '.', '_' or '-' "
            "(at most 63 characters, starting with a letter or digit)"
        )
    if max_rows is not None and (isinstance(max_rows, bool) or max_rows < 1):
        raise ServerError(f"--max-rows must be a positive whole number (got {max_rows})")
    key = load_node_public_key(public_key)
    fingerprint = public_key_fingerprint(key)
    with registry_lock(federation):
        registry = load_registry(federation)
        if name in registry:
            raise ServerError(f"a node named '{name}' is already enrolled; choose another --name")
        for other, existing in registry.items():
            if existing["fingerprint"] == fingerprint:
                raise ServerError(
                    f"this key is already enrolled as '{other}'"
                    + (" (revoked keys cannot be enrolled again; make a new one with "
                       "'fedmodel client init --force')" if existing["status"] == "revoked"
                       else "")
                )  # fmt: skip
        result = flwr_cli(federation, "supernode", "register", str(public_key), "--name", name)
        entry = {
            "name": name,
            "node_id": str(result["node-id"]),
            "fingerprint": fingerprint,
            "status": "enrolled",
            "enrolled_at": utc_now(),
            "max_rows": max_rows,
        }
        registry[name] = entry
        save_registry(federation, registry)
        append_audit(
            federation, "enrolled", node=name, node_id=entry["node_id"],
            fingerprint=fingerprint, max_rows=max_rows,
        )  # fmt: skip
    bundle = JoinBundle(
        node_name=name,
        fleet_address=federation.fleet_address,
        ca_certificate=federation.path("ca.crt").read_text(),
        node_fingerprint=fingerprint,
    )
    if bundle_path is None:
        bundle_path = private_directory(federation.path("bundles")) / f"{name}.join"
    bundle_path.parent.mkdir(parents=True, exist_ok=True)
    write_public_file(bundle_path, bundle.to_json().encode())
    return entry, bundle_path


def revoke_node(federation: Federation, name: str) -> dict[str, Any]:
    """Unregister node `name`: Flower disconnects it and never accepts its key again."""
    with registry_lock(federation):
        registry = load_registry(federation)
        if name not in registry:
            known = ", ".join(sorted(registry)) or "none enrolled"
            raise ServerError(f"no node named '{name}' (known: {known})")
        entry = registry[name]
        if entry["status"] == "revoked":
            raise ServerError(f"node '{name}' was already revoked at {entry['revoked_at']}")
        flwr_cli(federation, "supernode", "unregister", entry["node_id"])
        entry |= {"status": "revoked", "revoked_at": utc_now()}
        save_registry(federation, registry)
        append_audit(
            federation, "revoked", node=name, node_id=entry["node_id"],
            fingerprint=entry["fingerprint"],
        )  # fmt: skip
    return entry


NOT_ENROLLED = "(unenrolled)"


def list_nodes(federation: Federation) -> list[dict[str, Any]]:
    """Our registry joined with Flower's live status (online/offline/registered), then
    every node Flower registered outside FedModel (runs keep those out): name NOT_ENROLLED."""
    live = {
        str(node["node-id"]): node
        for node in flwr_cli(federation, "supernode", "list", verbose=True)["nodes"]
    }
    rows = []
    registry = load_registry(federation).values()
    for entry in registry:
        node = live.get(entry["node_id"], {})
        status = "revoked" if entry["status"] == "revoked" else node.get("status", "unknown")
        rows.append(
            {**entry, "status": status, "online_at": node.get("online-at"),
             "offline_at": node.get("offline-at")}
        )  # fmt: skip
    known = {entry["node_id"] for entry in registry}
    for node_id, node in live.items():
        if node_id not in known:
            rows.append(
                {"name": NOT_ENROLLED, "node_id": node_id, "status": node.get("status", "unknown"),
                 "fingerprint": "-", "enrolled_at": "-", "max_rows": None,
                 "online_at": node.get("online-at")}
            )  # fmt: skip
    return rows


def flwr_cli(federation: Federation, *arguments: str, verbose: bool = False) -> dict[str, Any]:
    """Run `flwr <arguments> fedmodel --format json` in the federation's FLWR_HOME."""
    command = [_executable("flwr"), *arguments, CONNECTION, "--format", "json"]
    if verbose:
        command.append("--verbose")
    done = subprocess.run(
        command,
        env=server_environment(federation),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    payload = _json_object(done.stdout)
    if done.returncode != 0 or not payload.get("success", False):
        reason = payload.get("error-message") or _last(done.stderr) or _last(done.stdout)
        unreachable = ("Connection refused", "ConnectError", "SuperLink is unavailable")
        if any(sign in reason for sign in unreachable):
            reason = (
                f"the SuperLink is not running; start it with "
                f"'fedmodel server start --dir {federation.directory}'"
            )
        raise ServerError(f"flwr {' '.join(arguments[:2])} failed: {reason}")
    return payload


# --- registry and audit log ------------------------------------------------------------


@contextmanager
def registry_lock(federation: Federation) -> Iterator[None]:
    """Exclusive hold on nodes.json, audit.jsonl, audit.key and audit.offset."""
    with exclusive_lock(federation.path("federation.lock")):
        yield


def load_registry(federation: Federation) -> dict[str, dict[str, Any]]:
    path = federation.path("nodes.json")
    return json.loads(path.read_text()) if path.exists() else {}


def save_registry(federation: Federation, registry: dict[str, dict[str, Any]]) -> None:
    write_public_file(
        federation.path("nodes.json"), (json.dumps(registry, indent=2) + "\n").encode()
    )


def append_audit(federation: Federation, event: str, **details: Any) -> dict[str, Any]:
    """Append one authenticated event to the audit log; the caller holds `registry_lock`."""
    log = AuditLog(federation.path("audit.jsonl"), audit_key(federation, create=True))
    return log.append(event, **details)


def verify_audit(
    federation: Federation, anchor: str | None = None
) -> tuple[list[dict[str, Any]], str]:
    """The audit events and the head ('N:SHA256') they end at, after checking chain, MACs,
    the recorded head and `anchor`; a failed check raises ServerError."""
    path = federation.path("audit.jsonl")
    with registry_lock(federation):
        key = audit_key(federation)
        if key is not None and not path.exists():
            raise ServerError(
                f"{path} is missing but {federation.path('audit.key')} exists: "
                "the audit log was deleted"
            )
        log = AuditLog(path, key)
        try:
            return log.verify(anchor), log.head()
        except AuditLogError as broken:
            raise ServerError(str(broken)) from None


def audit_key(federation: Federation, create: bool = False) -> bytes | None:
    """DIR/audit.key: born with the log (first append), so a key without a log means the
    log was deleted. None while neither exists."""
    key_path, log_path = federation.path("audit.key"), federation.path("audit.jsonl")
    if key_path.exists():
        return key_path.read_bytes()
    if log_path.exists():
        raise ServerError(
            f"{key_path} is missing, so {log_path} cannot be authenticated; restore the key "
            "from your backup"
        )
    if not create:
        return None
    key = secrets.token_bytes(32)
    write_private_file(key_path, key)
    return key


def record_refusals(federation: Federation) -> int:
    """Append audit events for refusals the SuperLink logged since the last scan."""
    if not federation.path("superlink.log").exists():
        return 0
    with registry_lock(federation):
        return _record_refusals(federation)


def _record_refusals(federation: Federation) -> int:
    log_path, offset_path = federation.path("superlink.log"), federation.path("audit.offset")
    offset = int(offset_path.read_text()) if offset_path.exists() else 0
    if offset > log_path.stat().st_size:  # the log was replaced
        offset = 0
    with log_path.open("rb") as log:
        log.seek(offset)
        data = log.read()
    complete = data.rsplit(b"\n", 1)[0] + b"\n" if b"\n" in data else b""
    refusals: dict[str, dict[str, Any]] = {}  # a retrying node repeats itself: count it
    for line in complete.decode(errors="replace").splitlines():
        refusal = parse_refusal(line, federation)
        if refusal is not None:
            key = json.dumps(refusal, sort_keys=True)
            refusals.setdefault(key, {**refusal, "count": 0})["count"] += 1
    for refusal in refusals.values():
        append_audit(federation, "refused", **refusal)
    found = len(refusals)
    write_public_file(offset_path, str(offset + len(complete)).encode())
    return found


def parse_refusal(line: str, federation: Federation | None = None) -> dict[str, Any] | None:
    """The refusal a SuperLink log line reports, if any, without key material."""
    line = " ".join(plain_lines(line))
    if "ApiError:2004" in line:
        refusal: dict[str, Any] = {"reason": "unknown or revoked node key (ApiError 2004)"}
        fingerprint = _fingerprint_in(line)
        if fingerprint:
            refusal["fingerprint"] = fingerprint
            if federation is not None:
                for entry in load_registry(federation).values():
                    if entry["fingerprint"] == fingerprint:
                        refusal |= {"node": entry["name"], "node_status": entry["status"]}
        return refusal
    if "ApiError:2001" in line:
        return {"reason": "node presented no authentication key (ApiError 2001)"}
    if "Handshake failed" in line or "handshake failed" in line:
        if "WRONG_VERSION_NUMBER" in line or "HTTP_REQUEST" in line:
            return {"reason": "TLS handshake failed (client did not speak TLS: plaintext node)"}
        detail = re.search(r"OPENSSL_internal:([A-Z0-9_]+)", line)
        cause = detail.group(1) if detail else "unknown cause"
        return {"reason": f"TLS handshake failed ({cause}; a node that does not trust our CA?)"}
    return None


def _fingerprint_in(line: str) -> str | None:
    match = _PEM_KEY.search(line)
    if not match:
        return None
    body = re.sub(r"\\n|\s", "", match.group(1))
    try:
        key = serialization.load_der_public_key(base64.b64decode(body))
    except ValueError:
        return None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return None
    return public_key_fingerprint(key)


def _json_object(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    start = text.find("{")
    if start >= 0:
        try:
            value = json.loads(text[start:])
            return value if isinstance(value, dict) else {}
        except json.JSONDecodeError:
            pass
    return {}


def _last(text: str) -> str:
    lines = [line for line in plain_lines(text) if line]
    return lines[-1] if lines else ""
