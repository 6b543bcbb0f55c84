"""POST /v1/embeddings: exact against transformers, consistent with /v1/classify, OpenAI's shape."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest
import torch
from httpx import ASGITransport, AsyncClient
from transformers import AutoProcessor, CLIPModel

from fixtures.adapters import adapter_bytes
from tests.conftest import encode, make_image, running_app

TOKEN = "embeddings-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEXTS = ["a tabby cat", "a photo of a dog.", "x-ray of a hand", "ünïcödé caption"]


def data_url(seed: int, fmt: str = "PNG") -> str:
    mime = "png" if fmt == "PNG" else "jpeg"
    return f"data:image/{mime};base64," + base64.b64encode(encode(make_image(seed), fmt)).decode()


@pytest.fixture(scope="module")
def reference(tiny_clip_dir):
    """transformers' own features, L2-normalised: what an embedding must equal."""
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_clip_dir)

    def normalised(x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=-1, keepdim=True)

    def image(seed: int) -> torch.Tensor:
        inputs = processor(images=make_image(seed), return_tensors="pt")
        with torch.inference_mode():
            return normalised(model.get_image_features(**inputs).pooler_output)[0]

    def text(value: str) -> torch.Tensor:
        inputs = processor.tokenizer([value], return_tensors="pt")
        with torch.inference_mode():
            return normalised(model.get_text_features(**inputs).pooler_output)[0]

    return image, text


async def embed(client, model, inputs, **fields):
    response = await client.post("/v1/embeddings", json={"model": model, "input": inputs, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def vectors(body) -> list[torch.Tensor]:
    assert [row["index"] for row in body["data"]] == list(range(len(body["data"])))
    return [torch.tensor(row["embedding"]) for row in body["data"]]


async def upload(client, data: bytes) -> None:
    files = {"file": ("a.safetensors", data, "application/octet-stream")}
    response = await client.post("/v1/admin/adapters", files=files, headers=AUTH)
    assert response.status_code == 201, response.text


async def test_zero_shot_embeddings_equal_transformers(client, tiny_clip_dir, reference):
    ref_image, ref_text = reference
    model = tiny_clip_dir.name
    inputs = [data_url(0), TEXTS[0], data_url(1), *TEXTS[1:]]
    body = await embed(client, model, inputs)
    assert body["object"] == "list" and body["model"] == model
    got = vectors(body)
    expected = [ref_image(0), ref_text(TEXTS[0]), ref_image(1), *(ref_text(t) for t in TEXTS[1:])]
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        assert torch.allclose(g, e, atol=1e-5), (g - e).abs().max()
    # Sensitive: the two images and the texts are far apart, so a mix-up would show.
    assert (got[0] - got[2]).abs().max() > 1e-2 and (got[1] - got[3]).abs().max() > 1e-2
    # A string input is one embedding; usage counts the text's tokens (start and end included).
    single = await embed(client, model, TEXTS[0])
    assert len(single["data"]) == 1 and torch.allclose(vectors(single)[0], ref_text(TEXTS[0]), atol=1e-5)
    assert single["usage"] == {"prompt_tokens": 5, "total_tokens": 5}


async def test_base64_is_little_endian_float32_of_the_same_numbers(client, tiny_clip_dir):
    model = tiny_clip_dir.name
    floats = await embed(client, model, [TEXTS[0], data_url(2)])
    packed = await embed(client, model, [TEXTS[0], data_url(2)], encoding_format="base64")
    for f, p in zip(floats["data"], packed["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(p["embedding"]), dtype="<f4")
        assert decoded.tolist() == pytest.approx(f["embedding"], abs=1e-7)


async def test_batched_rows_equal_rows_alone(make_settings, tiny_clip_dir):
    """Rows of many concurrent requests share batches and give the numbers they give alone."""
    settings = make_settings(max_batch_size=16, max_wait_ms=300)
    requests = [[data_url(seed), TEXTS[seed % 4]] for seed in range(6)]
    async with running_app(settings) as (client, app):
        model = tiny_clip_dir.name
        alone = [vectors(await embed(client, model, inputs)) for inputs in requests]
        together = await asyncio.gather(*(embed(client, model, inputs) for inputs in requests))
        registry = app.state.metrics.registry
        batches = registry.get_sample_value("promptswap_batch_size_count", {"queue": "embeddings"})
        rows = registry.get_sample_value("promptswap_batch_size_sum", {"queue": "embeddings"})
    assert rows == 24 and batches < 12, "the concurrent requests were never batched"
    for one, many in zip(alone, together, strict=True):
        for a, b in zip(one, vectors(many), strict=True):
            assert torch.allclose(a, b, atol=1e-5)


async def test_repeated_texts_come_from_the_text_cache(make_settings, tiny_clip_dir):
    async with running_app(make_settings()) as (client, app):
        handler = app.state.runtime.services.classify.handler
        await embed(client, tiny_clip_dir.name, TEXTS)
        forwards = handler.text_forwards
        await embed(client, tiny_clip_dir.name, [TEXTS[2], TEXTS[0], TEXTS[0]])
        assert handler.text_forwards == forwards
        # Classify's label cache and the embeddings' texts are one cache: the same prompt is
        # computed once (the label "dog" in the default template is the text below).
        response = await client.post(
            "/v1/classify",
            files={"image": ("i.png", encode(make_image(0)), "image/png")},
            data={"labels": ["dog"]},
        )
        assert response.status_code == 200
        forwards = handler.text_forwards
        await embed(client, tiny_clip_dir.name, "a photo of a dog.")
        assert handler.text_forwards == forwards


async def test_adapter_embeddings_give_classify_logits(make_settings, tiny_clip_dir):
    """image . text(label) through an adapter == /v1/classify's logit / logit_scale."""
    labels = ["cat", "dog", "a red sports car"]
    async with running_app(make_settings(admin_token=TOKEN)) as (client, app):
        await upload(client, adapter_bytes(tiny_clip_dir, "pets", seed=1))
        response = await client.post(
            "/v1/classify",
            files={"image": ("i.png", encode(make_image(3)), "image/png")},
            data={"labels": labels, "adapter": "pets"},
        )
        assert response.status_code == 200, response.text
        logits = {row["label"]: row["logit"] for row in response.json()["labels"]}
        scale = float(app.state.runtime.services.classify.clip.logit_scale)
        for model in ("pets", "pets@1"):
            body = await embed(client, model, [data_url(3), *labels])
            assert body["model"] == model
            image, *texts = vectors(body)
            for label, text in zip(labels, texts, strict=True):
                assert float(image @ text) == pytest.approx(logits[label] / scale, abs=1e-5)
        # Sensitive: the adapter's embeddings are not the zero-shot ones.
        plain = vectors(await embed(client, tiny_clip_dir.name, [data_url(3), labels[0]]))
        assert (plain[0] - image).abs().max() > 1e-2
        zero_shot_text = vectors(await embed(client, tiny_clip_dir.name, f"a photo of a {labels[0]}."))[0]
        assert (zero_shot_text - texts[0]).abs().max() > 1e-2


async def test_openai_client_works_unchanged(make_settings, tiny_clip_dir, reference):
    openai = pytest.importorskip("openai")
    _, ref_text = reference
    async with running_app(make_settings()) as (_, app):
        transport = ASGITransport(app=app)
        async with AsyncClient(transport=transport, base_url="http://test") as http:
            oa = openai.AsyncOpenAI(api_key="unused", base_url="http://test/v1", http_client=http)
            # The client asks for base64 unless told otherwise, and decodes it itself.
            result = await oa.embeddings.create(model=tiny_clip_dir.name, input=[TEXTS[1], data_url(4)])
            assert len(result.data) == 2 and result.data[1].index == 1
            got = torch.tensor(result.data[0].embedding)
            assert torch.allclose(got, ref_text(TEXTS[1]), atol=1e-5)
            floats = await oa.embeddings.create(
                model=tiny_clip_dir.name, input=TEXTS[1], encoding_format="float"
            )
            assert floats.data[0].embedding == pytest.approx(result.data[0].embedding, abs=1e-7)
            assert result.usage.prompt_tokens > 0
            with pytest.raises(openai.UnprocessableEntityError):
                await oa.embeddings.create(model=tiny_clip_dir.name, input="cat", dimensions=8)
            with pytest.raises(openai.NotFoundError):
                await oa.embeddings.create(model="no-such-adapter", input="cat")


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"input": "cat", "dimensions": 16}, 422, "dimensions"),
        ({"input": []}, 422, "at least one"),
        ({"input": ["cat"] * 9}, 422, "at most 8"),
        ({"input": [[1, 2, 3]]}, 422, "token arrays"),
        ({"input": [101, 102]}, 422, "token arrays"),
        ({"input": ["cat", "  "]}, 422, "input[1]"),
        ({"input": ["cat", "w " * 100]}, 422, "input[1]: the text is 102 tokens"),
        ({"input": ["cat", "x" * 301]}, 422, "input[1]: the text is 301 characters"),
        ({"input": ["cat", "data:image/png;base64,AAAA"]}, 400, "input[1]"),
        ({"input": ["data:image/png;base64,@@"]}, 400, "input[0]: the image is not valid base64"),
        ({"input": "cat", "encoding_format": "int8"}, 422, "encoding_format"),
        ({"input": "cat", "user": "me"}, 422, "user"),
        ({"input": "cat", "model": "missing"}, 404, "missing"),
        ({"input": "cat", "model": ""}, 404, "model"),
    ],
)
async def test_bad_requests_get_clear_errors(make_settings, tiny_clip_dir, body, status, needle):
    settings = make_settings(max_embedding_inputs=8, max_embedding_text_chars=300)
    async with running_app(settings) as (client, _):
        payload = {"model": tiny_clip_dir.name, **body}
        response = await client.post("/v1/embeddings", json=payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["code"]


async def test_not_json_and_bad_json(client):
    response = await client.post("/v1/embeddings", content=b"input=cat")
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"
    response = await client.post(
        "/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


async def test_a_request_larger_than_the_queue_is_refused_as_invalid(make_settings, tiny_clip_dir):
    """A permanent condition is never a 503/429: more rows than the queue holds is a 422."""
    async with running_app(make_settings(max_queue=4)) as (client, _):
        response = await client.post("/v1/embeddings", json={"model": tiny_clip_dir.name, "input": ["a"] * 5})
    assert response.status_code == 422 and "at most 4" in response.json()["error"]["message"]
