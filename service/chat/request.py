"""Chat requests, whatever API they came through: from parsed messages to a ``ChatCall``,
shared by /v1/chat and the OpenAI-compatible /v1/chat/completions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.chat.engine import GenRequest
from service.chat.sampling import SamplingExtras
from service.errors import BadRequest, InvalidImage
from service.http.images import decode_base64_image


@dataclass
class ChatCall:
    """One chat request, whatever API it came through."""

    conversation: list[dict[str, Any]]  # chat-template messages, at most one {"type": "image"} part
    image: bytes | None  # None: a text-only conversation
    adapter: str | None
    max_tokens: int | None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    extras: SamplingExtras | None = None  # OpenAI penalties and logprobs


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


def openai_conversation(messages: list[Any], max_bytes: int) -> tuple[list[dict[str, Any]], bytes | None]:
    """OpenAI messages -> chat-template conversation and the image's bytes (None: text only,
    which a LLaVA answers as its language model does)."""
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
    if len(images) > 1:
        check_one_image(len(images))
    return conversation, images[0] if images else None


def check_one_image(count: int) -> None:
    if count == 0:
        raise BadRequest("the request holds no image; send exactly one")
    if count > 1:
        raise BadRequest(f"the request holds {count} images; this backbone takes exactly one")


def instruction_conversation(instruction: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]


def conversation_chars(conversation: list[dict[str, Any]]) -> int:
    return sum(len(p.get("text", "")) for m in conversation for p in m["content"])


def usage_of(request: GenRequest) -> Usage:
    return Usage(request.prompt_tokens, request.completion_tokens)
