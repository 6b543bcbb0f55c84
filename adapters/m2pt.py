"""M²PT prompts for LLaVA: the train-time learner and the folded inference form.

Over 400 lines on purpose: one module per method (its description, learner, folded form
and file spec together), and about 60 of them describe the reference and where we differ.

M²PT (Wang et al., EMNLP 2024; reference code github.com/William-wAng618/M2PT, folder
``M2PT/``) tunes three things on a frozen LLaVA and nothing else:

Visual prompts (``modeling_clipPT.py``, ``CLIPEncoder``): ``VIT_PT_len`` (10 in the
published script) vectors of the vision width per vision layer, for *every* layer
(24 on CLIP-L/14). They are *prepended* (positions 0..n_v-1, before the class token)
to the embeddings *after* ``pre_layrnorm``; before every layer ``i`` the first n_v
hidden states are *replaced* by ``prompts[i]`` (not carried; layer 0's replacement
is the same vector). The encoder is bidirectional, so the patch tokens see them.

Textual prompts (``modeling_llamaPT.py``, ``LlamaModel``): ``PT_len`` (10) vectors of
the LLM width per LLM layer, for every layer (32 on a 7B). They are *concatenated
before the whole input* (before BOS, positions 0..n_t-1; the input's position ids
start at n_t) and before every decoder layer the first n_t hidden states are
replaced by ``prompts[i]``. Labels get n_t ignored positions in front. They are
inserted only when there is no cache (prefill); generation then reuses the cache.
So they ARE at the start of the sequence: under causal attention their keys and
values at layer i depend on ``prompts[i]`` alone (DESIGN idea 4): a KV prefix.

Cross-modality interaction layer (``llava_archPT.py``): ``mm_projector =
nn.Linear(mm_hidden_size, hidden_size)`` (1024 -> 4096), a single linear layer that
*is* the projector (LLaVA-v1 style, initialised from the stage-1 ``mm_projector.bin``
and tuned); it maps every selected vision feature to the LLM width.

Served here (``adapters.prompted_llava``) on transformers' ``LlavaForConditionalGeneration``:
- visual prompts as above; the features at ``vision_feature_layer`` are taken with
  the prompt positions removed, then the backbone's own select strategy applies,
  so an adapter gives as many image tokens as the plain model (differs, see below);
- textual prompts as above, served as a per-adapter KV prefix;
- the interaction layer (Dt, Dv * n_feature_layers) *replaces* the backbone's
  projector (llava-1.5's two-layer MLP) for that adapter's rows.

Where the reference differs (deliberately not reproduced):
- Its ``feature_select('patch')`` drops index 0 of the selected hidden state, which
  with prompts is the first *prompt*, not the class token: the LLM receives
  ``prompts[L-1][1:]`` (raw learned vectors, since layer -2's hidden state is the
  last layer's input after replacement), the class token and the patches, i.e.
  n_v + n_patches image tokens. We keep the plain model's image-token count, so rows
  of different adapters batch together and the processor needs no change. A side
  effect: with feature layer -2 the last vision layer's prompt has no effect here.
- Its attention mask puts the n_t ones after the first input column while the
  prompts sit before it; that is equal only when the first input token is attended
  (right padding, as in its training). Here the mask covers exactly the prompts.
- Its position ids are ``arange`` (padding ignored); here they count attended
  tokens (``generate``'s rule), equal without padding, and padding-independent.
- Its training script also tunes the LM head (``tune_lm_header``); the paper's
  ~0.09% does not count it, and a frozen-backbone adapter cannot carry it.

``METHOD`` tells the adapter file format what an ``m2pt`` file holds: exactly
``vision_prompts`` (vision_depth, n_vision, Dv), ``text_prompts`` (text_depth, n_text, Dt),
``projector_weight`` (Dt, projector_in) and ``projector_bias`` (Dt,), made for a LLaVA
backbone described by ``llava_fingerprint``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import LlavaConfig, PretrainedConfig

from adapters.errors import AdapterValueError
from adapters.method import Fit, Method, check_positive_ints

# The fields an m2pt adapter must agree on with a LLaVA backbone (adapters.format checks them).
LLAVA_FINGERPRINT_FIELDS: dict[str, type] = {
    "arch": str,
    "vision_width": int,
    "vision_layers": int,
    "image_size": int,
    "patch_size": int,
    "vision_feature_layer": str,  # "-2" or "-2,-5": may be negative, so a string
    "vision_feature_select_strategy": str,
    "image_tokens": int,  # per image, as the processor expands <image>
    "text_width": int,
    "text_layers": int,
    "num_heads": int,
    "num_kv_heads": int,
    "head_dim": int,
    "vocab_size": int,
    "projector_in": int,
    "projector_out": int,
}


def feature_layers(config: LlavaConfig) -> list[int]:
    layer = config.vision_feature_layer
    return [layer] if isinstance(layer, int) else list(layer)


def llava_fingerprint(config: LlavaConfig) -> dict[str, Any]:
    """What an m2pt adapter must agree on with a LLaVA backbone (not the weights themselves)."""
    v, t = config.vision_config, config.text_config
    # transformers types the sub-configs loosely; a built LlavaConfig always has both
    assert isinstance(v, PretrainedConfig) and isinstance(t, PretrainedConfig)
    layers = feature_layers(config)
    strategy = config.vision_feature_select_strategy
    patches = (v.image_size // v.patch_size) ** 2
    return {
        "arch": "llava",
        "vision_width": v.hidden_size,
        "vision_layers": v.num_hidden_layers,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "vision_feature_layer": ",".join(map(str, layers)),
        "vision_feature_select_strategy": strategy,
        "image_tokens": patches + (0 if strategy == "default" else 1),
        "text_width": t.hidden_size,
        "text_layers": t.num_hidden_layers,
        "num_heads": t.num_attention_heads,
        "num_kv_heads": t.num_key_value_heads or t.num_attention_heads,
        "head_dim": getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads,
        "vocab_size": t.vocab_size,
        "projector_in": v.hidden_size * len(layers),
        "projector_out": t.hidden_size,
    }


@dataclass(frozen=True)
class M2ptConfig:
    n_vision: int  # VIT_PT_len: visual prompts per vision layer
    vision_depth: int  # vision layers that get their own prompts (reference: all)
    vision_width: int
    n_text: int  # PT_len: textual prompts per LLM layer
    text_depth: int  # LLM layers that get their own prompts (reference: all)
    text_width: int
    projector_in: int  # vision width * number of feature layers

    def __post_init__(self) -> None:
        for name in (
            "n_vision",
            "vision_depth",
            "vision_width",
            "n_text",
            "text_depth",
            "text_width",
            "projector_in",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AdapterValueError(f"M2PT {name} must be an integer >= 1, got {value!r}")

    @classmethod
    def for_llava(
        cls,
        config: LlavaConfig,
        *,
        n_vision: int = 10,
        n_text: int = 10,
        vision_depth: int | None = None,
        text_depth: int | None = None,
    ) -> M2ptConfig:
        """Widths from a LLaVA config; depths default to every layer, as the reference."""
        fp = llava_fingerprint(config)
        vision_depth = fp["vision_layers"] if vision_depth is None else vision_depth
        text_depth = fp["text_layers"] if text_depth is None else text_depth
        if isinstance(vision_depth, int) and vision_depth > fp["vision_layers"]:
            raise AdapterValueError(
                f"vision_depth {vision_depth} exceeds the {fp['vision_layers']} vision layers"
            )
        if isinstance(text_depth, int) and text_depth > fp["text_layers"]:
            raise AdapterValueError(f"text_depth {text_depth} exceeds the {fp['text_layers']} LLM layers")
        return cls(
            n_vision,
            vision_depth,
            fp["vision_width"],
            n_text,
            text_depth,
            fp["text_width"],
            fp["projector_in"],
        )

    @property
    def num_parameters(self) -> int:
        """Tuned parameters: prompts of both towers plus the interaction layer."""
        return (
            self.vision_depth * self.n_vision * self.vision_width
            + self.text_depth * self.n_text * self.text_width
            + self.text_width * self.projector_in
            + self.text_width
        )


def _xavier_prompt(n: int, width: int) -> torch.Tensor:
    # The reference initialises each (1, n, width) prompt with xavier_uniform_: fan_in n*width, fan_out width.
    return nn.init.xavier_uniform_(torch.empty(1, n, width))[0]  # (n, width)


class M2ptPromptLearner(nn.Module):
    """The learned parameters of one M²PT adapter.

    Names follow the reference where it has one name per role: ``mm_projector``
    is its projector; its two ``prompts`` lists (vision encoder, LLM) are
    ``vision_prompts`` and ``text_prompts`` here, each entry (n, width) rather than
    the reference's (1, n, width) (see ``learner_state_from_reference``).
    """

    def __init__(self, config: M2ptConfig, projector: nn.Linear | None = None) -> None:
        super().__init__()
        self.config = config
        c = config
        self.vision_prompts = nn.ParameterList(
            [nn.Parameter(_xavier_prompt(c.n_vision, c.vision_width)) for _ in range(c.vision_depth)]
        )
        self.text_prompts = nn.ParameterList(
            [nn.Parameter(_xavier_prompt(c.n_text, c.text_width)) for _ in range(c.text_depth)]
        )
        self.mm_projector = nn.Linear(c.projector_in, c.text_width)  # default Linear init unless given
        if projector is not None:
            # The reference starts from a pretrained linear projector (LLaVA stage-1 mm_projector.bin).
            if tuple(projector.weight.shape) != (c.text_width, c.projector_in) or projector.bias is None:
                raise AdapterValueError(
                    f"projector must be Linear({c.projector_in}, {c.text_width}) with bias, "
                    f"got weight {tuple(projector.weight.shape)}"
                )
            self.mm_projector.load_state_dict(
                {k: v.detach().float() for k, v in projector.state_dict().items()}
            )

    def prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer prompts: vision (vision_depth, n_vision, Dv), text (text_depth, n_text, Dt)."""
        return torch.stack(list(self.vision_prompts)), torch.stack(list(self.text_prompts))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """The interaction layer: selected vision features (..., projector_in) -> (..., Dt)."""
        return self.mm_projector(image_features)

    def as_folded(self) -> FoldedM2pt:
        """The inference form still attached to the graph: train through prompted_llava with it."""
        vision, text = self.prompts()
        return FoldedM2pt(vision, text, self.mm_projector.weight, self.mm_projector.bias)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> M2ptPromptLearner:
        """A learner from its own state dict (any float dtype); shapes define the config."""
        learner = cls(config_from_state(state))
        learner.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
        return learner


_PROMPT_KEY = re.compile(r"(vision|text)_prompts\.(\d+)")


def config_from_state(state: Mapping[str, torch.Tensor]) -> M2ptConfig:
    """Infer counts, depths and widths from a learner state dict; check every shape."""
    for key in ("mm_projector.weight", "mm_projector.bias", "vision_prompts.0", "text_prompts.0"):
        if key not in state:
            raise AdapterValueError(f"not an M2PT prompt learner state: '{key}' is missing")
    extra = sorted(set(state) - {"mm_projector.weight", "mm_projector.bias"})
    unknown = [k for k in extra if not _PROMPT_KEY.fullmatch(k)]
    if unknown:
        raise AdapterValueError(f"unexpected keys in an M2PT prompt learner state: {unknown[:5]}")
    depth = {"vision": 0, "text": 0}
    for tower in depth:
        idx = {int(m.group(2)) for k in extra if (m := _PROMPT_KEY.fullmatch(k)) and m.group(1) == tower}
        if idx != set(range(len(idx))):
            raise AdapterValueError(f"{tower} prompt indices must be 0..{len(idx) - 1}, got {sorted(idx)}")
        depth[tower] = len(idx)
    v0, t0, w = state["vision_prompts.0"], state["text_prompts.0"], state["mm_projector.weight"]
    if v0.ndim != 2 or t0.ndim != 2 or w.ndim != 2:
        raise AdapterValueError("M2PT prompts must be (n, width) and mm_projector.weight (Dt, Din)")
    config = M2ptConfig(
        int(v0.shape[0]), depth["vision"], int(v0.shape[1]), int(t0.shape[0]), depth["text"], int(t0.shape[1]),
        int(w.shape[1]),
    )  # fmt: skip
    for key, shape in learner_shapes(config).items():
        if tuple(state[key].shape) != shape:
            raise AdapterValueError(
                f"'{key}' should have shape {shape} for {config}, got {tuple(state[key].shape)}"
            )
    return config


def learner_shapes(config: M2ptConfig) -> dict[str, tuple[int, ...]]:
    c = config
    shapes: dict[str, tuple[int, ...]] = {
        "mm_projector.weight": (c.text_width, c.projector_in),
        "mm_projector.bias": (c.text_width,),
    }
    shapes.update({f"vision_prompts.{i}": (c.n_vision, c.vision_width) for i in range(c.vision_depth)})
    shapes.update({f"text_prompts.{i}": (c.n_text, c.text_width) for i in range(c.text_depth)})
    return shapes


# Reference parameter names (LlavaLlamaForCausalLM state dict) -> ours.
_REFERENCE_KEYS = (
    (
        re.compile(r"model\.vision_tower\.vision_tower\.vision_model\.encoder\.prompts\.(\d+)"),
        "vision_prompts.{}",
    ),
    (re.compile(r"model\.prompts\.(\d+)"), "text_prompts.{}"),
    (re.compile(r"model\.mm_projector\.(weight|bias)"), "mm_projector.{}"),
)


def learner_state_from_reference(model_state: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The learner's tensors from a reference M2PT model state dict (prompts squeezed to (n, width)).

    Everything else (frozen backbone, the tuned LM head) is dropped. Note the image-token
    difference in the module docstring: a reference-trained projector saw n_v extra tokens.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in model_state.items():
        if not isinstance(key, str):
            continue
        key = key.removeprefix("module.")
        for pattern, template in _REFERENCE_KEYS:
            if m := pattern.fullmatch(key):
                if not isinstance(value, torch.Tensor):
                    raise AdapterValueError(f"'{key}' is not a tensor (got {type(value).__name__})")
                out[template.format(m.group(1))] = (
                    value[0] if "prompts" in template and value.ndim == 3 else value
                )
    return out


@dataclass(frozen=True, eq=False)
class FoldedM2pt:
    """Inference form of one M²PT adapter (fp32, detached, contiguous once folded)."""

    vision: torch.Tensor  # (vision_depth, n_vision, Dv)
    text: torch.Tensor  # (text_depth, n_text, Dt)
    projector_weight: torch.Tensor  # (Dt, projector_in)
    projector_bias: torch.Tensor  # (Dt,)

    def __post_init__(self) -> None:
        v, t, w, b = self.vision, self.text, self.projector_weight, self.projector_bias
        ok = (
            v.ndim == 3 and t.ndim == 3 and w.ndim == 2 and b.ndim == 1
            and 0 not in v.shape and 0 not in t.shape and 0 not in w.shape
            and w.shape[0] == t.shape[2] == b.shape[0]
        )  # fmt: skip
        if not ok:
            raise AdapterValueError(
                "folded M2PT tensors must be vision (Lv, n_v, Dv), text (Lt, n_t, Dt), projector weight "
                f"(Dt, Din) and bias (Dt,), got {tuple(v.shape)}, {tuple(t.shape)}, {tuple(w.shape)}, {tuple(b.shape)}"
            )

    @property
    def vision_depth(self) -> int:
        return self.vision.shape[0]

    @property
    def n_vision(self) -> int:
        return self.vision.shape[1]

    @property
    def vision_width(self) -> int:
        return self.vision.shape[2]

    @property
    def text_depth(self) -> int:
        return self.text.shape[0]

    @property
    def n_text(self) -> int:
        return self.text.shape[1]

    @property
    def text_width(self) -> int:
        return self.text.shape[2]

    @property
    def projector_in(self) -> int:
        return self.projector_weight.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.vision, self.text, self.projector_weight, self.projector_bias))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> FoldedM2pt:
        return FoldedM2pt(
            self.vision.to(device, dtype),
            self.text.to(device, dtype),
            self.projector_weight.to(device, dtype),
            self.projector_bias.to(device, dtype),
        )

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The interaction layer: (..., projector_in) -> (..., Dt)."""
        return F.linear(features, self.projector_weight, self.projector_bias)


def fold(learner: M2ptPromptLearner) -> FoldedM2pt:
    """Detached fp32 copies; the result no longer needs the learner."""
    with torch.no_grad():
        f = learner.as_folded()
        return FoldedM2pt(*(t.detach().to(torch.float32).contiguous().clone() for t in (
            f.vision, f.text, f.projector_weight, f.projector_bias)))  # fmt: skip


# ---------------------------------------------------------------- the file format's view

TENSORS = ("vision_prompts", "text_prompts", "projector_weight", "projector_bias")  # FoldedM2pt's order
_COUNTS = (
    ("n_vision", None),
    ("vision_depth", "vision_layers"),
    ("n_text", None),
    ("text_depth", "text_layers"),
)


def _check_hyperparameters(hp: Mapping[str, Any], backbone: Mapping[str, Any]) -> None:
    for key, layers in _COUNTS:
        check_positive_ints(hp, (key,))
        if layers is not None and hp[key] > backbone[layers]:
            raise AdapterValueError(f"{key} {hp[key]} exceeds the backbone's {backbone[layers]} {layers}")


def _expected_shapes(hp: Mapping[str, Any], backbone: Mapping[str, Any]) -> dict[str, list[int]]:
    b = backbone
    return {
        "vision_prompts": [hp["vision_depth"], hp["n_vision"], b["vision_width"]],
        "text_prompts": [hp["text_depth"], hp["n_text"], b["text_width"]],
        "projector_weight": [b["projector_out"], b["projector_in"]],
        "projector_bias": [b["projector_out"]],
    }


METHOD: Method[FoldedM2pt] = Method(
    name="m2pt",
    arch="llava",
    config_type=LlavaConfig,
    fingerprint=llava_fingerprint,
    fingerprint_fields=LLAVA_FINGERPRINT_FIELDS,
    folded_type=FoldedM2pt,
    tensors=TENSORS,
    shape=lambda f: {
        "n_vision": f.n_vision,
        "vision_depth": f.vision_depth,
        "n_text": f.n_text,
        "text_depth": f.text_depth,
    },  # fmt: skip
    check_hyperparameters=_check_hyperparameters,
    expected_shapes=_expected_shapes,
    to_tensors=lambda f: dict(
        zip(TENSORS, (f.vision, f.text, f.projector_weight, f.projector_bias), strict=True)
    ),
    from_tensors=lambda t: FoldedM2pt(*(t[name] for name in TENSORS)),
    fit=lambda f: Fit(
        "tensors",
        widths=(
            ("vision_width", f.vision_width),
            ("text_width", f.text_width),
            ("projector_in", f.projector_in),
        ),
        depths=(("vision_layers", f.vision_depth), ("text_layers", f.text_depth)),
    ),
)
