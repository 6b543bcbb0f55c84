"""Strict requests: a field the service does not read is a 422 naming it (and the closest
known one), on every route and through every door (JSON, multipart, query); a backbone the
service does not run is a permanent 404, never a 503 a balancer would resend."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from fixtures.adapters import adapter_bytes
from fixtures.images import encode, make_image
from tests.conftest import running_app
from tests.deploy.test_nginx import NGINX_DIR, directive, nginx_blocks
from tests.llava_fixtures import save_tiny_llava

TOKEN = "strict-admin-token"


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("strict-llava"))


@pytest.fixture
async def both(make_settings, llava_dir):
    """CLIP and LLaVA, admin on: every route exists."""
    async with running_app(make_settings(llava_model=str(llava_dir), admin_token=TOKEN)) as pair:
        yield pair


def b64(seed: int = 0) -> str:
    return base64.b64encode(encode(make_image(seed))).decode()


def message(response) -> str:
    assert response.status_code == 422, response.text
    return response.json()["error"]["message"]


async def test_misspelt_classify_fields_are_named_with_the_closest_known(client):
    image = encode(make_image(0))
    form = await client.post(
        "/v1/classify",
        files={"image": ("a.png", image)},
        data={"labels": ["cat", "dog"], "adaptor": "digits"},
    )
    assert message(form) == "unknown field 'adaptor'; did you mean 'adapter'?"
    topk = await client.post(
        "/v1/classify", files={"image": ("a.png", image)}, data={"labels": ["cat", "dog"], "topk": "1"}
    )
    assert message(topk) == "unknown field 'topk'; did you mean 'top_k'?"
    body = {"image": b64(), "labels": ["cat", "dog"], "adaptor": "digits"}
    assert message(await client.post("/v1/classify", json=body)) == (
        "unknown field 'adaptor'; did you mean 'adapter'?"
    )
    far = await client.post("/v1/classify", json={"image": b64(), "labels": ["cat"], "zzz": 1})
    assert message(far).startswith("unknown field 'zzz'; known fields: adapter, image, ")
    query = await client.post("/v1/classify?adaptor=digits", json={"image": b64(), "labels": ["cat"]})
    assert message(query) == "unknown query parameter 'adaptor'; this route takes no query parameters"
    models = await client.get("/v1/models?verbose=1")
    assert message(models) == "unknown query parameter 'verbose'; this route takes no query parameters"
    # Spelt right, the same requests pass.
    ok = await client.post("/v1/classify", json={"image": b64(), "labels": ["cat", "dog"], "top_k": 1})
    assert ok.status_code == 200 and len(ok.json()["labels"]) == 1


async def test_misspelt_chat_and_openai_fields_are_named(both):
    client, _ = both
    chat = {"image": b64(), "instruction": "hi", "max_token": 2}
    assert message(await client.post("/v1/chat", json=chat)) == (
        "unknown field 'max_token'; did you mean 'max_tokens'?"
    )
    form = await client.post(
        "/v1/chat",
        files={"image": ("a.png", encode(make_image(0)))},
        data={"instruction": "hi", "temprature": "0"},
    )
    assert message(form) == "unknown field 'temprature'; did you mean 'temperature'?"
    image_part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64()}"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}, image_part]}]
    top = {"model": "x", "messages": messages, "max_token": 2}
    assert message(await client.post("/v1/chat/completions", json=top)) == (
        "unknown field 'max_token'; did you mean 'max_tokens'?"
    )
    nested = {"model": "x", "messages": [{"role": "user", "contnet": "hi"}]}
    assert message(await client.post("/v1/chat/completions", json=nested)) == (
        "unknown field 'contnet' in messages.0; did you mean 'content'?"
    )


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"user": "someone"}, "user"),
    ],
    ids=["response_format", "tools", "logit_bias", "user"],
)
async def test_openai_parameters_not_implemented_are_refused(both, extra, fragment):
    client, app = both
    model = app.state.runtime.services.chat.model_id
    image_part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64()}"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}, image_part]}]
    body = {"model": model, "messages": messages, "max_tokens": 2, **extra}
    text = message(await client.post("/v1/chat/completions", json=body))
    assert text.startswith(fragment) and "not supported" in text


async def test_openai_parameters_at_their_default_are_accepted(both):
    client, app = both
    model = app.state.runtime.services.chat.model_id
    image_part = {
        "type": "image_url",
        "image_url": {"url": f"data:image/png;base64,{b64()}", "detail": "auto"},
    }
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}, image_part]}]
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": 2,
        "n": 1,
        "response_format": {"type": "text"},
        "tools": [],
        "store": False,
        "parallel_tool_calls": None,
    }
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    low = {**image_part, "image_url": {**image_part["image_url"], "detail": "low"}}
    body["messages"] = [{"role": "user", "content": [{"type": "text", "text": "hi"}, low]}]
    assert message(await client.post("/v1/chat/completions", json=body)).startswith(
        "messages.0.content.1.image_url.detail ('low'): not supported"
    )


async def test_admin_upload_fields_are_strict(both, tiny_clip_dir):
    client, _ = both
    r = await client.post(
        "/v1/admin/adapters",
        files={"file": ("a", adapter_bytes(tiny_clip_dir, "pets"))},
        data={"nam": "cats"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert message(r) == "unknown field 'nam'; did you mean 'name'?"
    listed = await client.get("/v1/adapters")
    assert listed.json()["adapters"] == []  # nothing was stored


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


async def test_every_route_refuses_an_unknown_field(both):
    """Generic: every route, including ones added after this test was written."""
    client, app = both
    paths = app.openapi()["paths"]  # every API route, as FastAPI knows them
    assert len(paths) >= 10
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for path, operations in paths.items():
        for method in (m.upper() for m in operations):
            r = await client.request(method, concrete(path) + "?zz_unknown=1", headers=headers)
            assert r.status_code == 422 and "'zz_unknown'" in r.json()["error"]["message"], (
                path,
                r.text,
            )
            if method not in {"POST", "PUT", "PATCH"}:
                continue
            as_json = await client.request(method, concrete(path), json={"zz_unknown": 1}, headers=headers)
            as_form = await client.request(
                method, concrete(path), files={"zz_unknown": ("f", b"1")}, headers=headers
            )
            answers = [as_json, as_form]
            assert all(a.status_code >= 400 for a in answers), (path, [a.text for a in answers])
            named = [a for a in answers if a.status_code == 422 and "'zz_unknown'" in a.text]
            assert named, (path, [a.text for a in answers])


async def test_a_backbone_not_served_is_a_permanent_404(client, make_settings, llava_dir):
    chat = await client.post("/v1/chat", json={"image": b64(), "instruction": "hi"})
    completions = await client.post("/v1/chat/completions", json={"model": "x", "messages": []})
    for r in (chat, completions):
        assert r.status_code == 404 and "Retry-After" not in r.headers, r.text
        assert r.json()["error"]["code"] == "not_served" and "--llava-model" in r.json()["error"]["message"]
    async with running_app(make_settings(clip_model="", llava_model=str(llava_dir))) as (chat_only, _):
        r = await chat_only.post("/v1/classify", json={"image": b64(), "labels": ["cat"]})
        assert r.status_code == 404 and "Retry-After" not in r.headers, r.text
        assert "--clip-model" in r.json()["error"]["message"]
    # The shipped nginx resends only connection failures and 503s: never a 404.
    locations = nginx_blocks((NGINX_DIR / "nginx.conf").read_text(), "location")
    for block in locations.values():
        retry = (directive(block, "proxy_next_upstream") or "off").split()
        assert not any(word.startswith("http_4") for word in retry), retry
        assert "http_404" not in retry


async def test_metrics_carry_no_created_series(client):
    await client.get("/healthz")
    text = (await client.get("/metrics")).text
    assert "promptswap_requests_total" in text
    assert "_created" not in text
