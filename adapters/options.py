"""Command-line options generated from a config dataclass, so each option is written once.

A field declared with ``option(...)`` becomes ``--field-name``: its type gives the
argparse type (``bool``: a flag), its default is shown once in ``--help`` (or the
``shown`` text where the real default is computed, e.g. from another option), and a
field without a default is a required option.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar, cast

T = TypeVar("T")
_NO_DEFAULT: Any = dataclasses.MISSING


def option(
    help: str,
    default: Any = _NO_DEFAULT,
    *,
    flags: Sequence[str] = (),  # extra spellings, e.g. ("-o",)
    choices: Sequence[str] | None = None,
    shown: str | None = None,  # what --help says the default is, where None stands for a computed one
    metavar: str | None = None,
) -> Any:
    meta = {"help": help, "flags": tuple(flags), "choices": choices, "shown": shown, "metavar": metavar}
    return dataclasses.field(default=default, metadata=meta)


def _scalar(annotation: Any) -> type:
    """``int | None`` -> int; a plain type as it is."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner
    return annotation


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """One option per ``option()`` field of the dataclass ``cls``, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        meta, typ = f.metadata, _scalar(hints[f.name])
        names = [*meta["flags"], "--" + f.name.replace("_", "-")]
        kwargs: dict[str, Any] = {"dest": f.name}
        if f.default is _NO_DEFAULT:
            kwargs.update(required=True, help=meta["help"])
        elif typ is bool:
            kwargs.update(action="store_true", default=f.default, help=meta["help"])
        else:
            shown = meta["shown"] if meta["shown"] is not None else _show(f.default)
            kwargs.update(
                default=f.default, help=f"{meta['help']} (default: {shown})" if shown else meta["help"]
            )
        if typ is not bool:
            kwargs.update(type=typ, choices=meta["choices"], metavar=meta["metavar"])
        parser.add_argument(*names, **kwargs)


def _show(default: Any) -> str | None:
    if default is None or default == "" or default is False:
        return None  # nothing to show: the help says what happens without it
    return str(default).replace("%", "%%")


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The dataclass filled from parsed options (every ``option()`` field)."""
    fields = dataclasses.fields(cast(Any, cls))  # T is a dataclass
    return cls(**{f.name: getattr(args, f.name) for f in fields if "help" in f.metadata})
