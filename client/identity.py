"""A data owner's node identity: its key pair, and the join bundle it was enrolled with.

The private key never leaves NODE/ (0600); the operator receives NODE/node.pub and
sends back a join bundle, which is only accepted if it was issued for this key.
"""

from __future__ import annotations

from pathlib import Path

from fedmodel.pki import (
    BundleError,
    JoinBundle,
    NodeIdentity,
    create_node_identity,
    public_key_fingerprint,
)


class IdentityError(BundleError):
    """The node directory has no identity, or the bundle belongs to another key."""


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
