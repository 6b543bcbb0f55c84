"""Per-adapter metrics through HTTP: requests, errors, latency, rows per batch and the
loaded gauge by adapter name, with the label set bounded to the busiest names."""

from __future__ import annotations

import asyncio

from fixtures.adapters import adapter_bytes
from service.metrics import OTHER, AdapterLabels
from tests.conftest import running_app
from tests.registry.test_admin_api import TOKEN, classify, upload


def sample(app, name: str, **labels) -> float | None:
    return app.state.metrics.registry.get_sample_value(name, labels)


async def test_per_adapter_series_are_bounded_to_the_busiest_names(make_settings, tiny_clip_dir):
    settings = make_settings(admin_token=TOKEN, metrics_adapter_labels=2, max_batch_size=8, max_wait_ms=200)
    async with running_app(settings) as (client, app):
        for name in ("a1", "a2", "a3"):
            assert (await upload(client, adapter_bytes(tiny_clip_dir, name))).status_code == 201
        # a1 x4 at once (one batch), a2 x2, a3 x1: a3 is past the bound
        first = await asyncio.gather(*(classify(client, s, ["x", "y"], "a1@1") for s in range(4)))
        assert all(r.status_code == 200 for r in first)
        for ref in ("a2", "a2", "a3"):
            assert (await classify(client, 0, ["x", "y"], ref)).status_code == 200
        broken = await client.post(
            "/v1/classify",
            files={"image": ("i.png", b"not an image")},
            data={"labels": ["x"], "adapter": "a1"},
        )
        assert broken.status_code == 400  # failed after the adapter was resolved: counts for a1

        assert sample(app, "promptswap_adapter_requests_total", adapter="a1") == 5  # by name, not version
        assert sample(app, "promptswap_adapter_requests_total", adapter="a2") == 2
        assert sample(app, "promptswap_adapter_requests_total", adapter=OTHER) == 1
        assert sample(app, "promptswap_adapter_requests_total", adapter="a3") is None
        assert sample(app, "promptswap_adapter_errors_total", adapter="a1", status="4xx") == 1
        assert sample(app, "promptswap_adapter_errors_total", adapter="a2", status="4xx") is None
        assert sample(app, "promptswap_adapter_request_seconds_count", adapter="a1") == 5
        assert sample(app, "promptswap_adapter_request_seconds_count", adapter=OTHER) == 1
        # rows per batch: every a1 row that reached the model, in fewer batches than rows
        assert sample(app, "promptswap_adapter_batch_rows_sum", adapter="a1") == 4
        assert sample(app, "promptswap_adapter_batch_rows_count", adapter="a1") < 4
        for label, loaded in (("a1", 1), ("a2", 1), (OTHER, 1)):
            assert sample(app, "promptswap_adapter_loaded", adapter=label) == loaded

        # a3 draws twice a2's traffic: it takes a2's place, a2's series go
        for _ in range(4):
            assert (await classify(client, 0, ["x"], "a3")).status_code == 200
        text = (await client.get("/metrics")).text
        assert 'promptswap_adapter_requests_total{adapter="a3"}' in text
        assert 'adapter="a2"' not in text
        assert 'adapter="a1"' in text


def test_labels_keep_the_top_n_with_hysteresis():
    demoted: list[str] = []
    labels = AdapterLabels(2, demoted.append)
    assert {labels.count("a") for _ in range(10)} == {"a"}
    assert {labels.count("b") for _ in range(5)} == {"b"}
    assert {labels.count("c") for _ in range(9)} == {OTHER}  # 9 < 2 x 5
    assert labels.count("c") == "c" and demoted == ["b"]  # 10 >= 2 x 5: c displaces the floor
    assert labels.count("b") == OTHER and labels.label("b") == OTHER  # b would need 2 x 10 now
    assert labels.label("a") == "a"
    off = AdapterLabels(0, demoted.append)
    assert off.count("a") == OTHER  # N = 0: every adapter is "other"
