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

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Self

from service.errors import DeadlineExceeded, Overloaded, Unavailable
from service.metrics import Metrics
from service.scheduling.batcher import Closed, Expired, QueueFull


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


@dataclass(frozen=True)
class Lane:
    """One capability's way to its queue: the arrival gate, the queue's name in the metrics,
    and the one place where the scheduler's refusals become HTTP errors."""

    name: str  # "classify", "chat": the ``queue`` label of the metrics
    gate: ArrivalGate
    metrics: Metrics
    busy_retry_after_s: int  # 429: the queue is full
    closed_retry_after_s: int  # 503: shutting down (another replica or the restart answers)

    def admit(self) -> Place:
        """A place for this request, else 429 before its body is read."""
        try:
            return self.gate.enter()
        except NoPlace as exc:
            self.metrics.rejected.labels(self.name, "queue_full").inc()
            raise Overloaded(f"server busy: {exc}", retry_after_s=self.busy_retry_after_s) from None

    @contextmanager
    def refusals(self) -> Iterator[None]:
        """Scheduler errors raised inside become the client's 429, 504 or 503."""
        try:
            yield
        except QueueFull as exc:
            self.metrics.rejected.labels(self.name, "queue_full").inc()
            raise Overloaded(f"server busy: {exc}", retry_after_s=self.busy_retry_after_s) from None
        except Expired as exc:
            self.metrics.rejected.labels(self.name, "deadline").inc()
            raise DeadlineExceeded(str(exc)) from None
        except Closed:
            raise Unavailable("shutting down", retry_after_s=self.closed_retry_after_s) from None

    def client_gone(self) -> None:
        self.metrics.rejected.labels(self.name, "client_gone").inc()
