"""Signatures on ledger entries with the node's key: who wrote the ledger, not only what.

The hash chain shows that entries were not edited after the fact; a signature over each
entry's hash with the node's private key (the EC P-384 key that also authenticates the
node to the SuperLink, fedmodel.pki) shows which node wrote them, so a ledger cannot be
rebuilt from scratch by someone without that key. Verification needs only the node's
public key (`node.pub`), which the federation already holds from enrollment.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmodel.errors import FedModelError


class LedgerSigner:
    """Signs entry hashes with a node's OpenSSH EC private key (ECDSA, SHA-384)."""

    def __init__(self, private_key_path: Path) -> None:
        try:
            key = serialization.load_ssh_private_key(Path(private_key_path).read_bytes(), None)
        except (OSError, ValueError) as error:
            raise FedModelError(f"cannot load node key {private_key_path} ({error})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise FedModelError(f"{private_key_path} is not an EC node key")
        self._key = key

    def __call__(self, entry_hash: str) -> str:
        return self._key.sign(entry_hash.encode(), ec.ECDSA(hashes.SHA384())).hex()


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """A node's OpenSSH public key (`node.pub`)."""
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as error:
        raise FedModelError(f"cannot load public key {path} ({error})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise FedModelError(f"{path} is not an EC public key")
    return key


def signature_is_valid(
    public_key: ec.EllipticCurvePublicKey, entry_hash: str, signature: str | None
) -> bool:
    if not signature:
        return False
    try:
        public_key.verify(bytes.fromhex(signature), entry_hash.encode(), ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        return False
    return True
