"""Bad input on /v1/classify: a clear status and JSON body, and the service keeps serving
after each. (Overload, deadlines and disconnects: tests/http/test_overload.py.)"""

from __future__ import annotations

import asyncio
import base64

import pytest

from tests.conftest import encode, make_image, running_app

# The tests on `client` share one app (they only send bad requests); the others start their own.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def client(module_client):
    return module_client


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
