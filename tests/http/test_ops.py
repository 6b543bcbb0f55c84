"""Health, readiness, metrics and the model list."""

from __future__ import annotations

import threading

from httpx import ASGITransport, AsyncClient

from service.backbones import clip as clip_module
from service.main import create_app
from tests.conftest import encode, make_image


async def test_healthz_and_readyz_while_loading_then_ready(make_settings, monkeypatch):
    release = threading.Event()
    original = clip_module.ClipBackbone.load

    def slow_load(*args, **kwargs):
        release.wait(30)  # hold the load until the test has looked
        return original(*args, **kwargs)

    monkeypatch.setattr(clip_module.ClipBackbone, "load", slow_load)
    app = create_app(make_settings())
    async with app.router.lifespan_context(app):
        async with AsyncClient(transport=ASGITransport(app=app), base_url="http://t") as client:
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            not_ready = await client.get("/readyz")
            assert not_ready.status_code == 503 and "Retry-After" in not_ready.headers
            assert not_ready.json()["error"]["code"] == "not_ready"
            response = await client.post("/v1/classify", json={"image": "aGk=", "labels": ["a"]})
            assert response.status_code == 503
            release.set()
            await app.state.runtime.wait_ready()
            assert (await client.get("/readyz")).status_code == 200


async def test_failed_load_reports_why(make_settings, tmp_path):
    messages: list[str] = []
    app = create_app(make_settings(clip_model=str(tmp_path)), on_fatal=messages.append)
    async with app.router.lifespan_context(app):
        try:
            await app.state.runtime.wait_ready()
        except RuntimeError:
            pass
        async with AsyncClient(transport=ASGITransport(app=app), base_url="http://t") as client:
            response = await client.get("/readyz")
    assert response.status_code == 503
    assert messages and str(tmp_path) in messages[0]


async def test_metrics_expose_requests_batches_queue_and_cache(client):
    image = encode(make_image(0))
    for _ in range(2):
        response = await client.post(
            "/v1/classify", files={"image": ("i.png", image)}, data={"labels": ["cat", "dog"]}
        )
        assert response.status_code == 200
    await client.post("/v1/classify", json={"image": "%%", "labels": ["cat"]})
    text = (await client.get("/metrics")).text
    for needle in (
        'promptswap_requests_total{route="/v1/classify",status="200"} 2.0',
        'promptswap_requests_total{route="/v1/classify",status="400"} 1.0',
        'promptswap_request_seconds_count{route="/v1/classify"} 3.0',
        'promptswap_batch_size_count{queue="classify"} 2.0',
        'promptswap_queue_depth{queue="classify"} 0.0',
        "promptswap_inference_seconds_bucket",
        "promptswap_text_cache_hits_total 2.0",
        "promptswap_text_cache_misses_total 2.0",
    ):
        assert needle in text, needle


async def test_unknown_route_is_json_404(client):
    response = await client.get("/nope")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert 'route="unmatched"' in (await client.get("/metrics")).text


async def test_models_lists_the_backbone(client, tiny_clip_dir):
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [tiny_clip_dir.name]
    assert body["data"][0]["kind"] == "clip"


async def test_openapi_documents_both_classify_bodies(client):
    spec = (await client.get("/openapi.json")).json()
    content = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(content)


async def test_every_answer_names_the_replica(make_settings, png):
    from tests.conftest import running_app

    async with running_app(make_settings(replica_id="gpu-7")) as (client, _):
        for response in (
            await client.get("/healthz"),
            await client.get("/no/such/route"),
            await client.post(
                "/v1/classify", files={"image": ("a.png", png(1))}, data={"labels": ["a", "b"]}
            ),
            await client.post("/v1/classify", json={"labels": []}),  # an error answer too
        ):
            assert response.headers["x-promptswap-replica"] == "gpu-7"
            name, duration = response.headers["server-timing"].split(";dur=")
            assert name == "app" and 0 <= float(duration) < 60_000


def test_replica_id_defaults_to_host_and_process(make_settings):
    import os
    import socket

    from service.main import replica_id

    assert replica_id(make_settings()) == f"{socket.gethostname()}-{os.getpid()}"
