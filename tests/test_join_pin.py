"""A join the owner can verify: the bundle's CA must be the one the operator read out.

The attacker here can hand the owner any file: a bundle naming their own CA and Fleet
address, its self-check fingerprint recomputed, passes `JoinBundle.load`. Only the
fingerprint the owner pinned decides.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from client.identity import (
    PIN_FILE,
    UntrustedCaError,
    canonical_ca_fingerprint,
    pinned_ca_fingerprint,
    trusted_join_bundle,
)
from fedmodel.pki import JoinBundle, NodeIdentity, create_node_identity, create_server_pki
from tests.federation import fedmodel


def _bundle(path: Path, ca_directory: Path, fleet: str, node: NodeIdentity) -> str:
    """Write a join bundle for `node` trusting a fresh CA in `ca_directory`; its fingerprint."""
    pki = create_server_pki(ca_directory, ["127.0.0.1"])
    bundle = JoinBundle("hospital-a", fleet, pki.ca_certificate.read_text(), node.fingerprint)
    path.write_text(bundle.to_json())  # to_json writes the CA's own fingerprint beside it
    assert JoinBundle.load(path).ca_fingerprint == pki.ca_fingerprint  # self-consistent
    return pki.ca_fingerprint


@pytest.fixture
def node(tmp_path: Path) -> NodeIdentity:
    return create_node_identity(tmp_path / "node")


@pytest.fixture
def fingerprints(tmp_path: Path, node: NodeIdentity) -> tuple[str, str]:
    """honest.join from the operator, forged.join from an attacker: their CAs' fingerprints."""
    operator = _bundle(tmp_path / "honest.join", tmp_path / "operator", "127.0.0.1:9092", node)
    forged = _bundle(tmp_path / "forged.join", tmp_path / "attacker", "203.0.113.7:9092", node)
    return operator, forged


def test_a_tampered_bundle_is_refused_without_the_operators_fingerprint(
    tmp_path: Path, node: NodeIdentity, fingerprints: tuple[str, str]
) -> None:
    operator, forged = fingerprints
    directory = tmp_path / "node"

    with pytest.raises(UntrustedCaError) as unpinned:  # first join, no fingerprint given
        trusted_join_bundle(tmp_path / "forged.join", node, directory, None)
    assert forged in str(unpinned.value) and "--ca-fingerprint" in str(unpinned.value)
    with pytest.raises(UntrustedCaError) as mismatch:
        trusted_join_bundle(tmp_path / "forged.join", node, directory, operator)
    assert forged in str(mismatch.value) and operator in str(mismatch.value)
    assert pinned_ca_fingerprint(directory) is None  # nothing was trusted


def test_the_operators_fingerprint_is_pinned_and_every_later_bundle_must_match_it(
    tmp_path: Path, node: NodeIdentity, fingerprints: tuple[str, str]
) -> None:
    operator, forged = fingerprints
    directory = tmp_path / "node"
    as_read_out = operator.removeprefix("sha256:").replace(":", "").lower()

    bundle = trusted_join_bundle(tmp_path / "honest.join", node, directory, as_read_out)
    assert bundle.fleet_address == "127.0.0.1:9092"
    assert pinned_ca_fingerprint(directory) == operator
    assert stat.S_IMODE((directory / PIN_FILE).stat().st_mode) == 0o600

    with pytest.raises(UntrustedCaError) as later:  # a later start, no flag: the stored pin
        trusted_join_bundle(tmp_path / "forged.join", node, directory, None)
    assert forged in str(later.value) and operator in str(later.value)
    with pytest.raises(UntrustedCaError, match="differs from the CA pinned"):
        trusted_join_bundle(tmp_path / "forged.join", node, directory, forged)  # no re-pinning
    assert trusted_join_bundle(tmp_path / "honest.join", node, directory, None) == bundle
    assert pinned_ca_fingerprint(directory) == operator


def test_a_fingerprint_is_read_however_the_operator_spelled_it() -> None:
    canonical = "sha256:" + ":".join(["AB"] * 32)
    for spelling in ("ab" * 32, "AB" * 32, ":".join(["ab"] * 32), canonical.lower(), canonical):
        assert canonical_ca_fingerprint(f" {spelling} ") == canonical
    for wrong in ("ab" * 31, "zz" * 32, "SHA256:" + "ab" * 33, ""):
        with pytest.raises(UntrustedCaError, match="64 hex digits"):
            canonical_ca_fingerprint(wrong)


def test_client_status_prints_a_pinned_fingerprint_verbatim(tmp_path: Path) -> None:
    """Rich would turn ':AB:' into an emoji; one fingerprint in eight has such a pair."""
    node = tmp_path / "node"
    assert fedmodel("client", "init", "--dir", node, "--budget-epsilon", "1").returncode == 0
    fingerprint = "sha256:" + ":".join(["AB", "CD"] * 16)
    (node / PIN_FILE).write_text(json.dumps({"ca-fingerprint": fingerprint}))
    status = fedmodel("client", "status", "--dir", node)
    assert status.returncode == 0, status.stderr
    assert f"Federation CA pinned: {fingerprint}" in status.stdout
