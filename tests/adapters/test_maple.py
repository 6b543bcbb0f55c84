from __future__ import annotations

import pytest
import torch

from adapters.errors import AdapterValueError
from adapters.maple import (
    FoldedMaple,
    MapleConfig,
    MaplePromptLearner,
    config_from_state,
    fold,
    learner_state,
)
from tests.adapters.conftest import tiny_clip_config

CONFIG = MapleConfig(n_ctx=2, depth=3, text_width=64, vision_width=96)


@pytest.mark.parametrize(
    "kwargs",
    [dict(n_ctx=0), dict(depth=0), dict(n_ctx=-1), dict(depth=1.5), dict(text_width=0), dict(n_ctx=True)],
)
def test_config_validation(kwargs: dict) -> None:
    values = dict(n_ctx=2, depth=3, text_width=64, vision_width=96) | kwargs
    with pytest.raises(AdapterValueError):
        MapleConfig(**values)


def test_config_for_clip() -> None:
    cfg = tiny_clip_config()
    assert MapleConfig.for_clip(cfg, n_ctx=2, depth=4) == MapleConfig(2, 4, 64, 96)
    with pytest.raises(AdapterValueError, match="depth 5"):
        MapleConfig.for_clip(cfg, n_ctx=2, depth=5)


def reference_style_state(config: MapleConfig, n_cls: int = 3) -> dict[str, torch.Tensor]:
    """What CustomCLIP.state_dict() holds under prompt_learner., frozen buffers included."""
    g = torch.Generator().manual_seed(7)
    n, dt, dv = config.n_ctx, config.text_width, config.vision_width
    state = {
        "prompt_learner.ctx": torch.randn(n, dt, generator=g),
        "prompt_learner.proj.weight": torch.randn(dv, dt, generator=g),
        "prompt_learner.proj.bias": torch.randn(dv, generator=g),
        "prompt_learner.token_prefix": torch.randn(n_cls, 1, dt, generator=g),
        "prompt_learner.token_suffix": torch.randn(n_cls, 77 - 1 - n, dt, generator=g),
        "image_encoder.conv1.weight": torch.randn(4, 3, 2, 2, generator=g),
        "logit_scale": torch.tensor(4.6),
    }
    for i in range(config.depth - 1):
        state[f"prompt_learner.compound_prompts_text.{i}"] = torch.randn(n, dt, generator=g)
        state[f"prompt_learner.compound_prompt_projections.{i}.weight"] = torch.randn(dv, dt, generator=g)
        state[f"prompt_learner.compound_prompt_projections.{i}.bias"] = torch.randn(dv, generator=g)
    return state


def test_parameter_names_match_the_reference() -> None:
    state = learner_state(reference_style_state(CONFIG))
    learner = MaplePromptLearner(CONFIG)
    assert set(learner.state_dict()) == set(state)
    learner.load_state_dict(state, strict=True)
    assert torch.equal(learner.ctx, state["ctx"])
    assert config_from_state(state) == CONFIG


def test_config_from_state_rejects_inconsistent_shapes() -> None:
    state = learner_state(reference_style_state(CONFIG))
    bad = dict(state, **{"compound_prompts_text.1": torch.zeros(3, 64)})
    with pytest.raises(AdapterValueError, match="compound_prompts_text.1"):
        config_from_state(bad)
    gap = {k: v for k, v in state.items() if not k.startswith("compound_prompts_text.0")}
    with pytest.raises(AdapterValueError):
        config_from_state(gap)
    with pytest.raises(AdapterValueError, match="'ctx' is missing"):
        config_from_state({k: v for k, v in state.items() if k != "ctx"})


def test_init_like_the_reference() -> None:
    torch.manual_seed(0)
    learner = MaplePromptLearner(MapleConfig(n_ctx=16, depth=9, text_width=512, vision_width=768))
    for p in [learner.ctx, *learner.compound_prompts_text]:
        assert abs(p.std().item() - 0.02) < 0.003
    # the reference clones one Linear for all deep couplings
    first = learner.compound_prompt_projections[0].weight
    assert all(torch.equal(m.weight, first) for m in learner.compound_prompt_projections)
    assert learner.compound_prompt_projections[0].weight is not learner.compound_prompt_projections[1].weight


def test_ctx_init_from_token_embeddings() -> None:
    words = torch.randn(2, 64)
    learner = MaplePromptLearner(CONFIG, ctx_init=words)
    assert torch.equal(learner.ctx.detach(), words)
    with pytest.raises(AdapterValueError, match="ctx_init"):
        MaplePromptLearner(CONFIG, ctx_init=torch.randn(3, 64))


def test_prompts_shapes_and_gradients() -> None:
    learner = MaplePromptLearner(CONFIG)
    text, vision = learner.prompts()
    assert text.shape == (3, 2, 64) and vision.shape == (3, 2, 96)
    (text.sum() + vision.sum()).backward()
    assert all(p.grad is not None for p in learner.parameters())


def test_fold_equals_prompts() -> None:
    learner = MaplePromptLearner(CONFIG)
    text, vision = learner.prompts()
    folded = fold(learner)
    assert torch.equal(folded.text, text.detach()) and torch.equal(folded.vision, vision.detach())
    assert torch.equal(folded.text[0], learner.ctx.detach())
    assert torch.equal(
        folded.vision[2], learner.compound_prompt_projections[1](learner.compound_prompts_text[1]).detach()
    )
    for t in (folded.text, folded.vision):
        assert not t.requires_grad and t.is_contiguous() and t.dtype == torch.float32
    assert (folded.depth, folded.n_ctx, folded.text_width, folded.vision_width) == (3, 2, 64, 96)
    assert folded.nbytes == 4 * (3 * 2 * 64 + 3 * 2 * 96)
    with torch.no_grad():  # later training steps must not reach a folded copy
        learner.ctx.add_(1.0)
    assert not torch.equal(folded.text[0], learner.ctx.detach())


def test_fold_from_fp16_learner_is_fp32() -> None:
    folded = fold(MaplePromptLearner(CONFIG).half())
    assert folded.text.dtype == folded.vision.dtype == torch.float32


def test_folded_rejects_inconsistent_tensors() -> None:
    with pytest.raises(AdapterValueError):
        FoldedMaple(torch.zeros(3, 2, 64), torch.zeros(2, 2, 96))
    with pytest.raises(AdapterValueError):
        FoldedMaple(torch.zeros(3, 2), torch.zeros(3, 2, 96))
