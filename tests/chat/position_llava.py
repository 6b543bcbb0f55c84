"""A tiny LLaVA-1.5-style model whose greedy tokens depend on positions (shared/MODELS.md).

Llama text model, 3 layers, width 128, ``rope_theta`` 10000, initialised wide enough
(std 0.12, logit std about 1) that a decode step given a position off by one picks
another token from the second token on. The default tiny LLaVA's answers barely
depend on position, so an engine off by one passed every exactness test on it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from tests.llava_fixtures import tiny_processor, tiny_tokenizer

SEED = 3
INIT_STD = 0.12


def position_llava(seed: int = SEED) -> tuple[LlavaForConditionalGeneration, object]:
    tokenizer = tiny_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    text = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        initializer_range=INIT_STD,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(  # type: ignore[call-arg]
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval(), tiny_processor(tokenizer)


def save_position_llava(directory: Path, seed: int = SEED) -> Path:
    model, processor = position_llava(seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)  # type: ignore[attr-defined]
    return directory
