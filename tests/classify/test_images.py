"""Several images in one /v1/classify request: each row as a separate request would be
answered, in order, batched with the others, failing alone."""

from __future__ import annotations

import base64

import pytest

from fixtures.adapters import adapter_bytes
from tests.conftest import encode, make_image, running_app

LABELS = ["cat", "dog", "a red sports car", "boat"]
TOKEN = "images-admin-token"


def b64(seed: int) -> str:
    return base64.b64encode(encode(make_image(seed))).decode()


async def single(client, seed: int, **fields) -> dict:
    response = await client.post("/v1/classify", json={"image": b64(seed), "labels": LABELS, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def logits(answer: dict) -> dict[str, float]:
    return {row["label"]: row["logit"] for row in answer["labels"]}


def assert_same(row: dict, alone: dict) -> None:
    a, b = logits(row), logits(alone)
    assert list(a) == list(b)  # same labels in the same (score) order
    for label in a:
        assert a[label] == pytest.approx(b[label], abs=1e-5)


async def test_images_are_answered_in_order_like_separate_requests(make_settings):
    settings = make_settings(max_batch_size=16, max_wait_ms=300)
    async with running_app(settings) as (client, app):
        seeds = [3, 0, 7, 1, 5]
        alone = [await single(client, seed) for seed in seeds]
        registry = app.state.metrics.registry
        batches = registry.get_sample_value("promptswap_batch_size_count", {"queue": "classify"})
        rows = registry.get_sample_value("promptswap_batch_size_sum", {"queue": "classify"})
        response = await client.post(
            "/v1/classify", json={"images": [b64(s) for s in seeds], "labels": LABELS, "top_k": 3}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        # Each image was a row of its own, and the rows shared a batch.
        assert registry.get_sample_value("promptswap_batch_size_sum", {"queue": "classify"}) == rows + 5
        assert registry.get_sample_value("promptswap_batch_size_count", {"queue": "classify"}) < batches + 5
    assert body["adapter"] is None and body["model"] == alone[0]["model"]
    assert [r["index"] for r in body["results"]] == list(range(len(seeds)))
    for row, one in zip(body["results"], alone, strict=True):
        assert len(row["labels"]) == 3
        one["labels"] = one["labels"][:3]
        assert_same(row, one)
    # Sensitive: different images give different answers, so an order mix-up would fail.
    assert logits(alone[0]) != logits(alone[1])


async def test_a_bad_image_fails_alone(client):
    good = [await single(client, seed) for seed in (1, 2)]
    images = [b64(1), base64.b64encode(b"not an image").decode(), b64(2), "@@not base64@@"]
    response = await client.post("/v1/classify", json={"images": images, "labels": LABELS})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert_same(results[0], good[0])
    assert_same(results[2], good[1])
    for bad in (results[1], results[3]):
        assert set(bad) == {"index", "error"}
        assert bad["error"]["code"] == "invalid_image" and bad["error"]["message"]
    assert "base64" in results[3]["error"]["message"]


async def test_multipart_takes_repeated_image_files(client):
    alone = [await single(client, seed) for seed in (4, 6)]
    files = [("images", (f"{s}.png", encode(make_image(s)), "image/png")) for s in (4, 6)]
    response = await client.post("/v1/classify", files=files, data={"labels": LABELS})
    assert response.status_code == 200, response.text
    for row, one in zip(response.json()["results"], alone, strict=True):
        assert_same(row, one)


async def test_images_through_an_adapter(make_settings, tiny_clip_dir):
    async with running_app(make_settings(admin_token=TOKEN)) as (client, _):
        files = {"file": ("a.safetensors", adapter_bytes(tiny_clip_dir, "pets", seed=2))}
        upload = await client.post(
            "/v1/admin/adapters", files=files, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert upload.status_code == 201, upload.text
        alone = [await single(client, seed, adapter="pets") for seed in (0, 1)]
        plain = await single(client, 0)
        response = await client.post(
            "/v1/classify", json={"images": [b64(0), b64(1)], "labels": LABELS, "adapter": "pets"}
        )
        assert response.status_code == 200, response.text
        body = response.json()
    assert body["adapter"] == "pets@1"
    for row, one in zip(body["results"], alone, strict=True):
        assert_same(row, one)
    assert logits(plain) != logits(alone[0])  # the adapter mattered


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"images": []}, "images"),
        ({"images": ["x"] * 4}, "at most 3"),
        ({"images": ["x"], "image": "x"}, "not both"),
        ({}, "image"),
    ],
)
async def test_bad_image_lists_are_422(make_settings, fields, needle):
    async with running_app(make_settings(max_images=3)) as (client, _):
        response = await client.post("/v1/classify", json={"labels": LABELS, **fields})
    assert response.status_code == 422, response.text
    assert needle in response.json()["error"]["message"]


async def test_too_many_image_files_are_422(make_settings):
    async with running_app(make_settings(max_images=2)) as (client, _):
        files = [("images", (f"{s}.png", encode(make_image(s, (32, 32))), "image/png")) for s in range(3)]
        response = await client.post("/v1/classify", files=files, data={"labels": LABELS})
    assert response.status_code == 422, response.text
    assert "at most 2" in response.json()["error"]["message"]
