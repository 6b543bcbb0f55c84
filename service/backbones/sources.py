"""Where a backbone comes from, checked once before the server listens.

A source is a local directory or a model-hub id. Checking it first turns the hub
client's minute of retries into one fast, explained failure: a mistyped path says it
does not exist; a hub id that cannot be fetched says how to serve a local directory
and how to run offline. A hub id already in the local cache is served from there when
the hub cannot be reached.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("promptswap.backbones")

PROBE_TIMEOUT_S = 10.0


class SourceError(ValueError):
    """A model source that cannot be served; the message says what to do instead.
    (No torch import here: the CLI checks sources before it loads anything.)"""


@dataclass(frozen=True)
class Source:
    load_from: str  # what from_pretrained reads: a directory, or the hub id
    served_name: str  # the name requests and answers use


def default_served_name(source: str) -> str:
    """A hub id as typed; a local directory by its own name (never the path typed, which
    changes with the working directory)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve().name
    return source


def looks_like_path(source: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else is meant as a path."""
    return (
        source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source or source.endswith("/")
    )


def _how_to(option: str) -> str:
    return (
        f"To serve a local checkpoint: {option} ./DIR (a directory written by save_pretrained). To "
        "run offline: point HF_HOME at a cache holding the model and set HF_HUB_OFFLINE=1."
    )


def resolve(source: str, option: str, served_name: str | None = None) -> Source:
    """Check ``source`` (the value of ``option``, e.g. ``--clip-model``) without loading it."""
    name = served_name or default_served_name(source)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{option} {source!r} is a file; give the checkpoint's directory")
        return Source(str(path), name)
    if looks_like_path(source):
        raise SourceError(f"{option} {source!r}: no such directory ({path.resolve()})")
    return Source(_hub(source, option), name)


def _hub(repo: str, option: str) -> str:
    """The hub id when the hub has it, or the cached snapshot directory; else a clear error."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    cached = huggingface_hub.try_to_load_from_cache(repo, "config.json")
    snapshot = os.path.dirname(cached) if isinstance(cached, str) else None
    not_local = f"(there is no local directory {repo!r} either)"
    if constants.HF_HUB_OFFLINE:
        if snapshot is None:
            raise SourceError(
                f"{option} {repo!r}: HF_HUB_OFFLINE is set and the model is not in the hub cache "
                f"({constants.HF_HUB_CACHE}) {not_local}. {_how_to(option)}"
            )
        return snapshot
    try:
        huggingface_hub.model_info(repo, timeout=PROBE_TIMEOUT_S)  # one request, no retries
    except errors.RepositoryNotFoundError:
        raise SourceError(
            f"{option} {repo!r}: the model hub ({constants.ENDPOINT}) has no such model, or it is "
            f"private or gated (set HF_TOKEN) {not_local}. {_how_to(option)}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any network failure: explain once, no retry storm
        if snapshot is not None:
            log.warning("the model hub is unreachable (%s); serving %s from the cache", exc, repo)
            return snapshot
        raise SourceError(
            f"{option} {repo!r}: cannot reach the model hub ({constants.ENDPOINT}: {exc}) and the "
            f"model is not in the hub cache ({constants.HF_HUB_CACHE}) {not_local}. {_how_to(option)}"
        ) from None
    return repo
