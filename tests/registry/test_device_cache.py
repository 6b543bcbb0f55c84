"""The device cache: adapters loaded once however many requests want them, held under a
byte budget with LRU eviction, and a device out-of-memory during a load answered by
evicting idle adapters (503 + Retry-After when none is idle)."""

from __future__ import annotations

import asyncio

import pytest

from fixtures.adapters import adapter_bytes
from tests.classify.test_errors import assert_error, form, still_serving
from tests.conftest import encode, make_image, running_app
from tests.registry.test_admin_api import TOKEN, classify, loaded, upload


@pytest.fixture
def admin_settings(make_settings):
    return lambda **kw: make_settings(admin_token=TOKEN, **kw)


async def test_cold_adapter_loads_once_for_concurrent_requests(admin_settings, tiny_clip_dir):
    async with running_app(admin_settings()) as (client, app):
        assert (await upload(client, adapter_bytes(tiny_clip_dir, "cold"))).status_code == 201
        registry = app.state.runtime.services.registry
        assert registry.loads == 0
        responses = await asyncio.gather(*(classify(client, s, ["a", "b"], "cold") for s in range(10)))
        assert all(r.status_code == 200 for r in responses)
        assert registry.loads == 1
        assert app.state.metrics.registry.get_sample_value("promptswap_adapter_loads_total") == 1


async def test_device_cache_evicts_least_recently_used(admin_settings, tiny_clip_dir):
    one_adapter = 3 * 2 * (64 + 96) * 4  # depth 3, n_ctx 2, fp32
    async with running_app(admin_settings(adapter_cache_bytes=2 * one_adapter)) as (client, app):
        for name in ("a1", "a2", "a3"):
            assert (await upload(client, adapter_bytes(tiny_clip_dir, name))).status_code == 201
        registry = app.state.runtime.services.registry
        for name in ("a1", "a2", "a3"):
            assert (await classify(client, 0, ["x"], name)).status_code == 200
        assert [await loaded(client, name) for name in ("a1", "a2", "a3")] == [False, True, True]
        assert registry.device_bytes <= 2 * one_adapter
        assert (await classify(client, 0, ["x"], "a1")).status_code == 200  # reloads from the store
        assert registry.loads == 4
        text = (await client.get("/metrics")).text
        assert "promptswap_adapter_evictions_total 2.0" in text
        assert 'promptswap_adapter_requests_total{adapter="a1"} 2.0' in text


async def test_concurrent_cold_loads_past_a_one_adapter_budget_all_succeed(admin_settings, tiny_clip_dir):
    one_adapter = 3 * 2 * (64 + 96) * 4
    async with running_app(admin_settings(adapter_cache_bytes=one_adapter)) as (client, app):
        names = [f"churn{i}" for i in range(4)]
        for name in names:
            assert (await upload(client, adapter_bytes(tiny_clip_dir, name))).status_code == 201
        responses = await asyncio.gather(*(classify(client, i, ["a", "b"], names[i % 4]) for i in range(24)))
        assert [r.status_code for r in responses] == [200] * 24
        assert [r.json()["adapter"] for r in responses] == [f"{names[i % 4]}@1" for i in range(24)]
        registry = app.state.runtime.services.registry
        assert registry.device_bytes <= one_adapter  # nothing pinned once answered


def simulate_device_capacity(registry, adapters: int) -> list[str]:
    """Make the maple placement raise the device's out-of-memory error once ``adapters``
    adapters are loaded; returns the keys whose placement hit it."""
    import torch

    from service.registry.placement import Placement

    real = registry.placements["maple"]
    refused: list[str] = []

    def place(folded):
        if len(registry._loaded) >= adapters:
            refused.append(f"{len(registry._loaded)} loaded")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return real.place(folded)

    registry.placements["maple"] = Placement(real.fingerprint, place)
    return refused


async def test_device_oom_during_adapter_load_evicts_idle_adapters_and_retries(make_settings, tiny_clip_dir):
    async with running_app(make_settings(admin_token=TOKEN)) as (client, app):
        registry = app.state.runtime.services.registry
        for seed, name in enumerate(("a", "b", "c")):
            assert (await upload(client, adapter_bytes(tiny_clip_dir, name, seed=seed))).status_code == 201
        reference = (
            await client.post("/v1/classify", **form(encode(make_image(3)), ["x", "y"], adapter="c"))
        ).json()
        registry.forget([registry.store.get("c")])  # cold again
        refused = simulate_device_capacity(registry, adapters=2)
        for name in ("a", "b"):
            assert (
                await client.post("/v1/classify", **form(encode(make_image(3)), ["x", "y"], adapter=name))
            ).status_code == 200
        # The device is full: loading c evicts a (least recently used), then succeeds.
        response = await client.post("/v1/classify", **form(encode(make_image(3)), ["x", "y"], adapter="c"))
        assert response.status_code == 200, response.text
        assert response.json() == reference
        assert refused == ["2 loaded"]
        assert [await loaded(client, name) for name in ("a", "b", "c")] == [False, True, True]
        metrics = (await client.get("/metrics")).text
        assert "promptswap_adapter_load_oom_total 1.0" in metrics


async def test_device_oom_with_nothing_to_evict_is_503(make_settings, tiny_clip_dir):
    async with running_app(make_settings(admin_token=TOKEN)) as (client, app):
        assert (await upload(client, adapter_bytes(tiny_clip_dir, "a", seed=1))).status_code == 201
        simulate_device_capacity(app.state.runtime.services.registry, adapters=0)
        response = await client.post("/v1/classify", **form(encode(make_image(3)), ["x", "y"], adapter="a"))
        assert "memory" in assert_error(response, 503, "unavailable")["message"]
        assert response.headers["Retry-After"] == "2"
        await still_serving(client)  # zero-shot needs no adapter memory
