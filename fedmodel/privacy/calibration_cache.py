"""A machine-wide memo of noise calibrations: Opacus's own answers, each computed once.

Calibrating a noise multiplier is a binary search over Opacus's RDP accountant: about
ten epsilon evaluations, around a second of CPU. Simulated clients of different sizes
each need one per distinct (sample rate, steps), and every simulation worker and every
run used to repeat them (shared/notes/perf-baseline.md; issue 7). The answer is a pure
function of its inputs, the accountant and Opacus's version, so it is kept in a small
SQLite file that all workers and later runs read: the same numbers, computed once per
machine. A cache that cannot be read or written never fails a run; it only costs time.

Location: $FEDMODEL_CACHE_DIR, else $XDG_CACHE_HOME/fedmodel, else ~/.cache/fedmodel.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

CACHE_DIR_VARIABLE = "FEDMODEL_CACHE_DIR"
CACHE_FILE = "noise-calibration.sqlite"


def cache_path() -> Path:
    """Where calibrations are kept (see the module docstring)."""
    if directory := os.environ.get(CACHE_DIR_VARIABLE):
        return Path(directory) / CACHE_FILE
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedmodel" / CACHE_FILE


def remembered(inputs: tuple[float | int | str, ...], compute: Callable[[], float]) -> float:
    """`compute()` for these exact inputs, from the cache when an earlier call stored it.

    The key holds every input as its exact repr plus Opacus's version; SQLite REAL is an
    IEEE double, so the value comes back bit for bit.
    """
    key = json.dumps([version("opacus"), *map(repr, inputs)])
    try:
        with _connect() as connection:
            row = connection.execute("SELECT value FROM calibration WHERE key = ?", (key,))
            found = row.fetchone()
    except (sqlite3.Error, OSError):
        return compute()
    if found is not None:
        return float(found[0])
    value = compute()
    try:
        with _connect() as connection:
            connection.execute(
                "INSERT OR IGNORE INTO calibration (key, value) VALUES (?, ?)", (key, value)
            )
    except (sqlite3.Error, OSError):
        pass
    return value


def _connect() -> sqlite3.Connection:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=30)
    connection.execute("CREATE TABLE IF NOT EXISTS calibration (key TEXT PRIMARY KEY, value REAL)")
    return connection
