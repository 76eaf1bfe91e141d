"""Keys and certificates of a federation: a CA, the SuperLink's TLS certificate, node keys.

Everything is EC P-384 (`cryptography`). TLS in Flower 1.39 authenticates the server
only; a node proves who it is by signing every Fleet request with its own key, which
Flower reads in OpenSSH format only (it rejects PEM private keys and Ed25519). Private
keys are created with mode 0600 from the first byte (never chmod-ed afterwards) and
reach their final name by an atomic rename, so no reader ever sees a partial or
world-readable key. Modes never depend on the umask: directories holding keys are
0700 and public files 0644, set explicitly.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmodel.errors import ExitCode, FedModelError

CURVE = ec.SECP384R1()
CA_LIFETIME = datetime.timedelta(days=3650)
SERVER_LIFETIME = datetime.timedelta(days=397)  # the CA/Browser Forum's cap for TLS certs
LOOPBACK_NAMES = ("localhost", "127.0.0.1")


class KeyExistsError(FedModelError):
    """A key file exists and the user did not ask to replace it."""

    exit_code = ExitCode.KEY_EXISTS


class CertificateError(FedModelError):
    """A certificate or key file is missing, unreadable or of the wrong kind."""

    exit_code = ExitCode.CERTIFICATE


@dataclass(frozen=True)
class ServerPki:
    """Where `create_server_pki` put the federation's TLS files."""

    ca_certificate: Path
    ca_key: Path
    server_certificate: Path
    server_key: Path
    ca_fingerprint: str


@dataclass(frozen=True)
class NodeIdentity:
    """A node's key pair on disk and the fingerprint an operator checks at enrollment."""

    private_key: Path
    public_key: Path
    fingerprint: str


def create_server_pki(directory: Path, addresses: list[str], force: bool = False) -> ServerPki:
    """A CA and a server certificate for `addresses` (plus localhost and 127.0.0.1)."""
    paths = server_pki_paths(directory)
    if not force:
        for key in (paths.ca_key, paths.server_key):
            if key.exists():
                raise KeyExistsError(f"{key} already exists; pass --force to replace the keys")
    private_directory(directory)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(CURVE)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FedModel federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )
    write_private_file(paths.ca_key, _pem_private(ca_key), force)
    write_public_file(paths.ca_certificate, ca_cert.public_bytes(serialization.Encoding.PEM))
    _issue_server_certificate(paths, ca_key, ca_cert, addresses, force)
    return ServerPki(
        paths.ca_certificate, paths.ca_key, paths.server_certificate, paths.server_key,
        certificate_fingerprint(ca_cert),
    )  # fmt: skip


def renew_server_certificate(directory: Path, addresses: list[str]) -> x509.Certificate:
    """A new server key and certificate from the same CA, so every join bundle stays valid."""
    paths = server_pki_paths(directory)
    try:
        ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), None)
        ca_cert = load_certificate_bytes(paths.ca_certificate.read_bytes())
    except FileNotFoundError as missing:
        raise CertificateError(
            f"{missing.filename} is missing; renewal needs the federation's CA key and "
            "certificate (bring ca.key back from where you keep it)"
        ) from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or (
        ca_key.public_key() != ca_cert.public_key()
    ):
        raise CertificateError(f"{paths.ca_key} is not the key of {paths.ca_certificate}")
    return _issue_server_certificate(paths, ca_key, ca_cert, addresses, force=True)


def server_pki_paths(directory: Path) -> ServerPki:
    return ServerPki(
        directory / "ca.crt", directory / "ca.key", directory / "server.pem",
        directory / "server.key", "",
    )  # fmt: skip


def _issue_server_certificate(
    paths: ServerPki,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    addresses: list[str],
    force: bool,
) -> x509.Certificate:
    """A fresh server key and a SERVER_LIFETIME certificate for it, signed by the CA."""
    now = datetime.datetime.now(datetime.UTC)
    server_key = ec.generate_private_key(CURVE)
    names = list(dict.fromkeys([*addresses, *LOOPBACK_NAMES]))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + SERVER_LIFETIME)
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    write_private_file(paths.server_key, _pem_private(server_key), force)
    write_public_file(
        paths.server_certificate, server_cert.public_bytes(serialization.Encoding.PEM)
    )
    return server_cert


def create_node_identity(directory: Path, force: bool = False) -> NodeIdentity:
    """An OpenSSH EC P-384 key pair `node.key` / `node.pub`, the form Flower accepts."""
    private_path, public_path = directory / "node.key", directory / "node.pub"
    if private_path.exists() and not force:
        raise KeyExistsError(
            f"{private_path} already exists; this node already has an identity "
            "(pass --force to replace it, which requires enrolling again)"
        )
    private_directory(directory)
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    write_private_file(private_path, private, force)
    write_public_file(public_path, public + b" fedmodel-node\n")
    return NodeIdentity(private_path, public_path, public_key_fingerprint(public))


def load_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """A node's OpenSSH public key, refused unless it is EC on a NIST curve (Flower's rule)."""
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except FileNotFoundError:
        raise CertificateError(f"public key file {path} does not exist") from None
    except (ValueError, UnsupportedAlgorithm) as error:
        raise CertificateError(f"{path} is not an OpenSSH public key ({error})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertificateError(
            f"{path} is a {type(key).__name__.removeprefix('_')}, but Flower needs an EC "
            "(P-384) key; create one with 'fedmodel client init'"
        )
    return key


def public_key_fingerprint(public_key: bytes | ec.EllipticCurvePublicKey) -> str:
    """OpenSSH-style fingerprint (`SHA256:` + unpadded base64), as `ssh-keygen -l` prints."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key = public_key.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    blob = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def certificate_fingerprint(certificate: x509.Certificate | bytes) -> str:
    """SHA-256 of the DER certificate as colon-separated hex (what `openssl x509` shows)."""
    if isinstance(certificate, bytes):
        certificate = load_certificate_bytes(certificate)
    digest = certificate.fingerprint(hashes.SHA256()).hex().upper()
    return "sha256:" + ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def load_certificate_bytes(data: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertificateError("not a PEM X.509 certificate") from None


def certificate_names(certificate: x509.Certificate) -> list[str]:
    """DNS names and IP addresses the certificate is valid for."""
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in names.get_values_for_type(x509.DNSName)] + [
        str(v) for v in names.get_values_for_type(x509.IPAddress)
    ]


def write_private_file(path: Path, data: bytes, force: bool = False) -> None:
    """Write a secret: created 0600 (O_EXCL, so never through a pre-existing file), renamed."""
    if path.exists() and not force:
        raise KeyExistsError(f"{path} already exists; pass --force to replace it")
    _write_atomically(path, data, 0o600, os.O_EXCL)


def write_public_file(path: Path, data: bytes) -> None:
    """Write a non-secret file atomically (temp file, then rename), 0644 whatever the umask."""
    _write_atomically(path, data, 0o644, os.O_TRUNC)


def _write_atomically(path: Path, data: bytes, mode: int, flag: int) -> None:
    """Through a temp file of exactly `mode` (fchmod-ed: the umask cannot change it), renamed."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | flag, mode)
    try:
        os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def private_directory(path: Path) -> Path:
    """Create `path` if needed and make it 0700: it holds keys, a registry or a ledger."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


BUNDLE_FORMAT = "fedmodel-join/1"


class BundleError(FedModelError):
    """A join bundle that is unreadable, inconsistent or issued for another node."""

    exit_code = ExitCode.JOIN_BUNDLE


@dataclass(frozen=True)
class JoinBundle:
    """What an operator hands a data owner to join: where to dial and which CA to trust.

    The CA fingerprint is stored beside the certificate so the owner can compare it,
    out of band, with what the operator reads to them; `load` refuses a bundle whose
    certificate does not match its own fingerprint. Contains no secret.
    """

    node_name: str
    fleet_address: str
    ca_certificate: str
    node_fingerprint: str

    @property
    def ca_fingerprint(self) -> str:
        return certificate_fingerprint(self.ca_certificate.encode())

    def to_json(self) -> str:
        import json

        return (
            json.dumps(
                {
                    "format": BUNDLE_FORMAT,
                    "node-name": self.node_name,
                    "fleet-address": self.fleet_address,
                    "ca-fingerprint": self.ca_fingerprint,
                    "node-key-fingerprint": self.node_fingerprint,
                    "ca-certificate": self.ca_certificate,
                },
                indent=2,
            )
            + "\n"
        )

    @classmethod
    def load(cls, path: Path) -> JoinBundle:
        """Read and check a bundle; every problem is one BundleError line."""
        import json

        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise BundleError(f"join bundle {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise BundleError(
                f"join bundle {path} is not a FedModel join bundle (unreadable JSON)"
            ) from None
        if not isinstance(raw, dict) or raw.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"join bundle {path} is not a {BUNDLE_FORMAT} bundle")
        try:
            bundle = cls(
                node_name=str(raw["node-name"]),
                fleet_address=str(raw["fleet-address"]),
                ca_certificate=str(raw["ca-certificate"]),
                node_fingerprint=str(raw["node-key-fingerprint"]),
            )
            expected = str(raw["ca-fingerprint"])
        except KeyError as missing:
            raise BundleError(f"join bundle {path} lacks {missing}") from None
        try:
            actual = bundle.ca_fingerprint
        except CertificateError:
            raise BundleError(f"join bundle {path} holds no valid CA certificate") from None
        if actual != expected:
            raise BundleError(
                f"join bundle {path}: the CA certificate does not match its fingerprint "
                "(the file was altered); ask the operator for a new bundle"
            )
        if bundle.fleet_address.rpartition(":")[2].isdigit() is False:
            raise BundleError(f"join bundle {path}: fleet address lacks a port")
        return bundle
