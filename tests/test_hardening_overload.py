"""Overload: with the model held and the queue full, every further request is refused at
once (429, Retry-After) while the admitted ones are answered, and the service is back
to normal as soon as the load drops."""

from __future__ import annotations

import asyncio

from tests.conftest import encode, make_image, running_app
from tests.test_classify_errors import Gate, assert_error, form


async def test_burst_past_the_queue_gets_fast_429s_and_recovery_is_immediate(make_settings, monkeypatch):
    gate = Gate(monkeypatch)
    max_queue, burst = 4, 40
    settings = make_settings(max_queue=max_queue, max_batch_size=1, max_wait_ms=0)
    async with running_app(settings) as (client, app):
        queue = app.state.runtime.classify_queue
        image = encode(make_image(0))

        def post(i: int):
            return client.post("/v1/classify", **form(image, ["cat", f"label {i}"]))

        admitted = [asyncio.ensure_future(post(0))]
        await gate.wait_entered()  # the model holds the first
        admitted += [asyncio.ensure_future(post(i)) for i in range(1, max_queue + 1)]
        while queue.depth < max_queue:  # the queue is full
            await asyncio.sleep(0)

        refused = await asyncio.gather(*(post(100 + i) for i in range(burst)))
        # Every one was answered while the model was still held: nobody waited for it.
        assert not gate.release.is_set() and gate.seen == [1]
        for response in refused:
            assert_error(response, 429, "overloaded")
            assert int(response.headers["retry-after"]) >= 1
        assert not any(task.done() for task in admitted)

        gate.release.set()
        for response in await asyncio.gather(*admitted):
            assert response.status_code == 200, response.text
        assert queue.depth == 0
        # Load dropped: the very next request is served.
        assert (await post(999)).status_code == 200
        rejected = app.state.metrics.registry.get_sample_value(
            "promptswap_rejected_total", {"queue": "classify", "reason": "queue_full"}
        )
        assert rejected == burst
        assert gate.seen == [1] * (max_queue + 2)
