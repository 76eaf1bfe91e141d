"""A machine-wide memo of pure accounting computations: Opacus's own answers, once each.

Two computations dominate a simulated DP client's round when clients differ in size
(shared/notes/perf-baseline.md; issue 7): calibrating the noise multiplier (a binary
search over Opacus's RDP accountant, about ten epsilon evaluations, around a second of
CPU) and the per-step RDP curve of a new (noise multiplier, sample rate) (one such
evaluation). Each is a pure function of its inputs and Opacus's version, and every
simulation worker and every run used to repeat them. They are kept in a small SQLite
file that all workers and later runs read, as float64 bytes: the same numbers bit for
bit, computed once per machine. A cache that cannot be read or written never fails a
run; it only costs time.

Location: $FEDMODEL_CACHE_DIR, else $XDG_CACHE_HOME/fedmodel, else ~/.cache/fedmodel.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np

CACHE_DIR_VARIABLE = "FEDMODEL_CACHE_DIR"
CACHE_FILE = "accounting.sqlite"


def cache_path() -> Path:
    """Where results are kept (see the module docstring)."""
    if directory := os.environ.get(CACHE_DIR_VARIABLE):
        return Path(directory) / CACHE_FILE
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedmodel" / CACHE_FILE


def remembered(
    name: str, inputs: tuple[float | int | str, ...], compute: Callable[[], np.ndarray]
) -> np.ndarray:
    """`compute()` (float64 values) for these exact inputs, stored on first use.

    The key is `name`, Opacus's version and the exact repr of every input.
    """
    key = json.dumps([name, version("opacus"), *map(repr, inputs)])
    try:
        with _connect() as connection:
            found = connection.execute("SELECT value FROM memo WHERE key = ?", (key,)).fetchone()
    except (sqlite3.Error, OSError):
        return compute()
    if found is not None:
        return np.frombuffer(found[0], dtype=np.float64).copy()
    value = np.asarray(compute(), dtype=np.float64)
    try:
        with _connect() as connection:
            connection.execute(
                "INSERT OR IGNORE INTO memo (key, value) VALUES (?, ?)", (key, value.tobytes())
            )
    except (sqlite3.Error, OSError):
        pass
    return value


def _connect() -> sqlite3.Connection:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=30)
    connection.execute("CREATE TABLE IF NOT EXISTS memo (key TEXT PRIMARY KEY, value BLOB)")
    return connection
