"""The classify capability as the routes see it: admit, decode, queue, rank.

Built by the runtime once CLIP is loaded; holds everything a classify request touches,
so a route that has this object has everything it needs (nothing optional)."""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import Executor
from dataclasses import dataclass

from service.backbones.clip import ClipBackbone
from service.classify.handler import ClassifyHandler, ClassifyItem, ClassifyResult
from service.classify.request import ClassifyCall
from service.http.admission import Lane, Place
from service.http.images import decode_image
from service.http.schemas import DEFAULT_TEMPLATE
from service.registry.adapter_registry import AdapterRegistry
from service.scheduling.batcher import BatchQueue
from service.settings import Settings


@dataclass(frozen=True)
class Ranked:
    """A classify answer: the top labels, most probable first."""

    model: str
    adapter: str | None  # "name@version" used, or None
    labels: list[tuple[str, float, float]]  # (label, softmax score, logit)


@dataclass
class ClassifyService:
    clip: ClipBackbone
    handler: ClassifyHandler
    queue: BatchQueue[ClassifyItem, ClassifyResult]
    lane: Lane
    registry: AdapterRegistry
    settings: Settings
    decode_pool: Executor

    @property
    def model_id(self) -> str:
        return self.clip.model_id

    async def classify(self, call: ClassifyCall, place: Place) -> Ranked:
        """Decode ``call``'s image off the loop, queue it, and rank its labels. ``place`` (its
        place at the arrival gate) is given back once the item is queued."""
        s = self.settings
        adapter = await self.registry.acquire(call.adapter, "maple") if call.adapter else None
        try:
            # An adapter is used with the template it was trained with unless told otherwise.
            template = call.template or (adapter.template if adapter else None) or DEFAULT_TEMPLATE
            clip = self.clip
            draft = clip.draft_min_side if s.jpeg_draft else None  # opt-in: changes pixels
            pixels = await asyncio.get_running_loop().run_in_executor(
                self.decode_pool,
                lambda: clip.preprocess(
                    decode_image(call.image, max_pixels=s.max_image_pixels, draft_min_side=draft)
                ),
            )
            place.release()  # queued from here on: the queue's bound counts it
            with self.lane.refusals():
                result = await self.queue.submit(
                    ClassifyItem(pixels, call.labels, template, adapter), s.request_timeout_s
                )
        finally:
            if adapter is not None:
                self.registry.release(adapter)
        scores = softmax(result.logits)
        ranked = sorted(range(len(call.labels)), key=lambda i: -scores[i])[: call.top_k]
        return Ranked(
            model=self.model_id,
            adapter=adapter.key if adapter is not None else None,
            labels=[(call.labels[i], scores[i], result.logits[i]) for i in ranked],
        )


def softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]
