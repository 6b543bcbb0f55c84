"""Loading a frozen backbone: hub id or local directory, device, dtype, clear errors."""

from __future__ import annotations

import logging

import torch
from transformers import AutoConfig, AutoProcessor, PreTrainedModel

from adapters.devices import resolve_device

log = logging.getLogger("promptswap.backbones")


class BackboneLoadError(RuntimeError):
    """The checkpoint cannot be served as this backbone; the message says why."""


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_frozen(
    source: str, model_type: str, model_class: type[PreTrainedModel], device: str, dtype: str
) -> tuple[PreTrainedModel, object, torch.device, torch.dtype]:
    """``from_pretrained`` model and processor, frozen, in eval mode, moved once to the device."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise BackboneLoadError(f"cannot read a model config from {source!r}: {exc}") from exc
    if config.model_type != model_type:
        raise BackboneLoadError(
            f"{source!r} holds a {config.model_type!r} model, not a {model_type.upper()} checkpoint"
        )
    try:
        model = model_class.from_pretrained(source, dtype=torch_dtype)
        processor = AutoProcessor.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise BackboneLoadError(f"cannot load {model_type} from {source!r}: {exc}") from exc
    model.requires_grad_(False)
    model.eval().to(dev)
    log.info("loaded %s %s on %s as %s", model_type, source, dev, torch_dtype)
    return model, processor, dev, torch_dtype
