"""M²PT learner, folding, the m2pt adapter file, and the tuned-parameter budget."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save as st_save
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from adapters.container import tensors_sha256
from adapters.errors import AdapterMismatch, AdapterValueError
from adapters.format import METADATA_KEY, Manifest, dump, load_adapter, validate_for_backbone
from adapters.m2pt import (
    FoldedM2pt,
    M2ptConfig,
    M2ptPromptLearner,
    fold,
    learner_state_from_reference,
    llava_fingerprint,
)
from adapters.maple import clip_fingerprint
from tests.adapters.conftest import tiny_clip_config
from tests.llava_fixtures import tiny_llava_config, tiny_tokenizer

MAX = 1 << 20
CONFIG = tiny_llava_config(tiny_tokenizer(), vision_layers=3, text_layers=3)
FP = llava_fingerprint(CONFIG)


def make_learner(seed: int = 0, **hyper: int) -> M2ptPromptLearner:
    torch.manual_seed(seed)
    return M2ptPromptLearner(M2ptConfig.for_llava(CONFIG, **{"n_vision": 2, "n_text": 3, **hyper}))


def test_fingerprint_of_the_tiny_llava() -> None:
    assert FP == {
        "arch": "llava", "vision_width": 32, "vision_layers": 3, "image_size": 32, "patch_size": 8,
        "vision_feature_layer": "-2", "vision_feature_select_strategy": "default", "image_tokens": 16,
        "text_width": 64, "text_layers": 3, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
        "vocab_size": CONFIG.text_config.vocab_size, "projector_in": 32, "projector_out": 64,
    }  # fmt: skip


def test_config_defaults_to_every_layer_and_checks_depths() -> None:
    c = M2ptConfig.for_llava(CONFIG)
    assert (c.n_vision, c.vision_depth, c.n_text, c.text_depth) == (10, 3, 10, 3)
    with pytest.raises(AdapterValueError, match="text_depth 4 exceeds"):
        M2ptConfig.for_llava(CONFIG, text_depth=4)
    with pytest.raises(AdapterValueError, match="n_vision"):
        M2ptConfig.for_llava(CONFIG, n_vision=0)


def test_fold_equals_the_learner() -> None:
    learner = make_learner(1)
    folded = fold(learner)
    vision, text = learner.prompts()
    assert folded.vision.shape == (3, 2, 32) and folded.text.shape == (3, 3, 64)
    assert torch.equal(folded.vision, vision) and torch.equal(folded.text, text)
    assert all(
        t.dtype == torch.float32 and not t.requires_grad for t in (folded.vision, folded.projector_weight)
    )
    features = torch.randn(2, 16, 32)
    torch.testing.assert_close(folded.project(features), learner(features).detach(), atol=0, rtol=0)
    assert folded.nbytes == 4 * (3 * 2 * 32 + 3 * 3 * 64 + 64 * 32 + 64) == 4 * learner.config.num_parameters
    half = folded.to("cpu", torch.bfloat16)
    assert half.text.dtype == torch.bfloat16 and half.nbytes == folded.nbytes // 2


def test_state_dict_and_reference_names_round_trip() -> None:
    learner = make_learner(2)
    again = M2ptPromptLearner.from_state_dict(learner.state_dict())
    assert again.config == learner.config
    # The reference keeps (1, n, width) prompts under its own module paths.
    reference = {
        "model.mm_projector.weight": learner.mm_projector.weight,
        "model.mm_projector.bias": learner.mm_projector.bias,
    }
    for i, p in enumerate(learner.vision_prompts):
        reference[f"model.vision_tower.vision_tower.vision_model.encoder.prompts.{i}"] = p[None].half()
    for i, p in enumerate(learner.text_prompts):
        reference[f"model.prompts.{i}"] = p[None]
    reference["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(2, 2)  # frozen: dropped
    imported = M2ptPromptLearner.from_state_dict(learner_state_from_reference(reference))
    assert imported.config == learner.config
    torch.testing.assert_close(fold(imported).text, fold(learner).text, atol=0, rtol=0)
    with pytest.raises(AdapterValueError, match="missing"):
        M2ptPromptLearner.from_state_dict({"mm_projector.weight": torch.zeros(64, 32)})


# ---------------------------------------------------------------- the adapter file


def test_format_round_trip() -> None:
    folded = fold(make_learner(3, text_depth=2))
    data = dump(folded, name="vqa", backbone=FP, version=2, description="tiny")
    adapter = load_adapter(data, max_bytes=MAX)
    assert adapter.manifest.method == "m2pt" and adapter.manifest.version == 2
    assert adapter.manifest.hyperparameters == {
        "n_vision": 2,
        "vision_depth": 3,
        "n_text": 3,
        "text_depth": 2,
    }
    assert isinstance(adapter.folded, FoldedM2pt)
    for name in ("vision", "text", "projector_weight", "projector_bias"):
        assert torch.equal(getattr(adapter.folded, name), getattr(folded, name)), name
    validate_for_backbone(adapter, FP)


def test_an_m2pt_file_is_refused_by_a_clip_backbone_and_another_llava() -> None:
    adapter = load_adapter(dump(fold(make_learner(4)), name="vqa", backbone=FP), max_bytes=MAX)
    with pytest.raises(AdapterMismatch) as e:
        validate_for_backbone(adapter, clip_fingerprint(tiny_clip_config()))
    assert e.value.field == "arch" and (e.value.expected, e.value.got) == ("clip", "llava")
    other = llava_fingerprint(tiny_llava_config(tiny_tokenizer(), vision_layers=3, text_layers=2))
    with pytest.raises(AdapterMismatch) as e:
        validate_for_backbone(adapter, other)
    assert e.value.field == "text_layers"


def test_manifest_for_the_wrong_arch_or_too_deep_is_refused() -> None:
    folded = fold(make_learner(5))
    with pytest.raises(AdapterMismatch, match="needs a llava backbone"):
        dump(folded, name="vqa", backbone=clip_fingerprint(tiny_clip_config()))
    shallow = {**FP, "text_layers": 2}
    with pytest.raises(AdapterValueError, match="text_depth 3 exceeds"):
        dump(folded, name="vqa", backbone=shallow)


def _file(tensors: dict[str, torch.Tensor], hyper: dict[str, int]) -> bytes:
    """An m2pt file with a valid checksum, whatever its tensors."""
    manifest = Manifest(
        name="bad", method="m2pt", backbone=FP, hyperparameters=hyper,
        tensors_sha256=tensors_sha256(tensors), created_at="2026-01-01T00:00:00+00:00",
    )  # fmt: skip
    return st_save(tensors, metadata={METADATA_KEY: manifest.to_json()})


@pytest.mark.parametrize(
    ("name", "shape"),
    [("vision_prompts", (3, 2, 16)), ("text_prompts", (3, 4, 64)), ("projector_weight", (64, 64)),
     ("projector_bias", (32,))],
)  # fmt: skip
def test_wrong_tensor_shapes_are_refused(name: str, shape: tuple[int, ...]) -> None:
    folded = fold(make_learner(6))
    tensors = {
        "vision_prompts": folded.vision, "text_prompts": folded.text,
        "projector_weight": folded.projector_weight, "projector_bias": folded.projector_bias,
    }  # fmt: skip
    hyper = {"n_vision": 2, "vision_depth": 3, "n_text": 3, "text_depth": 3}
    load_adapter(_file(tensors, hyper), max_bytes=MAX)  # the honest file loads
    tensors[name] = torch.zeros(shape)
    with pytest.raises(AdapterValueError, match=f"tensor '{name}' has shape"):
        load_adapter(_file(tensors, hyper), max_bytes=MAX)


def test_a_missing_tensor_or_hyperparameter_is_refused() -> None:
    folded = fold(make_learner(7))
    tensors = {
        "vision_prompts": folded.vision,
        "text_prompts": folded.text,
        "projector_weight": folded.projector_weight,
    }
    with pytest.raises(Exception, match="adapter tensors must be exactly"):
        load_adapter(
            _file(tensors, {"n_vision": 2, "vision_depth": 3, "n_text": 3, "text_depth": 3}), max_bytes=MAX
        )
    tensors["projector_bias"] = folded.projector_bias
    with pytest.raises(AdapterValueError, match="hyperparameters.n_text"):
        load_adapter(_file(tensors, {"n_vision": 2, "vision_depth": 3, "text_depth": 3}), max_bytes=MAX)


# ---------------------------------------------------------------- parameter budget


def llava_15_7b_config() -> LlavaConfig:
    """llava-hf/llava-1.5-7b-hf's shapes: CLIP ViT-L/14-336 (feature layer -2) and a LLaMA-7B."""
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
    )  # fmt: skip
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2)


def test_tuned_fraction_for_llava_15_7b_is_near_the_papers() -> None:
    config = llava_15_7b_config()
    with torch.device("meta"):  # shapes only, no memory
        backbone = sum(p.numel() for p in LlavaForConditionalGeneration(config).parameters())
    fp = llava_fingerprint(config)
    assert fp["image_tokens"] == 576 and fp["projector_in"] == 1024
    m2pt = M2ptConfig.for_llava(config)  # the published script: 10 + 10 prompts, every layer
    assert m2pt.num_parameters == 24 * 10 * 1024 + 32 * 10 * 4096 + 4096 * 1024 + 4096 == 5_754_880
    fraction = m2pt.num_parameters / backbone
    wide = M2ptConfig.for_llava(config, n_vision=20, n_text=20).num_parameters / backbone
    print(f"llava-1.5-7b: {backbone:,} frozen; M2PT 10+10 tunes {fraction:.4%}, 20+20 tunes {wide:.4%}")
    assert 0.0007 < fraction < 0.0009 < wide < 0.0011  # the paper: about 0.09%
