"""Everything the app holds while it runs: the threads, the text cache, and once the
models are loaded, one service per capability (``Services``).

Built by the lifespan, one per app (tests build many). Models load off the event
loop in the model thread, so /healthz answers and /readyz says 503 while they load.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from service.backbones.clip import ClipBackbone
from service.backbones.llava import LlavaBackbone
from service.backbones.sources import default_served_name
from service.chat.engine import GenerationEngine
from service.chat.service import ChatService
from service.classify.handler import ClassifyHandler, ClassifyItem, ClassifyResult
from service.classify.service import ClassifyService
from service.classify.text_cache import TextCache
from service.embeddings.handler import EmbeddingsHandler, EmbedItem
from service.embeddings.service import EmbeddingsService
from service.errors import Unprocessable
from service.http.admission import ArrivalGate, Lane
from service.metrics import Metrics
from service.registry.adapter_registry import AdapterRegistry
from service.registry.placement import Placement, m2pt_placement, maple_placement
from service.registry.store_protocol import open_store
from service.scheduling.batcher import BatchQueue, BatchStats
from service.settings import Settings

log = logging.getLogger("promptswap")


@dataclass(frozen=True)
class Services:
    """What the loaded models serve: a capability is None when its backbone is not run."""

    registry: AdapterRegistry
    classify: ClassifyService | None
    chat: ChatService | None
    embeddings: EmbeddingsService | None = None

    def refuse_backbone_name(self, ref: str | None, method: str) -> None:
        """A backbone's name where an adapter goes (422): say which backbone serves what."""
        serves = {"maple": "/v1/classify", "m2pt": "/v1/chat and /v1/chat/completions"}
        named = {"maple": self.classify, "m2pt": self.chat}
        for own, service in named.items():
            if ref is None or service is None or ref != service.model_id:
                continue
            kind = "CLIP" if own == "maple" else "LLaVA"
            if own == method:
                raise Unprocessable(
                    f"{ref!r} is this service's {kind} backbone, not an adapter; leave it out"
                )
            here = named[method]
            other = f"; this route is served by {here.model_id!r}" if here is not None else ""
            raise Unprocessable(f"{ref!r} is the {kind} backbone: it serves {serves[own]}{other}")


def log_model(kind: str, backbone: ClipBackbone | LlavaBackbone, source: str, load_s: float) -> None:
    log.info(
        "model %s: id %r (from %s) on %s as %s, loaded in %.2f s",
        kind,
        backbone.model_id,
        source,
        backbone.device,
        str(backbone.dtype).removeprefix("torch."),
        load_s,
    )


class Runtime:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        # One model thread: the device is one resource and batches must not interleave.
        self.model_executor = ThreadPoolExecutor(1, thread_name_prefix="promptswap-model")
        self.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="promptswap-decode")
        self.text_cache = TextCache(
            settings.text_cache_entries,
            on_hit=metrics.text_cache_hits.inc,
            on_miss=metrics.text_cache_misses.inc,
        )
        metrics.text_cache_entries.set_function(lambda: len(self.text_cache))
        self.services: Services | None = None  # set once every model is loaded
        self.load_error: str | None = None
        self._classify_queue: BatchQueue[ClassifyItem, ClassifyResult] | None = None
        self._chat_engine: GenerationEngine | None = None
        self._embeddings_queue: BatchQueue[EmbedItem, torch.Tensor] | None = None
        self._settled = asyncio.Event()  # loading finished, well or not
        self._load_task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.services is not None

    async def wait_ready(self) -> Services:
        """Wait until loading ends; the services, or raise if it failed."""
        await self._settled.wait()
        if self.services is None:
            raise RuntimeError(f"models failed to load: {self.load_error}")
        return self.services

    def start(self, on_fatal: Callable[[str], None] | None = None) -> None:
        """Load models in the background; ``on_fatal`` is told if that fails."""
        if self.settings.torch_threads is not None:
            torch.set_num_threads(self.settings.torch_threads)  # process-wide intra-op pool
        self._load_task = asyncio.get_running_loop().create_task(self._load(on_fatal))

    async def _load(self, on_fatal: Callable[[str], None] | None) -> None:
        try:
            self.services = await self._load_models()
        except Exception as exc:
            self.load_error = str(exc)
            log.error("start-up failed: %s", exc)
            if on_fatal is not None:
                on_fatal(self.load_error)
        else:
            log.info("ready")
        finally:
            self._settled.set()

    async def _load_models(self) -> Services:
        loop = asyncio.get_running_loop()
        s = self.settings
        # First: refused credentials stop the start before a backbone loads for nothing.
        store = await loop.run_in_executor(self.decode_pool, open_store, s)
        clip = llava = None
        if s.clip_model:
            started = time.perf_counter()
            clip = await loop.run_in_executor(
                self.model_executor, ClipBackbone.load, s.clip_model, s.device, s.dtype
            )
            clip.model_id = s.clip_served_model_name or default_served_name(s.clip_model)
            if s.device_preprocess:
                clip.use_device_preprocessing()
            log_model("clip", clip, s.clip_model, time.perf_counter() - started)
        if s.llava_model:
            started = time.perf_counter()
            llava = await loop.run_in_executor(
                self.model_executor, LlavaBackbone.load, s.llava_model, s.device, s.dtype
            )
            llava.model_id = s.llava_served_model_name or default_served_name(s.llava_model)
            log_model("llava", llava, s.llava_model, time.perf_counter() - started)
        placements: dict[str, Placement] = {}
        if clip is not None:
            placements["maple"] = maple_placement(clip)
        if llava is not None:
            placements["m2pt"] = m2pt_placement(llava)
        registry = AdapterRegistry(
            store,
            placements=placements,
            cache_bytes=s.adapter_cache_bytes,
            max_adapter_bytes=s.max_adapter_bytes,
            io_executor=self.decode_pool,
            metrics=self.metrics,
            retry_after_s=s.retry_after_adapter_memory_s,
            on_forget=self._forget_text,
        )
        classify = self._classify(clip, registry) if clip is not None else None
        chat = self._chat(llava, registry) if llava is not None else None
        embeddings = self._embeddings(classify, registry) if classify is not None else None
        return Services(registry, classify, chat, embeddings)

    def _lane(self, name: str, gate: ArrivalGate, busy_retry_after_s: int) -> Lane:
        return Lane(name, gate, self.metrics, busy_retry_after_s, self.settings.retry_after_unavailable_s)

    def _batch_queue(self, name: str, handler: Callable) -> BatchQueue:
        """A started scheduler queue on the model thread, observed under ``name``."""
        s, m = self.settings, self.metrics

        def observe(stats: BatchStats) -> None:
            m.batch_size.labels(name).observe(stats.size)
            m.inference.labels(name).observe(stats.run_s)
            for wait in stats.queue_wait_s:
                m.queue_wait.labels(name).observe(wait)

        def counted(items: list) -> list:
            # rows per adapter name in this batch (key is "name@version"); rows without one
            # (zero-shot, embeddings) are not counted
            adapters = (getattr(i, "adapter", None) for i in items)
            m.adapter_rows(a.key.partition("@")[0] for a in adapters if a is not None)
            return handler(items)

        queue: BatchQueue = BatchQueue(
            counted,
            executor=self.model_executor,
            max_batch_size=s.max_batch_size,
            max_wait_s=s.max_wait_ms / 1000,
            max_queue=s.max_queue,
            on_batch=observe,
            name=name,
        )
        m.queue_depth.labels(name).set_function(lambda: queue.depth)
        queue.start()
        return queue

    def _classify(self, clip: ClipBackbone, registry: AdapterRegistry) -> ClassifyService:
        s = self.settings
        handler = ClassifyHandler(clip, self.text_cache)
        queue: BatchQueue[ClassifyItem, ClassifyResult] = self._batch_queue("classify", handler)
        self._classify_queue = queue
        lane = self._lane("classify", ArrivalGate(s.max_queue, lambda: queue.depth), s.retry_after_busy_s)
        return ClassifyService(clip, handler, queue, lane, registry, s, self.decode_pool)

    def _embeddings(self, classify: ClassifyService, registry: AdapterRegistry) -> EmbeddingsService:
        """Embeddings share CLIP, the classify handler's paths and its text cache, in a queue of
        their own (one row per input: a request's rows are many, a classify request's one)."""
        s = self.settings
        queue: BatchQueue[EmbedItem, torch.Tensor] = self._batch_queue(
            "embeddings", EmbeddingsHandler(classify.handler)
        )
        self._embeddings_queue = queue
        lane = self._lane("embeddings", ArrivalGate(s.max_queue, lambda: queue.depth), s.retry_after_busy_s)
        return EmbeddingsService(classify.clip, queue, lane, registry, s, self.decode_pool)

    def _chat(self, llava: LlavaBackbone, registry: AdapterRegistry) -> ChatService:
        s, m = self.settings, self.metrics
        engine = GenerationEngine(
            llava,
            executor=self.model_executor,
            max_batch_size=s.chat_max_batch_size,
            max_queue=s.chat_max_queue,
            kv_cache_bytes=s.kv_cache_bytes,
            max_prefill_tokens=s.max_prefill_tokens,
            on_step=m.batch_size.labels("chat").observe,
            on_rows=lambda rows: m.adapter_rows(r.adapter.name for r in rows if r.adapter is not None),
        )
        m.queue_depth.labels("chat").set_function(lambda: engine.depth)
        engine.start()
        self._chat_engine = engine
        lane = self._lane(
            "chat", ArrivalGate(s.chat_max_queue, lambda: engine.depth), s.chat_retry_after_busy_s
        )
        return ChatService(llava, engine, lane, registry, s, self.decode_pool)

    def _forget_text(self, adapter_key: str) -> None:
        # The text cache belongs to the model thread: drop entries there, in order.
        self.model_executor.submit(self.text_cache.drop_adapter, adapter_key)

    async def stop(self) -> None:
        """Refuse new work, answer what was admitted, then release the threads."""
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self._classify_queue is not None:
            await self._classify_queue.stop(drain=True)
        if self._embeddings_queue is not None:
            await self._embeddings_queue.stop(drain=True)
        if self._chat_engine is not None:
            await self._chat_engine.stop(drain=True)
        self.model_executor.shutdown(wait=True, cancel_futures=True)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
