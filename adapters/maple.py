"""MaPLe prompts: the train-time learner and the folded inference form.

Train-time form follows the reference ``MultiModalPromptLearner``
(muzairkhattak/multimodal-prompt-learning, trainers/maple.py) parameter by parameter,
so its ``prompt_learner.*`` state dict loads here once the prefix and the frozen
``token_prefix``/``token_suffix`` buffers are dropped (see ``learner_state``).

The coupling functions are fixed at inference, so an adapter is served folded: two
tensors ``text`` (depth, n_ctx, Dt) and ``vision`` (depth, n_ctx, Dv), layer 0 being
the shallow prompt. ``MaplePromptLearner.prompts`` is the one place that computes
them, for training (differentiable) and for folding alike.

``METHOD`` tells the adapter file format what a ``maple`` file holds: exactly
``text_prompts`` (depth, n_ctx, Dt) and ``vision_prompts`` (depth, n_ctx, Dv), made for a
CLIP backbone described by ``clip_fingerprint``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

from adapters.errors import AdapterValueError
from adapters.method import Fit, Method, check_positive_ints

PREFIX = "prompt_learner."
# Frozen per-class token embeddings the reference keeps as buffers; not learned.
FROZEN_BUFFERS = ("token_prefix", "token_suffix")


CLIP_FINGERPRINT_FIELDS: dict[str, type] = {
    "arch": str,
    "text_width": int,
    "vision_width": int,
    "text_layers": int,
    "vision_layers": int,
    "projection_dim": int,
    "image_size": int,
    "patch_size": int,
    "vocab_size": int,
}


def clip_towers(config: CLIPConfig) -> tuple[CLIPTextConfig, CLIPVisionConfig]:
    """The two tower configs (transformers types them loosely; a built CLIPConfig always has both)."""
    t, v = config.text_config, config.vision_config
    assert isinstance(t, CLIPTextConfig) and isinstance(v, CLIPVisionConfig)
    return t, v


def clip_fingerprint(config: CLIPConfig) -> dict[str, Any]:
    """What an adapter must agree on with a CLIP backbone (not the weights themselves)."""
    t, v = clip_towers(config)
    return {
        "arch": "clip",
        "text_width": t.hidden_size,
        "vision_width": v.hidden_size,
        "text_layers": t.num_hidden_layers,
        "vision_layers": v.num_hidden_layers,
        "projection_dim": config.projection_dim,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "vocab_size": t.vocab_size,
    }


@dataclass(frozen=True)
class MapleConfig:
    n_ctx: int
    depth: int  # J: layer 0 (shallow) plus depth - 1 deep prompts
    text_width: int
    vision_width: int

    def __post_init__(self) -> None:
        for field, low in (("n_ctx", 1), ("depth", 1), ("text_width", 1), ("vision_width", 1)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise AdapterValueError(f"MaPLe {field} must be an integer >= {low}, got {value!r}")

    @classmethod
    def for_clip(cls, config: CLIPConfig, *, n_ctx: int = 2, depth: int = 9) -> MapleConfig:
        """Widths from a CLIP config; depth must fit both towers."""
        t, v = clip_towers(config)
        layers = min(t.num_hidden_layers, v.num_hidden_layers)
        if depth > layers:
            raise AdapterValueError(f"MaPLe depth {depth} exceeds the backbone's {layers} layers")
        return cls(n_ctx, depth, t.hidden_size, v.hidden_size)


class MaplePromptLearner(nn.Module):
    """The learned parameters of one MaPLe adapter, named as in the reference."""

    def __init__(self, config: MapleConfig, ctx_init: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        n, dt, dv = config.n_ctx, config.text_width, config.vision_width
        if ctx_init is None:
            ctx = torch.empty(n, dt)
            nn.init.normal_(ctx, std=0.02)
        else:
            # Reference: embeddings of CTX_INIT's first n_ctx words after the start token.
            if tuple(ctx_init.shape) != (n, dt):
                raise AdapterValueError(f"ctx_init must have shape {(n, dt)}, got {tuple(ctx_init.shape)}")
            ctx = ctx_init.detach().to(torch.float32).clone()
        self.ctx = nn.Parameter(ctx)  # (n_ctx, Dt)
        self.proj = nn.Linear(dt, dv)  # default Linear init, as the reference
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(nn.init.normal_(torch.empty(n, dt), std=0.02)) for _ in range(config.depth - 1)]
        )
        # The reference deep-copies ONE Linear, so every coupling starts identical.
        single = nn.Linear(dt, dv)
        self.compound_prompt_projections = nn.ModuleList(
            [copy.deepcopy(single) for _ in range(config.depth - 1)]
        )

    def prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer prompts: text (depth, n_ctx, Dt), vision (depth, n_ctx, Dv)."""
        text = [self.ctx, *self.compound_prompts_text]
        vision = [self.proj(self.ctx)] + [
            proj(p)
            for proj, p in zip(self.compound_prompt_projections, self.compound_prompts_text, strict=True)
        ]
        return torch.stack(text), torch.stack(vision)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> MaplePromptLearner:
        """Build a learner from its own state dict (prefix already stripped), any float dtype."""
        learner = cls(config_from_state(state))
        learner.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
        return learner


_DEEP_KEY = re.compile(r"compound_prompts_text\.(\d+)|compound_prompt_projections\.(\d+)\.(weight|bias)")


def config_from_state(state: Mapping[str, torch.Tensor]) -> MapleConfig:
    """Infer n_ctx, depth and widths from a learner state dict's shapes; check consistency."""
    for key in ("ctx", "proj.weight", "proj.bias"):
        if key not in state:
            raise AdapterValueError(f"not a MaPLe prompt learner state: '{key}' is missing")
    ctx = state["ctx"]
    if ctx.ndim != 2:
        raise AdapterValueError(f"ctx must be 2-D (n_ctx, Dt), got shape {tuple(ctx.shape)}")
    n_ctx, dt = ctx.shape
    dv = state["proj.weight"].shape[0]
    extra = sorted(set(state) - {"ctx", "proj.weight", "proj.bias"})
    deep = {int(m.group(1) or m.group(2)) for k in extra if (m := _DEEP_KEY.fullmatch(k))}
    unknown = [k for k in extra if not _DEEP_KEY.fullmatch(k)]
    if unknown:
        raise AdapterValueError(f"unexpected keys in a MaPLe prompt learner state: {unknown[:5]}")
    if deep != set(range(len(deep))):
        raise AdapterValueError(f"deep prompt indices must be 0..{len(deep) - 1}, got {sorted(deep)}")
    config = MapleConfig(int(n_ctx), len(deep) + 1, int(dt), int(dv))
    expected = learner_shapes(config)
    for key, shape in expected.items():
        got = tuple(state[key].shape) if key in state else None
        if got != shape:
            raise AdapterValueError(f"'{key}' should have shape {shape} for {config}, got {got}")
    return config


def learner_shapes(config: MapleConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of a MaplePromptLearner with its shape."""
    n, dt, dv = config.n_ctx, config.text_width, config.vision_width
    shapes: dict[str, tuple[int, ...]] = {"ctx": (n, dt), "proj.weight": (dv, dt), "proj.bias": (dv,)}
    for i in range(config.depth - 1):
        shapes[f"compound_prompts_text.{i}"] = (n, dt)
        shapes[f"compound_prompt_projections.{i}.weight"] = (dv, dt)
        shapes[f"compound_prompt_projections.{i}.bias"] = (dv,)
    return shapes


def learner_state(model_state: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The learner's entries of a reference CustomCLIP state dict, prefix stripped.

    Frozen buffers and everything outside ``prompt_learner.`` are dropped; a
    DataParallel ``module.`` prefix is tolerated.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in model_state.items():
        if not isinstance(key, str):
            continue
        key = key.removeprefix("module.")
        if not key.startswith(PREFIX):
            continue
        name = key[len(PREFIX) :]
        if name in FROZEN_BUFFERS:
            continue
        if not isinstance(value, torch.Tensor):
            raise AdapterValueError(f"'{key}' is not a tensor (got {type(value).__name__})")
        out[name] = value
    return out


@dataclass(frozen=True, eq=False)
class FoldedMaple:
    """Inference form of one MaPLe adapter: fp32, detached, contiguous."""

    text: torch.Tensor  # (depth, n_ctx, Dt)
    vision: torch.Tensor  # (depth, n_ctx, Dv)

    def __post_init__(self) -> None:
        t, v = self.text, self.vision
        if t.ndim != 3 or v.ndim != 3 or t.shape[:2] != v.shape[:2] or 0 in t.shape or 0 in v.shape:
            raise AdapterValueError(
                "folded MaPLe prompts must be text (depth, n_ctx, Dt) and vision (depth, n_ctx, Dv) "
                f"with equal depth and n_ctx, got {tuple(t.shape)} and {tuple(v.shape)}"
            )

    @property
    def depth(self) -> int:
        return self.text.shape[0]

    @property
    def n_ctx(self) -> int:
        return self.text.shape[1]

    @property
    def text_width(self) -> int:
        return self.text.shape[2]

    @property
    def vision_width(self) -> int:
        return self.vision.shape[2]

    @property
    def nbytes(self) -> int:
        return self.text.nbytes + self.vision.nbytes

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> FoldedMaple:
        return FoldedMaple(self.text.to(device, dtype), self.vision.to(device, dtype))


def fold(learner: MaplePromptLearner) -> FoldedMaple:
    """Run the coupling functions once; the result no longer needs the learner."""
    with torch.no_grad():
        text, vision = learner.prompts()
    return FoldedMaple(
        text.detach().to(torch.float32).contiguous().clone(),
        vision.detach().to(torch.float32).contiguous().clone(),
    )


# ---------------------------------------------------------------- the file format's view


def _check_hyperparameters(hp: Mapping[str, Any], backbone: Mapping[str, Any]) -> None:
    check_positive_ints(hp, ("n_ctx", "depth"))
    for tower in ("text", "vision"):
        if hp["depth"] > backbone[f"{tower}_layers"]:
            raise AdapterValueError(
                f"prompt depth {hp['depth']} exceeds the {tower} tower's {backbone[f'{tower}_layers']} layers"
            )


def _expected_shapes(hp: Mapping[str, Any], backbone: Mapping[str, Any]) -> dict[str, list[int]]:
    depth, n_ctx = hp["depth"], hp["n_ctx"]
    return {
        "text_prompts": [depth, n_ctx, backbone["text_width"]],
        "vision_prompts": [depth, n_ctx, backbone["vision_width"]],
    }


METHOD: Method[FoldedMaple] = Method(
    name="maple",
    arch="clip",
    config_type=CLIPConfig,
    fingerprint=clip_fingerprint,
    fingerprint_fields=CLIP_FINGERPRINT_FIELDS,
    folded_type=FoldedMaple,
    tensors=("text_prompts", "vision_prompts"),
    shape=lambda f: {"n_ctx": f.n_ctx, "depth": f.depth},
    check_hyperparameters=_check_hyperparameters,
    expected_shapes=_expected_shapes,
    to_tensors=lambda f: {"text_prompts": f.text, "vision_prompts": f.vision},
    from_tensors=lambda t: FoldedMaple(t["text_prompts"], t["vision_prompts"]),
    fit=lambda f: Fit(
        "prompts",
        widths=(("text_width", f.text_width), ("vision_width", f.vision_width)),
        depths=(("text_layers", f.depth), ("vision_layers", f.depth)),
    ),
)
