"""The embeddings capability as the route sees it: admit, decode, queue, collect.

Built by the runtime once CLIP is loaded, beside the classify service whose handler paths
and text cache it shares; holds everything an embeddings request touches."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch

from service.backbones.clip import ClipBackbone
from service.embeddings import request as parsing
from service.embeddings.handler import EmbedItem
from service.embeddings.schemas import EmbeddingsRequest
from service.errors import Overloaded, Unprocessable
from service.http.admission import Lane, Place
from service.registry.adapter_registry import AdapterRegistry
from service.scheduling.batcher import BatchQueue
from service.settings import Settings


@dataclass(frozen=True)
class Embedded:
    vectors: list[torch.Tensor]  # (P,) each, L2-normalised, in input order
    tokens: int  # usage: text tokens plus image tokens


@dataclass
class EmbeddingsService:
    clip: ClipBackbone
    queue: BatchQueue[EmbedItem, torch.Tensor]  # one row per input, on the model thread
    lane: Lane
    registry: AdapterRegistry
    settings: Settings
    decode_pool: Executor

    @property
    def image_tokens(self) -> int:
        """Tokens the vision encoder sees per image (class token + patches), for usage."""
        vision: Any = self.clip.model.config.vision_config
        return 1 + (vision.image_size // vision.patch_size) ** 2

    def adapter_ref(self, model: str) -> str | None:
        """``model`` names the backbone (no adapter) or an adapter (``name``, ``name@version``)."""
        return None if model == self.clip.model_id else model

    async def embed(self, body: EmbeddingsRequest, place: Place) -> Embedded:
        """Decode and tokenize ``body``'s inputs off the loop, queue one row each, collect them
        in order. ``place`` (its place at the arrival gate) is given back once they are queued."""
        ref = self.adapter_ref(body.model)
        adapter = await self.registry.acquire(ref, "maple") if ref is not None else None
        try:
            template = parsing.template_of(adapter, adapter.template if adapter else None)
            rows, tokens = await asyncio.get_running_loop().run_in_executor(
                self.decode_pool,
                parsing.build_rows,
                parsing.as_list(body),
                self.clip,
                self.settings,
                adapter,
                template,
                self.image_tokens,
            )
            place.release()  # queued from here on: the queue's bound counts each row
            return Embedded(await self._run(rows), tokens)
        finally:
            if adapter is not None:
                self.registry.release(adapter)

    async def _run(self, rows: list[EmbedItem]) -> list[torch.Tensor]:
        """Every row queued (all admitted or the request refused) and answered."""
        s, queue = self.settings, self.queue
        if queue.depth + len(rows) > s.max_queue:
            self.lane.metrics.rejected.labels(self.lane.name, "queue_full").inc()
            raise Overloaded(
                f"server busy: {queue.depth} rows queued", retry_after_s=self.lane.busy_retry_after_s
            )
        tasks = [asyncio.ensure_future(queue.submit(row, s.request_timeout_s)) for row in rows]
        try:
            with self.lane.refusals():
                return list(await asyncio.gather(*tasks))
        except Unprocessable as exc:  # a row's own failure: say which input
            failed = (
                i for i, t in enumerate(tasks) if t.done() and not t.cancelled() and t.exception() is exc
            )
            raise Unprocessable(f"input[{next(failed, '?')}]: {exc.message}") from None
        finally:
            for task in tasks:  # when one failed (or the client left) the others' rows are dropped
                task.cancel()
