"""The waits between polls that found nothing: short at first, longer while nothing comes.

A node's executor polls its SuperNode for tasks and the coordinator's Grid polls the
SuperLink for replies. Every poll costs CPU at both ends (a request, a database query),
yet the next task or reply usually comes soon after the last one and rarely while a
node trains, so the wait starts short and doubles up to a ceiling; a poll that finds
something starts it short again.
"""

from __future__ import annotations

from collections.abc import Iterator


def backoff_waits(first: float, ceiling: float) -> Iterator[float]:
    """`first`, then doubling up to `ceiling`, forever."""
    wait = first
    while True:
        yield wait
        wait = min(2 * wait, ceiling)
