"""Advisory file locks (POSIX `flock`) for files several FedModel processes write.

Concurrent `fedmodel server enroll` runs, or a node's executor answering two tasks at
once, would otherwise interleave read-modify-write cycles and lose updates. The lock
belongs to the open descriptor, so a holder that crashes releases it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def locked_descriptor(path: Path, flags: int, shared: bool = False) -> Iterator[int]:
    """`path` opened with `flags` (created 0600 if O_CREAT) and flock-ed while the block runs."""
    descriptor = os.open(path, flags, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield descriptor
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold the lock file `path` exclusively: one writer at a time across processes."""
    with locked_descriptor(path, os.O_RDWR | os.O_CREAT):
        yield
