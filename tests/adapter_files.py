"""Adapter files for service tests, made with the adapters library's own writer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save as st_save
from transformers import CLIPConfig

from adapters.container import tensors_sha256
from adapters.format import METADATA_KEY, dump
from adapters.maple import FoldedMaple, clip_fingerprint


def random_folded(config: CLIPConfig, seed: int, n_ctx: int = 2, depth: int = 3) -> FoldedMaple:
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(depth, n_ctx, config.text_config.hidden_size, generator=g)
    vision = torch.randn(depth, n_ctx, config.vision_config.hidden_size, generator=g)
    return FoldedMaple(text, vision)


def adapter_bytes(clip_dir: Path, name: str, seed: int = 0, **kw) -> bytes:
    config = CLIPConfig.from_pretrained(clip_dir)
    return dump(random_folded(config, seed, **kw), name=name, backbone=clip_fingerprint(config))


def nan_adapter_bytes(clip_dir: Path, name: str) -> bytes:
    """A well-formed file whose checksum is right but whose values are not finite."""
    good = adapter_bytes(clip_dir, name)
    header_len = int.from_bytes(good[:8], "little")
    manifest = json.loads(json.loads(good[8 : 8 + header_len])["__metadata__"][METADATA_KEY])
    config = CLIPConfig.from_pretrained(clip_dir)
    folded = random_folded(config, 0)
    tensors = {"text_prompts": folded.text.clone(), "vision_prompts": folded.vision.clone()}
    tensors["text_prompts"][0, 0, 0] = float("nan")
    manifest["tensors_sha256"] = tensors_sha256(tensors)
    return st_save(tensors, metadata={METADATA_KEY: json.dumps(manifest)})
