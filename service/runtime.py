"""Everything the app holds while it runs: models, queues, caches, thread pools.

Built by the lifespan, one per app (tests build many). Models load off the event
loop in the model thread, so /healthz answers and /readyz says 503 while they load.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from adapters.m2pt import llava_fingerprint
from adapters.maple import clip_fingerprint
from adapters.prompted_llava import prefix_kv
from service.backbones.clip import ClipBackbone
from service.backbones.llava import LlavaBackbone
from service.chat.engine import GenerationEngine
from service.classify.handler import ClassifyHandler, ClassifyItem, ClassifyResult
from service.classify.text_cache import TextCache
from service.errors import NotFound
from service.http.admission import ArrivalGate
from service.metrics import Metrics
from service.registry.adapter_registry import AdapterRegistry, LoadedAdapter, Placement
from service.registry.store import AdapterStore
from service.scheduling.batcher import BatchQueue, BatchStats
from service.settings import Settings

log = logging.getLogger("promptswap")


def maple_placement(clip: ClipBackbone) -> Placement:
    def place(folded):
        on_device = folded.to(clip.device, clip.dtype)
        return on_device, on_device.nbytes, {}

    return Placement(clip_fingerprint(clip.model.config), place)


def m2pt_placement(llava: LlavaBackbone) -> Placement:
    """M2PT adapters: tensors on the device plus their KV prefix, computed once per load."""

    def place(folded):
        on_device = folded.to(llava.device, llava.dtype)
        with torch.inference_mode():
            prefix = prefix_kv(llava.model, on_device)
        nbytes = on_device.nbytes + sum(t.nbytes for kv in prefix for t in kv)
        return on_device, nbytes, {"prefix": prefix}

    return Placement(llava_fingerprint(llava.model.config), place)


class Runtime:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        # One model thread: the device is one resource and batches must not interleave.
        self.model_executor = ThreadPoolExecutor(1, thread_name_prefix="promptswap-model")
        self.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="promptswap-decode")
        self.clip: ClipBackbone | None = None
        self.classify_handler: ClassifyHandler | None = None
        self.classify_queue: BatchQueue[ClassifyItem, ClassifyResult] | None = None
        self.classify_gate: ArrivalGate | None = None
        self.registry: AdapterRegistry | None = None
        self.llava: LlavaBackbone | None = None
        self.chat_engine: GenerationEngine | None = None
        self.chat_gate: ArrivalGate | None = None
        self.text_cache = TextCache(
            settings.text_cache_entries,
            on_hit=metrics.text_cache_hits.inc,
            on_miss=metrics.text_cache_misses.inc,
        )
        metrics.text_cache_entries.set_function(lambda: len(self.text_cache))
        self.load_error: str | None = None
        self._ready = asyncio.Event()
        self._settled = asyncio.Event()  # loading finished, well or not
        self._load_task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def wait_ready(self) -> None:
        """Wait until loading ends; raise if it failed."""
        await self._settled.wait()
        if not self.ready:
            raise RuntimeError(f"models failed to load: {self.load_error}")

    def start(self, on_fatal: Callable[[str], None] | None = None) -> None:
        """Load models in the background; ``on_fatal`` is told if that fails."""
        if self.settings.torch_threads is not None:
            torch.set_num_threads(self.settings.torch_threads)  # process-wide intra-op pool
        self._load_task = asyncio.get_running_loop().create_task(self._load(on_fatal))

    async def _load(self, on_fatal: Callable[[str], None] | None) -> None:
        try:
            await self._load_models()
        except Exception as exc:
            self.load_error = str(exc)
            log.error("start-up failed: %s", exc)
            if on_fatal is not None:
                on_fatal(self.load_error)
        else:
            self._ready.set()
            log.info("ready")
        finally:
            self._settled.set()

    async def _load_models(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        placements: dict[str, Placement] = {}
        if s.clip_model:
            self.clip = await loop.run_in_executor(
                self.model_executor, ClipBackbone.load, s.clip_model, s.device, s.dtype
            )
            self.classify_handler = ClassifyHandler(self.clip, self.text_cache)
            self.classify_queue = queue = self._queue("classify", self.classify_handler)
            self.classify_gate = ArrivalGate(s.max_queue, lambda: queue.depth)
            placements["maple"] = maple_placement(self.clip)
        if s.llava_model:
            self.llava = await loop.run_in_executor(
                self.model_executor, LlavaBackbone.load, s.llava_model, s.device, s.dtype
            )
            self.chat_engine = engine = GenerationEngine(
                self.llava,
                executor=self.model_executor,
                max_batch_size=s.chat_max_batch_size,
                max_queue=s.chat_max_queue,
                on_step=self.metrics.batch_size.labels("chat").observe,
            )
            self.metrics.queue_depth.labels("chat").set_function(lambda: self.chat_engine.depth)
            self.chat_engine.start()
            self.chat_gate = ArrivalGate(s.chat_max_queue, lambda: engine.depth)
            placements["m2pt"] = m2pt_placement(self.llava)
        self.registry = AdapterRegistry(
            AdapterStore(s.adapter_dir),
            placements=placements,
            cache_bytes=s.adapter_cache_bytes,
            max_adapter_bytes=s.max_adapter_bytes,
            io_executor=self.decode_pool,
            metrics=self.metrics,
            on_forget=self._forget_text,
        )

    def _queue(self, name: str, handler) -> BatchQueue:
        s, m = self.settings, self.metrics

        def observe(stats: BatchStats) -> None:
            m.batch_size.labels(name).observe(stats.size)
            m.inference.labels(name).observe(stats.run_s)
            for wait in stats.queue_wait_s:
                m.queue_wait.labels(name).observe(wait)

        queue: BatchQueue = BatchQueue(
            handler,
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

    async def acquire_adapter(self, ref: str | None, method: str) -> LoadedAdapter | None:
        """The loaded adapter a request names (``name`` or ``name@version``), pinned
        until ``release_adapter``; None when the request names none."""
        if ref is None:
            return None
        if self.registry is None:
            raise NotFound(f"adapter {ref!r} not found")
        return await self.registry.acquire(ref, method)

    def release_adapter(self, adapter: LoadedAdapter | None) -> None:
        if adapter is not None and self.registry is not None:
            self.registry.release(adapter)

    def _forget_text(self, adapter_key: str) -> None:
        # The text cache belongs to the model thread: drop entries there, in order.
        self.model_executor.submit(self.text_cache.drop_adapter, adapter_key)

    async def stop(self) -> None:
        """Refuse new work, answer what was admitted, then release the threads."""
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.classify_queue is not None:
            await self.classify_queue.stop(drain=True)
        if self.chat_engine is not None:
            await self.chat_engine.stop(drain=True)
        self.model_executor.shutdown(wait=True, cancel_futures=True)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
