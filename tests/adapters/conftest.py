"""Tiny random CLIP shared by the adapter tests (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel


def tiny_clip_config(text_layers: int = 4, vision_layers: int = 4) -> CLIPConfig:
    # initializer_factor 3.0 everywhere: at 1.0 a tiny random CLIP maps all images alike.
    return CLIPConfig(
        text_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers, num_attention_heads=4,
            vocab_size=1000, max_position_embeddings=77, eos_token_id=999, bos_token_id=998,
            pad_token_id=999, initializer_factor=3.0,
        ),
        vision_config=dict(
            hidden_size=96, intermediate_size=192, num_hidden_layers=vision_layers, num_attention_heads=4,
            image_size=64, patch_size=16, initializer_factor=3.0,
        ),
        projection_dim=48,
        initializer_factor=3.0,
    )  # fmt: skip


@pytest.fixture(scope="session")
def clip_config() -> CLIPConfig:
    return tiny_clip_config()


@pytest.fixture(scope="session")
def tiny_clip(clip_config: CLIPConfig) -> CLIPModel:
    torch.manual_seed(0)
    return CLIPModel(clip_config).eval()


@pytest.fixture(scope="session")
def clip_config_dir(tiny_clip: CLIPModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-clip")
    tiny_clip.save_pretrained(path)
    return path


def random_text_ids(n: int, length: int, *, seed: int = 0) -> torch.Tensor:
    """(n, length) ids: bos first, eos last, ordinary tokens between (no padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 998, (n, length), generator=g)
    ids[:, 0], ids[:, -1] = 998, 999
    return ids


def random_pixels(n: int, *, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
