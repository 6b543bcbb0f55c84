"""The service on a bucket store (real SeaweedFS): the admin API and classify through it,
and its faults: down at start, down or cut during an upload, wedged, wrong credentials."""

from __future__ import annotations

import asyncio

import pytest

from fixtures.adapters import adapter_bytes
from service.registry.s3_store import parse_s3_url
from tests.conftest import running_app
from tests.registry.test_admin_api import AUTH, TOKEN, classify, logits_of, upload
from tests.seaweedfs import S3Server
from tests.tcp_proxy import FaultProxy


@pytest.fixture
def s3_settings(make_settings, s3_url):
    return lambda **kw: make_settings(admin_token=TOKEN, adapter_store=s3_url, **kw)


@pytest.fixture
def proxy(s3_server: S3Server, monkeypatch):
    """A fault-injecting proxy in front of SeaweedFS, set as AWS_ENDPOINT_URL."""
    proxy = FaultProxy(int(s3_server.endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    yield proxy
    proxy.close()


def objects(s3_server: S3Server, url: str) -> list[str]:
    bucket, prefix = parse_s3_url(url)
    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"][len(prefix) :] for o in listed)


async def test_upload_classify_list_delete_on_a_bucket_match_the_directory_store(
    s3_settings, make_settings, s3_url, s3_server, tmp_path
):
    data = adapter_bytes(make_settings().clip_model, "pets", seed=3)
    async with running_app(make_settings(admin_token=TOKEN, adapter_dir=tmp_path / "dir")) as (client, _):
        assert (await upload(client, data)).status_code == 201
        on_disk = logits_of((await classify(client, 1, ["cat", "dog"], "pets")).json())
    async with running_app(s3_settings()) as (client, _):
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        created = await upload(client, data)
        assert created.status_code == 201 and created.json()["key"] == "pets@1"
        assert logits_of((await classify(client, 1, ["cat", "dog"], "pets")).json()) == on_disk
        assert objects(s3_server, s3_url) == ["pets/.claimed/1", "pets/1.safetensors"]
        listed = (await client.get("/v1/adapters")).json()["adapters"]
        assert [(a["name"], a["latest"], a["method"]) for a in listed] == [("pets", 1, "maple")]
        assert (
            await upload(client, adapter_bytes(make_settings().clip_model, "pets", seed=4))
        ).status_code == 201
        deleted = await client.delete("/v1/admin/adapters/pets@2", headers=AUTH)
        assert deleted.json() == {"deleted": ["pets@2"]}
        assert (await classify(client, 1, ["cat"], "pets@2")).status_code == 404
        assert (await classify(client, 1, ["cat"], "pets")).json()["adapter"] == "pets@1"
        refused = await upload(client, b"not an adapter")
        assert refused.status_code == 400
        assert (await client.delete("/v1/admin/adapters/pets", headers=AUTH)).status_code == 200
    assert objects(s3_server, s3_url) == ["pets/.claimed/1", "pets/.claimed/2"]  # numbers stay spent


async def test_store_down_at_start_starts_serves_zero_shot_and_readyz_says_why(
    s3_settings, proxy, s3_server, s3_url
):
    proxy.set("down")
    settings = s3_settings(store_timeout_s=0.5, store_attempts=1, store_refresh_s=0.0)
    async with running_app(settings) as (client, _):
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert "did not answer" in ready.json()["adapter_store"]
        assert (await classify(client, 1, ["cat", "dog"])).status_code == 200  # zero-shot serves
        named = await classify(client, 1, ["cat"], "pets")
        assert named.status_code == 503 and named.headers["Retry-After"]
        assert named.json()["error"]["code"] == "adapter_store_unavailable"
        data = adapter_bytes(settings.clip_model, "pets", seed=3)
        assert (await upload(client, data)).status_code == 503
        proxy.set("pass")  # back: the next look-up lists again
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        assert (await upload(client, data)).json()["key"] == "pets@1"  # nothing was spent meanwhile
        assert (await classify(client, 1, ["cat"], "pets")).status_code == 200


async def test_store_cut_during_an_upload_answers_503_and_stores_nothing_half(
    s3_settings, proxy, s3_server, s3_url
):
    settings = s3_settings(store_timeout_s=2, store_attempts=1)
    data = adapter_bytes(settings.clip_model, "pets", seed=3)
    async with running_app(settings) as (client, _):
        assert (await upload(client, data)).status_code == 201
        proxy.set("cut", cut_after=len(data) // 2)  # mid-body of the next PUT
        answer = await upload(client, adapter_bytes(settings.clip_model, "pets", seed=4))  # new tensors
        assert answer.status_code == 503 and answer.headers["Retry-After"], answer.text
        assert proxy.cuts >= 1
        proxy.set("pass")
        stored = [k for k in objects(s3_server, s3_url) if k.endswith(".safetensors")]
        assert stored == ["pets/1.safetensors"]  # no partial pets@2
        assert (await classify(client, 1, ["cat"], "pets")).json()["adapter"] == "pets@1"
        listed = (await client.get("/v1/adapters/pets")).json()
        assert [v["version"] for v in listed["versions"]] == [1]


async def test_a_wedged_store_times_out_with_bounded_retries_and_the_loop_keeps_answering(s3_settings, proxy):
    settings = s3_settings(store_timeout_s=0.5, store_attempts=2)
    async with running_app(settings) as (client, _):
        proxy.set("hang")
        upload_task = asyncio.ensure_future(
            upload(client, adapter_bytes(settings.clip_model, "pets", seed=3))
        )
        health = await client.get("/healthz")  # answered while the upload waits on the bucket
        assert health.status_code == 200 and not upload_task.done()
        zero_shot = await classify(client, 1, ["cat", "dog"])
        assert zero_shot.status_code == 200
        answer = await upload_task
        assert answer.status_code == 503 and "did not answer" in answer.json()["error"]["message"]
        assert proxy.accepted == 2  # --store-attempts: tried twice, then gave up


async def test_wrong_credentials_stop_the_start_with_a_clear_error(s3_settings, monkeypatch):
    from service.main import create_app

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    app = create_app(s3_settings())
    async with app.router.lifespan_context(app):
        with pytest.raises(RuntimeError) as failed:
            await app.state.runtime.wait_ready()
    message = str(failed.value)
    assert "refused the credentials" in message and "AWS_SECRET_ACCESS_KEY" in message
    assert "not-the-secret" not in message
