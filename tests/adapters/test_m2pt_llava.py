"""M²PT on a tiny random LLaVA: the prompted forwards against the plain model and each other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from adapters.m2pt import FoldedM2pt, M2ptConfig, M2ptPromptLearner, fold
from adapters.prompted_llava import (
    explicit_forward,
    forward_with_prefix,
    image_embeds,
    positions_from_mask,
    prefix_kv,
    prefix_length,
)
from tests.llava_fixtures import save_tiny_llava, tiny_llava, tiny_llava_config, tiny_tokenizer

INSTRUCTIONS = ["what is in the image", "the cat", "describe the picture in detail"]


@pytest.fixture(scope="module")
def llava() -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    # 3 vision layers so a deep visual prompt (layer 1) reaches feature layer -2; 3 LLM layers.
    return tiny_llava(0, vision_layers=3, text_layers=3)


def make_adapter(model: LlavaForConditionalGeneration, seed: int, **hyper: int) -> FoldedM2pt:
    torch.manual_seed(seed)
    return fold(M2ptPromptLearner(M2ptConfig.for_llava(model.config, **hyper)))


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def chat_inputs(processor: LlavaProcessor, instructions: list[str]) -> dict[str, torch.Tensor]:
    """Left-padded input_ids / attention_mask with one <image> each (expanded by the processor)."""
    texts = [f"USER: <image>\n{t} ASSISTANT:" for t in instructions]
    images = [Image.new("RGB", (32, 32))] * len(texts)
    out = processor(images=images, text=texts, return_tensors="pt", padding=True)
    return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


@torch.no_grad()
@pytest.mark.parametrize(
    ("feature_layer", "strategy"), [(-2, "default"), ([-3, -1], "default"), (-1, "full")]
)  # fmt: skip
def test_no_adapter_equals_get_image_features(feature_layer, strategy) -> None:
    config = tiny_llava_config(tiny_tokenizer(), vision_layers=3)
    config.vision_feature_layer, config.vision_feature_select_strategy = feature_layer, strategy
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    px = pixels(3)
    ref = torch.stack(list(model.get_image_features(pixel_values=px).pooler_output))
    got = image_embeds(model, px, [None] * 3)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # With an adapter, the same number of image tokens (the prompt positions are dropped).
    assert image_embeds(model, px, [make_adapter(model, 0, n_vision=2)] * 3).shape == ref.shape


@torch.no_grad()
def test_mixed_adapters_in_one_call_equal_rows_alone(llava) -> None:
    model = llava[0]
    a = make_adapter(model, 1, n_vision=2)
    b = make_adapter(model, 2, n_vision=2)  # same shape as a: shares a's vision forward
    c = make_adapter(model, 3, n_vision=3, vision_depth=2)
    adapters = [b, None, a, c, a, None]
    px = pixels(len(adapters), seed=1)
    together = image_embeds(model, px, adapters)
    for row, adapter in enumerate(adapters):
        alone = image_embeds(model, px[row : row + 1], [adapter])
        torch.testing.assert_close(together[row : row + 1], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(together[0], together[2])  # the prompts matter
    assert not torch.allclose(together[2], image_embeds(model, px[2:3], [None])[0])


@torch.no_grad()
@pytest.mark.parametrize("text_depth", [3, 2])  # every layer (the reference), and carried past depth
def test_kv_prefix_equals_explicit_prompts(llava, text_depth) -> None:
    model, processor = llava
    folded = make_adapter(model, 4, n_vision=2, n_text=5, text_depth=text_depth)
    inputs = chat_inputs(processor, INSTRUCTIONS)
    assert (inputs["attention_mask"] == 0).any()  # left padding is exercised
    px = pixels(len(INSTRUCTIONS), seed=2)
    explicit = explicit_forward(model, inputs["input_ids"], inputs["attention_mask"], px, folded)
    served = forward_with_prefix(model, inputs["input_ids"], inputs["attention_mask"], px, folded)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(served[real], explicit[real], atol=1e-4, rtol=0)
    plain = explicit_forward(model, inputs["input_ids"], inputs["attention_mask"], px, None)
    assert (served[real] - plain[real]).abs().max() > 1e-3  # the prompts matter


@torch.no_grad()
def test_prefix_kv_shapes_and_reuse(llava) -> None:
    model, processor = llava
    folded = make_adapter(model, 5, n_text=4)
    kv = prefix_kv(model, folded)
    t = model.config.text_config
    assert prefix_length(folded) == 4 and len(kv) == t.num_hidden_layers
    for k, v in kv:
        assert k.shape == v.shape == (1, t.num_key_value_heads, 4, t.hidden_size // t.num_attention_heads)
    inputs = chat_inputs(processor, INSTRUCTIONS[:2])
    px = pixels(2, seed=3)
    fresh = forward_with_prefix(model, inputs["input_ids"], inputs["attention_mask"], px, folded)
    reused = forward_with_prefix(model, inputs["input_ids"], inputs["attention_mask"], px, folded, prefix=kv)
    torch.testing.assert_close(reused, fresh, atol=0, rtol=0)


@torch.no_grad()
def test_padded_row_equals_row_alone(llava) -> None:
    model, processor = llava
    folded = make_adapter(model, 6, n_text=3)
    inputs = chat_inputs(processor, INSTRUCTIONS)
    px = pixels(len(INSTRUCTIONS), seed=4)
    batch = forward_with_prefix(model, inputs["input_ids"], inputs["attention_mask"], px, folded)
    for row, text in enumerate(INSTRUCTIONS):
        alone_inputs = chat_inputs(processor, [text])
        alone = forward_with_prefix(
            model, alone_inputs["input_ids"], alone_inputs["attention_mask"], px[row : row + 1], folded
        )
        length = alone.shape[1]
        torch.testing.assert_close(batch[row, -length:], alone[0], atol=1e-4, rtol=0)


@torch.no_grad()
def test_no_adapter_paths_equal_the_plain_model(llava) -> None:
    model, processor = llava
    inputs = chat_inputs(processor, INSTRUCTIONS)
    px = pixels(len(INSTRUCTIONS), seed=5)
    ref = model(
        **inputs, pixel_values=px, position_ids=positions_from_mask(inputs["attention_mask"])
    ).logits  # fmt: skip
    real = inputs["attention_mask"].bool()
    for path in (explicit_forward, forward_with_prefix):
        got = path(model, inputs["input_ids"], inputs["attention_mask"], px, None)
        torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)


def test_gradients_reach_every_used_parameter(llava) -> None:
    model, processor = llava
    torch.manual_seed(7)
    learner = M2ptPromptLearner(M2ptConfig.for_llava(model.config, n_vision=2, n_text=2))
    inputs = chat_inputs(processor, INSTRUCTIONS[:2])
    logits = explicit_forward(
        model, inputs["input_ids"], inputs["attention_mask"], pixels(2), learner.as_folded()
    )
    logits.logsumexp(-1).mean().backward()
    grads = {name: p.grad for name, p in learner.named_parameters()}
    # Feature layer -2 is the last vision layer's input: that layer's prompt never reaches the LLM.
    dead = f"vision_prompts.{model.config.vision_config.num_hidden_layers - 1}"
    for name, grad in grads.items():
        if name == dead:
            assert grad is None or not grad.any()
        else:
            assert grad is not None and grad.abs().sum() > 0, name


def test_saved_tiny_llava_loads_offline_and_generates(tmp_path: Path) -> None:
    directory = save_tiny_llava(tmp_path / "tiny-llava")
    model = LlavaForConditionalGeneration.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the image"}]}
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert text == "USER: <image>\nwhat is in the image ASSISTANT:"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    inputs = processor(images=image, text=text, return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 16  # (32 / 8) ** 2 patches
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        # The served path with no adapter gives generate's first token.
        logits = forward_with_prefix(
            model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], None
        )
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)
    assert logits[0, -1].argmax() == out[0, inputs["input_ids"].shape[1]]
