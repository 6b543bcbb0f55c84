"""Tiny random-weight models for tests, with CLIP's real tokenizer; no hub access.

CLIP's BPE vocabulary ships in the open-clip-torch package; it is read as a data file
(importing open_clip itself would need torchvision).
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, others shifted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + shift)
            shift += 1
    return [symbols[b] for b in printable] + [symbols[b] for b in range(256) if b not in printable]


@lru_cache(maxsize=1)
def clip_tokenizer() -> CLIPTokenizer:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "tests need open-clip-torch for CLIP's vocabulary: pip install --no-deps open-clip-torch"
        )
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    base = _byte_symbols()
    vocab = base + [s + "</w>" for s in base] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges)


def tiny_clip_config(vocab_size: int = 49408, image_size: int = 224, patch_size: int = 32) -> CLIPConfig:
    # initializer_factor 3 keeps random image features apart (MODELS.md).
    return CLIPConfig(
        text_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            vocab_size=vocab_size,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            initializer_factor=3.0,
        ),
        vision_config=dict(
            hidden_size=96,
            intermediate_size=192,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=patch_size,
            initializer_factor=3.0,
        ),
        projection_dim=48,
        initializer_factor=3.0,
    )


def save_tiny_clip(directory: Path, seed: int = 0) -> Path:
    """A tiny random CLIP + processor saved as a user's local checkpoint would be."""
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config()).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=clip_tokenizer())
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
