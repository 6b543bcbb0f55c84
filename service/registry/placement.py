"""Where each method's adapters go: the backbone's fingerprint they must match (shapes and
a digest of its weights, see adapters.weights), and how
their folded tensors are put on its device (for M2PT, with the KV prefix computed once
per load, so a request never recomputes it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from adapters.m2pt import llava_fingerprint
from adapters.maple import clip_fingerprint
from adapters.prompted_llava import prefix_kv
from adapters.weights import with_weights
from service.backbones.clip import ClipBackbone
from service.backbones.llava import LlavaBackbone


@dataclass(frozen=True)
class Placement:
    """How one method's adapters fit the backbone that serves them."""

    fingerprint: dict[str, Any]
    # folded tensors (CPU, fp32) -> (device form, device bytes, extras)
    place: Callable[[Any], tuple[Any, int, dict[str, Any]]]


def maple_placement(clip: ClipBackbone) -> Placement:
    def place(folded: Any) -> tuple[Any, int, dict[str, Any]]:
        on_device = folded.to(clip.device, clip.dtype)
        return on_device, on_device.nbytes, {}

    return Placement(with_weights(clip_fingerprint(clip.model.config), clip.model), place)


def m2pt_placement(llava: LlavaBackbone) -> Placement:
    """M2PT adapters: tensors on the device plus their KV prefix, computed once per load."""

    def place(folded: Any) -> tuple[Any, int, dict[str, Any]]:
        on_device = folded.to(llava.device, llava.dtype)
        with torch.inference_mode():
            prefix = prefix_kv(llava.model, on_device)
        nbytes = on_device.nbytes + sum(t.nbytes for kv in prefix for t in kv)
        return on_device, nbytes, {"prefix": prefix}

    return Placement(with_weights(llava_fingerprint(llava.model.config), llava.model), place)
