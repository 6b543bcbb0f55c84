"""A tiny random LLaVA (small CLIP vision tower + small Llama) saved as a local checkpoint.

The tokenizer is a small BPE trained in-process with ``tokenizers``; no hub access.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

CORPUS = [
    "the cat sat on the mat",
    "a photo of a dog",
    "what is in the image",
    "describe the picture in detail",
    "yes no maybe red green blue",
    "answer the question",
]
# LLaVA-1.5's format: "USER: <image>\n{text} ASSISTANT:"
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %} {% elif m['role'] == 'assistant' %}ASSISTANT: "
    "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"])
    bpe.train_from_iterator(CORPUS * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.padding_side = "left"  # generation pads on the left
    return tokenizer


def tiny_llava_config(
    tokenizer: PreTrainedTokenizerFast, *, vision_layers: int = 2, text_layers: int = 2
) -> LlavaConfig:
    """CLIP tower 32 wide, 32 px images of 8 px patches (16 image tokens); Llama 64 wide, GQA 4/2 heads."""
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def tiny_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # One extra image token for the CLS position the "default" strategy drops (MODELS.md).
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def tiny_llava(
    seed: int = 0, *, vision_layers: int = 2, text_layers: int = 2
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """An in-memory tiny random LLaVA (eval mode) and its processor."""
    tokenizer = tiny_tokenizer()
    config = tiny_llava_config(tokenizer, vision_layers=vision_layers, text_layers=text_layers)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval(), tiny_processor(tokenizer)


def save_tiny_llava(directory: Path, seed: int = 0, *, vision_layers: int = 2, text_layers: int = 2) -> Path:
    """Save a tiny LLaVA and its processor as a local checkpoint, loadable offline with from_pretrained."""
    model, processor = tiny_llava(seed, vision_layers=vision_layers, text_layers=text_layers)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
