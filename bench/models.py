"""Random-weight CLIPs in the exact shapes of openai/clip-vit-base-patch32 / -patch16.

Speed does not depend on the weight values, so the benchmark saves a model built from
the published config (written out here, no hub) plus a CLIPProcessor, exactly as a
user's local checkpoint: ``promptswap serve --clip-model DIR`` loads it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

OUT = Path(__file__).resolve().parent / "out"
MODELS_DIR = OUT / "models"

# openai/clip-vit-base-patch{32,16} config.json values, explicit.
TEXT_CONFIG = dict(
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
    layer_norm_eps=1e-5,
)
VISION_CONFIG = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    num_channels=3,
)
PROJECTION_DIM = 512
LOGIT_SCALE_INIT = 2.6592

ARCHS = {"B/32": 32, "B/16": 16}  # name -> patch size


def clip_config(patch_size: int) -> CLIPConfig:
    return CLIPConfig(
        text_config=dict(TEXT_CONFIG),
        vision_config=dict(VISION_CONFIG, patch_size=patch_size),
        projection_dim=PROJECTION_DIM,
        logit_scale_init_value=LOGIT_SCALE_INIT,
    )


def model_dir(arch: str) -> Path:
    return MODELS_DIR / f"clip-vit-base-patch{ARCHS[arch]}"


def ensure_model(arch: str) -> Path:
    """Build and save the random-weight checkpoint once; later runs reuse it."""
    directory = model_dir(arch)
    if (directory / "model.safetensors").exists():  # written last, by an atomic rename
        return directory
    from fixtures.tiny_models import clip_tokenizer  # CLIP's real BPE vocabulary, no hub

    torch.manual_seed(0)
    model = CLIPModel(clip_config(ARCHS[arch])).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=clip_tokenizer())
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def ensure_tiny_clip() -> Path:
    """The tiny random CLIP of the tests (model cost negligible), saved once; later runs reuse it."""
    directory = MODELS_DIR / "tiny-clip"
    if (directory / "model.safetensors").exists():
        return directory
    from fixtures.tiny_models import save_tiny_clip

    tmp = directory.with_name("tiny-clip.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tiny_clip(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


if __name__ == "__main__":
    for name in ARCHS:
        print(name, ensure_model(name))
