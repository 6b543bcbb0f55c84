"""Chat requests: from parsed messages to a running generation, shared by /v1/chat and
the OpenAI-compatible /v1/chat/completions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from service.chat.engine import Delta, GenRequest
from service.errors import (
    BadRequest,
    DeadlineExceeded,
    InvalidImage,
    Overloaded,
    Unavailable,
    Unprocessable,
)
from service.http.admission import ArrivalGate, Place
from service.http.images import decode_base64_image, decode_image
from service.registry.adapter_registry import LoadedAdapter
from service.runtime import Runtime
from service.scheduling.batcher import Closed, Expired, QueueFull


class ContextTooLong(BadRequest):
    code = "context_length_exceeded"


@dataclass
class ChatCall:
    """One chat request, whatever API it came through."""

    conversation: list[dict[str, Any]]  # chat-template messages with one {"type": "image"} part
    image: bytes
    adapter: str | None
    max_tokens: int | None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
        }


def image_from_url(url: str, max_bytes: int) -> bytes:
    """An OpenAI ``image_url``: only ``data:`` URLs; the service never fetches."""
    if not url.startswith("data:"):
        raise InvalidImage("only data: URLs are accepted for images; remote URLs are never fetched")
    return decode_base64_image(url, max_bytes=max_bytes)


def openai_conversation(messages: list[Any], max_bytes: int) -> tuple[list[dict[str, Any]], bytes]:
    """OpenAI messages -> chat-template conversation and the one image's bytes."""
    conversation: list[dict[str, Any]] = []
    images: list[bytes] = []
    for message in messages:
        content = message.content
        parts: list[dict[str, Any]] = []
        if isinstance(content, str):
            parts.append({"type": "text", "text": content})
        else:
            for part in content:
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text})
                else:
                    images.append(image_from_url(part.image_url.url, max_bytes))
                    parts.append({"type": "image"})
        conversation.append({"role": message.role, "content": parts})
    check_one_image(len(images))
    return conversation, images[0]


def check_one_image(count: int) -> None:
    if count == 0:
        raise BadRequest("the request holds no image; send exactly one")
    if count > 1:
        raise BadRequest(f"the request holds {count} images; this backbone takes exactly one")


def instruction_conversation(instruction: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]


def conversation_chars(conversation: list[dict[str, Any]]) -> int:
    return sum(len(p.get("text", "")) for m in conversation for p in m["content"])


def require_llava(runtime: Runtime) -> ArrivalGate:
    """The chat arrival gate; 503 when this service runs no LLaVA backbone."""
    if runtime.llava is None or runtime.chat_gate is None:
        raise Unavailable("this service runs no LLaVA backbone (start it with --llava-model)", 3600)
    return runtime.chat_gate


async def start(runtime: Runtime, call: ChatCall, place: Place) -> tuple[GenRequest, LoadedAdapter | None]:
    """Check bounds, prepare the prompt off the loop and admit the request; ``place`` (its
    place at the arrival gate) is given back once it is queued.

    The caller owns the returned adapter pin: release it when the request ends.
    """
    s = runtime.settings
    require_llava(runtime)
    engine = runtime.chat_engine
    assert engine is not None
    max_tokens = call.max_tokens if call.max_tokens is not None else min(256, s.max_new_tokens)
    if not 1 <= max_tokens <= s.max_new_tokens:
        raise Unprocessable(f"max_tokens must be between 1 and {s.max_new_tokens}")
    if not 0 <= call.temperature <= 2 or not 0 < call.top_p <= 1:
        raise Unprocessable("temperature must be in [0, 2] and top_p in (0, 1]")
    if conversation_chars(call.conversation) > s.max_prompt_chars:
        raise Unprocessable(f"the messages are over {s.max_prompt_chars} characters")
    if len(call.stop) > 4 or any(not stop or len(stop) > 64 for stop in call.stop):
        raise Unprocessable("stop: at most 4 non-empty strings of at most 64 characters")
    adapter = await runtime.acquire_adapter(call.adapter, method="m2pt")
    try:
        llava = runtime.llava
        loop = asyncio.get_running_loop()
        prompt = await loop.run_in_executor(
            runtime.decode_pool,
            lambda: llava.prepare(decode_image(call.image, max_pixels=s.max_image_pixels), call.conversation),
        )
        if prompt.length + max_tokens > llava.context_length:
            raise ContextTooLong(
                f"the prompt is {prompt.length} tokens and max_tokens {max_tokens}; the model's "
                f"context is {llava.context_length} tokens"
            )
        request = GenRequest(
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=call.temperature,
            top_p=call.top_p,
            seed=call.seed,
            stop=call.stop,
            adapter=adapter,
            deadline=loop.time() + s.chat_timeout_s,
        )
        place.release()  # queued from here on: the engine's bound counts it
        try:
            engine.submit(request)
        except QueueFull as exc:
            runtime.metrics.rejected.labels("chat", "queue_full").inc()
            raise Overloaded(f"server busy: {exc}", retry_after_s=2) from None
        except Closed:
            raise Unavailable("shutting down", retry_after_s=5) from None
    except BaseException:
        runtime.release_adapter(adapter)
        raise
    return request, adapter


async def deltas(request: GenRequest) -> AsyncIterator[Delta]:
    """The admitted request's deltas; leaving early (client gone) cancels it."""
    try:
        while True:
            event = await request.events.get()
            if isinstance(event, Expired):
                raise DeadlineExceeded(str(event))
            if isinstance(event, Closed):
                raise Unavailable("shutting down", retry_after_s=5)
            if isinstance(event, BaseException):
                raise event
            yield event
            if event.finish_reason is not None:
                return
    finally:
        request.cancelled = True


def usage_of(request: GenRequest) -> Usage:
    return Usage(request.prompt_tokens, request.completion_tokens)
