"""The OpenAI chat-completions request, field by field.

Every field of OpenAI's API is declared, so a misspelt one is an unknown field (422 with
the closest name) and a real one this service does not implement is refused by
``refuse_unsupported`` unless it holds OpenAI's default (which changes nothing): a
client is never answered as if a parameter had been applied when it was not.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from service.chat.sampling import SamplingExtras
from service.errors import Unprocessable
from service.http.strict import StrictModel

# Values of an unimplemented field that mean "the default", so are safe to accept.
_NOTHING: tuple[Any, ...] = (None,)


class Unsupported(StrictModel):
    """A request model whose ``UNSUPPORTED`` fields are refused unless at a default."""

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {}


class ImageURL(Unsupported):
    UNSUPPORTED = {"detail": (None, "auto")}
    url: str
    detail: Any = None


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ImagePart(StrictModel):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(Unsupported):
    UNSUPPORTED = {
        "name": _NOTHING,
        "tool_calls": (None, []),
        "tool_call_id": _NOTHING,
        "function_call": _NOTHING,
        "refusal": _NOTHING,
        "audio": _NOTHING,
    }
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart | ImagePart]
    name: Any = None
    tool_calls: Any = None
    tool_call_id: Any = None
    function_call: Any = None
    refusal: Any = None
    audio: Any = None


class StreamOptions(StrictModel):
    include_usage: bool = False


class CompletionRequest(Unsupported):
    UNSUPPORTED = {
        "logit_bias": (None, {}),
        "response_format": (None, {"type": "text"}),
        "tools": (None, []),
        "tool_choice": (None, "none"),
        "parallel_tool_calls": _NOTHING,
        "functions": (None, []),
        "function_call": (None, "none"),
        "modalities": (None, ["text"]),
        "audio": _NOTHING,
        "prediction": _NOTHING,
        "reasoning_effort": _NOTHING,
        "verbosity": _NOTHING,
        "web_search_options": _NOTHING,
        "service_tier": (None, "auto", "default"),
        "store": (None, False),
        "metadata": (None, {}),
        "user": _NOTHING,
        "safety_identifier": _NOTHING,
        "prompt_cache_key": _NOTHING,
    }
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: Any = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    service_tier: Any = None
    store: Any = None
    metadata: Any = None
    user: Any = None
    safety_identifier: Any = None
    prompt_cache_key: Any = None


def _refuse(model: Unsupported, where: str) -> None:
    for name, defaults in model.UNSUPPORTED.items():
        value = getattr(model, name)
        if not any(value == d and type(value) is type(d) for d in defaults):
            shown = "" if value is None else f" ({value!r:.60})"
            raise Unprocessable(
                f"{where}{name}{shown}: not supported by this service; leave it out"
                + ("" if defaults == _NOTHING else f" or send {defaults[-1]!r}")
            )


def refuse_unsupported(body: CompletionRequest) -> None:
    """422 for the first OpenAI parameter this service would otherwise not apply."""
    _refuse(body, "")
    for i, message in enumerate(body.messages):
        _refuse(message, f"messages.{i}.")
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if isinstance(part, ImagePart):
                    _refuse(part.image_url, f"messages.{i}.content.{j}.image_url.")


def sampling_extras(body: CompletionRequest) -> SamplingExtras | None:
    """The request's penalties and logprobs, or None when it asks for neither."""
    if body.top_logprobs is not None and not body.logprobs:
        raise Unprocessable("top_logprobs: needs logprobs: true")
    extras = SamplingExtras(
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        top_logprobs=(body.top_logprobs or 0) if body.logprobs else None,
    )
    return extras if extras.penalised or extras.top_logprobs is not None else None
