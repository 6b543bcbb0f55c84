"""Dependencies shared by the routers: the runtime, and each capability's service once the
models are loaded (503 while they load; 404 for a capability this replica does not run:
that is permanent, and a balancer must not resend it).

Each is ``async def`` although none awaits: FastAPI runs a plain ``def`` dependency in a
worker thread, a hop there and back per dependency per request for a few attribute reads."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.chat.service import ChatService
from service.classify.service import ClassifyService
from service.errors import NotServed, Unavailable
from service.registry.adapter_registry import AdapterRegistry
from service.runtime import Runtime, Services


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise Unavailable(
            "the service is starting", retry_after_s=request.app.state.settings.retry_after_unavailable_s
        )
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_services(runtime: RuntimeDep) -> Services:
    services = runtime.services
    if services is None:
        raise Unavailable(
            runtime.load_error or "models are loading",
            retry_after_s=runtime.settings.retry_after_unavailable_s,
        )
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_classify(services: ServicesDep, runtime: RuntimeDep) -> ClassifyService:
    if services.classify is None:
        raise NotServed(
            "this service runs no CLIP backbone, so it serves no classify; start it with --clip-model "
            "(GET /v1/models lists what it serves)"
        )
    return services.classify


async def get_chat(services: ServicesDep, runtime: RuntimeDep) -> ChatService:
    if services.chat is None:
        raise NotServed(
            "this service runs no LLaVA backbone, so it serves no chat; start it with --llava-model "
            "(GET /v1/models lists what it serves)"
        )
    return services.chat


async def get_registry(services: ServicesDep) -> AdapterRegistry:
    return services.registry


ClassifyDep = Annotated[ClassifyService, Depends(get_classify)]
ChatDep = Annotated[ChatService, Depends(get_chat)]
RegistryDep = Annotated[AdapterRegistry, Depends(get_registry)]
