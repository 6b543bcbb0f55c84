"""Admission at arrival: a request takes a place before its body is read.

Between arrival and its queue a request reads its body, parses it and decodes its
image: real work, done on the event loop and the decode pool. Under overload, doing that
for requests that then find the queue full is what makes refusals slow and memory grow.
So a request takes a *place* first: places held (requests still being read and decoded)
plus items already queued never exceed the queue's capacity, and past it the request is
refused before a byte of its body is read. A place is given back when its request is
queued (from then on the queue's own bound counts it) or when it fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Self


class NoPlace(Exception):
    """Every place is taken: the queue plus the requests arriving fill its capacity."""


class Place:
    def __init__(self, gate: ArrivalGate) -> None:
        self._gate: ArrivalGate | None = gate

    def release(self) -> None:
        """Idempotent: called when the request is queued, and again when it ends."""
        if self._gate is not None:
            self._gate.arriving -= 1
            self._gate = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ArrivalGate:
    def __init__(self, capacity: int, queued: Callable[[], int]) -> None:
        self.capacity = capacity
        self._queued = queued
        self.arriving = 0

    def enter(self) -> Place:
        """A place for one arriving request, or ``NoPlace`` at once."""
        queued = self._queued()
        if self.arriving + queued >= self.capacity:
            raise NoPlace(f"{queued} requests queued and {self.arriving} arriving")
        self.arriving += 1
        return Place(self)
