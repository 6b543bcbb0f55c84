"""The classify capability as the routes see it: admit, decode, queue, rank.

Built by the runtime once CLIP is loaded; holds everything a classify request touches,
so a route that has this object has everything it needs (nothing optional)."""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

from service.backbones.clip import ClipBackbone
from service.classify.handler import ClassifyHandler, ClassifyItem, ClassifyResult
from service.classify.request import ClassifyCall, check_labels, labels_of
from service.errors import ApiError, Overloaded
from service.http.admission import Lane, Place
from service.http.images import decode_image
from service.http.schemas import DEFAULT_TEMPLATE
from service.registry.adapter_registry import AdapterRegistry, LoadedAdapter
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
        adapter = await self.registry.acquire(call.adapter, "maple") if call.adapter else None
        try:
            template = self._template(call, adapter)
            labels, top_k = self._labels(call, adapter)
            pixels = await self._decode(call.image)
            place.release()  # queued from here on: the queue's bound counts it
            return await self._row(pixels, labels, top_k, template, adapter)
        finally:
            if adapter is not None:
                self.registry.release(adapter)

    async def classify_many(
        self, call: ClassifyCall, place: Place
    ) -> tuple[str | None, list[Ranked | ApiError]]:
        """``call.images`` in order, each row decoded, queued and ranked as a request of its
        own would be (batched with every other row), and failing alone: a row's answer is
        its ranking or its error. The rows are admitted together or refused together. Returns
        the adapter used ("name@version", or None) and the rows."""
        s = self.settings
        adapter = await self.registry.acquire(call.adapter, "maple") if call.adapter else None
        try:
            template = self._template(call, adapter)
            labels, top_k = self._labels(call, adapter)
            images = call.images or []
            decoded = await asyncio.gather(*(self._decode_row(image) for image in images))
            if self.queue.depth + len(images) > s.max_queue:
                self.lane.metrics.rejected.labels(self.lane.name, "queue_full").inc()
                raise Overloaded(
                    f"server busy: {self.queue.depth} requests queued; {len(images)} images need a place "
                    "each",
                    retry_after_s=self.lane.busy_retry_after_s,
                )
            place.release()  # queued from here on: the queue's bound counts each row

            async def row(pixels: torch.Tensor | ApiError) -> Ranked | ApiError:
                if isinstance(pixels, ApiError):
                    return pixels
                try:
                    return await self._row(pixels, labels, top_k, template, adapter)
                except ApiError as exc:  # this row's own failure (a deadline, a prompt too long)
                    return exc

            rows = list(await asyncio.gather(*(row(p) for p in decoded)))
            return (adapter.key if adapter is not None else None), rows
        finally:
            if adapter is not None:
                self.registry.release(adapter)

    def _labels(self, call: ClassifyCall, adapter: LoadedAdapter | None) -> tuple[list[str], int]:
        # An adapter is used with the labels it was trained with unless the request gives its own.
        labels = call.labels if call.labels is not None else check_labels(labels_of(adapter), self.settings)
        return labels, min(call.top_k or len(labels), len(labels))

    def _template(self, call: ClassifyCall, adapter: LoadedAdapter | None) -> str:
        # An adapter is used with the template it was trained with unless told otherwise.
        return call.template or (adapter.template if adapter else None) or DEFAULT_TEMPLATE

    async def _decode(self, image: bytes | torch.Tensor | ApiError) -> torch.Tensor:
        if isinstance(image, ApiError):  # a front end's decode failed: it fails here, in order
            raise image
        if isinstance(image, torch.Tensor):  # decoded by a front-end process
            return image
        clip, s = self.clip, self.settings
        draft = clip.draft_min_side if s.jpeg_draft else None  # opt-in: changes pixels
        return await asyncio.get_running_loop().run_in_executor(
            self.decode_pool,
            lambda: clip.preprocess(decode_image(image, max_pixels=s.max_image_pixels, draft_min_side=draft)),
        )

    async def _decode_row(self, image: bytes | torch.Tensor | ApiError) -> torch.Tensor | ApiError:
        try:
            return await self._decode(image)
        except ApiError as exc:
            return exc

    async def _row(
        self,
        pixels: torch.Tensor,
        labels: list[str],
        top_k: int,
        template: str,
        adapter: LoadedAdapter | None,
    ) -> Ranked:
        with self.lane.refusals():
            result = await self.queue.submit(
                ClassifyItem(pixels, labels, template, adapter), self.settings.request_timeout_s
            )
        scores = softmax(result.logits)
        ranked = sorted(range(len(labels)), key=lambda i: -scores[i])[:top_k]
        return Ranked(
            model=self.model_id,
            adapter=adapter.key if adapter is not None else None,
            labels=[(labels[i], scores[i], result.logits[i]) for i in ranked],
        )


def softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]
