"""Greedy tokens through the service equal ``LlavaForConditionalGeneration.generate``'s,
on a tiny LLaVA whose tokens depend on positions (the sensitivity is asserted first):
single requests on both routes, concurrent requests joining at different steps, short
and long prompts, and the stop token counted in ``usage.completion_tokens``."""

from __future__ import annotations

import asyncio
import base64

import pytest
import torch

from tests.chat.conftest import model_inputs
from tests.conftest import encode, make_image, running_app

SHORT, MEDIUM, LONG = (
    "yes",
    "describe the picture in detail",
    " ".join(["describe the picture in detail"] * 30),
)
CASES = [(0, SHORT), (1, "what is in the image"), (2, MEDIUM), (3, LONG), (0, "answer the question")]


def b64(seed: int) -> str:
    return base64.b64encode(encode(make_image(seed))).decode()


@pytest.fixture
async def served(make_settings, position_llava_dir):
    async with running_app(make_settings(llava_model=str(position_llava_dir))) as (client, app):
        yield client, app


def shifted_greedy(model, processor, image_seed: int, instruction: str, n: int, shift: int) -> list[int]:
    """Greedy decoding with every decode step's position moved by ``shift``."""
    inputs = model_inputs(processor, image_seed, instruction)
    length = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        out = model(**inputs, use_cache=True)
        cache, token = out.cache, int(out.logits[0, -1].argmax())
        tokens = [token]
        for i in range(n - 1):
            step = model.model.language_model(
                input_ids=torch.tensor([[token]]),
                position_ids=torch.tensor([[length + i + shift]]),
                cache=cache,
                use_cache=True,
            )
            token = int(model.lm_head(step.last_hidden_state[0, -1]).argmax())
            tokens.append(token)
    return tokens


def test_the_fixture_is_sensitive_to_positions(position_model, generate_tokens):
    model, processor = position_model
    for seed, instruction in CASES[:3]:
        reference = generate_tokens(seed, instruction, 12)
        assert shifted_greedy(model, processor, seed, instruction, 12, 0) == reference
        off_by_one = shifted_greedy(model, processor, seed, instruction, 12, 1)
        assert off_by_one[1:4] != reference[1:4], "the fixture hides a position off by one"


def expected_text(app, tokens: list[int]) -> str:
    return app.state.runtime.services.chat.llava.tokenizer.decode(tokens, skip_special_tokens=True)


async def native(client, seed: int, instruction: str, max_tokens: int):
    r = await client.post(
        "/v1/chat", json={"image": b64(seed), "instruction": instruction, "max_tokens": max_tokens}
    )
    assert r.status_code == 200, r.text
    return r.json()


async def test_single_requests_equal_generate_on_both_routes(served, generate_tokens):
    client, app = served
    model_id = app.state.runtime.services.chat.llava.model_id
    stopped = 0
    for seed, instruction in CASES:
        tokens = generate_tokens(seed, instruction, 24)
        stopped += tokens[-1] in app.state.runtime.services.chat.llava.eos_token_ids
        body = await native(client, seed, instruction, 24)
        assert body["text"] == expected_text(app, tokens), (seed, instruction[:20])
        assert body["usage"]["completion_tokens"] == len(tokens)  # the stop token counts
        assert body["finish_reason"] == ("stop" if len(tokens) < 24 else "length")
        content = [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(seed)}"}},
            {"type": "text", "text": instruction},
        ]
        r = await client.post(
            "/v1/chat/completions",
            json={
                "model": model_id,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": 24,
                "temperature": 0,
            },
        )
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["message"]["content"] == body["text"]
        assert r.json()["usage"]["completion_tokens"] == len(tokens)
    assert stopped >= 1, "no case ends on the stop token: its count is untested"


async def test_concurrent_requests_joining_at_different_steps_equal_generate(served, generate_tokens):
    client, app = served
    engine = app.state.runtime.services.chat.engine
    plan = [(s % 4, CASES[s % len(CASES)][1], 6 + 3 * s) for s in range(8)]
    engine.batch_rows.clear()
    tasks = []
    for seed, instruction, max_tokens in plan:
        tasks.append(asyncio.ensure_future(native(client, seed, instruction, max_tokens)))
        joined_at = engine.steps
        while engine.steps < joined_at + 2 and not all(t.done() for t in tasks):
            await asyncio.sleep(0)  # let the running ones take two steps before the next joins
    bodies = await asyncio.gather(*tasks)
    for (seed, instruction, max_tokens), body in zip(plan, bodies, strict=True):
        tokens = generate_tokens(seed, instruction, max_tokens)
        assert body["text"] == expected_text(app, tokens), (seed, instruction[:20], max_tokens)
        assert body["usage"]["completion_tokens"] == len(tokens)
    assert max(engine.batch_rows) > 2, "the requests never decoded together"


async def test_a_burst_of_concurrent_requests_equals_generate(served, generate_tokens):
    client, app = served
    plan = [(s % 4, CASES[(s + 1) % len(CASES)][1], 10) for s in range(8)]
    bodies = await asyncio.gather(*(native(client, s, i, m) for s, i, m in plan))
    for (seed, instruction, max_tokens), body in zip(plan, bodies, strict=True):
        assert body["text"] == expected_text(app, generate_tokens(seed, instruction, max_tokens))


async def test_m2pt_adapters_equal_the_explicit_insertion(make_settings, position_llava_dir, explicit_tokens):
    from tests.chat.test_chat_adapters import AUTH, TOKEN, m2pt_bytes, m2pt_folded

    settings = make_settings(llava_model=str(position_llava_dir), admin_token=TOKEN)
    async with running_app(settings) as (client, app):
        for name, seed, n_text in (("caption", 1, 3), ("vqa", 2, 5)):
            up = await client.post(
                "/v1/admin/adapters",
                files={"file": ("a", m2pt_bytes(position_llava_dir, name, seed, n_text))},
                headers=AUTH,
            )
            assert up.status_code == 201, up.text
        plan = [(s, ["caption", "vqa"][s % 2], 8 + s) for s in range(4)]

        async def ask(seed: int, adapter: str, max_tokens: int):
            body = {"image": b64(seed), "instruction": MEDIUM, "max_tokens": max_tokens, "adapter": adapter}
            r = await client.post("/v1/chat", json=body)
            assert r.status_code == 200, r.text
            return r.json()

        together = await asyncio.gather(*(ask(*p) for p in plan))
        folded = {
            "caption": m2pt_folded(position_llava_dir, 1, 3),
            "vqa": m2pt_folded(position_llava_dir, 2, 5),
        }
        plain = await asyncio.gather(*(native(client, s, MEDIUM, m) for s, _, m in plan))
        for (seed, adapter, max_tokens), body, without in zip(plan, together, plain, strict=True):
            expected = explicit_tokens(seed, MEDIUM, folded[adapter], max_tokens)
            assert body["text"] == expected_text(app, expected), (seed, adapter)
            assert body["usage"]["completion_tokens"] == len(expected)
            assert body["text"] != without["text"], "the adapter never changed the answer"
