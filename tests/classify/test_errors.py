"""Bad requests on /v1/classify (body bound, unknown adapter, malformed forms) and the JSON
error body of every route: a clear status, and the service keeps serving after each.
Images: test_bad_images.py; labels: test_bad_labels.py; overload, deadlines and
disconnects: tests/http/test_overload.py. The helpers here serve all of them."""

from __future__ import annotations

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


LABELS = ["cat", "dog", "boat"]


async def classify(client, image: bytes, labels=LABELS):
    return await client.post("/v1/classify", **form(image, labels))


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


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/v1/classify", 405),
        ("POST", "/healthz", 405),
        ("GET", "/nowhere", 404),
        ("DELETE", "/v1/adapters/pets", 405),
        ("PUT", "/v1/admin/adapters", 405),
    ],
)
async def test_unknown_routes_and_methods_answer_the_json_error_body(client, method, path, status):
    assert_error(await client.request(method, path), status)
