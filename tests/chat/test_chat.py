"""Chat on a tiny random LLaVA: exactness against model.generate, iteration-level
batching, streaming, the OpenAI client, and bad input."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from tests.conftest import encode, make_image, running_app
from tests.llava_fixtures import save_tiny_llava

INSTRUCTIONS = ["what is in the image", "describe the picture in detail", "answer the question"]


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture
def chat_settings(make_settings, tiny_llava_dir):
    return lambda **kw: make_settings(llava_model=str(tiny_llava_dir), **kw)


@pytest.fixture
async def chat_client(chat_settings):
    async with running_app(chat_settings()) as (client, app):
        yield client, app


def b64(seed: int) -> str:
    return base64.b64encode(encode(make_image(seed))).decode()


async def chat(client, image_seed: int, instruction: str, **extra):
    return await client.post("/v1/chat", json={"image": b64(image_seed), "instruction": instruction, **extra})


@pytest.fixture(scope="module")
def reference(tiny_llava_dir):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)

    def greedy(seed: int, instruction: str, max_new_tokens: int) -> str:
        image = Image.open(io.BytesIO(encode(make_image(seed)))).convert("RGB")
        conversation = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}
        ]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=image, text=text, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    return greedy


async def test_greedy_tokens_equal_model_generate(chat_client, reference):
    client, _ = chat_client
    for seed, instruction in enumerate(INSTRUCTIONS):
        response = await chat(client, seed, instruction, max_tokens=16)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["text"] == reference(seed, instruction, 16)
        assert body["adapter"] is None and body["finish_reason"] in {"stop", "length"}
        assert (
            body["usage"]["total_tokens"]
            == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        )


async def test_concurrent_requests_share_steps_and_match_alone(chat_client):
    client, app = chat_client
    requests = [(seed, INSTRUCTIONS[seed % 3], 4 + 3 * seed) for seed in range(8)]
    alone = [(await chat(client, s, i, max_tokens=m)).json()["text"] for s, i, m in requests]
    engine = app.state.runtime.services.chat.engine
    engine.batch_rows.clear()
    together = await asyncio.gather(*(chat(client, s, i, max_tokens=m) for s, i, m in requests))
    assert [r.json()["text"] for r in together] == alone
    assert max(engine.batch_rows) > 1, "decode steps were never shared"


async def test_short_request_is_not_held_hostage_by_a_long_one(chat_client):
    client, app = chat_client
    engine = app.state.runtime.services.chat.engine
    long = asyncio.ensure_future(chat(client, 0, INSTRUCTIONS[0], max_tokens=120))
    while engine.active == 0:  # the long one is decoding
        await asyncio.sleep(0)
    short = await chat(client, 1, INSTRUCTIONS[1], max_tokens=2)
    assert short.status_code == 200
    assert not long.done(), "the short request waited for the long one"
    assert (await long).status_code == 200


async def test_sampling_with_a_seed_is_reproducible_in_any_batch(chat_client):
    client, _ = chat_client
    params = dict(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    alone = (await chat(client, 3, INSTRUCTIONS[0], **params)).json()["text"]
    together = await asyncio.gather(
        chat(client, 3, INSTRUCTIONS[0], **params),
        *(chat(client, s, INSTRUCTIONS[1], max_tokens=8) for s in range(4)),
    )
    assert together[0].json()["text"] == alone


def sse_payloads(text: str) -> list:
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def test_streaming_equals_the_whole_answer(chat_client):
    client, _ = chat_client
    whole = (await chat(client, 2, INSTRUCTIONS[2], max_tokens=12)).json()
    response = await chat(client, 2, INSTRUCTIONS[2], max_tokens=12, stream=True)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_payloads(response.text)
    assert len(events) > 1
    assert "".join(e["text"] for e in events) == whole["text"]
    assert events[-1]["finish_reason"] == whole["finish_reason"]
    assert events[-1]["usage"] == whole["usage"]


async def test_stop_strings_end_the_answer(chat_client):
    client, _ = chat_client
    full = (await chat(client, 0, INSTRUCTIONS[0], max_tokens=16)).json()["text"]
    assert len(full) > 4
    stop = full[2:4]
    stopped = (await chat(client, 0, INSTRUCTIONS[0], max_tokens=16, stop=[stop])).json()
    assert stopped["text"] == full[: full.find(stop)] and stopped["finish_reason"] == "stop"
    streamed = sse_payloads(
        (await chat(client, 0, INSTRUCTIONS[0], max_tokens=16, stop=stop, stream=True)).text
    )
    assert "".join(e["text"] for e in streamed) == stopped["text"]


async def test_openai_client_works_unchanged(chat_settings, tiny_llava_dir):
    openai = pytest.importorskip("openai")
    async with running_app(chat_settings()) as (client, app):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        oa = openai.AsyncOpenAI(api_key="unused", base_url="http://test/v1", http_client=http)
        models = await oa.models.list()
        assert tiny_llava_dir.name in [m.id for m in models.data]
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": INSTRUCTIONS[0]},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(0)}"}},
                ],
            }
        ]
        completion = await oa.chat.completions.create(
            model=tiny_llava_dir.name, messages=messages, max_tokens=12, temperature=0
        )
        plain = (await chat(client, 0, INSTRUCTIONS[0], max_tokens=12)).json()
        assert completion.choices[0].message.content == plain["text"]
        assert completion.usage.completion_tokens == plain["usage"]["completion_tokens"]
        stream = await oa.chat.completions.create(
            model=tiny_llava_dir.name,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                usage = chunk.usage
        assert "".join(pieces) == plain["text"] and usage.total_tokens == completion.usage.total_tokens
        with pytest.raises(openai.BadRequestError):
            await oa.chat.completions.create(
                model=tiny_llava_dir.name,
                max_tokens=4,
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "hi"},
                            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                        ],
                    }
                ],
            )
        await http.aclose()


async def test_client_leaving_a_stream_stops_its_generation(chat_client):
    client, app = chat_client
    engine = app.state.runtime.services.chat.engine
    async with client.stream(
        "POST", "/v1/chat", json={"image": b64(0), "instruction": "hi", "max_tokens": 200, "stream": True}
    ) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                break  # one token is enough; leave
    steps_at_exit = engine.steps
    while engine.active:  # the engine drops it at its next step
        await asyncio.sleep(0)
    assert engine.steps - steps_at_exit < 50


GOOD_IMAGE = b64(0)


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"instruction": "hi"}, 422, "image"),
        ({"image": "", "instruction": "hi"}, 400, "no image"),
        ({"image": base64.b64encode(b"not an image").decode(), "instruction": "hi"}, 400, "image"),
        ({"image": "https://example.com/x.png", "instruction": "hi"}, 400, "remote"),
        ({"image": GOOD_IMAGE, "instruction": "hi", "max_tokens": 100_000}, 422, "max_tokens"),
        ({"image": GOOD_IMAGE, "instruction": "hi", "adapter": "missing"}, 404, "missing"),
        ({"image": GOOD_IMAGE, "instruction": "hi", "temperature": 5}, 422, "temperature"),
    ],
    ids=[
        "no-image",
        "empty-image",
        "undecodable",
        "remote-url",
        "max-tokens",
        "unknown-adapter",
        "temperature",
    ],
)
async def test_bad_chat_requests(chat_client, body, status, fragment):
    client, _ = chat_client
    response = await client.post("/v1/chat", json=body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]
    assert (await chat(client, 0, "hi", max_tokens=2)).status_code == 200


async def test_two_images_and_prompt_over_context_are_400(chat_client):
    client, _ = chat_client
    image = encode(make_image(0))
    two = await client.post(
        "/v1/chat",
        files=[("image", ("a.png", image)), ("image", ("b.png", image))],
        data={"instruction": "hi"},
    )
    assert two.status_code == 400 and "2 images" in two.json()["error"]["message"]
    long_text = " ".join(["describe the picture in detail"] * 60)
    over = await chat(client, 0, long_text, max_tokens=4)
    assert over.status_code == 400 and over.json()["error"]["code"] == "context_length_exceeded"
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(0)}"}},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(1)}"}},
            ],
        }
    ]
    r = await client.post("/v1/chat/completions", json={"model": "x", "messages": messages})
    assert r.status_code == 400


async def test_maple_adapter_on_chat_is_422(chat_settings, tiny_clip_dir):
    from fixtures.adapters import adapter_bytes

    async with running_app(chat_settings(admin_token="t")) as (client, _):
        up = await client.post(
            "/v1/admin/adapters",
            files={"file": ("a", adapter_bytes(tiny_clip_dir, "clipper"))},
            headers={"Authorization": "Bearer t"},
        )
        assert up.status_code == 201
        r = await chat(client, 0, "hi", adapter="clipper")
        assert r.status_code == 422 and "maple" in r.json()["error"]["message"]


async def test_chat_without_llava_is_404(client):
    r = await chat(client, 0, "hi")
    assert r.status_code == 404 and "LLaVA" in r.json()["error"]["message"]
