"""Exactness: the service's logits are the plain transformers model's, whatever the batch."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from transformers import AutoProcessor, CLIPModel

from tests.conftest import encode, make_image, running_app

LABEL_SETS = [
    ["cat", "dog", "a red sports car"],
    ["airplane", "ship"],
    ["tabby cat", "golden retriever", "boat", "x-ray of a hand", "ünïcödé label"],
]


@pytest.fixture(scope="module")
def reference(tiny_clip_dir):
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_clip_dir)

    def logits(image, labels, template="a photo of a {}."):
        prompts = [template.replace("{}", label) for label in labels]
        inputs = processor(text=prompts, images=image, return_tensors="pt", padding=True)
        with torch.inference_mode():
            return model(**inputs).logits_per_image[0].tolist()

    return logits


def by_label(body: dict) -> dict[str, float]:
    return {row["label"]: row["logit"] for row in body["labels"]}


async def classify(client, seed: int, labels: list[str], **fields):
    image = encode(make_image(seed), "PNG")
    data = {"labels": labels, **fields}
    response = await client.post("/v1/classify", files={"image": ("i.png", image, "image/png")}, data=data)
    assert response.status_code == 200, response.text
    return response.json()


async def test_logits_equal_plain_transformers(client, reference):
    for seed, labels in enumerate(LABEL_SETS):
        body = await classify(client, seed, labels)
        expected = reference(make_image(seed), labels)
        got = by_label(body)
        for label, want in zip(labels, expected, strict=False):
            assert got[label] == pytest.approx(want, abs=1e-4)
        scores = [row["score"] for row in body["labels"]]
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=1e-6)
        assert body["adapter"] is None


async def test_custom_template_and_json_body_match_reference(client, reference):
    import base64

    labels = ["cat", "dog"]
    image = base64.b64encode(encode(make_image(5), "JPEG")).decode()
    response = await client.post(
        "/v1/classify",
        json={"image": f"data:image/jpeg;base64,{image}", "labels": labels, "template": "art of {}"},
    )
    assert response.status_code == 200, response.text
    import io

    from PIL import Image

    decoded = Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB")
    expected = reference(decoded, labels, "art of {}")
    got = by_label(response.json())
    assert [got[label] for label in labels] == pytest.approx(expected, abs=1e-4)


async def test_concurrent_batch_equals_one_at_a_time(make_settings):
    """Batch invariance: rows batched with different neighbours give the same numbers."""
    requests = [(seed, LABEL_SETS[seed % 3]) for seed in range(12)]
    settings = make_settings(max_batch_size=16, max_wait_ms=300)
    async with running_app(settings) as (client, app):
        alone = [await classify(client, seed, labels) for seed, labels in requests]
        together = await asyncio.gather(*(classify(client, seed, labels) for seed, labels in requests))
        registry = app.state.metrics.registry
        batches = registry.get_sample_value("promptswap_batch_size_count", {"queue": "classify"})
        rows = registry.get_sample_value("promptswap_batch_size_sum", {"queue": "classify"})
    assert rows == 24 and batches < 24, "the concurrent requests were never batched"
    for one, many in zip(alone, together, strict=False):
        a, b = by_label(one), by_label(many)
        assert a.keys() == b.keys()
        for label in a:
            assert a[label] == pytest.approx(b[label], abs=1e-5)


async def test_text_features_are_cached(make_settings):
    async with running_app(make_settings()) as (client, app):
        runtime = app.state.runtime
        await classify(client, 0, LABEL_SETS[2])
        forwards = runtime.services.classify.handler.text_forwards
        assert forwards >= 1
        for seed in range(1, 4):  # same label set, other images, JSON-array form too
            await classify(client, seed, [json.dumps(LABEL_SETS[2])])
        await classify(client, 9, ["boat"])  # a subset: every label cached already
        assert runtime.services.classify.handler.text_forwards == forwards
        await classify(client, 9, ["an unseen label"])
        assert runtime.services.classify.handler.text_forwards == forwards + 1
        registry = app.state.metrics.registry
        assert registry.get_sample_value("promptswap_text_cache_hits_total") == 16
        assert registry.get_sample_value("promptswap_text_cache_misses_total") == 6


async def test_text_cache_is_bounded(make_settings):
    async with running_app(make_settings(text_cache_entries=3)) as (client, app):
        await classify(client, 0, LABEL_SETS[2])
        assert len(app.state.runtime.text_cache) == 3
