"""A data owner's node identity: its key pair, the join bundle, and the CA it trusts.

The private key never leaves NODE/ (0600); the operator receives NODE/node.pub and
sends back a join bundle, which is only accepted if it was issued for this key.

A bundle cannot vouch for itself: anyone who can hand the owner a file can put their
own CA and Fleet address in it and recompute its fingerprint. So the owner pins the
CA fingerprint the operator read out to them (`client start --ca-fingerprint`) on the
first join; it is kept in NODE/pinned-ca.json and every later bundle must match it.
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

from fedmodel.pki import (
    BundleError,
    JoinBundle,
    NodeIdentity,
    create_node_identity,
    public_key_fingerprint,
    write_private_file,
)

PIN_FILE = "pinned-ca.json"


class IdentityError(BundleError):
    """The node directory has no identity, or the bundle belongs to another key."""


class UntrustedCaError(BundleError):
    """The bundle's CA is not the one the owner pinned, or none is pinned yet."""


def init_node(directory: Path, force: bool = False) -> NodeIdentity:
    """Create NODE/node.key (OpenSSH EC P-384, 0600) and NODE/node.pub."""
    return create_node_identity(directory.absolute(), force=force)


def node_identity(directory: Path) -> NodeIdentity:
    """The identity `init_node` created in `directory`, checked to exist."""
    private, public = directory / "node.key", directory / "node.pub"
    if not private.is_file() or not public.is_file():
        raise IdentityError(
            f"{directory} has no node identity; run 'fedmodel client init --dir {directory}'"
        )
    return NodeIdentity(
        private.absolute(), public.absolute(), public_key_fingerprint(public.read_bytes())
    )


def load_join_bundle(path: Path, identity: NodeIdentity) -> JoinBundle:
    """The bundle at `path`, refused unless it was issued for `identity`'s key."""
    bundle = JoinBundle.load(path)
    if bundle.node_fingerprint != identity.fingerprint:
        raise IdentityError(
            f"join bundle {path} was issued for key {bundle.node_fingerprint}, but this node's "
            f"key is {identity.fingerprint}; send {identity.public_key} to the operator"
        )
    return bundle


def canonical_ca_fingerprint(text: str) -> str:
    """`text` as `certificate_fingerprint` writes it ("sha256:AB:CD:..."): an optional
    "sha256:" prefix, colons and case are whatever the operator's reading left."""
    digits = re.sub(r"^sha256:", "", text.strip(), flags=re.IGNORECASE).replace(":", "")
    if not re.fullmatch(r"[0-9A-Fa-f]{64}", digits):
        raise UntrustedCaError(
            f"--ca-fingerprint must be a SHA-256 fingerprint (64 hex digits, colons optional), "
            f"got '{text}'"
        )
    digits = digits.upper()
    return "sha256:" + ":".join(digits[i : i + 2] for i in range(0, 64, 2))


def pinned_ca_fingerprint(directory: Path) -> str | None:
    """The CA fingerprint pinned in NODE/pinned-ca.json; None before the first join."""
    path = directory / PIN_FILE
    try:
        return canonical_ca_fingerprint(str(json.loads(path.read_text())["ca-fingerprint"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        raise UntrustedCaError(
            f"{path} is damaged; delete it and pass the CA fingerprint the operator read out "
            "to you with --ca-fingerprint"
        ) from None


def trusted_join_bundle(
    path: Path, identity: NodeIdentity, directory: Path, ca_fingerprint: str | None
) -> JoinBundle:
    """The bundle at `path`, refused unless its CA is the one the owner pinned.

    On the first join the pin is `ca_fingerprint` (what the operator read out), and is
    stored in NODE/pinned-ca.json (0600) once the bundle matches it. Later joins check
    against the stored pin; `ca_fingerprint` may repeat it but never replace it.
    """
    bundle = load_join_bundle(path, identity)
    offered = bundle.ca_fingerprint
    pinned = pinned_ca_fingerprint(directory)
    given = None if ca_fingerprint is None else canonical_ca_fingerprint(ca_fingerprint)
    if pinned is not None and given not in (None, pinned):
        raise UntrustedCaError(
            f"--ca-fingerprint {given} differs from the CA pinned for this node ({pinned}); "
            f"if the operator really replaced their CA, delete {directory / PIN_FILE} and "
            "start again with the new fingerprint they read out to you"
        )
    expected = pinned or given
    if expected is None:
        raise UntrustedCaError(
            f"join bundle {path} names CA {offered}; compare it with the CA fingerprint the "
            "operator read out to you, and if it is the same pass it with --ca-fingerprint"
        )
    if offered != expected:
        source = "pinned for this node" if pinned else "given with --ca-fingerprint"
        raise UntrustedCaError(
            f"join bundle {path} names CA {offered}, not the CA {expected} {source}; "
            "do not join with it: ask the operator for the right bundle"
        )
    if pinned is None:
        pin = {
            "ca-fingerprint": offered,
            "pinned-at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        write_private_file(directory / PIN_FILE, (json.dumps(pin) + "\n").encode())
    return bundle
