"""Bad and hostile labels on /v1/classify: too many, too long, empty, duplicated, NUL,
lone surrogates, unicode. Each is served exactly or refused with a clear 4xx and JSON
body, and the service keeps serving after each."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from tests.classify.test_errors import assert_error, classify, form, still_serving
from tests.conftest import encode, make_image, running_app

# The tests on `client` share one app (they only read); the others start their own.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def client(module_client):
    return module_client


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


async def test_megabyte_label_json_is_422(client):
    image = base64.b64encode(encode(make_image(0))).decode()
    response = await client.post("/v1/classify", json={"image": image, "labels": ["x" * 2**20]})
    assert "characters" in assert_error(response, 422, "invalid_request")["message"]
    await still_serving(client)


async def test_megabyte_label_multipart_is_413_or_422(client):
    response = await classify(client, encode(make_image(0)), ["x" * 2**20])
    assert response.status_code in (413, 422), response.text
    await still_serving(client)


async def test_ten_thousand_labels_as_json_and_json_array_field(client):
    labels = [f"l{i}" for i in range(10_000)]
    image = encode(make_image(0))
    response = await client.post(
        "/v1/classify", json={"image": base64.b64encode(image).decode(), "labels": labels}
    )
    assert "at most 1000" in assert_error(response, 422)["message"]
    await still_serving(client)


async def test_ten_thousand_labels_as_one_json_array_field_is_a_clear_4xx(client):
    labels = json.dumps([f"l{i}" for i in range(10_000)])
    response = await client.post("/v1/classify", **form(encode(make_image(0)), labels))
    assert 400 <= response.status_code < 500
    assert_error(response, response.status_code)
    await still_serving(client)


async def test_max_labels_as_one_json_array_field_are_served(client):
    labels = json.dumps([f"label number {i}" for i in range(1000)])
    response = await client.post("/v1/classify", **form(encode(make_image(0)), labels))
    assert response.status_code == 200, response.text


UNICODE_LABELS = [
    "قطة",  # Arabic, right to left
    "\u202egod\u202c",  # RTL override
    "e\u0301\u0301\u0301",  # combining marks
    "🐈‍⬛",  # emoji with a zero-width joiner
    "👨‍👩‍👧‍👦",  # family: three joiners
    "a\u200bb",  # zero-width space
    "\ufeffbom",
    "𝔠𝔞𝔱",  # outside the BMP
    "ﷺ",  # one char, many when normalised
]


async def test_unicode_labels_are_served_and_echoed_exactly(client):
    image = encode(make_image(0))
    for send in ("json", "multipart"):
        if send == "json":
            response = await client.post(
                "/v1/classify", json={"image": base64.b64encode(image).decode(), "labels": UNICODE_LABELS}
            )
        else:
            response = await classify(client, image, UNICODE_LABELS)
        assert response.status_code == 200, response.text
        assert sorted(row["label"] for row in response.json()["labels"]) == sorted(UNICODE_LABELS)


@pytest.mark.parametrize("label", ["nul\x00byte", "\x00", "cat\x00"])
async def test_nul_in_a_label_is_422(client, label):
    image = encode(make_image(0))
    response = await client.post(
        "/v1/classify", json={"image": base64.b64encode(image).decode(), "labels": ["dog", label]}
    )
    assert "NUL" in assert_error(response, 422)["message"]
    assert "NUL" in assert_error(await classify(client, image, ["dog", label]), 422)["message"]
    await still_serving(client)


async def test_lone_surrogate_in_json_is_a_clear_4xx(client):
    body = b'{"image": "aGk=", "labels": ["\\ud800"]}'
    response = await client.post("/v1/classify", content=body, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500
    assert_error(response, response.status_code)
    await still_serving(client)
