"""OpenAI's logprobs and penalties through /v1/chat/completions, against ``generate``:
logprobs equal ``log_softmax`` of generate's scores (stream and whole, alone and batched),
and presence/frequency penalties as OpenAI defines them give generate's tokens under a
logits processor that applies that definition (the penalties' effect is asserted first)."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from fixtures.images import encode, make_image
from tests.chat.conftest import model_inputs
from tests.conftest import running_app

INSTRUCTION = "describe the picture in detail"
STEPS = 10


def request_body(model: str, image_seed: int, **extra) -> dict:
    image = "data:image/png;base64," + base64.b64encode(encode(make_image(image_seed))).decode()
    content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": INSTRUCTION}]
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": STEPS,
        "temperature": 0,
        **extra,
    }


@pytest.fixture
async def served(make_settings, position_llava_dir):
    async with running_app(make_settings(clip_model="", llava_model=str(position_llava_dir))) as (
        client,
        app,
    ):
        yield client, app.state.runtime.services.chat.model_id


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's definition: logit[j] -= count[j] * frequency + (count[j] > 0) * presence."""

    def __init__(self, prompt_length: int, frequency: float, presence: float) -> None:
        self.prompt_length, self.frequency, self.presence = prompt_length, frequency, presence

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :]
        counts = torch.zeros_like(scores).scatter_add_(
            1, generated, torch.ones_like(generated, dtype=scores.dtype)
        )
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


def reference(position_model, image_seed: int, frequency: float = 0.0, presence: float = 0.0):
    """generate's greedy tokens and the log_softmax of its scores, one row per step."""
    model, processor = position_model
    inputs = model_inputs(processor, image_seed, INSTRUCTION)
    processors = LogitsProcessorList([OpenAIPenalties(inputs["input_ids"].shape[1], frequency, presence)])
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=STEPS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            logits_processor=processors,
        )
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    return tokens, [torch.log_softmax(s[0].float(), -1) for s in out.scores]


def check_logprobs(content: list[dict], tokens: list[int], logprobs: list[torch.Tensor], tokenizer) -> None:
    eos = tokenizer.eos_token_id
    answer = [t for t in tokens if t != eos]
    assert len(content) == len(answer) > 3
    for i, entry in enumerate(content):
        expected = logprobs[i]
        assert entry["token"] == tokenizer.decode([answer[i]])
        assert entry["logprob"] == pytest.approx(float(expected[answer[i]]), abs=1e-4)
        values, ids = torch.topk(expected, 5)
        assert [t["token"] for t in entry["top_logprobs"]] == [tokenizer.decode([int(j)]) for j in ids]
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(values.tolist(), abs=1e-4)
        assert entry["bytes"] == list(entry["token"].encode())


def streamed(text: str) -> list[dict]:
    events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def test_logprobs_equal_generates_scores_whole_streamed_and_batched(served, position_model):
    client, model = served
    tokenizer = position_model[1].tokenizer
    expected = {seed: reference(position_model, seed) for seed in (0, 1, 2)}
    whole = await client.post(
        "/v1/chat/completions", json=request_body(model, 0, logprobs=True, top_logprobs=5)
    )
    assert whole.status_code == 200, whole.text
    choice = whole.json()["choices"][0]
    check_logprobs(choice["logprobs"]["content"], *expected[0], tokenizer)

    stream = await client.post(
        "/v1/chat/completions", json=request_body(model, 0, logprobs=True, top_logprobs=5, stream=True)
    )
    chunks = [c["choices"][0] for c in streamed(stream.text) if c["choices"]]
    content = [entry for c in chunks for entry in c["logprobs"]["content"]]
    check_logprobs(content, *expected[0], tokenizer)
    assert "".join(c["delta"]["content"] for c in chunks) == choice["message"]["content"]

    together = await asyncio.gather(
        *(
            client.post("/v1/chat/completions", json=request_body(model, seed, logprobs=True, top_logprobs=5))
            for seed in (0, 1, 2)
        )
    )
    for seed, answer in zip((0, 1, 2), together, strict=True):
        check_logprobs(answer.json()["choices"][0]["logprobs"]["content"], *expected[seed], tokenizer)

    plain = await client.post("/v1/chat/completions", json=request_body(model, 0, logprobs=False))
    assert plain.json()["choices"][0]["logprobs"] is None
    assert plain.json()["choices"][0]["message"]["content"] == choice["message"]["content"]


async def test_penalties_are_openais(served, position_model):
    client, model = served
    tokenizer = position_model[1].tokenizer
    plain_tokens, _ = reference(position_model, 0)
    penalised_tokens, penalised_logprobs = reference(position_model, 0, frequency=1.5, presence=0.7)
    assert penalised_tokens != plain_tokens  # the penalties change this answer: the test can fail
    body = request_body(model, 0, frequency_penalty=1.5, presence_penalty=0.7, logprobs=True, top_logprobs=5)
    answer = await client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    check_logprobs(
        answer.json()["choices"][0]["logprobs"]["content"], penalised_tokens, penalised_logprobs, tokenizer
    )
    text = tokenizer.decode(
        [t for t in penalised_tokens if t != tokenizer.eos_token_id], skip_special_tokens=True
    )
    assert answer.json()["choices"][0]["message"]["content"] == text
    # Either penalty alone is applied as defined too.
    for name, value in (("frequency_penalty", 1.5), ("presence_penalty", 1.5)):
        tokens, _ = reference(position_model, 0, **{name.split("_")[0]: value})
        one = await client.post("/v1/chat/completions", json=request_body(model, 0, **{name: value}))
        expected = tokenizer.decode(
            [t for t in tokens if t != tokenizer.eos_token_id], skip_special_tokens=True
        )
        assert one.json()["choices"][0]["message"]["content"] == expected, name


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"top_logprobs": 3}, "top_logprobs: needs logprobs: true"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
    ],
    ids=["top-without-logprobs", "top-over-20", "frequency-range", "presence-range"],
)
async def test_bad_openai_sampling_parameters_are_422(served, extra, fragment):
    client, model = served
    r = await client.post("/v1/chat/completions", json=request_body(model, 0, **extra))
    assert r.status_code == 422 and r.json()["error"]["message"].startswith(fragment), r.text


async def test_text_only_messages_are_answered_as_the_language_model_does(served, position_model):
    """No image part: a LLaVA answers from its language model alone, as generate does."""
    client, model = served
    llava, processor = position_model
    conversation = [{"role": "user", "content": [{"type": "text", "text": INSTRUCTION}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, return_tensors="pt")
    assert "pixel_values" not in inputs
    with torch.inference_mode():
        out = llava.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    tokens = [
        t for t in out[0, inputs["input_ids"].shape[1] :].tolist() if t != processor.tokenizer.eos_token_id
    ]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": INSTRUCTION}],
        "max_tokens": STEPS,
        "temperature": 0,
    }
    answer = await client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == processor.tokenizer.decode(
        tokens, skip_special_tokens=True
    )
    assert answer.json()["usage"]["prompt_tokens"] == inputs["input_ids"].shape[1]
