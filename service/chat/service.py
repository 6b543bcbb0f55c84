"""The chat capability as the routes see it: a thin layer over the generation engine.

Checks a call against the bounds, pins its adapter, prepares the prompt off the loop and
admits it to the engine; then hands out its deltas. Built by the runtime once LLaVA is
loaded, so a route holding it holds a running engine (nothing optional)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass

from service.backbones.llava import LlavaBackbone
from service.chat.engine import Delta, GenerationEngine, GenRequest, NeverFits
from service.chat.request import ChatCall, conversation_chars
from service.errors import ContextTooLong, NotFound, Unprocessable
from service.http.admission import Lane, Place
from service.http.images import decode_image
from service.registry.adapter_registry import AdapterRegistry, LoadedAdapter
from service.scheduling.batcher import Closed, Expired
from service.settings import Settings


@dataclass
class ChatService:
    llava: LlavaBackbone
    engine: GenerationEngine
    lane: Lane
    registry: AdapterRegistry
    settings: Settings
    decode_pool: Executor

    @property
    def model_id(self) -> str:
        return self.llava.model_id

    def adapter_of_model(self, name: str) -> str | None:
        """OpenAI's ``model`` names the backbone (no adapter) or an adapter: its ref."""
        if name == self.model_id:
            return None
        if not name:
            raise NotFound("model: name the backbone or an adapter (see GET /v1/models)")
        return name

    def check(self, call: ChatCall) -> int:
        """``call``'s bounds (422); returns the max_tokens it runs with."""
        s = self.settings
        max_tokens = (
            call.max_tokens if call.max_tokens is not None else min(s.default_max_tokens, s.max_new_tokens)
        )
        if not 1 <= max_tokens <= s.max_new_tokens:
            raise Unprocessable(f"max_tokens must be between 1 and {s.max_new_tokens}")
        if not 0 <= call.temperature <= 2 or not 0 < call.top_p <= 1:
            raise Unprocessable("temperature must be in [0, 2] and top_p in (0, 1]")
        if conversation_chars(call.conversation) > s.max_prompt_chars:
            raise Unprocessable(f"the messages are over {s.max_prompt_chars} characters")
        if len(call.stop) > s.max_stops or any(
            not stop or len(stop) > s.max_stop_chars for stop in call.stop
        ):
            raise Unprocessable(
                f"stop: at most {s.max_stops} non-empty strings of at most {s.max_stop_chars} characters"
            )
        return max_tokens

    async def start(self, call: ChatCall, place: Place) -> tuple[GenRequest, LoadedAdapter | None]:
        """Check bounds, prepare the prompt off the loop and admit the request; ``place`` (its
        place at the arrival gate) is given back once it is queued.

        The caller owns the returned adapter pin: ``release`` it when the request ends.
        """
        s = self.settings
        max_tokens = self.check(call)
        adapter = await self.registry.acquire(call.adapter, "m2pt") if call.adapter else None
        try:
            llava = self.llava
            loop = asyncio.get_running_loop()
            prompt = await loop.run_in_executor(
                self.decode_pool,
                lambda: llava.prepare(
                    None if call.image is None else decode_image(call.image, max_pixels=s.max_image_pixels),
                    call.conversation,
                ),
            )
            request = GenRequest(
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=call.temperature,
                top_p=call.top_p,
                seed=call.seed,
                stop=call.stop,
                adapter=adapter,
                extras=call.extras,
                deadline=loop.time() + s.chat_timeout_s,
            )
            prefix = request.prefix_tokens
            if prefix + prompt.length + max_tokens > llava.context_length:
                raise ContextTooLong(
                    f"the prompt is {prompt.length} tokens"
                    + (f" after the adapter's {prefix} prompt tokens" if prefix else "")
                    + f" and max_tokens {max_tokens}; the model's context is {llava.context_length} tokens"
                )
            try:
                self.engine.check_fits(prompt.length, max_tokens)
            except NeverFits as exc:
                raise ContextTooLong(str(exc)) from None
            place.release()  # queued from here on: the engine's bound counts it
            with self.lane.refusals():
                self.engine.submit(request)
        except BaseException:
            self.release(adapter)
            raise
        return request, adapter

    def release(self, adapter: LoadedAdapter | None) -> None:
        if adapter is not None:
            self.registry.release(adapter)

    async def deltas(self, request: GenRequest) -> AsyncIterator[Delta]:
        """The admitted request's deltas; leaving early (client gone) cancels it."""
        try:
            while True:
                event = await request.events.get()
                if isinstance(event, Expired | Closed):
                    with self.lane.refusals():
                        raise event
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            request.cancelled = True
