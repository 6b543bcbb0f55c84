"""Chat fixtures: the position-sensitive tiny LLaVA and ``generate`` as the reference."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from tests.chat.position_llava import save_position_llava
from tests.conftest import encode, make_image

Reference = Callable[[int, str, int], list[int]]


@pytest.fixture(scope="session")
def position_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_position_llava(tmp_path_factory.mktemp("position-llava"))


def conversation(instruction: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]


@pytest.fixture(scope="session")
def position_model(position_llava_dir: Path):
    model = LlavaForConditionalGeneration.from_pretrained(position_llava_dir).eval()
    return model, AutoProcessor.from_pretrained(position_llava_dir)


def model_inputs(processor, image_seed: int, instruction: str) -> dict:
    image = Image.open(io.BytesIO(encode(make_image(image_seed)))).convert("RGB")
    text = processor.apply_chat_template(
        conversation(instruction), add_generation_prompt=True, tokenize=False
    )
    return processor(images=image, text=text, return_tensors="pt")


@pytest.fixture(scope="session")
def generate_tokens(position_model) -> Reference:
    """``generate(do_sample=False)``'s new tokens, the stop token included when it came."""
    model, processor = position_model
    memo: dict[tuple[int, str, int], list[int]] = {}

    def greedy(image_seed: int, instruction: str, max_new_tokens: int) -> list[int]:
        key = (image_seed, instruction, max_new_tokens)
        if key not in memo:
            inputs = model_inputs(processor, image_seed, instruction)
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            memo[key] = out[0, inputs["input_ids"].shape[1] :].tolist()
        return memo[key]

    return greedy


@pytest.fixture(scope="session")
def explicit_tokens(position_model):
    """Greedy decoding by full recomputation through M2PT's literal form (prompts inserted
    before the input and replaced per layer), the stop token included when it came.

    The image is merged once, into the prompt: a generated ``<image>`` token (which this
    random model does emit) is a plain token, as it is for ``generate``.
    """
    from adapters.prompted_llava import explicit_forward, merge_image_tokens

    model, processor = position_model
    eos = processor.tokenizer.eos_token_id

    def greedy(image_seed: int, instruction: str, folded, max_new_tokens: int) -> list[int]:
        inputs = model_inputs(processor, image_seed, instruction)
        ids = inputs["input_ids"]
        out: list[int] = []
        with torch.inference_mode():
            embeds = merge_image_tokens(model, ids, inputs["pixel_values"], [folded])
            for _ in range(max_new_tokens):
                logits = explicit_forward(
                    model, ids, torch.ones_like(ids), None, folded, inputs_embeds=embeds
                )
                token = int(logits[0, -1].argmax())
                out.append(token)
                if token == eos:
                    break
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
                embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
        return out

    return greedy
