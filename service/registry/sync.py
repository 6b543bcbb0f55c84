"""``promptswap adapters sync SRC DST``: copy a store into another, keeping version numbers.

SRC and DST are each a directory or ``s3://BUCKET/PREFIX`` (credentials and endpoint from
the AWS chain). Every version of SRC is verified (object and tensor sha256) and written to
DST as the same ``name@version``; one DST already holds with the same tensors is skipped,
one it holds with other content is reported and left alone (nothing is ever overwritten),
and the exit status is then 1. Running it again copies only what is new.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from adapters.errors import AdapterError
from adapters.format import load_adapter
from service.registry.store_protocol import (
    StoreMisconfigured,
    StoreUnavailable,
    VersionStore,
    VersionTaken,
)

MAX_BYTES = 1 << 30  # a copy reads what the store holds; the service's bound applies on upload


def open_any(location: str, timeout_s: float = 30.0) -> VersionStore:
    if location.startswith("s3://"):
        from service.registry.s3_store import S3Store

        store = S3Store(location, refresh_s=0.0, timeout_s=timeout_s, cache_bytes=0)
        store.check()
        return store
    from pathlib import Path

    from service.registry.store import AdapterStore

    return AdapterStore(Path(location))


def sync(src: VersionStore, dst: VersionStore, out: Any = None) -> int:
    """Copy every version of ``src`` missing in ``dst``; 1 if any conflicts, else 0."""
    out = out or sys.stdout
    copied = same = conflicts = 0
    for name in src.names():
        held = {v.version: v for v in dst.versions(name)}
        for stored in src.versions(name):
            data = src.read(stored, MAX_BYTES)
            sha = load_adapter(data, max_bytes=MAX_BYTES).manifest.tensors_sha256
            if stored.version not in held:
                try:
                    dst.put_exact(name, stored.version, data)
                    copied += 1
                    print(f"copied {stored.key}", file=out)
                    continue
                except VersionTaken:  # claimed there (deleted, or being written): never reuse it
                    print(f"conflict {stored.key}: that number is spent in {dst.location}", file=out)
                    conflicts += 1
                    continue
            theirs = load_adapter(dst.read(held[stored.version], MAX_BYTES), max_bytes=MAX_BYTES)
            if theirs.manifest.tensors_sha256 == sha:
                same += 1
            else:
                print(f"conflict {stored.key}: {dst.location} holds other content", file=out)
                conflicts += 1
    print(f"{copied} copied, {same} already there, {conflicts} conflicts", file=out)
    return 1 if conflicts else 0


def cmd_sync(args: argparse.Namespace) -> int:
    try:
        return sync(open_any(args.src), open_any(args.dst))
    except (StoreMisconfigured, StoreUnavailable, AdapterError, OSError, ValueError) as exc:
        message = getattr(exc, "message", None) or str(exc)
        print(f"promptswap adapters sync: {message}", file=sys.stderr)
        return 1


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sync",
        help="copy an adapter store (directory or s3://BUCKET/PREFIX) into another, keeping versions",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    parser.add_argument("src", help="the store to copy: a directory or s3://BUCKET/PREFIX")
    parser.add_argument("dst", help="the store to copy into: a directory or s3://BUCKET/PREFIX")
    parser.set_defaults(func=cmd_sync)
