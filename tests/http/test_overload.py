"""Overload, deadlines and disconnects: with the model held and the queue full, every
further request is refused at once (429, Retry-After) while the admitted ones are
answered; a request past its deadline gets 504, one whose client left never reaches the
model; and the service is back to normal as soon as the load drops."""

from __future__ import annotations

import asyncio
import threading

import httpx

from service.classify.handler import ClassifyHandler
from tests.classify.test_errors import assert_error, form, still_serving
from tests.conftest import encode, make_image, running_app


def classify_scope(request: httpx.Request) -> dict:
    """The ASGI scope of a raw POST /v1/classify carrying ``request``'s headers."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/classify",
        "raw_path": b"/v1/classify",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in request.headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
        "root_path": "",
    }


class Gate:
    """Blocks the model thread until released, so queue states are deterministic."""

    def __init__(self, monkeypatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.seen: list[int] = []
        original = ClassifyHandler.__call__

        def gated(handler, items):
            self.seen.append(len(items))
            self.entered.set()
            self.release.wait(30)
            return original(handler, items)

        monkeypatch.setattr(ClassifyHandler, "__call__", gated)

    async def wait_entered(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.entered.wait, 30)


async def test_full_queue_answers_429_with_retry_after(make_settings, monkeypatch):
    gate = Gate(monkeypatch)
    settings = make_settings(max_queue=1, max_batch_size=1, max_wait_ms=0)
    async with running_app(settings) as (client, app):
        image = encode(make_image(0))
        first = asyncio.ensure_future(client.post("/v1/classify", **form(image, ["cat"])))
        await gate.wait_entered()  # the model is busy with the first
        second = asyncio.ensure_future(client.post("/v1/classify", **form(image, ["cat"])))
        while app.state.runtime.services.classify.queue.depth < 1:  # the second is queued
            await asyncio.sleep(0)
        third = await client.post("/v1/classify", **form(image, ["cat"]))
        assert_error(third, 429, "overloaded")
        assert int(third.headers["retry-after"]) >= 1
        gate.release.set()
        assert (await first).status_code == 200 and (await second).status_code == 200
        await still_serving(client)


async def test_deadline_answers_504(make_settings, monkeypatch):
    gate = Gate(monkeypatch)
    settings = make_settings(max_batch_size=1, max_wait_ms=0, request_timeout_s=0.2)
    async with running_app(settings) as (client, _):
        image = encode(make_image(0))
        first = asyncio.ensure_future(client.post("/v1/classify", **form(image, ["cat"])))
        await gate.wait_entered()
        late = await client.post("/v1/classify", **form(image, ["cat"]))  # queued behind it
        assert_error(late, 504, "deadline_exceeded")
        gate.release.set()
        await first
        assert gate.seen.count(1) >= 1


async def test_disconnected_client_is_dropped_from_the_queue(make_settings, monkeypatch):
    gate = Gate(monkeypatch)
    settings = make_settings(max_batch_size=4, max_wait_ms=0)
    async with running_app(settings) as (client, app):
        image = encode(make_image(0))
        first = asyncio.ensure_future(client.post("/v1/classify", **form(image, ["cat"])))
        await gate.wait_entered()
        # A raw ASGI request whose client goes away while it is queued.
        request = client.build_request("POST", "http://test/v1/classify", **form(image, ["dog"]))
        body = request.read()
        gone = asyncio.Event()
        sent: list[dict] = []

        async def receive():
            if not sent:
                sent.append({})
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = classify_scope(request)
        call = asyncio.ensure_future(app(scope, receive, send))
        while app.state.runtime.services.classify.queue.depth < 1:
            await asyncio.sleep(0)
        gone.set()
        await call
        gate.release.set()
        assert (await first).status_code == 200
        await still_serving(client)
        assert gate.seen == [1, 1], "the disconnected request reached the model"
        assert sent[-1]["type"] == "http.response.body"


async def test_burst_past_the_queue_gets_fast_429s_and_recovery_is_immediate(make_settings, monkeypatch):
    gate = Gate(monkeypatch)
    max_queue, burst = 4, 40
    settings = make_settings(max_queue=max_queue, max_batch_size=1, max_wait_ms=0)
    async with running_app(settings) as (client, app):
        queue = app.state.runtime.services.classify.queue
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


async def test_refusals_come_before_the_body_is_read(make_settings, monkeypatch):
    """Requests still reading their bodies hold places: with the queue plus the arriving
    requests at capacity, the next one is refused without reading a byte of its body."""
    gate = Gate(monkeypatch)
    settings = make_settings(max_queue=2, max_batch_size=1, max_wait_ms=0)
    async with running_app(settings) as (client, app):
        image = encode(make_image(0))
        first = asyncio.ensure_future(client.post("/v1/classify", **form(image, ["cat"])))
        await gate.wait_entered()  # the model holds the first; the queue is empty
        request = client.build_request("POST", "http://test/v1/classify", **form(image, ["dog"]))
        scope = classify_scope(request)

        def slow_upload(reads: list[int], body_arrives: asyncio.Event):
            async def receive():
                reads.append(1)
                await body_arrives.wait()  # a client still sending its body
                return {"type": "http.request", "body": request.read(), "more_body": False}

            return receive

        async def ignore(message):
            pass

        arriving = app.state.runtime.services.classify.lane.gate
        bodies = asyncio.Event()
        slow = [asyncio.ensure_future(app(scope, slow_upload([], bodies), ignore)) for _ in range(2)]
        while arriving.arriving < 2:  # both hold a place while their bodies trickle in
            await asyncio.sleep(0)

        reads: list[int] = []
        sent: list[dict] = []

        async def record(message):
            sent.append(message)

        await app(scope, slow_upload(reads, asyncio.Event()), record)
        assert sent[0]["status"] == 429 and reads == []  # refused; its body never read
        assert (b"retry-after", b"1") in sent[0]["headers"]
        bodies.set()
        await asyncio.gather(*slow)
        gate.release.set()
        assert (await first).status_code == 200
        assert arriving.arriving == 0
        assert (await client.post("/v1/classify", **form(image, ["cat"]))).status_code == 200
