"""PKI: the CA, server certificate and node keys are what Flower and TLS clients accept."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedmodel.pki import (
    CertificateError,
    KeyExistsError,
    certificate_fingerprint,
    certificate_names,
    create_node_identity,
    create_server_pki,
    load_node_public_key,
    public_key_fingerprint,
    renew_server_certificate,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_is_signed_by_the_ca_and_covers_every_address(tmp_path: Path) -> None:
    pki = create_server_pki(tmp_path, ["fl.hospital.example", "10.1.2.3"])
    ca = x509.load_pem_x509_certificate(pki.ca_certificate.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_certificate.read_bytes())
    server.verify_directly_issued_by(ca)
    assert set(certificate_names(server)) == {
        "fl.hospital.example", "localhost", "10.1.2.3", "127.0.0.1",
    }  # fmt: skip
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert 300 < lifetime.days <= 398
    assert pki.ca_fingerprint == certificate_fingerprint(pki.ca_certificate.read_bytes())
    assert pki.ca_fingerprint.startswith("sha256:") and len(pki.ca_fingerprint) == 7 + 95


def test_private_keys_are_0600_and_public_files_are_not_secret(tmp_path: Path) -> None:
    pki = create_server_pki(tmp_path / "server", ["127.0.0.1"])
    node = create_node_identity(tmp_path / "node")
    for key in (pki.ca_key, pki.server_key, node.private_key):
        assert _mode(key) == 0o600, key
    assert _mode(node.public_key) == 0o644  # readable: it is meant to be sent to the operator
    assert not list(tmp_path.rglob("*.partial"))


def test_existing_keys_are_not_overwritten_without_force(tmp_path: Path) -> None:
    create_server_pki(tmp_path, ["127.0.0.1"])
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(KeyExistsError, match="pass --force"):
        create_server_pki(tmp_path, ["127.0.0.1"])
    assert (tmp_path / "ca.key").read_bytes() == before
    create_server_pki(tmp_path, ["127.0.0.1"], force=True)
    assert (tmp_path / "ca.key").read_bytes() != before
    assert _mode(tmp_path / "ca.key") == 0o600
    create_node_identity(tmp_path / "n")
    with pytest.raises(KeyExistsError, match="already has an identity"):
        create_node_identity(tmp_path / "n")


def test_node_key_is_openssh_p384_that_flower_loads(tmp_path: Path) -> None:
    node = create_node_identity(tmp_path)
    assert node.private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert node.public_key.read_bytes().startswith(b"ecdsa-sha2-nistp384 ")
    private = serialization.load_ssh_private_key(node.private_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    # Flower's own loader for `flwr supernode register` accepts it
    from flwr.cli.supernode.register import try_load_public_key

    assert try_load_public_key(node.public_key)
    assert load_node_public_key(node.public_key).curve.name == "secp384r1"


def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    node = create_node_identity(tmp_path)
    try:
        shown = subprocess.run(
            ["ssh-keygen", "-l", "-f", str(node.public_key)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    except FileNotFoundError:
        pytest.skip("ssh-keygen is not installed")
    assert node.fingerprint in shown
    assert node.fingerprint == public_key_fingerprint(node.public_key.read_bytes())


def test_ed25519_public_key_is_refused_with_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "ed.pub"
    path.write_bytes(
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(CertificateError, match="fedmodel client init"):
        load_node_public_key(path)
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(CertificateError, match="not an OpenSSH public key"):
        load_node_public_key(tmp_path / "junk.pub")


def test_renewed_server_certificate_comes_from_the_same_ca(tmp_path: Path) -> None:
    pki = create_server_pki(tmp_path, ["fl.example"])
    old_cert, old_key = pki.server_certificate.read_bytes(), pki.server_key.read_bytes()
    renewed = renew_server_certificate(tmp_path, ["fl.example"])
    ca = x509.load_pem_x509_certificate(pki.ca_certificate.read_bytes())
    served = x509.load_pem_x509_certificate(pki.server_certificate.read_bytes())
    assert served == renewed and served.public_bytes(serialization.Encoding.PEM) != old_cert
    served.verify_directly_issued_by(ca)
    assert pki.server_key.read_bytes() != old_key and _mode(pki.server_key) == 0o600
    assert certificate_fingerprint(pki.ca_certificate.read_bytes()) == pki.ca_fingerprint
    assert (served.not_valid_after_utc - served.not_valid_before_utc).days == 397
    assert set(certificate_names(served)) == {"fl.example", "localhost", "127.0.0.1"}
    pki.ca_key.unlink()
    with pytest.raises(CertificateError, match="ca.key is missing"):
        renew_server_certificate(tmp_path, ["fl.example"])


def test_modes_do_not_follow_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        pki = create_server_pki(tmp_path / "server", ["127.0.0.1"])
        node = create_node_identity(tmp_path / "node")
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "server") == _mode(tmp_path / "node") == 0o700
    assert _mode(pki.ca_certificate) == _mode(pki.server_certificate) == 0o644
    assert _mode(node.public_key) == 0o644
    assert _mode(pki.ca_key) == _mode(node.private_key) == 0o600
