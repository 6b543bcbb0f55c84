"""Chat: ``POST /v1/chat`` (image + instruction) and the OpenAI-compatible
``POST /v1/chat/completions``, both optionally streamed as server-sent events."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from service.chat import request as chat
from service.chat.engine import GenRequest
from service.chat.openai_schema import CompletionRequest, refuse_unsupported, sampling_extras
from service.chat.service import ChatService
from service.errors import ApiError, BadRequest, UnsupportedMediaType, error_body
from service.http.bodies import validated, validated_json
from service.http.deps import ChatDep, ServicesDep
from service.http.disconnect import ClientGone, unless_disconnected
from service.http.images import decode_base64_image
from service.http.schemas import ErrorBody, inline_schema
from service.http.strict import StrictModel, check_form, field_names
from service.registry.adapter_registry import LoadedAdapter
from service.settings import Settings

router = APIRouter(tags=["chat"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 404, 409, 413, 415, 422, 429, 503, 504)
}


# ---------------------------------------------------------------- /v1/chat


class ChatJSON(StrictModel):
    image: str = Field(description="The image as base64 or a data: URL (no remote URLs).")
    instruction: str = Field(description="What to do with the image.")
    adapter: str | None = Field(None, description="M2PT adapter as 'name' or 'name@version'.")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(0.0, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False


class ChatResponse(BaseModel):
    id: str
    model: str
    adapter: str | None
    text: str
    finish_reason: str
    usage: dict[str, int]


def stops(value: str | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


async def parse_chat_body(request: Request, runtime_settings: Settings) -> chat.ChatCall:
    max_bytes = runtime_settings.max_body_bytes
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        try:
            # a part may hold the whole instruction: bound it by the prompt bound, not less
            part_bytes = max(64 * 1024, 4 * runtime_settings.max_prompt_chars)
            form = await request.form(max_files=2, max_fields=16, max_part_size=part_bytes)
        except HTTPException as exc:
            raise BadRequest(f"malformed multipart body: {exc.detail}") from None
        check_form(form, field_names(ChatJSON))
        files = [v for v in form.getlist("image") if isinstance(v, UploadFile)]
        chat.check_one_image(len(files))
        image = await files[0].read()
        fields: dict[str, Any] = {"image": "", "stop": form.getlist("stop") or None}
        for name in ("instruction", "adapter", "max_tokens", "temperature", "top_p", "seed", "stream"):
            value = form.get(name)
            if isinstance(value, str) and value != "":
                fields[name] = value
        body = validated(ChatJSON, fields)
    elif content_type.startswith("application/json"):
        body = validated_json(ChatJSON, await request.body())
        if not body.image:
            chat.check_one_image(0)
        image = decode_base64_image(body.image, max_bytes=max_bytes)
    else:
        raise UnsupportedMediaType("send multipart/form-data or application/json")
    call = chat.ChatCall(
        conversation=chat.instruction_conversation(body.instruction),
        image=image,
        adapter=body.adapter,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=stops(body.stop),
    )
    call.stream = body.stream
    return call


@router.post(
    "/v1/chat",
    response_model=ChatResponse,
    responses=ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": inline_schema(ChatJSON)},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image", "instruction"],
                        "properties": {
                            "image": {"type": "string", "format": "binary"},
                            "instruction": {"type": "string"},
                            "adapter": {"type": "string"},
                            "max_tokens": {"type": "integer", "minimum": 1},
                            "temperature": {"type": "number"},
                            "top_p": {"type": "number"},
                            "seed": {"type": "integer"},
                            "stop": {"type": "array", "items": {"type": "string"}},
                            "stream": {"type": "boolean"},
                        },
                    }
                },
            },
        }
    },
)
async def chat_route(request: Request, service: ChatDep, services: ServicesDep) -> Any:
    """Answer an instruction about one image, with an optional M2PT adapter."""
    with service.lane.admit() as place:  # before the body is read
        call = await parse_chat_body(request, service.settings)
        services.refuse_backbone_name(call.adapter, "m2pt")
        generation, adapter = await service.start(call, place)
    model = service.model_id
    rid = f"chat-{uuid.uuid4().hex[:24]}"
    key = adapter.key if adapter else None

    def event(delta_text: str, finish: str | None) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": rid,
            "model": model,
            "adapter": key,
            "text": delta_text,
            "finish_reason": finish,
        }
        if finish is not None:
            payload["usage"] = chat.usage_of(generation).as_dict()
        return payload

    if call.stream:
        return sse(service, generation, adapter, lambda d: [event(d.text, d.finish_reason)])
    collected = await collect(request, service, generation, adapter)
    if collected is None:
        return Response(status_code=499)  # the client left; nobody reads this
    text, finish = collected
    return ChatResponse(
        id=rid,
        model=model,
        adapter=key,
        text=text,
        finish_reason=finish,
        usage=chat.usage_of(generation).as_dict(),
    )


async def collect(
    request: Request, service: ChatService, generation: GenRequest, adapter: LoadedAdapter | None
) -> tuple[str, str] | None:
    """The whole answer, or None when the client left (its generation is stopped)."""

    async def run() -> tuple[str, str]:
        parts: list[str] = []
        finish = "stop"
        async for delta in service.deltas(generation):
            parts.append(delta.text)
            finish = delta.finish_reason or finish
        return "".join(parts), finish

    try:
        return await unless_disconnected(request, run())
    except ClientGone:
        generation.cancelled = True
        service.lane.client_gone()
        return None
    finally:
        service.release(adapter)


def sse(
    service: ChatService,
    generation: GenRequest,
    adapter: LoadedAdapter | None,
    render: Callable[[Any], list[dict[str, Any]]],
) -> StreamingResponse:
    async def events() -> AsyncIterator[bytes]:
        try:
            async for delta in service.deltas(generation):
                for payload in render(delta):
                    yield f"data: {json.dumps(payload)}\n\n".encode()
            yield b"data: [DONE]\n\n"
        except ApiError as exc:  # the stream has started: the error travels as an event
            yield f"data: {json.dumps(error_body(exc.code, exc.message))}\n\n".encode()
        finally:
            generation.cancelled = True  # the client left or the stream ended
            service.release(adapter)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# ---------------------------------------------------------------- OpenAI-compatible


@router.post(
    "/v1/chat/completions",
    responses=ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline_schema(CompletionRequest)}},
        }
    },
)
async def chat_completions(request: Request, service: ChatDep, services: ServicesDep) -> Any:
    """OpenAI's chat completions: messages with text and data: URL image parts."""
    if not request.headers.get("content-type", "").lower().startswith("application/json"):
        raise UnsupportedMediaType("send application/json")
    with service.lane.admit() as place:  # before the body is read
        body = validated_json(CompletionRequest, await request.body())
        refuse_unsupported(body)
        conversation, image = chat.openai_conversation(body.messages, service.settings.max_body_bytes)
        call = chat.ChatCall(
            conversation=conversation,
            image=image,
            adapter=service.adapter_of_model(body.model),
            max_tokens=body.max_completion_tokens or body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=stops(body.stop),
            extras=sampling_extras(body),
        )
        services.refuse_backbone_name(call.adapter, "m2pt")
        generation, adapter = await service.start(call, place)
    rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    wants_logprobs = bool(body.logprobs)
    created = int(time.time())
    model = body.model

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        first = [True]

        def chunks(delta: Any) -> list[dict[str, Any]]:
            out = []
            piece: dict[str, Any] = {"content": delta.text}
            if first[0]:
                piece["role"] = "assistant"
                first[0] = False
            out.append(
                {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "delta": piece,
                            "finish_reason": delta.finish_reason,
                            "logprobs": {"content": delta.logprobs} if wants_logprobs else None,
                        }
                    ],
                }
            )
            if delta.finish_reason is not None and include_usage:
                out.append(
                    {
                        "id": rid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": chat.usage_of(generation).as_dict(),
                    }
                )
            return out

        return sse(service, generation, adapter, chunks)

    collected = await collect(request, service, generation, adapter)
    if collected is None:
        return Response(status_code=499)
    text, finish = collected
    return JSONResponse(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                    "logprobs": {"content": generation.logprobs} if wants_logprobs else None,
                }
            ],
            "usage": chat.usage_of(generation).as_dict(),
        }
    )
