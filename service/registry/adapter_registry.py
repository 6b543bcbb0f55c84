"""The adapter registry: the store on disk plus the device cache.

An adapter is named ``name``, ``name@version`` or ``name@alias``: ``name@latest`` is the
highest version, an alias points at a version (see the store), and the plain ``name`` means
its ``default`` alias when it has one, else ``latest``. A request
*acquires* a loaded version and releases it when answered: acquired versions are
pinned (never evicted mid-request), and a request keeps the version it acquired even
when a newer one is uploaded meanwhile (hot swap). The device cache holds loaded
versions under a byte budget with LRU eviction. A cold version is loaded once however
many requests ask for it at the same moment (single flight). Versions are read from
the store (a shared directory or a bucket), so uploads made by other replicas are seen
too, within the store's ``refresh_s``.

Over 400 lines because resolution, single-flight loading, pinning and the device budget
share one lock and one set of invariants; split, each part would need the others' internals.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import torch

from adapters.container import tensors_sha256
from adapters.errors import AdapterError, AdapterMismatch
from adapters.format import (
    Adapter,
    Manifest,
    check_name,
    encode_adapter,
    load_adapter,
    validate_for_backbone,
)
from adapters.weights import WEIGHTS, WEIGHTS_FORCED, fingerprint_kind
from service.access import caller_may_see
from service.errors import AdapterCorrupted, AdapterNotFound, DeviceFull, NoBackboneFor, WrongMethod
from service.metrics import Metrics
from service.registry.placement import Placement
from service.registry.store import ALIAS_RE, DEFAULT, LATEST
from service.registry.store_protocol import StoredVersion, VersionGone, VersionStore

log = logging.getLogger("promptswap.registry")

MANIFEST_CACHE_ENTRIES = 100_000  # parsed manifests kept by stored file (a few hundred bytes each)


@dataclass(eq=False)
class LoadedAdapter:
    """One adapter version on the device, in folded form."""

    name: str
    version: int
    manifest: Manifest
    folded: Any  # the method's folded tensors on the device (FoldedMaple, FoldedM2pt)
    nbytes: int
    file_id: Hashable  # the stored content it came from (see StoredVersion)
    extras: dict[str, Any] = field(default_factory=dict)  # precomputed per adapter (KV prefix)
    pins: int = 0  # requests holding it: never evicted while > 0

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def uid(self) -> str:
        """Key plus content: what caches derived from this adapter are keyed by."""
        return f"{self.key}#{self.manifest.tensors_sha256[:16]}"

    @property
    def method(self) -> str:
        return self.manifest.method

    @property
    def template(self) -> str | None:
        return self.manifest.hyperparameters.get("template")

    @cached_property
    def labels(self) -> list[str] | None:
        """The labels it was trained on, from its manifest; None when it stores none."""
        return manifest_labels(self.manifest)


def manifest_labels(manifest: Manifest) -> list[str] | None:
    """A manifest's ``labels``: a JSON list in a string (manifest values are scalars)."""
    raw = manifest.hyperparameters.get("labels")
    try:
        labels = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        return None
    if isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels):
        return labels
    return None


class _Vanished(Exception):
    """The resolved file was deleted before it could be read."""


Selector = int | str | None  # a version, an alias (or "latest"), or None: the plain name


def parse_ref(ref: str) -> tuple[str, Selector]:
    """``name``, ``name@version`` or ``name@alias`` -> (name, version or alias or None)."""
    name, sep, selector = ref.partition("@")
    try:
        check_name(name)
    except AdapterError as exc:
        raise AdapterNotFound(f"adapter {ref[:80]!r} not found ({exc})") from None
    if not sep:
        return name, None
    if selector.isdigit() and 0 < int(selector) < 10**9:
        return name, int(selector)
    if ALIAS_RE.fullmatch(selector):
        return name, selector
    raise AdapterNotFound(
        f"adapter {ref[:80]!r} not found: after '@' give a version (a positive integer) or an alias "
        "(a-z, 0-9, '_', '-', starting with a letter)"
    )


class AdapterRegistry:
    def __init__(
        self,
        store: VersionStore,
        *,
        placements: dict[str, Placement],
        cache_bytes: int,
        max_adapter_bytes: int,
        io_executor: Executor,
        metrics: Metrics,
        retry_after_s: int,  # of the 503 when the device is full and every adapter busy
        on_forget: Callable[[str], Any] | None = None,
    ) -> None:
        self.store = store
        self.placements = placements  # by method: the backbones this service runs
        self.cache_bytes = cache_bytes
        self.max_adapter_bytes = max_adapter_bytes
        self._io = io_executor
        self._metrics = metrics
        self._retry_after_s = retry_after_s  # device out of memory, every adapter busy
        self._on_forget = on_forget  # called with "name@version" when a version is deleted
        self._loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()  # LRU order
        self._flights: dict[tuple[str, Hashable], asyncio.Future[LoadedAdapter]] = {}
        # Manifests by stored file: listings read each file once, not on every GET.
        self._manifests: dict[Hashable, Manifest] = {}
        self.loads = 0  # completed loads from disk, for tests and metrics
        metrics.adapter_device_bytes.set_function(lambda: self.device_bytes)
        metrics.adapter_loaded.names = lambda: [a.name for a in list(self._loaded.values())]

    @property
    def device_bytes(self) -> int:
        return sum(a.nbytes for a in self._loaded.values())

    # ------------------------------------------------------------------ serving

    async def acquire(self, ref: str, method: str = "maple") -> LoadedAdapter:
        """Resolve ``ref``, load it if cold (once), pin it. Pair with ``release``."""
        name, version = parse_ref(ref)
        if not caller_may_see(name):  # outside the API key's scope: as if absent
            raise AdapterNotFound(f"adapter {ref!r} not found")
        adapter = await self._resolve(ref, name, version)
        if adapter.manifest.method != method:
            raise WrongMethod(
                f"adapter {adapter.key!r} is a {adapter.manifest.method} adapter; "
                f"this endpoint takes {method} adapters"
            )
        # Another load may have evicted it before this waiter resumed: (re)insert it as
        # most recently used; pinned, it stays until released.
        self._loaded[adapter.key] = adapter
        self._loaded.move_to_end(adapter.key)
        adapter.pins += 1
        self._evict_over_budget()
        self._metrics.adapter_request(adapter.name)
        return adapter

    def resolve(self, name: str, selector: Selector) -> StoredVersion | None:
        """The stored version a reference means now (blocking: call off the loop)."""
        if isinstance(selector, int):
            return self.store.get(name, selector)
        if selector == LATEST:
            return self.store.get(name)
        version = self.store.alias(name, selector or DEFAULT)
        if version is None:
            return self.store.get(name) if selector is None else None
        return self.store.get(name, version)

    async def _resolve(self, ref: str, name: str, version: Selector) -> LoadedAdapter:
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            stored = await loop.run_in_executor(self._io, self.resolve, name, version)
            if stored is None:
                raise AdapterNotFound(f"adapter {ref!r} not found")
            adapter = self._loaded.get(stored.key)
            if adapter is not None and adapter.file_id == stored.file_id:
                return adapter
            try:
                return await self._load_once(stored)  # cold, or a new file under the key
            except _Vanished:
                # Deleted between resolving and reading. "name" or an alias may mean another
                # version now: resolve again; "name@version" is gone.
                if isinstance(version, int) or attempt == 1:
                    raise AdapterNotFound(f"adapter {stored.key!r} not found (deleted)") from None
        raise AssertionError("unreachable")

    def release(self, adapter: LoadedAdapter) -> None:
        adapter.pins = max(0, adapter.pins - 1)
        self._evict_over_budget()

    async def _load_once(self, stored: StoredVersion) -> LoadedAdapter:
        ident = (stored.key, stored.file_id)
        flight = self._flights.get(ident)
        if flight is None:
            flight = asyncio.ensure_future(self._load(stored))
            self._flights[ident] = flight
            flight.add_done_callback(lambda _: self._flights.pop(ident, None))
        # shield: one waiter giving up must not cancel the load the others wait for
        return await asyncio.shield(flight)

    async def _load(self, stored: StoredVersion) -> LoadedAdapter:
        started = time.perf_counter()
        try:
            adapter = await self._place_evicting(stored)
        except VersionGone:  # deleted between resolving and reading it
            raise _Vanished(stored.key) from None
        except AdapterError as exc:
            log.error("adapter %s in the store is unusable: %s", stored.key, exc)
            raise AdapterCorrupted(f"adapter {stored.key!r} in the store is unusable: {exc}") from None
        self.loads += 1
        self._metrics.adapter_loads.inc()
        self._metrics.adapter_load_seconds.observe(time.perf_counter() - started)
        self._loaded[adapter.key] = adapter
        self._evict_over_budget(keep=adapter.key)
        return adapter

    async def _place_evicting(self, stored: StoredVersion) -> LoadedAdapter:
        """Read and place; when the device is out of memory, evict the least recently used
        idle adapter and try again, until none is left to evict: then 503."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                return await loop.run_in_executor(self._io, self._read_and_place, stored)
            except torch.OutOfMemoryError:
                self._metrics.adapter_load_oom.inc()
                victim = next((k for k, a in self._loaded.items() if a.pins == 0), None)
                if victim is None:
                    log.warning("device out of memory loading %s; nothing idle to evict", stored.key)
                    raise DeviceFull(
                        f"the device has no memory left to load adapter {stored.key!r} while "
                        "the adapters in use are busy; retry shortly",
                        retry_after_s=self._retry_after_s,
                    ) from None
                log.warning("device out of memory loading %s; evicting %s", stored.key, victim)
                self._evict(victim)

    def _placement(self, adapter: Adapter) -> Placement:
        placement = self.placements.get(adapter.manifest.method)
        if placement is None:
            raise NoBackboneFor(
                f"adapter {adapter.name!r} is a {adapter.manifest.method} adapter, and this "
                f"service runs no backbone for it (it serves: {', '.join(sorted(self.placements))})"
            )
        return placement

    def _read_and_place(self, stored: StoredVersion) -> LoadedAdapter:
        """File -> verified tensors on the device (in the I/O thread pool)."""
        data = self.store.read(stored, self.max_adapter_bytes)
        parsed = load_adapter(data, max_bytes=self.max_adapter_bytes)  # checks the sha256
        placement = self._placement(parsed)
        validate_for_backbone(parsed, placement.fingerprint)
        self._remember_manifest(stored.file_id, parsed.manifest)
        folded, nbytes, extras = placement.place(parsed.folded)
        return LoadedAdapter(
            stored.name, stored.version, parsed.manifest, folded, nbytes, stored.file_id, extras
        )

    def _evict(self, key: str) -> None:
        """Drop ``key`` from the device cache; its tensors are freed once no batch holds them."""
        if self._loaded.pop(key, None) is not None:
            self._metrics.adapter_evictions.inc()

    def _evict_over_budget(self, keep: str | None = None) -> None:
        for key in list(self._loaded):
            if self.device_bytes <= self.cache_bytes:
                return
            adapter = self._loaded[key]
            if adapter.pins > 0 or key == keep:
                continue  # in use: evicted once released
            self._evict(key)

    # ------------------------------------------------------------------ admin

    def parse_upload(self, data: bytes, name: str | None = None, force: bool = False) -> Adapter:
        """Validate uploaded bytes completely; nothing is stored here. With ``force``, an
        adapter made for other weights of the same shapes is accepted, and its manifest
        records the backbone it was forced onto (every other mismatch still refuses it)."""
        adapter = load_adapter(data, max_bytes=self.max_adapter_bytes)
        fingerprint = self._placement(adapter).fingerprint
        try:
            validate_for_backbone(adapter, fingerprint)
        except AdapterMismatch as exc:
            if not (force and exc.field == WEIGHTS):
                raise
            backbone = {**adapter.manifest.backbone, WEIGHTS_FORCED: fingerprint[WEIGHTS]}
            adapter = Adapter(replace(adapter.manifest, backbone=backbone), adapter.folded)
            validate_for_backbone(adapter, fingerprint)  # nothing else may differ
        if name is not None:
            adapter = Adapter(replace(adapter.manifest, name=check_name(name)), adapter.folded)
        return adapter

    def store_adapter(self, adapter: Adapter) -> tuple[StoredVersion, Manifest, bool]:
        """Write the next version of the adapter's name, unless a version of that name holds
        the same tensors: then nothing is written and that version is the answer. Returns
        (version, its manifest, whether it is new); blocking: call off the loop.

        Two identical uploads racing on two replicas may both be stored (harmless: the
        newer is a copy); one replica never stores a copy of what it can read."""
        # The stored form is fp32: compare the upload as it will be stored.
        sha = tensors_sha256({k: v.detach().to(torch.float32) for k, v in adapter.tensors().items()})
        for existing in reversed(self.store.versions(adapter.name)):
            manifest = self.manifest_of(existing)
            if manifest is not None and manifest.tensors_sha256 == sha:
                return existing, manifest, False
        stored = self.store.put(
            adapter.name,
            lambda version: encode_adapter(
                Adapter(replace(adapter.manifest, version=version), adapter.folded)
            ),
        )
        return stored, replace(adapter.manifest, version=stored.version, tensors_sha256=sha), True

    def _fingerprint_of(self, stored: StoredVersion) -> dict[str, Any]:
        manifest = self.manifest_of(stored)
        if manifest is None:
            return {}
        return {
            "fingerprint": fingerprint_kind(manifest.backbone),
            "forced": WEIGHTS_FORCED in manifest.backbone,
        }

    def manifest_of(self, stored: StoredVersion) -> Manifest | None:
        """The manifest of a stored version (read once per file), None if unreadable."""
        manifest = self._manifests.get(stored.file_id)
        if manifest is None:
            try:
                data = self.store.read(stored, self.max_adapter_bytes)
                manifest = load_adapter(data, max_bytes=self.max_adapter_bytes).manifest
            except (AdapterError, VersionGone):
                return None
            self._remember_manifest(stored.file_id, manifest)
        return manifest

    def forget(self, removed: list[StoredVersion]) -> None:
        """Drop deleted versions from the device cache (in-flight requests keep theirs)."""
        for stored in removed:
            self._evict(stored.key)
            self._manifests.pop(stored.file_id, None)
            if self._on_forget is not None:
                self._on_forget(stored.key)

    def _remember_manifest(self, file_id: Hashable, manifest: Manifest) -> None:
        if len(self._manifests) >= MANIFEST_CACHE_ENTRIES:  # files other replicas replaced
            self._manifests.clear()
        self._manifests[file_id] = manifest

    def describe_all(self) -> list[dict[str, Any]]:
        return [d for n in self.store.names() if (d := self.describe(n)) is not None]

    def describe(self, name: str) -> dict[str, Any] | None:
        """Versions and aliases of ``name`` and the manifest of what the plain name means
        (blocking: call off the loop)."""
        versions = self.store.versions(name)
        if not versions:
            return None
        aliases = self.store.aliases(name)
        default = aliases.get(DEFAULT, versions[-1].version)
        described: dict[str, Any] = {
            "name": name,
            "latest": versions[-1].version,
            "default": default,
            "aliases": aliases,
            "versions": [
                {
                    "version": v.version,
                    "key": v.key,
                    "size_bytes": v.size,
                    "loaded": v.key in self._loaded,
                    "aliases": [a for a, n in aliases.items() if n == v.version],
                    **self._fingerprint_of(v),
                }
                for v in versions
            ],
        }
        shown = next((v for v in versions if v.version == default), versions[-1])
        try:
            manifest = self._manifests.get(shown.file_id)
            if manifest is None:
                data = self.store.read(shown, self.max_adapter_bytes)
                manifest = load_adapter(data, max_bytes=self.max_adapter_bytes).manifest
                self._remember_manifest(shown.file_id, manifest)
        except AdapterError as exc:
            described["error"] = str(exc)
        except VersionGone:
            described["error"] = f"{shown.key} was deleted while it was listed"
        else:
            described.update(
                method=manifest.method,
                description=manifest.description,
                hyperparameters=manifest.hyperparameters,
                created_at=manifest.created_at,
            )
        return described
