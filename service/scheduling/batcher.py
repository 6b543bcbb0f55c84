"""The async batching scheduler: bounded queue in, batches out, one answer per caller.

It knows nothing about HTTP or models. ``submit`` admits an item (or refuses at once
when the queue is full), a collector closes a batch at ``max_batch_size`` items or
``max_wait_s`` after its first item, and the handler runs in the given executor (one
worker thread: the device is one resource), never on the event loop. The handler
returns one result or exception per item, so one bad row fails only itself. Items
whose caller has gone (cancelled, deadline passed) are dropped when dequeued, and a
result is only ever set on a future that is still pending.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("promptswap.batching")

Handler = Callable[[list[T]], Sequence["R | BaseException"]]


class QueueFull(Exception):
    """The queue holds ``max_queue`` items already."""


class Expired(Exception):
    """The item's deadline passed before its result was ready."""


class Closed(Exception):
    """The queue no longer admits items (shutting down)."""


@dataclass(eq=False)
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    deadline: float  # on the loop's clock
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    """What the scheduler reports after each batch (for metrics)."""

    size: int
    queue_wait_s: list[float]
    run_s: float


class BatchQueue(Generic[T, R]):
    def __init__(
        self,
        handler: Handler,
        *,
        executor: Executor,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[BatchStats], None] | None = None,
        name: str = "batch",
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_s >= 0")
        self._handler = handler
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue[_Pending[T, R]] = asyncio.Queue(maxsize=max_queue)
        self._on_batch = on_batch
        self._name = name
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def depth(self) -> int:
        """Items admitted and not yet taken into a batch."""
        return self._queue.qsize()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    async def stop(self, drain: bool = True) -> None:
        """Refuse new items; with ``drain``, answer every admitted item first."""
        self._closed = True
        if drain and self._task is not None and not self._task.done():
            await self._queue.join()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while not self._queue.empty():  # only when not drained
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(Closed("shutting down"))

    async def submit(self, item: T, timeout_s: float) -> R:
        """Queue ``item`` and wait for its result.

        Raises ``QueueFull`` at once when the queue is full, ``Closed`` when stopping,
        ``Expired`` when ``timeout_s`` passes first; a cancelled caller's item is dropped.
        """
        if self._closed:
            raise Closed("not accepting requests")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        pending = _Pending(item, future, loop.time() + timeout_s)
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise QueueFull(f"{self._queue.maxsize} requests already queued") from None
        try:
            async with asyncio.timeout_at(pending.deadline):
                return await future  # cancelling the caller cancels the future too
        except TimeoutError:
            raise Expired(f"no result within {timeout_s:g} s") from None

    async def _collect(self) -> list[_Pending[T, R]]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        close_at = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = close_at - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            try:
                now = loop.time()
                live = [p for p in batch if not p.future.done() and p.deadline > now]
                if live:
                    await self._run_batch(live)
            except asyncio.CancelledError:
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(Closed("shutting down"))
                raise
            except Exception:  # never let one batch end the loop that serves everyone
                log.exception("batch %s failed outside its handler", self._name)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _run_batch(self, live: list[_Pending[T, R]]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        waits = [started - p.enqueued for p in live]
        try:
            results: Sequence[R | BaseException] = await loop.run_in_executor(
                self._executor, self._handler, [p.item for p in live]
            )
            if len(results) != len(live):
                raise RuntimeError(f"handler returned {len(results)} results for {len(live)} items")
        except Exception as exc:  # the whole batch failed: each caller gets the error
            log.exception("batch of %d failed", len(live))
            results = [exc] * len(live)
        for p, result in zip(live, results, strict=False):
            if p.future.done():
                continue
            if isinstance(result, BaseException):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)
        if self._on_batch is not None:
            self._on_batch(BatchStats(len(live), waits, time.perf_counter() - started))
