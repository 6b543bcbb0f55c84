"""The chat engine as it was before issue 15, kept runnable for ``bench.chat`` only.

Per-request DynamicCache tensors: every decode step pads all active caches into a new
batch, the cache concatenates, and each row is cloned back; prefill one request at a
time; the whole answer re-detokenized per token. (Positions as fixed in b74ba7f.)
Not used by the service.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from adapters.prompted_llava import merge_image_tokens
from service.backbones.llava import LlavaBackbone, PreparedPrompt
from service.scheduling.batcher import Closed, Expired, QueueFull

log = logging.getLogger("promptswap.legacy_generation")
KV = list[tuple[torch.Tensor, torch.Tensor]]


class LegacyBackbone:
    """The old prefill/decode over a current LlavaBackbone's model."""

    def __init__(self, backbone: LlavaBackbone) -> None:
        self.backbone = backbone
        self.model = backbone.model
        self.device = backbone.device
        self.dtype = backbone.dtype
        self.eos_token_ids = backbone.eos_token_ids
        self.context_length = backbone.context_length

    def decode_text(self, token_ids: list[int]) -> str:
        return self.backbone.decode_text(token_ids)

    @torch.inference_mode()
    def prefill(self, prompt: PreparedPrompt, adapter: object = None) -> tuple[torch.Tensor, KV, int]:
        """Logits of the next token (V,), the cache, and the next position.

        Without an adapter this is exactly ``generate``'s prefill. With an M2PT adapter
        (``adapter.folded``, ``adapter.extras["prefix"]``) the image goes through its
        visual prompts and interaction layer, and the text starts after its KV prefix.
        """
        ids = prompt.input_ids.to(self.device)
        pixels = prompt.pixel_values.to(self.device, self.dtype)
        if adapter is None:
            out = self.model(
                input_ids=ids,
                pixel_values=pixels,
                attention_mask=torch.ones_like(ids),
                use_cache=True,
                logits_to_keep=1,
            )
            cache, start = out.cache, 0
            hidden_logits = out.logits[0, -1]
        else:
            prefix: KV = adapter.extras["prefix"]  # type: ignore[attr-defined]
            start = prefix[0][0].shape[2]  # n_text: the input's positions begin after it
            embeds = merge_image_tokens(self.model, ids, pixels, [adapter.folded])  # type: ignore[attr-defined]
            cache = DynamicCache(ddp_cache_data=prefix)  # copied on update: the prefix stays intact
            length = ids.shape[1]
            out = self.model.model.language_model(
                inputs_embeds=embeds,
                attention_mask=torch.ones(1, start + length, dtype=torch.long, device=self.device),
                position_ids=torch.arange(start, start + length, device=self.device)[None],
                cache=cache,
                use_cache=True,
            )
            hidden_logits = self.model.lm_head(out.last_hidden_state[0, -1])
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        return hidden_logits.float(), kv, start + prompt.length

    @torch.inference_mode()
    def decode(
        self, tokens: list[int], caches: list[KV], positions: list[int]
    ) -> tuple[torch.Tensor, list[KV]]:
        """One decode step for B requests with caches of different lengths.

        Returns logits (B, V) and each request's cache grown by one token.
        """
        lengths = [kv[0][0].shape[2] for kv in caches]
        longest = max(lengths)
        batch = len(caches)
        padded = []
        for layer in range(len(caches[0])):
            k0, v0 = caches[0][layer]
            keys = k0.new_zeros(batch, k0.shape[1], longest, k0.shape[3])  # (B, Hkv, Lmax, d)
            values = v0.new_zeros(batch, v0.shape[1], longest, v0.shape[3])
            for row, kv in enumerate(caches):
                keys[row, :, longest - lengths[row] :] = kv[layer][0][0]
                values[row, :, longest - lengths[row] :] = kv[layer][1][0]
            padded.append((keys, values))
        mask = torch.zeros(batch, longest + 1, dtype=torch.long, device=self.device)
        for row, length in enumerate(lengths):
            mask[row, longest - length :] = 1  # left padding is masked out
        cache = DynamicCache(ddp_cache_data=padded)
        out = self.model.model.language_model(
            input_ids=torch.tensor(tokens, device=self.device)[:, None],  # (B, 1)
            attention_mask=mask,
            position_ids=torch.tensor(positions, device=self.device)[:, None],
            cache=cache,
            use_cache=True,
        )
        logits = self.model.lm_head(out.last_hidden_state[:, -1]).float()  # (B, V)
        grown: list[KV] = []
        for row, length in enumerate(lengths):
            start = longest - length
            grown.append(
                [
                    (
                        layer.keys[row : row + 1, :, start:].clone(),
                        layer.values[row : row + 1, :, start:].clone(),
                    )
                    for layer in cache.layers
                ]
            )
        return logits, grown


@dataclass
class Delta:
    """New text of one request; ``finish_reason`` set on its last delta."""

    text: str
    tokens: int  # completion tokens so far
    finish_reason: str | None = None  # "stop" | "length"


@dataclass(eq=False)
class GenRequest:
    prompt: PreparedPrompt
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    adapter: Any = None  # a loaded M2PT adapter, or None
    deadline: float = float("inf")  # on the loop's clock
    events: asyncio.Queue[Delta | BaseException] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    # model-thread state
    kv: KV | None = None
    position: int = 0  # where ``last_token`` goes: generate's cache_position for the next step
    last_token: int = -1
    completion_tokens: int = 0  # every sampled token, the stop token included (as generate counts)
    generated: list[int] = field(default_factory=list)  # the answer's tokens, without the stop token
    text: str = ""
    emitted: int = 0  # characters of text already handed out
    finish_reason: str | None = None
    generator: torch.Generator | None = None

    @property
    def prompt_tokens(self) -> int:
        return self.prompt.length


class LegacyEngine:
    def __init__(
        self,
        backbone: LegacyBackbone,
        *,
        executor: Executor,
        max_batch_size: int,
        max_queue: int,
        on_step: Any = None,
    ) -> None:
        self.backbone = backbone
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._waiting: collections.deque[GenRequest] = collections.deque()
        self._active: list[GenRequest] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # set while nothing waits or runs
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._on_step = on_step
        self.steps = 0
        self.batch_rows: list[int] = []  # rows per decode step, for tests and metrics

    @property
    def depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="generation")

    async def stop(self, drain: bool = True) -> None:
        """Refuse new requests; with ``drain``, let admitted ones finish first."""
        self._closed = True
        if drain and self._task is not None and not self._task.done():
            await self._idle.wait()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for request in [*self._waiting, *self._active]:
            request.events.put_nowait(Closed("shutting down"))

    def submit(self, request: GenRequest) -> None:
        """Admit ``request`` or refuse it at once (QueueFull / Closed)."""
        if self._closed:
            raise Closed("not accepting requests")
        if len(self._waiting) >= self.max_queue:
            raise QueueFull(f"{self.max_queue} chat requests already waiting")
        self._waiting.append(request)
        self._idle.clear()
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting and not self._active:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            now = loop.time()
            self._active = [r for r in self._active if self._still_wanted(r, now)]
            new: list[GenRequest] = []
            while self._waiting and len(self._active) + len(new) < self.max_batch_size:
                request = self._waiting.popleft()
                if self._still_wanted(request, now):
                    new.append(request)
            if not new and not self._active:
                continue
            old = list(self._active)
            try:
                deltas = await loop.run_in_executor(self._executor, self._step, new, old)
            except Exception as exc:  # a failed step fails its rows only; the loop goes on
                log.exception("generation step failed")
                for request in new + old:
                    request.events.put_nowait(exc)
                    request.finish_reason = "error"
                deltas = []
            for request, delta in deltas:
                request.events.put_nowait(delta)
            self._active = [r for r in old + new if r.finish_reason is None]
            self.steps += 1
            if self._on_step is not None:
                self._on_step(len(old) + len(new))

    @staticmethod
    def _still_wanted(request: GenRequest, now: float) -> bool:
        if request.cancelled:
            return False
        if now > request.deadline:
            request.events.put_nowait(Expired("the request's deadline passed during generation"))
            request.finish_reason = "error"
            return False
        return True

    # ------------------------------------------------------------------ model thread

    def _step(self, new: list[GenRequest], old: list[GenRequest]) -> list[tuple[GenRequest, Delta]]:
        out: list[tuple[GenRequest, Delta]] = []
        for request in new:
            try:
                logits, request.kv, request.position = self.backbone.prefill(request.prompt, request.adapter)
            except Exception as exc:  # this request's prompt failed: only it fails
                log.exception("prefill failed")
                request.finish_reason = "error"
                request.events.put_nowait(exc)
                continue
            if request.seed is not None:
                request.generator = torch.Generator().manual_seed(request.seed)
            out.append((request, self._advance(request, logits)))
        if old:
            self.batch_rows.append(len(old))
            logits, grown = self.backbone.decode(
                [r.last_token for r in old], [r.kv for r in old], [r.position for r in old]
            )
            for row, request in enumerate(old):
                request.kv = grown[row]
                request.position += 1
                out.append((request, self._advance(request, logits[row])))
        return out

    def _advance(self, request: GenRequest, logits: torch.Tensor) -> Delta:
        token = self._sample(request, logits)
        request.last_token = token
        request.completion_tokens += 1
        if token in self.backbone.eos_token_ids:
            request.finish_reason = "stop"
        else:
            request.generated.append(token)
            request.text = self.backbone.decode_text(request.generated)
            for stop in request.stop:
                cut = request.text.find(stop)
                if cut != -1:
                    request.text = request.text[:cut]
                    request.finish_reason = "stop"
            if request.finish_reason is None and (
                len(request.generated) >= request.max_tokens
                or request.position >= self.backbone.context_length
            ):
                request.finish_reason = "length"
        if request.finish_reason is not None:
            request.kv = None  # free the cache at once
            end = len(request.text)
        else:
            # hold back a tail that could still become a stop string
            hold = max((len(s) - 1 for s in request.stop), default=0)
            end = max(request.emitted, len(request.text) - hold)
        delta = Delta(request.text[request.emitted : end], request.completion_tokens, request.finish_reason)
        request.emitted = end
        return delta

    @staticmethod
    def _sample(request: GenRequest, logits: torch.Tensor) -> int:
        if request.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float().cpu() / request.temperature, dim=-1)
        if request.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < request.top_p
            sorted_probs = sorted_probs * keep
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=request.generator))
