"""Bad input and overload on /v1/classify: a clear status and JSON body, and the
service keeps serving after each."""

from __future__ import annotations

import asyncio
import base64
import threading

import pytest

from service.classify.handler import ClassifyHandler
from tests.conftest import encode, make_image, running_app


def form(image: bytes, labels, **extra):
    return {
        "files": {"image": ("i.png", image, "application/octet-stream")},
        "data": {"labels": labels, **extra},
    }


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


async def still_serving(client) -> None:
    response = await client.post("/v1/classify", **form(encode(make_image(0)), ["cat", "dog"]))
    assert response.status_code == 200, response.text


def tiff_bytes() -> bytes:
    return encode(make_image(1, (32, 32)), "TIFF")


def truncated_png() -> bytes:
    data = encode(make_image(2))
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "payload, status, code",
    [
        (b"this is not an image", 400, "invalid_image"),
        (truncated_png(), 400, "invalid_image"),
        (tiff_bytes(), 400, "invalid_image"),
        (b"", 400, "invalid_image"),
    ],
    ids=["not-an-image", "truncated", "unsupported-format", "empty"],
)
async def test_bad_images_are_400(client, payload, status, code):
    error = assert_error(await client.post("/v1/classify", **form(payload, ["cat"])), status, code)
    assert "image" in error["message"]
    await still_serving(client)


@pytest.mark.parametrize(
    "labels, fragment",
    [
        ([], "at least one"),
        ([f"label {i}" for i in range(11)], "at most 10"),
        (["x" * 41], "characters"),
        (["cat", "dog", "cat"], "more than once"),
        (["   "], "empty"),
    ],
    ids=["none", "too-many", "too-long", "duplicate", "blank"],
)
async def test_bad_labels_are_422(make_settings, labels, fragment):
    async with running_app(make_settings(max_labels=10, max_label_chars=40)) as (client, _):
        image = encode(make_image(0))
        response = await client.post("/v1/classify", **form(image, labels))
        assert fragment in assert_error(response, 422, "invalid_request")["message"]
        response = await client.post(
            "/v1/classify", json={"image": base64.b64encode(image).decode(), "labels": labels}
        )
        assert fragment in assert_error(response, 422)["message"]
        await still_serving(client)


async def test_ten_thousand_labels_are_refused(client):
    labels = [f"l{i}" for i in range(10_000)]
    response = await client.post("/v1/classify", **form(encode(make_image(0)), labels))
    assert_error(response, 422)
    await still_serving(client)


async def test_label_over_the_text_encoders_context_is_422_for_that_request_only(client):
    long_label = "ŧ" * 190  # every character several tokens: well past 77
    bad, good = await asyncio.gather(
        client.post("/v1/classify", **form(encode(make_image(0)), [long_label, "cat"])),
        client.post("/v1/classify", **form(encode(make_image(1)), ["cat", "dog"])),
    )
    assert "tokens" in assert_error(bad, 422)["message"]
    assert good.status_code == 200


async def test_image_over_pixel_bound_is_413(make_settings):
    async with running_app(make_settings(max_image_pixels=100_000)) as (client, _):
        big = encode(make_image(0, (400, 300)))  # 120,000 pixels
        assert (
            "pixels" in assert_error(await client.post("/v1/classify", **form(big, ["cat"])), 413)["message"]
        )
        await still_serving(client)


async def test_decompression_bomb_is_413(client):
    from PIL import Image

    bomb = encode(Image.new("L", (12_000, 12_000)), "PNG")  # 144 Mpx in ~150 kB
    assert len(bomb) < 1_000_000
    assert_error(await client.post("/v1/classify", **form(bomb, ["cat"])), 413, "payload_too_large")
    await still_serving(client)


async def test_body_over_byte_bound_is_413(make_settings):
    async with running_app(make_settings(max_body_bytes=50_000)) as (client, _):
        noise = encode(make_image(0, (640, 480)), "PNG")
        assert len(noise) > 50_000
        assert_error(await client.post("/v1/classify", **form(noise, ["cat"])), 413, "payload_too_large")
        response = await client.post(
            "/v1/classify", json={"image": base64.b64encode(noise).decode(), "labels": ["cat"]}
        )
        assert_error(response, 413)
        small = encode(make_image(0, (64, 64)), "JPEG")
        response = await client.post("/v1/classify", **form(small, ["cat"]))
        assert response.status_code == 200


async def test_unknown_adapter_is_404(client):
    response = await client.post("/v1/classify", **form(encode(make_image(0)), ["cat"], adapter="nope"))
    assert "nope" in assert_error(response, 404, "not_found")["message"]
    await still_serving(client)


@pytest.mark.parametrize(
    "kwargs, status",
    [
        ({"content": b"labels=cat", "headers": {"content-type": "text/plain"}}, 415),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
        ({"json": {"image": "https://example.com/cat.jpg", "labels": ["cat"]}}, 400),
        ({"json": {"image": "%%% not base64 %%%", "labels": ["cat"]}}, 400),
        ({"json": {"labels": ["cat"]}}, 422),
        ({"json": {"image": "aGk=", "labels": "cat"}}, 422),
        ({"json": {"image": "aGk=", "labels": ["cat"], "top_k": 0}}, 422),
        ({"json": {"image": "aGk=", "labels": ["cat"], "template": "no slot"}}, 422),
        ({"json": {"image": "aGk=", "labels": ["cat"], "template": "{} and {}"}}, 422),
    ],
    ids=[
        "content-type",
        "bad-json",
        "remote-url",
        "bad-base64",
        "no-image",
        "labels-not-list",
        "top-k-zero",
        "template-no-slot",
        "template-two-slots",
    ],
)
async def test_malformed_requests(client, kwargs, status):
    assert_error(await client.post("/v1/classify", **kwargs), status)
    await still_serving(client)


async def test_multipart_without_image_is_422(client):
    response = await client.post("/v1/classify", data={"labels": ["cat"]}, files={"other": ("x", b"x")})
    assert "image" in assert_error(response, 422)["message"]


async def test_top_k_limits_the_answer(client):
    response = await client.post("/v1/classify", **form(encode(make_image(0)), ["a", "b", "c"], top_k="2"))
    assert response.status_code == 200
    assert len(response.json()["labels"]) == 2


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

        scope = {
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
