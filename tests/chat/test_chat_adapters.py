"""M2PT adapters served on chat: upload, per-adapter KV prefix, mixed batches, and the
greedy tokens of the served path against the method's explicit form."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

from adapters.prompted_llava import explicit_forward
from fixtures.adapters import m2pt_adapter_bytes, random_m2pt
from tests.conftest import encode, make_image, running_app
from tests.llava_fixtures import save_tiny_llava

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("llava-m2pt"))


def m2pt_folded(llava_dir: Path, seed: int, n_text: int = 3):
    # larger prompts (x20) so the adapter visibly changes the answer
    return random_m2pt(LlavaConfig.from_pretrained(llava_dir), seed, n_vision=2, n_text=n_text, scale=20)


def m2pt_bytes(llava_dir: Path, name: str, seed: int, n_text: int = 3) -> bytes:
    return m2pt_adapter_bytes(llava_dir, name, seed, n_vision=2, n_text=n_text, scale=20)


async def chat(client, image_seed: int, adapter: str | None = None, max_tokens: int = 10):
    body = {
        "image": base64.b64encode(encode(make_image(image_seed))).decode(),
        "instruction": "describe the picture in detail",
        "max_tokens": max_tokens,
    }
    if adapter is not None:
        body["adapter"] = adapter
    response = await client.post("/v1/chat", json=body)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
async def served(make_settings, llava_dir):
    settings = make_settings(llava_model=str(llava_dir), admin_token=TOKEN)
    async with running_app(settings) as (client, app):
        for name, seed, n_text in (("caption", 1, 3), ("vqa", 2, 5)):
            up = await client.post(
                "/v1/admin/adapters",
                files={"file": ("a", m2pt_bytes(llava_dir, name, seed, n_text))},
                headers=AUTH,
            )
            assert up.status_code == 201, up.text
            assert up.json()["manifest"]["method"] == "m2pt"
        yield client, app


def explicit_greedy(llava_dir: Path, image_seed: int, folded, max_tokens: int) -> list[int]:
    """Greedy decoding by full recomputation through the method's literal form."""
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    processor = AutoProcessor.from_pretrained(llava_dir)
    image = Image.open(io.BytesIO(encode(make_image(image_seed)))).convert("RGB")
    conversation = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "describe the picture in detail"}],
        }
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=image, text=text, return_tensors="pt")
    ids = inputs["input_ids"]
    eos = processor.tokenizer.eos_token_id
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(max_tokens):
            logits = explicit_forward(model, ids, torch.ones_like(ids), inputs["pixel_values"], folded)
            token = int(logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


async def test_served_adapter_equals_the_explicit_method(served, llava_dir):
    client, app = served
    body = await chat(client, 0, "caption", max_tokens=10)
    assert body["adapter"] == "caption@1"
    expected = explicit_greedy(llava_dir, 0, m2pt_folded(llava_dir, 1), 10)
    tokenizer = app.state.runtime.services.chat.llava.tokenizer
    assert body["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    adapted = [body["text"]] + [(await chat(client, s, "vqa", max_tokens=10))["text"] for s in (1, 2)]
    plain = [(await chat(client, s, None, max_tokens=10))["text"] for s in (0, 1, 2)]
    assert adapted != plain, "the adapters never changed an answer"


async def test_mixed_adapters_in_one_batch_equal_alone(served):
    client, app = served
    plan = [(seed, [None, "caption", "vqa"][seed % 3], 4 + seed) for seed in range(9)]
    alone = [(await chat(client, s, a, m))["text"] for s, a, m in plan]
    engine = app.state.runtime.services.chat.engine
    engine.batch_rows.clear()
    together = await asyncio.gather(*(chat(client, s, a, m) for s, a, m in plan))
    assert [b["text"] for b in together] == alone
    assert [b["adapter"] for b in together] == [None if a is None else f"{a}@1" for _, a, _ in plan]
    assert max(engine.batch_rows) > 1


async def test_prefix_is_computed_once_per_adapter(served):
    client, app = served
    registry = app.state.runtime.services.registry
    await asyncio.gather(*(chat(client, s, "vqa", 3) for s in range(6)))
    loaded_before = registry.loads
    await chat(client, 7, "vqa", 3)
    assert registry.loads == loaded_before  # the prefix and prompts stay on the device
    assert "prefix" in registry._loaded["vqa@1"].extras


async def test_m2pt_adapter_on_classify_is_422(make_settings, llava_dir):
    settings = make_settings(llava_model=str(llava_dir), admin_token=TOKEN)
    async with running_app(settings) as (client, _):
        up = await client.post(
            "/v1/admin/adapters", files={"file": ("a", m2pt_bytes(llava_dir, "chatty", 3))}, headers=AUTH
        )
        assert up.status_code == 201
        r = await client.post(
            "/v1/classify",
            files={"image": ("i.png", encode(make_image(0)))},
            data={"labels": ["cat"], "adapter": "chatty"},
        )
        assert r.status_code == 422 and "m2pt" in r.json()["error"]["message"]


async def test_m2pt_upload_without_llava_is_409(make_settings, llava_dir):
    async with running_app(make_settings(admin_token=TOKEN)) as (client, _):
        r = await client.post(
            "/v1/admin/adapters", files={"file": ("a", m2pt_bytes(llava_dir, "x", 3))}, headers=AUTH
        )
        assert r.status_code == 409 and "no backbone" in r.json()["error"]["message"]
