"""The embeddings batch handler: queued image and text rows -> L2-normalised embeddings.

Runs in the model worker thread and goes through the classify path's own pieces, so an
embedding is exactly what /v1/classify compares: texts through the text cache (a
repeated text costs nothing), images rows of one prompt shape in one forward, each row
with its own adapter's prompts. A row's failure (a text too long for the encoder) is
that row's alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.classify.handler import ClassifyHandler, PromptAdapter
from service.classify.text_cache import TextKey

PLAIN_TEMPLATE = "{}"  # no adapter: a text is embedded exactly as given


@dataclass
class EmbedItem:
    """One input of one request: an image (``pixels``) or a text (``text`` in ``template``)."""

    pixels: torch.Tensor | None = None  # ClipBackbone.preprocess's output
    text: str | None = None
    template: str = PLAIN_TEMPLATE
    adapter: PromptAdapter | None = None


class EmbeddingsHandler:
    def __init__(self, classify: ClassifyHandler) -> None:
        self.classify = classify

    def __call__(self, items: list[EmbedItem]) -> list[torch.Tensor | BaseException]:
        out: list[torch.Tensor | BaseException | None] = [None] * len(items)
        model_id = self.classify.backbone.model_id
        texts = [(i, item) for i, item in enumerate(items) if item.text is not None]
        if texts:
            keys = [
                TextKey(model_id, item.adapter.uid if item.adapter else "", item.template, item.text or "")
                for _, item in texts
            ]
            adapter_of = {key.adapter: item.adapter for key, (_, item) in zip(keys, texts, strict=True)}
            features, failed = self.classify.text_embeddings(list(dict.fromkeys(keys)), adapter_of)
            for key, (i, _) in zip(keys, texts, strict=True):
                out[i] = failed[key] if key in failed else features[key]
        images = [(i, item) for i, item in enumerate(items) if item.pixels is not None]
        if images:
            feats = self.classify.image_embeddings(
                [item.pixels for _, item in images],  # type: ignore[misc]
                [item.adapter for _, item in images],
            )
            for (i, _), feat in zip(images, feats, strict=True):
                out[i] = feat
        return [r if r is not None else ValueError("an input is neither image nor text") for r in out]
