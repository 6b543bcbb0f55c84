"""The scheduler alone, with fake handlers and no torch."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.scheduling.batcher import BatchQueue, BatchStats, Closed, Expired, QueueFull


@pytest.fixture
def executor():
    pool = ThreadPoolExecutor(1)
    yield pool
    pool.shutdown(wait=False, cancel_futures=True)


def make_queue(handler, executor, **kw) -> BatchQueue:
    options = dict(max_batch_size=4, max_wait_s=0.05, max_queue=64)
    options.update(kw)
    queue = BatchQueue(handler, executor=executor, **options)
    queue.start()
    return queue


class Gate:
    """A handler that records batches and blocks until released: deterministic, no sleeps."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.entered.set()
        self.release.wait(10)
        return [x * 10 for x in items]


async def test_each_caller_gets_its_own_result(executor):
    queue = make_queue(lambda xs: [x * 2 for x in xs], executor, max_batch_size=8, max_wait_s=1.0)
    results = await asyncio.gather(*(queue.submit(i, 5) for i in range(8)))
    assert results == [i * 2 for i in range(8)]
    await queue.stop()


async def test_batch_closes_at_max_batch_size(executor):
    sizes: list[int] = []
    # A long max_wait: batches can only close because they are full.
    queue = make_queue(lambda xs: (sizes.append(len(xs)), xs)[1], executor, max_batch_size=4, max_wait_s=30)
    results = await asyncio.gather(*(queue.submit(i, 60) for i in range(12)))
    assert results == list(range(12))
    assert sizes == [4, 4, 4]
    await queue.stop()


async def test_batch_closes_after_max_wait_when_not_full(executor):
    stats: list[BatchStats] = []
    queue = make_queue(lambda xs: xs, executor, max_batch_size=100, max_wait_s=0.01, on_batch=stats.append)
    assert await queue.submit(7, 30) == 7
    assert [s.size for s in stats] == [1]
    await queue.stop()


async def test_per_item_exception_fails_only_that_item(executor):
    def handler(items):
        return [ValueError(f"bad {x}") if x == 2 else x for x in items]

    queue = make_queue(handler, executor, max_batch_size=4, max_wait_s=1.0)
    results = await asyncio.gather(*(queue.submit(i, 5) for i in range(4)), return_exceptions=True)
    assert results[:2] == [0, 1] and results[3] == 3
    assert isinstance(results[2], ValueError)
    await queue.stop()


async def test_handler_crash_fails_its_batch_and_the_queue_keeps_serving(executor):
    calls = []

    def handler(items):
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return items

    queue = make_queue(handler, executor, max_batch_size=2, max_wait_s=1.0)
    first = await asyncio.gather(queue.submit(1, 5), queue.submit(2, 5), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in first)
    assert await queue.submit(3, 5) == 3
    await queue.stop()


async def test_full_queue_refuses_at_once(executor):
    gate = Gate()
    queue = make_queue(gate, executor, max_batch_size=1, max_queue=2, max_wait_s=0)
    running = asyncio.ensure_future(queue.submit(0, 30))
    await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 5)
    waiting = [asyncio.ensure_future(queue.submit(i, 30)) for i in (1, 2)]
    await asyncio.sleep(0)  # let them enqueue
    assert queue.depth == 2  # max_queue items wait: the queue is full
    with pytest.raises(QueueFull):
        await queue.submit(3, 30)
    gate.release.set()
    assert await asyncio.gather(running, *waiting) == [0, 10, 20]
    await queue.stop()


async def test_deadline_expires_and_late_item_is_dropped(executor):
    gate = Gate()
    queue = make_queue(gate, executor, max_batch_size=1, max_wait_s=0)
    running = asyncio.ensure_future(queue.submit(0, 30))
    await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 5)
    with pytest.raises(Expired):
        await queue.submit(1, 0.01)  # stuck behind the blocked batch
    gate.release.set()
    assert await running == 0
    assert await queue.submit(2, 30) == 20
    assert [1] not in gate.batches  # the expired item never reached the model


async def test_cancelled_caller_is_dropped_before_the_model(executor):
    gate = Gate()
    queue = make_queue(gate, executor, max_batch_size=1, max_wait_s=0)
    running = asyncio.ensure_future(queue.submit(0, 30))
    await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 5)
    gone = asyncio.ensure_future(queue.submit(1, 30))
    await asyncio.sleep(0)
    gone.cancel()  # a client that disconnected while queued
    gate.release.set()
    assert await running == 0
    assert await queue.submit(2, 30) == 20
    assert gate.batches == [[0], [2]]
    await queue.stop()


async def test_stop_drains_admitted_items_then_refuses(executor):
    gate = Gate()
    queue = make_queue(gate, executor, max_batch_size=2, max_wait_s=0)
    admitted = [asyncio.ensure_future(queue.submit(i, 30)) for i in range(5)]
    await asyncio.sleep(0)
    stopping = asyncio.ensure_future(queue.stop(drain=True))
    await asyncio.sleep(0)
    with pytest.raises(Closed):
        await queue.submit(99, 30)
    gate.release.set()
    await stopping
    assert await asyncio.gather(*admitted) == [0, 10, 20, 30, 40]
