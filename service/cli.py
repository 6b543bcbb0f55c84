"""The ``promptswap`` command: ``serve``, ``serve-ray`` and the ``adapters`` tools.

``serve``'s options are generated from ``Settings``, so every option is also an
environment variable and ``--help`` always shows the real defaults. ``serve-ray`` takes
the same options plus Ray's; Ray is imported only when it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any

from pydantic import SecretStr

from adapters import cli as adapters_cli
from service.backbones.sources import SourceError, resolve
from service.frontend.processes import FrontedServer, Frontends
from service.ray_options import RayOptions
from service.registry import sync as store_sync
from service.settings import Settings, SettingsError, load_settings


def _option_type(annotation: Any) -> Any:
    text = str(annotation)
    if "Literal" in text:  # choices are strings, even "float32"
        return str
    if "int" in text and "str" not in text:
        return int
    if "float" in text:
        return float
    return str


def shown_default(name: str) -> str:
    """A setting's default as --help (and the README's table) show it."""
    field = Settings.model_fields[name]
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if "shown_default" in extra:
        return str(extra["shown_default"])
    default = field.get_default(call_default_factory=True)
    if isinstance(default, bool):
        return "on" if default else "off"
    return "(unset)" if default is None or isinstance(default, SecretStr) else str(default)


def add_settings_options(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per Settings field; absent options leave env/default in charge."""
    for name, field in Settings.model_fields.items():
        help_text = f"{field.description} Default: {shown_default(name)}. Env: PROMPTSWAP_{name.upper()}."
        option = "--" + name.replace("_", "-")
        if field.annotation is bool:  # a flag: present means on
            parser.add_argument(
                option, dest=name, default=argparse.SUPPRESS, action="store_const", const=True, help=help_text
            )
            continue
        choices = getattr(field.annotation, "__args__", None)
        literal = choices if "Literal" in str(field.annotation) else None
        parser.add_argument(
            option,
            dest=name,
            default=argparse.SUPPRESS,
            type=_option_type(field.annotation),
            choices=literal,
            metavar=None if literal else name.upper(),
            help=help_text,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptswap", description="Serve one frozen backbone with hot-swappable prompt adapters."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="start the HTTP service",
        description="Start the HTTP service. Every option is also an environment variable.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_settings_options(serve)
    serve_ray = commands.add_parser(
        "serve-ray",
        help="serve as replicas of a Ray Serve application (pip install 'promptswap[ray]')",
        description="Serve the same app as `serve`, as replicas of a Ray Serve application "
        "behind Serve's HTTP proxy on --host/--port. Requests naming an adapter in the "
        "serve_multiplexed_model_id header go to replicas already serving it. Runs until "
        "SIGINT/SIGTERM, then removes the application (and the Ray instance it started).",
    )
    add_settings_options(serve_ray)
    RayOptions.add_options(serve_ray.add_argument_group("Ray"))
    tools = commands.add_parser("adapters", help="create, import, inspect and validate adapters")
    tool_commands = tools.add_subparsers(dest="adapters_command", required=True)
    adapters_cli.register(tool_commands)
    store_sync.register(tool_commands)  # a service tool: it opens the service's stores
    return parser


def checked_settings(overrides: dict[str, Any]) -> Settings:
    """Settings, and each model's source checked (exists, or the hub has it) before any
    port opens: SettingsError or SourceError say what to change."""
    return resolve_sources(load_settings(overrides))


def resolve_sources(settings: Settings) -> Settings:
    """Each model's source checked: SourceError says what to change."""
    update: dict[str, Any] = {}
    for kind in ("clip", "llava"):
        source = getattr(settings, f"{kind}_model")
        if source:
            resolved = resolve(source, f"--{kind}-model", getattr(settings, f"{kind}_served_model_name"))
            update[f"{kind}_model"] = resolved.load_from
            update[f"{kind}_served_model_name"] = resolved.served_name
    return settings.model_copy(update=update)


def serve(overrides: dict[str, Any]) -> int:
    import uvicorn

    from service.main import create_app

    try:
        settings = checked_settings(overrides)
    except (SettingsError, SourceError) as exc:
        print(f"promptswap: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    server: uvicorn.Server | None = None
    fatal: list[str] = []

    def on_fatal(message: str) -> None:
        fatal.append(message)
        if server is not None:
            server.should_exit = True

    frontends = Frontends(settings) if settings.frontends else None
    try:
        app = create_app(settings, on_fatal=on_fatal, frontends=frontends)
    except ValueError as exc:  # e.g. an unreadable or empty --api-keys-file
        if frontends is not None:
            frontends.remove_socket()
        print(f"promptswap: {exc}", file=sys.stderr)
        return 2
    # One process per device: several workers would each hold a copy of the backbone.
    if frontends is None:
        config = uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level=settings.log_level, workers=1
        )
        server = uvicorn.Server(config)
        server.run()
    else:
        # The front ends log each request with its client; here every client is a front end.
        config = uvicorn.Config(
            app, uds=frontends.engine_socket, log_level=settings.log_level, workers=1, access_log=False
        )
        server = FrontedServer(config, frontends)
        try:
            server.run(sockets=[config.bind_socket()])  # bound now: front ends may connect early
        finally:
            frontends.remove_socket()
    if fatal:
        print(f"promptswap: start-up failed: {fatal[0]}", file=sys.stderr)
        return 1
    return 0


def serve_ray(args: dict[str, Any]) -> int:
    ray_options = RayOptions.pop_from(args)
    try:
        settings = load_settings(args)  # the CLI over this process's environment, as `serve`
    except SettingsError as exc:
        print(f"promptswap: {exc}", file=sys.stderr)
        return 2
    if settings.frontends:
        print(
            "promptswap: --frontends is for `serve`; under Ray Serve its HTTP proxy and replicas "
            "are the processes (scale with --num-replicas)",
            file=sys.stderr,
        )
        return 2
    try:
        options = ray_options.deployment_options(settings)
    except ValueError as exc:
        print(f"promptswap: {exc}", file=sys.stderr)
        return 2
    try:
        import ray
        from ray import serve as ray_serve

        from service.ray_serve import APP_NAME, make_app
    except ImportError as exc:
        print(
            f"promptswap: serve-ray needs Ray Serve ({exc}); install it with: pip install 'promptswap[ray]'",
            file=sys.stderr,
        )
        return 2
    try:
        settings = resolve_sources(settings)  # after the import: no Ray is the first thing to fix
    except SourceError as exc:
        print(f"promptswap: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        app = make_app(settings, max_adapters=ray_options.max_adapters_per_replica, **options)
    except (TypeError, ValueError) as exc:  # e.g. a Ray option Serve refuses
        print(f"promptswap: {exc}", file=sys.stderr)
        return 2
    address = ray_options.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    owned = address == "local"  # started here, so stopped here
    try:
        ray.init(address=address)
    except Exception as exc:  # noqa: BLE001 - unreachable cluster, bad address: say so, no traceback
        print(f"promptswap: cannot start or join Ray at {address!r}: {exc}", file=sys.stderr)
        return 1
    # After ray.init: Ray's core worker installs a crash handler for SIGTERM that aborts
    # the process; ours replaces it, so SIGTERM stops as cleanly as SIGINT.
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        ray_serve.start(http_options={"host": settings.host, "port": settings.port})
        try:
            ray_serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # the replicas could not start (e.g. models failed to load)
            print(f"promptswap: start-up failed: {exc}", file=sys.stderr)
            status = 1
        else:
            print(
                f"promptswap: serving on http://{settings.host}:{settings.port} through Ray Serve "
                f"(application {APP_NAME!r}); Ctrl-C or SIGTERM stops it",
                file=sys.stderr,
                flush=True,
            )
            while not stop.wait(0.5):
                pass
    finally:
        # Graceful: Serve stops routing and lets each replica drain (its lifespan shutdown).
        try:
            if owned:
                ray_serve.shutdown()
            else:
                ray_serve.delete(APP_NAME)  # other applications on the cluster keep running
        finally:
            ray.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return status


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    if command == "serve":
        return serve(args)
    if command == "serve-ray":
        return serve_ray(args)
    handler = args.pop("func", None)  # set by each `adapters` subcommand
    if handler is None:
        print(f"promptswap: unknown command {command}", file=sys.stderr)
        return 2
    return int(handler(argparse.Namespace(**args)) or 0)


if __name__ == "__main__":
    sys.exit(main())
