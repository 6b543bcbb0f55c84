"""The engine's KV cache and steps, driven through HTTP as the service drives them: the
cache stays in place, admission by memory under a tiny budget, batched chunked prefill
with running requests decoding in the same steps, and a clean server log."""

from __future__ import annotations

import asyncio
import base64
import warnings

import pytest

from service.chat.kv_slots import SlotBatch, bytes_per_token
from tests.chat.test_chat_exact import CASES, LONG, MEDIUM, SHORT, expected_text
from tests.conftest import encode, make_image, running_app


def b64(seed: int) -> str:
    return base64.b64encode(encode(make_image(seed))).decode()


async def ask(client, seed: int, instruction: str, max_tokens: int):
    body = {"image": b64(seed), "instruction": instruction, "max_tokens": max_tokens}
    return await client.post("/v1/chat", json=body)


def slot_bytes(llava_dir, slots: int, tokens: int = 512) -> int:
    from transformers import LlavaConfig

    return (
        slots
        * tokens
        * bytes_per_token(LlavaConfig.from_pretrained(llava_dir).text_config, __import__("torch").float32)
    )


async def test_decode_writes_in_place_and_reads_views(make_settings, position_llava_dir, monkeypatch):
    reads: list[tuple[int, bool]] = []  # (tokens per row, the keys read share the cache's storage)
    update = SlotBatch.update

    def spy(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = update(self, key_states, value_states, layer_idx, *args, **kwargs)
        store = self.store.keys[layer_idx]
        reads.append(
            (key_states.shape[2], keys.untyped_storage().data_ptr() == store.untyped_storage().data_ptr())
        )
        return keys, values

    monkeypatch.setattr(SlotBatch, "update", spy)
    async with running_app(make_settings(llava_model=str(position_llava_dir))) as (client, app):
        engine = app.state.runtime.services.chat.engine
        pointers = [t.data_ptr() for t in engine.kv.keys + engine.kv.values]
        assert (await ask(client, 3, CASES[3][1], 4)).status_code == 200  # alone: one slot, read as a view
        alone = [shares for tokens, shares in reads if tokens > 1]
        assert alone and all(alone), "reading a prompt copied the cache"
        first = [(s, i, 12) for s, i in CASES[:4]]
        responses = await asyncio.gather(*(ask(client, *p) for p in first))
        assert all(r.status_code == 200 for r in responses)
        assert [t.data_ptr() for t in engine.kv.keys + engine.kv.values] == pointers  # preallocated, kept
    decode_reads = [shares for tokens, shares in reads if tokens == 1]
    assert decode_reads and all(decode_reads), "a decode step copied the cache"
    assert max(engine.batch_rows) > 1


async def test_tiny_budget_many_requests_wait_for_memory_and_stay_exact(
    make_settings, position_llava_dir, generate_tokens
):
    settings = make_settings(
        llava_model=str(position_llava_dir),
        kv_cache_bytes=slot_bytes(position_llava_dir, 2),
        chat_max_queue=32,
    )
    async with running_app(settings) as (client, app):
        engine = app.state.runtime.services.chat.engine
        assert engine.kv.slots == 2
        plan = [(s % 4, CASES[s % len(CASES)][1], 5 + s) for s in range(10)]
        responses = await asyncio.gather(*(ask(client, *p) for p in plan))
        for (seed, instruction, max_tokens), r in zip(plan, responses, strict=True):
            assert r.status_code == 200, r.text
            assert r.json()["text"] == expected_text(app, generate_tokens(seed, instruction, max_tokens))
        assert (
            max(decoded + read for decoded, read, _ in engine.step_shapes) <= 2
        )  # never more rows than slots
        assert engine.kv.free == 2  # every slot came back


async def test_a_request_that_could_never_fit_is_400_naming_the_numbers(make_settings, position_llava_dir):
    one_small_slot = slot_bytes(position_llava_dir, 1, tokens=60)
    async with running_app(
        make_settings(llava_model=str(position_llava_dir), kv_cache_bytes=one_small_slot)
    ) as (
        client,
        app,
    ):
        assert app.state.runtime.services.chat.engine.kv.slot_tokens == 60
        r = await ask(client, 0, SHORT, 40)
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert "60" in message and "max_tokens 40" in message and "--kv-cache-bytes" in message
        ok = await ask(client, 0, SHORT, 8)  # what fits still runs
        assert ok.status_code == 200


async def test_past_the_queue_is_429_with_retry_after(make_settings, position_llava_dir):
    settings = make_settings(
        llava_model=str(position_llava_dir),
        kv_cache_bytes=slot_bytes(position_llava_dir, 1),
        chat_max_queue=1,
    )
    async with running_app(settings) as (client, _):
        responses = await asyncio.gather(*(ask(client, s % 4, MEDIUM, 20) for s in range(6)))
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 429 in codes, codes
        refused = next(r for r in responses if r.status_code == 429)
        assert int(refused.headers["Retry-After"]) > 0 and refused.json()["error"]["code"]


async def test_long_prompts_are_read_in_chunks_while_others_decode(
    make_settings, position_llava_dir, generate_tokens
):
    settings = make_settings(llava_model=str(position_llava_dir), max_prefill_tokens=32)
    async with running_app(settings) as (client, app):
        engine = app.state.runtime.services.chat.engine
        running = asyncio.ensure_future(ask(client, 1, MEDIUM, 60))
        while not engine.batch_rows:  # the first request is decoding
            await asyncio.sleep(0)
        engine.step_shapes.clear()
        burst = [(s, LONG, 6) for s in range(3)]
        answers = await asyncio.gather(*(ask(client, *p) for p in burst))
        shapes = list(engine.step_shapes)
        for (seed, instruction, max_tokens), r in zip(burst, answers, strict=True):
            assert r.status_code == 200
            assert r.json()["text"] == expected_text(app, generate_tokens(seed, instruction, max_tokens))
        first = await running
        assert first.json()["text"] == expected_text(app, generate_tokens(1, MEDIUM, 60))
    assert max(tokens for _, _, tokens in shapes) <= 32  # the bound holds
    assert any(read > 1 for _, read, _ in shapes), "prompts that joined together were read one by one"
    assert sum(1 for decoded, read, _ in shapes if decoded and read) >= 3 * 188 // 32 - 1, (
        "the running request stopped decoding while the long prompts were read"
    )


async def test_no_deprecation_warnings_in_the_server_log(make_settings, position_llava_dir):
    from tests.chat.test_chat_adapters import AUTH, TOKEN, m2pt_bytes

    settings = make_settings(llava_model=str(position_llava_dir), admin_token=TOKEN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with running_app(settings) as (client, _):
            up = await client.post(
                "/v1/admin/adapters",
                files={"file": ("a", m2pt_bytes(position_llava_dir, "x", 1))},
                headers=AUTH,
            )
            assert up.status_code == 201
            assert (await ask(client, 0, MEDIUM, 4)).status_code == 200
            body = {"image": b64(0), "instruction": MEDIUM, "max_tokens": 4, "adapter": "x"}
            assert (await client.post("/v1/chat", json=body)).status_code == 200
    deprecations = [
        str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
    ]
    assert not [m for m in deprecations if "past_key_values" in m or "cache" in m], deprecations


@pytest.mark.parametrize("prefill", [1, 7])
async def test_any_chunk_size_gives_the_same_tokens(
    make_settings, position_llava_dir, generate_tokens, prefill
):
    settings = make_settings(llava_model=str(position_llava_dir), max_prefill_tokens=prefill)
    async with running_app(settings) as (client, app):
        plan = [(0, MEDIUM, 8), (1, SHORT, 8)]
        answers = await asyncio.gather(*(ask(client, *p) for p in plan))
        for (seed, instruction, max_tokens), r in zip(plan, answers, strict=True):
            assert r.json()["text"] == expected_text(app, generate_tokens(seed, instruction, max_tokens))
