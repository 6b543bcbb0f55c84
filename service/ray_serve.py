"""The service as a Ray Serve application: each replica runs ``create_app(settings)``.

``build_app(args)`` is the application builder of a Serve config file
(``import_path: service.ray_serve:build_app``); ``make_app`` is what it and
``promptswap serve-ray`` build with.

Per replica (Ray Serve 2.60):

- The FastAPI app is built late, in the replica, by ``__serve_build_asgi_app__``;
  Serve then runs its lifespan (uvicorn's ``LifespanOn``), so the models load in the
  replica exactly as under ``promptswap serve``.
- The lifespan is extended to wait until the models are loaded (or raise if they
  failed). Serve does not count a replica as started, nor route to it, until the
  lifespan start-up has finished and a first ``check_health`` passed; a load failure
  therefore fails the replica's start-up and Serve retries it.
- ``X-Promptswap-Replica`` carries the Serve replica id (``<deployment>:<unique id>``).
- The multiplexed model id (the ``serve_multiplexed_model_id`` request header) names
  an adapter. The replica reports each id it serves to Serve's multiplexing, so the
  router sends an adapter's requests to the replicas that already serve it. That
  report is a marker only: the adapter itself is resolved per request by the
  AdapterRegistry against the shared store, as in a single process.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import AdapterNotFound
from service.main import create_app
from service.registry.adapter_registry import parse_ref
from service.settings import Settings

APP_NAME = "promptswap"  # the application name `serve-ray` runs under
DEPLOYMENT_NAME = "promptswap"

# Keys of ``args`` passed to ``serve.deployment(...).options``; anything else must be a
# Settings field.
DEPLOYMENT_KEYS = frozenset(
    {
        "num_replicas",
        "autoscaling_config",
        "ray_actor_options",
        "max_ongoing_requests",
        "max_queued_requests",
        "health_check_period_s",
        "health_check_timeout_s",
        "graceful_shutdown_timeout_s",
    }
)
# Our own key: how many adapter ids one replica advertises to the router.
MAX_ADAPTERS_KEY = "max_adapters_per_replica"
MAX_ADVERTISED_ADAPTERS = 64


def default_max_adapters(settings: Settings) -> int:
    """Adapters a replica advertises: as many of the largest allowed adapter as its
    device cache holds at once, so an advertised adapter is (nearly always) still loaded
    when its next request arrives. At least 1; at most 64 (the id list travels to every
    router)."""
    fits = settings.adapter_cache_bytes // settings.max_adapter_bytes
    return max(1, min(MAX_ADVERTISED_ADAPTERS, fits))


def default_max_ongoing(settings: Settings) -> int:
    # Serve's default (5) would cap a replica's batches at 5 rows: let one batch run while
    # the next fills, within the replica's own queue bound (its 429s stay meaningful).
    return max(1, min(settings.max_queue, 2 * settings.max_batch_size))


def replica_name(deployment: str, unique_id: str) -> str:
    """The X-Promptswap-Replica value: allowed characters only, the unique id kept whole."""
    prefix = re.sub(r"[^A-Za-z0-9._-]", "-", deployment)[:64]
    return f"{prefix}:{unique_id}"


def configure_logging(level: str) -> None:
    """Serve sets up only its own logger in a replica: give the service's loggers the
    configured level and, without any handler around, the replica's stderr (the worker's
    log file, shown on the driver's console too)."""
    log = logging.getLogger("promptswap")
    log.setLevel(level.upper())
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)


class AdvertiseAdapter:
    """ASGI middleware: reports the request's multiplexed model id (an adapter ref) to
    Serve's multiplexing before the request runs, so that requests for it arriving
    meanwhile already prefer this replica."""

    def __init__(self, app: ASGIApp, advertise: Callable[[str], Awaitable[Any]]) -> None:
        self.app = app
        self.advertise = advertise

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            model_id = serve.get_multiplexed_model_id()
            if model_id and _is_adapter_ref(model_id):
                await self.advertise(model_id)
        await self.app(scope, receive, send)


def _is_adapter_ref(model_id: str) -> bool:
    # A malformed id would only crowd real adapters out of the advertised list.
    try:
        parse_ref(model_id)
    except AdapterNotFound:
        return False
    return True


class PromptswapReplica:
    """One Serve replica: the FastAPI app of ``create_app`` with its own Runtime."""

    def __init__(self, settings: Settings | dict[str, Any], max_adapters: int | None = None) -> None:
        context = serve.get_replica_context()
        self.replica_id = replica_name(context.deployment, context.replica_tag)
        # A dict (config file) is resolved here, so PROMPTSWAP_* variables of the replica's
        # environment (e.g. the admin token) fill what the config leaves out.
        if isinstance(settings, Settings):
            self.settings = settings.model_copy(update={"replica_id": self.replica_id})
        else:
            self.settings = Settings(**{**settings, "replica_id": self.replica_id})
        configure_logging(self.settings.log_level)
        self.fastapi: FastAPI | None = None  # (`app` belongs to Serve's ASGI wrapper)

        async def advertise(model_id: str) -> str:
            return model_id  # a marker: the registry loads adapters when requests use them

        # Wrapped per instance, so the limit can follow this replica's settings.
        self.advertise = serve.multiplexed(
            max_num_models_per_replica=max_adapters or default_max_adapters(self.settings)
        )(advertise)

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self.settings)
        started = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan_until_ready(app_: FastAPI) -> AsyncIterator[Any]:
            async with started(app_) as state:
                # Serve finishes the replica's start-up when this start-up ends: wait for
                # the models, so no request is routed here before they are loaded.
                await app_.state.runtime.wait_ready()
                yield state

        app.router.lifespan_context = lifespan_until_ready
        app.add_middleware(AdvertiseAdapter, advertise=self.advertise)
        self.fastapi = app
        return app

    async def check_health(self) -> None:
        runtime = getattr(self.fastapi.state, "runtime", None) if self.fastapi else None
        if runtime is None or not runtime.ready:
            raise RuntimeError("promptswap replica has no loaded models")


PromptswapDeployment = serve.deployment(name=DEPLOYMENT_NAME, max_constructor_retry_count=3)(
    serve.ingress()(PromptswapReplica)
)


def build_app(args: Settings | dict[str, Any]) -> Application:
    """The Serve application builder (``import_path: service.ray_serve:build_app``).

    ``args``: a ``Settings``, used as is by every replica; or a dict (a config file's
    ``args:``) of Settings fields plus optional keys: those of ``DEPLOYMENT_KEYS``
    (Serve deployment options; a config's ``deployments:`` section overrides them) and
    ``max_adapters_per_replica``. Each replica builds its Settings from the dict's
    fields, so its own ``PROMPTSWAP_*`` environment fills the rest (keep the admin
    token there, not in the config). Unknown keys are refused. ``host``/``port`` do
    not apply: Serve's HTTP proxy listens where ``http_options`` say.
    """
    if isinstance(args, Settings):
        return make_app(args)
    if not isinstance(args, dict):
        raise TypeError(f"build_app takes Settings or a dict, not {type(args).__name__}")
    fields = dict(args)
    options = {key: fields.pop(key) for key in DEPLOYMENT_KEYS & set(fields)}
    max_adapters = fields.pop(MAX_ADAPTERS_KEY, None)
    unknown = set(fields) - set(Settings.model_fields)
    if unknown:  # Settings ignores unknown fields: a typo would pass silently
        raise ValueError(
            f"unknown promptswap args: {', '.join(sorted(unknown))} (expected Settings "
            f"fields, {', '.join(sorted(DEPLOYMENT_KEYS))} or {MAX_ADAPTERS_KEY})"
        )
    try:
        settings = Settings(**fields)  # fail here, once, rather than in every replica
    except ValidationError as exc:
        raise ValueError(f"invalid promptswap settings:\n{exc}") from None
    fields.pop("replica_id", None)  # each replica names itself
    return make_app(settings, shipped=fields, max_adapters=max_adapters, **options)


def make_app(
    settings: Settings,
    *,
    shipped: dict[str, Any] | None = None,
    max_adapters: int | None = None,
    **options: Any,
) -> Application:
    """The application: one deployment of ``PromptswapReplica``.

    Replicas get ``settings``, or ``shipped`` (Settings fields each replica resolves
    itself) when given. ``options`` are ``serve.deployment`` options; unset ones get
    defaults that follow ``settings`` (``max_ongoing_requests``).
    """
    if max_adapters is not None and (not isinstance(max_adapters, int) or max_adapters < 1):
        raise ValueError(f"{MAX_ADAPTERS_KEY} must be a positive integer")
    options.setdefault("max_ongoing_requests", default_max_ongoing(settings))
    replica_settings = settings if shipped is None else shipped
    return PromptswapDeployment.options(**options).bind(replica_settings, max_adapters)
