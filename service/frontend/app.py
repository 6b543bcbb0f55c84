"""A front-end process's ASGI app (``--frontends N``): classify's host work, off the
model's process.

For ``POST /v1/classify`` it reads and bounds the body, parses it (the same parser and
bounds as one process), decodes and preprocesses each image in its own threads (the
same exact recipe), and sends the model's process the finished rows; everything else
goes through as it came. Whatever it finds wrong travels in the rows, so the model's
process answers it in the order and with the body it would have answered it in one
process, and counts it in its metrics.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send
from transformers import AutoConfig, AutoProcessor

from service.access import load_api_keys
from service.backbones.clip_pixels import ExactClipPixels, resize_target, standard_pixels
from service.classify.request import parse_classify
from service.errors import ApiError, Overloaded, error_body
from service.frontend import rows
from service.frontend.engine_client import EngineClient
from service.http.disconnect import ClientGone, unless_disconnected
from service.http.images import decode_image
from service.http.middleware import ApiKeyMiddleware, BodyTooLarge
from service.settings import Settings


class ClipImages:
    """Decoded image -> the model's pixels, from the checkpoint's processor alone."""

    def __init__(self, source: str) -> None:
        self.image_processor: Any = AutoProcessor.from_pretrained(source).image_processor
        self.exact = ExactClipPixels.for_processor(self.image_processor)
        vision: Any = AutoConfig.from_pretrained(source).vision_config
        self.draft_min_side = resize_target(self.image_processor, vision.image_size)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """The direct recipe's crop, uint8, which the model's process normalises (a quarter of
        the bytes to send); else the processor's finished float32 pixels."""
        if self.exact is not None and self.exact.accepts(image):
            return torch.from_numpy(self.exact.crop(image))
        return standard_pixels(image, None, self.image_processor)


class FrontendApp:
    def __init__(self, settings: Settings, engine_socket: str) -> None:
        s = self.settings = settings
        self.engine = EngineClient(engine_socket, s.retry_after_unavailable_s)
        # Only to skip the work of a request the model's process will refuse with 401.
        self.keys = (
            ApiKeyMiddleware(self._unused, load_api_keys(s.api_keys_file), s.admin_token)
            if s.api_keys_file
            else None
        )
        self.pool = ThreadPoolExecutor(s.decode_threads, thread_name_prefix="decode")
        self.images: ClipImages | None = None
        self.in_flight = 0  # classify requests being read or decoded here

    @staticmethod
    async def _unused(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("the key check alone is used")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # no route takes websockets
            await send({"type": "websocket.close", "code": 1000})
            return
        request = Request(scope, receive)
        try:
            if scope["path"] == "/v1/classify" and scope["method"] == "POST":
                response = await self.classify(request)
            else:
                response = await self.engine.pass_through(request)
        except ApiError as exc:  # the model's process is unreachable
            response = JSONResponse(error_body(exc.code, exc.message), exc.status, headers=exc.headers)
        except ClientDisconnect:  # left while its body was being passed on: no one to answer
            return
        await response(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                assert self.settings.clip_model, "front ends serve classify: Settings checks a CLIP model"
                source = self.settings.clip_model
                self.images = await asyncio.to_thread(ClipImages, source)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.engine.aclose()
                self.pool.shutdown(wait=False, cancel_futures=True)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def classify(self, request: Request) -> Response:
        started = time.perf_counter()
        body, cut_short = await self._rows(request)
        try:
            response = await unless_disconnected(request, self.engine.rows(request, body, rows.ROWS_TYPE))
        except ClientGone:  # the model's process sees its connection close and drops the rows
            return Response(status_code=499)
        took_ms = (time.perf_counter() - started) * 1000
        response.raw_headers.append((b"server-timing", f"frontend;dur={took_ms:.1f}".encode()))
        if cut_short:  # the rest of the body was not read: this connection cannot be reused
            response.raw_headers.append((b"connection", b"close"))
        return response

    async def _rows(self, request: Request) -> tuple[bytes, bool]:
        """The rows body for ``request`` and whether its body was left partly unread."""
        s = self.settings
        if self.keys is not None and self.keys.access_of(request.scope) is None:
            return b"", True  # the model's process answers 401 from the headers alone
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > s.max_body_bytes:
            return rows.encode_error(BodyTooLarge(f"request body is over {s.max_body_bytes} bytes")), True
        if self.in_flight >= s.max_queue:
            busy = Overloaded(
                f"server busy: {self.in_flight} requests being read here", retry_after_s=s.retry_after_busy_s
            )
            return rows.encode_error(busy), True
        self.in_flight += 1
        try:
            call = await parse_classify(Request(request.scope, self._bounded(request.receive)), s)
            images = call.images if call.images is not None else [call.image]
            decoded = await asyncio.gather(*(self._pixels(image) for image in images))
            return rows.encode_call(call, list(decoded), many=call.images is not None), False
        except BodyTooLarge as exc:
            return rows.encode_error(exc), True
        except ApiError as exc:
            return rows.encode_error(exc), False
        finally:
            self.in_flight -= 1

    def _bounded(self, receive: Receive) -> Receive:
        limit, seen = self.settings.max_body_bytes, 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(f"request body is over {limit} bytes")
            return message

        return bounded

    async def _pixels(self, image: bytes | torch.Tensor | ApiError) -> torch.Tensor | ApiError:
        if not isinstance(image, bytes):
            return image  # a row that failed already (its base64)
        images, s = self.images, self.settings
        assert images is not None, "set at start-up"
        draft = images.draft_min_side if s.jpeg_draft else None

        def work() -> torch.Tensor:
            return images(decode_image(image, max_pixels=s.max_image_pixels, draft_min_side=draft))

        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, work)
        except ApiError as exc:
            return exc
