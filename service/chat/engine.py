"""Iteration-level batching for chat over a KV cache that stays in place.

The engine's loop (on the event loop) admits waiting requests while a KV slot is free
(``service.chat.kv_slots``: memory is reserved at admission for the adapter prefix, the
prompt and every token the request may generate, so a step never runs out of it), then
runs one *step* in the model thread:

- one decode forward for every running request: each row's new key/value is written
  in place at its own position and attends over its own tokens only;
- one prefill forward for the prompts being read, together, at most
  ``max_prefill_tokens`` of them per step: a long prompt is split over steps while the
  running requests keep decoding.

Each step yields at most one token per request, handed to its own event queue, so a
short request leaves while a long one keeps going. Cancelled (client gone) and expired
requests are dropped between steps. ``sample`` turns one row's logits into its token,
with a per-request generator, so a row never depends on its neighbours' randomness.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

from service.backbones.llava import LlavaBackbone, PreparedPrompt
from service.chat.detokenize import Detokenizer
from service.chat.kv_slots import KVSlots, SlotBatch, default_cache_bytes
from service.chat.prefix_attention import PrefixReads, install
from service.chat.sampling import SamplingExtras
from service.scheduling.batcher import Closed, Expired, QueueFull

log = logging.getLogger("promptswap.generation")


class NeverFits(ValueError):
    """A request larger than one KV slot: it could never start."""


@dataclass
class Delta:
    """New text of one request; ``finish_reason`` set on its last delta."""

    text: str
    tokens: int  # completion tokens so far
    finish_reason: str | None = None  # "stop" | "length"
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # this step's token, if asked for


@dataclass(eq=False)
class GenRequest:
    prompt: PreparedPrompt
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    adapter: Any = None  # a loaded M2PT adapter, or None
    extras: SamplingExtras | None = None  # OpenAI penalties and logprobs: this row only
    deadline: float = float("inf")  # on the loop's clock
    events: asyncio.Queue[Delta | BaseException] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    # model-thread state
    slot: int | None = None
    embeds: torch.Tensor | None = None  # (L, D) while the prompt is being read, then None
    prefilled: int = 0  # positions read so far, the adapter prefix's included
    position: int = 0  # where ``last_token`` goes: generate's cache_position for the next step
    # a slot holds the request's own tokens: position p is at slot index p - prefix_tokens
    last_token: int = -1
    completion_tokens: int = 0  # every sampled token, the stop token included (as generate counts)
    generated: list[int] = field(default_factory=list)  # the answer's tokens, without the stop token
    text: str = ""
    emitted: int = 0  # characters of text already handed out
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    detokenizer: Detokenizer | None = None
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # every delta's, when asked for

    @property
    def prompt_tokens(self) -> int:
        return self.prompt.length

    @property
    def prefix_tokens(self) -> int:
        return 0 if self.adapter is None else int(self.adapter.extras["prefix"][0][0].shape[2])


class GenerationEngine:
    def __init__(
        self,
        backbone: LlavaBackbone,
        *,
        executor: Executor,
        max_batch_size: int,
        max_queue: int,
        kv_cache_bytes: int | None = None,
        max_prefill_tokens: int = 512,
        on_step: Callable[[int], Any] | None = None,
        on_rows: Callable[[list[GenRequest]], None] | None = None,
    ) -> None:
        self.backbone = backbone
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        budget = default_cache_bytes(backbone.device) if kv_cache_bytes is None else kv_cache_bytes
        install(backbone.model.config.text_config)  # adapter prefixes read in place, not copied
        self.kv = KVSlots(
            backbone.model.config.text_config,
            budget_bytes=budget,
            context_length=backbone.context_length,
            device=backbone.device,
            dtype=backbone.dtype,
        )
        self.kv_cache_bytes = budget
        self._waiting: collections.deque[GenRequest] = collections.deque()
        self._active: list[GenRequest] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # set while nothing waits or runs
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._on_step = on_step
        self._on_rows = on_rows  # the rows of each decode step (per-adapter metrics)
        self.steps = 0
        self.batch_rows: collections.deque[int] = collections.deque(maxlen=4096)  # rows per decode step
        # per step: (rows decoded, prompts read, prompt tokens read), for tests and metrics
        self.step_shapes: collections.deque[tuple[int, int, int]] = collections.deque(maxlen=4096)

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

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise NeverFits when a request needs more KV than one slot holds (an adapter's
        prefix is held once by the adapter, not in the slot)."""
        need = prompt_tokens + max_tokens
        if need > self.kv.slot_tokens:
            raise NeverFits(
                f"the request needs {need} tokens of KV cache (prompt {prompt_tokens} + max_tokens "
                f"{max_tokens}) but one request's slot holds {self.kv.slot_tokens} "
                f"(--kv-cache-bytes {self.kv_cache_bytes} at {self.kv.bytes_per_token} bytes per token); "
                "lower max_tokens or shorten the prompt"
            )

    def submit(self, request: GenRequest) -> None:
        """Admit ``request`` or refuse it at once (NeverFits / QueueFull / Closed)."""
        if self._closed:
            raise Closed("not accepting requests")
        self.check_fits(request.prompt_tokens, request.max_tokens)
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
            kept = [r for r in self._active if self._still_wanted(r, now)]
            self._free([r for r in self._active if r not in kept])
            self._active = kept
            new: list[GenRequest] = []
            while self._waiting and len(self._active) + len(new) < self.max_batch_size and self.kv.free:
                request = self._waiting.popleft()
                if self._still_wanted(request, now):
                    request.slot = self.kv.allocate()
                    new.append(request)
            if not new and not self._active:
                continue
            rows = self._active + new
            try:
                deltas = await loop.run_in_executor(self._executor, self._step, new, self._active)
            except Exception as exc:  # a failed step fails its rows only; the loop goes on
                log.exception("generation step failed")
                for request in rows:
                    request.events.put_nowait(exc)
                    request.finish_reason = "error"
                deltas = []
            for request, delta in deltas:
                request.events.put_nowait(delta)
            self._free([r for r in rows if r.finish_reason is not None])
            self._active = [r for r in rows if r.finish_reason is None]
            self.steps += 1
            if self._on_step is not None:
                self._on_step(len(rows))
            if self._on_rows is not None:
                self._on_rows(rows)

    def _free(self, requests: list[GenRequest]) -> None:
        for request in requests:
            if request.slot is not None:
                self.kv.release(request.slot)
                request.slot = None
            request.embeds = None

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

    def _step(self, new: list[GenRequest], running: list[GenRequest]) -> list[tuple[GenRequest, Delta]]:
        for request in new:
            try:
                self._begin(request)
            except Exception as exc:  # this request's prompt failed: only it fails
                log.exception("prompt preparation failed")
                request.finish_reason = "error"
                request.events.put_nowait(exc)
        out: list[tuple[GenRequest, Delta]] = []
        decoding = [r for r in running if r.embeds is None]
        if decoding:
            self.batch_rows.append(len(decoding))
            logits = self._decode(decoding)
            for row, request in enumerate(decoding):
                request.position += 1
                out.append((request, self._advance(request, logits[row])))
        chunks: list[tuple[GenRequest, int]] = []
        budget = self.max_prefill_tokens
        for request in [*running, *new]:
            if request.embeds is None or request.finish_reason is not None or budget <= 0:
                continue
            take = min(request.prefix_tokens + request.embeds.shape[0] - request.prefilled, budget)
            chunks.append((request, take))
            budget -= take
        self.step_shapes.append((len(decoding), len(chunks), self.max_prefill_tokens - budget))
        if chunks:
            logits = self._prefill(chunks)
            for row, (request, _) in enumerate(chunks):
                assert request.embeds is not None
                if request.prefilled == request.prefix_tokens + request.embeds.shape[0]:
                    request.embeds = None  # the prompt is read: decode from here
                    request.position = request.prefilled
                    out.append((request, self._advance(request, logits[row])))
        return out

    def _begin(self, request: GenRequest) -> None:
        assert request.slot is not None
        request.embeds = self.backbone.prompt_embeds(request.prompt, request.adapter)
        request.prefilled = request.prefix_tokens
        request.detokenizer = Detokenizer(self.backbone.tokenizer)
        if request.seed is not None:
            request.generator = torch.Generator().manual_seed(request.seed)

    def _decode(self, rows: list[GenRequest]) -> torch.Tensor:
        """One token for each running row; the batch spans slots 0..hi-1 (a view, no copy)."""
        kv = self.kv
        hi = max(r.slot for r in rows if r.slot is not None) + 1
        tokens = torch.zeros(hi, 1, dtype=torch.long)
        positions = torch.zeros(hi, 1, dtype=torch.long)
        write_slots = torch.full((hi, 1), kv.trash, dtype=torch.long)  # rows without a request: trash
        write_positions = torch.zeros(hi, 1, dtype=torch.long)
        adapters: list[Any] = [None] * hi
        for r in rows:
            assert r.slot is not None
            tokens[r.slot, 0] = r.last_token
            positions[r.slot, 0] = r.position
            write_slots[r.slot, 0] = r.slot
            write_positions[r.slot, 0] = r.position - r.prefix_tokens
            adapters[r.slot] = r.adapter
        length = int(write_positions.max()) + 1
        mask = torch.arange(length)[None, None, None, :] <= write_positions[:, None, :, None]  # (hi, 1, 1, K)
        cache = SlotBatch(kv, write_slots.to(kv.device), write_positions.to(kv.device), None, length)
        embeds = self.backbone.token_embeds(tokens)
        logits = self.backbone.forward(
            embeds,
            positions,
            mask,
            cache,
            torch.zeros(hi, dtype=torch.long),
            PrefixReads.of(adapters, kv.device),
        )
        return logits[torch.tensor([r.slot for r in rows])]

    def _prefill(self, chunks: list[tuple[GenRequest, int]]) -> torch.Tensor:
        """Read the next ``n`` prompt tokens of each row, together; logits after each chunk."""
        kv = self.kv
        width = max(n for _, n in chunks)
        first = chunks[0][0].embeds
        assert first is not None
        embeds = first.new_zeros(len(chunks), width, first.shape[-1])  # (B, T, D)
        offsets = torch.arange(width)
        positions = torch.zeros(len(chunks), width, dtype=torch.long)
        write_slots = torch.full((len(chunks), width), kv.trash, dtype=torch.long)
        write_positions = offsets.repeat(len(chunks), 1)  # padding: trash positions 0..T-1
        own = torch.zeros(len(chunks), width, dtype=torch.long)  # slot indices of the inputs
        for row, (r, n) in enumerate(chunks):
            assert r.embeds is not None and r.slot is not None
            start = r.prefilled - r.prefix_tokens
            embeds[row, :n] = r.embeds[start : start + n]
            positions[row] = r.prefilled + offsets
            own[row] = start + offsets
            write_slots[row, :n] = r.slot
            write_positions[row, :n] = own[row, :n]
        length = max(r.prefilled - r.prefix_tokens + n for r, n in chunks)
        mask = torch.arange(length)[None, None, None, :] <= own[:, None, :, None]  # (B, 1, T, K)
        slots = [r.slot for r, _ in chunks]
        lo = slots[0]
        assert lo is not None
        consecutive = slots == list(range(lo, lo + len(slots)))
        # consecutive slots (one prompt, or prompts admitted together) are read as a view
        read = slice(lo, lo + len(slots)) if consecutive else torch.tensor(slots, device=kv.device)
        cache = SlotBatch(kv, write_slots.to(kv.device), write_positions.to(kv.device), read, length)
        last = torch.tensor([n - 1 for _, n in chunks])
        prefixes = PrefixReads.of([r.adapter for r, _ in chunks], kv.device)
        logits = self.backbone.forward(embeds, positions, mask, cache, last, prefixes)
        for r, n in chunks:
            r.prefilled += n
        return logits

    def _advance(self, request: GenRequest, logits: torch.Tensor) -> Delta:
        extras = request.extras
        if extras is not None:  # penalties change the logits the token is sampled from
            logits = extras.apply_penalties(logits, request.generated)
        token = self.sample(request, logits)
        request.last_token = token
        request.completion_tokens += 1
        logprobs: list[dict[str, Any]] = []
        assert request.detokenizer is not None
        if token in self.backbone.eos_token_ids:
            request.finish_reason = "stop"
            request.text += request.detokenizer.flush()
        else:
            if extras is not None and extras.top_logprobs is not None:
                logprobs.append(extras.entry(logits, token, lambda t: self.backbone.tokenizer.decode([t])))
                request.logprobs.extend(logprobs)
            request.generated.append(token)
            piece = request.detokenizer.add(token)
            full = request.position - request.prefix_tokens >= self.kv.slot_tokens
            if (
                len(request.generated) >= request.max_tokens
                or full
                or request.position >= self.backbone.context_length
            ):
                piece += request.detokenizer.flush()
                request.finish_reason = "length"
            self._extend(request, piece)
        if request.finish_reason is not None:
            end = len(request.text)
        else:
            # hold back a tail that could still become a stop string
            hold = max((len(s) - 1 for s in request.stop), default=0)
            end = max(request.emitted, len(request.text) - hold)
        delta = Delta(
            request.text[request.emitted : end], request.completion_tokens, request.finish_reason, logprobs
        )
        request.emitted = end
        return delta

    @staticmethod
    def _extend(request: GenRequest, piece: str) -> None:
        """Append ``piece``; a stop string ends the text (searched only where it can newly appear)."""
        if not piece:
            return
        longest = max((len(s) for s in request.stop), default=0)
        begin = max(0, len(request.text) - longest + 1)
        request.text += piece
        cuts = [c for c in (request.text.find(s, begin) for s in request.stop) if c != -1]
        if cuts:
            request.text = request.text[: min(cuts)]
            request.finish_reason = "stop"

    def sample(self, request: GenRequest, logits: torch.Tensor) -> int:
        """One row's next token from its logits (V,): greedy at temperature 0, else top-p
        sampling with the request's own generator. The per-row hook for sampling options."""
        if request.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float().cpu() / request.temperature, dim=-1)
        if request.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < request.top_p
            sorted_probs = sorted_probs * keep
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=request.generator))
