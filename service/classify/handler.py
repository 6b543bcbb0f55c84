"""Classification: the batch handler that turns queued requests into logits.

Runs in the model worker thread. Per batch: (1) text embeddings for every
(adapter, template, label) the batch needs, from the cache or computed once, grouped
by adapter; (2) image embeddings for all rows, rows that share a prompt shape in one
forward (different adapters gather their own prompts per row); (3) per row, logits
against that row's own labels. A row's failure (a prompt too long for the text
encoder) is that row's alone.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol

import torch

from service.backbones.clip import ClipBackbone
from service.classify.text_cache import TextCache, TextKey
from service.errors import Unprocessable

PREFIX_CACHE_ENTRIES = 4096  # distinct templates whose prefix token count is kept
TEXT_CHUNK = 256  # prompts per text forward: bounds activation memory for big label sets


class FoldedPrompts(Protocol):
    text: torch.Tensor  # (depth, n_ctx, Dt) on the device
    vision: torch.Tensor  # (depth, n_ctx, Dv) on the device


class PromptAdapter(Protocol):
    """What the handler needs of a loaded MaPLe adapter (see service.registry)."""

    @property
    def key(self) -> str: ...  # "name@version"

    @property
    def uid(self) -> str: ...  # key and content: text embeddings are cached under it

    @property
    def folded(self) -> FoldedPrompts: ...


@dataclass
class ClassifyItem:
    pixels: torch.Tensor  # ClipBackbone.preprocess's: (3, H, W) float32 on the CPU, or the uint8 image
    labels: list[str]
    template: str
    adapter: PromptAdapter | None = None

    def text_keys(self, model_id: str) -> list[TextKey]:
        akey = self.adapter.uid if self.adapter is not None else ""
        return [TextKey(model_id, akey, self.template, label) for label in self.labels]


@dataclass
class ClassifyResult:
    logits: list[float]  # in the order of the item's labels


def _prompts(adapter: PromptAdapter | None) -> FoldedPrompts:
    assert adapter is not None, "a row with a prompt shape has an adapter"
    return adapter.folded


def _prompt_shape(adapter: PromptAdapter | None) -> tuple[int, ...] | None:
    """Rows whose prompts have one shape (depth, n_ctx) share a forward."""
    return None if adapter is None else tuple(adapter.folded.vision.shape[:2])


class ClassifyHandler:
    def __init__(self, backbone: ClipBackbone, cache: TextCache) -> None:
        self.backbone = backbone
        self.cache = cache
        self.logit_scale = backbone.logit_scale
        self.text_forwards = 0  # text-encoder calls, for tests and metrics
        self._prefix_tokens: dict[str, int] = {}  # model thread only

    def __call__(self, items: list[ClassifyItem]) -> list[ClassifyResult | BaseException]:
        model_id = self.backbone.model_id
        keys_per_item = [item.text_keys(model_id) for item in items]
        adapter_of = {
            k.adapter: item.adapter for item, keys in zip(items, keys_per_item, strict=False) for k in keys
        }
        unique = list(dict.fromkeys(k for keys in keys_per_item for k in keys))
        features, missing = self.cache.lookup(unique)
        failed = self._compute_text(missing, adapter_of, features)
        image_feats = self._image_features(items)

        results: list[ClassifyResult | BaseException] = []
        for i, keys in enumerate(keys_per_item):
            bad = next((failed[k] for k in keys if k in failed), None)
            if bad is not None:
                results.append(bad)
                continue
            text = torch.stack([features[k] for k in keys])  # (L, P)
            logits = self.logit_scale * (image_feats[i] @ text.T)  # (L,)
            results.append(ClassifyResult(logits.tolist()))
        return results

    def text_embeddings(
        self, keys: list[TextKey], adapter_of: dict[str, PromptAdapter | None]
    ) -> tuple[dict[TextKey, torch.Tensor], dict[TextKey, BaseException]]:
        """Embeddings of ``keys`` from the cache or computed once, and the keys that failed;
        ``adapter_of`` maps each key's adapter uid to its adapter (the embeddings route's path)."""
        features, missing = self.cache.lookup(keys)
        return features, self._compute_text(missing, adapter_of, features)

    def image_embeddings(
        self, pixels: list[torch.Tensor], adapters: list[PromptAdapter | None]
    ) -> list[torch.Tensor]:
        """Image embeddings of rows ``pixels`` (3, H, W), each through its own adapter's prompts."""
        rows = [ClassifyItem(p, [], "", a) for p, a in zip(pixels, adapters, strict=True)]
        return self._image_features(rows)

    def _compute_text(
        self,
        missing: list[TextKey],
        adapter_of: dict[str, PromptAdapter | None],
        out: dict[TextKey, torch.Tensor],
    ) -> dict[TextKey, BaseException]:
        failed: dict[TextKey, BaseException] = {}
        if not missing:
            return failed
        limit = self.backbone.max_text_tokens
        lengths = self.backbone.token_lengths([k.template.replace("{}", k.label) for k in missing])
        # One text forward per prompt shape: prompts of different adapters stack row-wise.
        by_shape: dict[tuple[int, ...] | None, list[TextKey]] = defaultdict(list)
        for key, n_tokens in zip(missing, lengths, strict=False):
            adapter = adapter_of[key.adapter]
            problem = self._prompt_problem(key, n_tokens, limit, adapter)
            if problem is not None:
                failed[key] = Unprocessable(problem)
            else:
                by_shape[_prompt_shape(adapter)].append(key)
        for shape, keys in by_shape.items():
            for start in range(0, len(keys), TEXT_CHUNK):
                chunk = keys[start : start + TEXT_CHUNK]
                prompts = None
                if shape is not None:
                    prompts = torch.stack([_prompts(adapter_of[k.adapter]).text for k in chunk])
                feats = self.backbone.text_features(
                    [k.template.replace("{}", k.label) for k in chunk], prompts
                )
                self.text_forwards += 1
                for key, feat in zip(chunk, feats, strict=False):
                    out[key] = feat
                    self.cache.put(key, feat)
        return failed

    def _prompt_problem(
        self, key: TextKey, n_tokens: int, limit: int, adapter: PromptAdapter | None
    ) -> str | None:
        if n_tokens > limit:
            return (
                f"label {key.label[:40]!r} with the template is {n_tokens} tokens; "
                f"the text encoder takes at most {limit}"
            )
        if adapter is not None:
            # MaPLe replaces the n_ctx tokens after the start token: they must be template words.
            n_ctx = adapter.folded.text.shape[1]
            before = self._tokens_before_label(key.template)
            if before < n_ctx:
                return (
                    f"template {key.template!r} has {before} tokens before the label, but "
                    f"adapter {adapter.key!r} replaces the first {n_ctx}; use a longer template"
                )
        return None

    def _tokens_before_label(self, template: str) -> int:
        """Word tokens of ``template`` before ``{}``, counted once per template."""
        count = self._prefix_tokens.get(template)
        if count is None:
            prefix = template.split("{}")[0].strip()
            count = self.backbone.token_lengths([prefix])[0] - 2  # minus start and end tokens
            if len(self._prefix_tokens) >= PREFIX_CACHE_ENTRIES:  # templates come from requests
                self._prefix_tokens.clear()
            self._prefix_tokens[template] = count
        return count

    def _image_features(self, items: list[ClassifyItem]) -> list[torch.Tensor]:
        """One forward per prompt shape; each row gathers its own adapter's prompts."""
        groups: dict[tuple[int, ...] | None, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            groups[_prompt_shape(item.adapter)].append(i)
        out: list[torch.Tensor | None] = [None] * len(items)
        for shape, rows in groups.items():
            pixels = self.backbone.pixel_batch([items[i].pixels for i in rows])  # (B, 3, H, W)
            prompts = None
            if shape is not None:
                prompts = torch.stack([_prompts(items[i].adapter).vision for i in rows])
            feats = self.backbone.image_features(pixels, prompts)  # (B, P)
            for i, feat in zip(rows, feats, strict=False):
                out[i] = feat
        return out  # type: ignore[return-value]
