"""Tiny random CLIP shared by the adapter tests (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from fixtures.tiny_models import tiny_clip_config as shared_tiny_clip_config


def tiny_clip_config(text_layers: int = 4, vision_layers: int = 4) -> CLIPConfig:
    """The shared tiny CLIP (fixtures.tiny_models), with a small vocabulary and 64-pixel
    images: the adapter tests tokenize nothing and want fast forwards."""
    return shared_tiny_clip_config(
        vocab_size=1000, image_size=64, patch_size=16, text_layers=text_layers, vision_layers=vision_layers
    )


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
