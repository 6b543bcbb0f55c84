"""The ``promptswap`` command: ``serve`` and the ``adapters`` tools.

``serve``'s options are generated from ``Settings``, so every option is also an
environment variable and ``--help`` always shows the real defaults.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from pydantic import SecretStr, ValidationError

from .settings import Settings


def _option_type(annotation: Any) -> Any:
    text = str(annotation)
    if "Literal" in text:  # choices are strings, even "float32"
        return str
    if "int" in text and "str" not in text:
        return int
    if "float" in text:
        return float
    return str


def add_settings_options(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per Settings field; absent options leave env/default in charge."""
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "(unset)" if default is None or isinstance(default, SecretStr) else default
        choices = getattr(field.annotation, "__args__", None)
        literal = choices if "Literal" in str(field.annotation) else None
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,
            type=_option_type(field.annotation),
            choices=literal,
            metavar=None if literal else name.upper(),
            help=f"{field.description} Default: {shown}. Env: PROMPTSWAP_{name.upper()}.",
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
    try:
        from adapters import cli as adapters_cli
    except ImportError:  # the adapters tools are optional for serving
        adapters_cli = None
    if adapters_cli is not None and hasattr(adapters_cli, "register"):
        tools = commands.add_parser("adapters", help="create, import, inspect and validate adapters")
        adapters_cli.register(tools.add_subparsers(dest="adapters_command", required=True))
    return parser


def serve(overrides: dict[str, Any]) -> int:
    import uvicorn

    from .main import create_app

    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"promptswap: invalid settings:\n{exc}", file=sys.stderr)
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

    try:
        app = create_app(settings, on_fatal=on_fatal)
    except ValueError as exc:  # e.g. an unreadable or empty --api-keys-file
        print(f"promptswap: {exc}", file=sys.stderr)
        return 2
    # One process per device: several workers would each hold a copy of the backbone.
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, workers=1
    )
    server = uvicorn.Server(config)
    server.run()
    if fatal:
        print(f"promptswap: start-up failed: {fatal[0]}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    if command == "serve":
        return serve(args)
    handler = args.pop("func", None)  # set by each `adapters` subcommand
    if handler is None:
        print(f"promptswap: unknown command {command}", file=sys.stderr)
        return 2
    return int(handler(argparse.Namespace(**args)) or 0)


if __name__ == "__main__":
    sys.exit(main())
