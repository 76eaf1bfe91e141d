"""A sequence whose items are built only when indexed: 1,000 simulated sites cost nothing
until one of them is read."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar, overload

T = TypeVar("T")


class LazySequence(Sequence[T]):
    """`size` items; item `i` is `build(i)`, called on each access (not cached: the
    callers build their items in milliseconds, and caching 1,000 sites would hold them)."""

    def __init__(self, size: int, build: Callable[[int], T]) -> None:
        self.size, self.build = size, build

    def __len__(self) -> int:
        return self.size

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[T]: ...

    def __getitem__(self, index: int | slice) -> T | Sequence[T]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.size))]
        if not -self.size <= index < self.size:
            raise IndexError(index)
        return self.build(int(index) % self.size)
