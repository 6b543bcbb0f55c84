"""The adapter file: one ``.safetensors`` file, folded tensors plus a JSON manifest.

The container (``adapters.container``) holds the tensors; its header's
``__metadata__["promptswap"]`` holds the manifest (JSON): name, version, method, the
backbone fingerprint the adapter was made for, scalar hyperparameters, description,
``tensors_sha256`` and ``created_at``. Which tensors a file holds and their shapes
follow from its method (``adapters.methods``); they are stored F32 (F16/BF16 accepted
on read, widened to fp32). This module knows no method by name.

Files come from users, so the reader trusts nothing: every failure is one of the typed
errors in ``adapters.errors``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from adapters.container import (
    decode,
    entries_sha256,
    read_header,
    strict_json,
    tensor_entries,
    tensors_sha256,
)
from adapters.errors import (
    AdapterChecksumError,
    AdapterFormatError,
    AdapterMismatch,
    AdapterNameError,
    AdapterTooLarge,
    AdapterValueError,
)
from adapters.method import Method, is_int
from adapters.methods import Folded, method_named, method_of
from adapters.weights import OPTIONAL_FIELDS, check_digest, check_weights

FORMAT_VERSION = 1
METADATA_KEY = "promptswap"
MAX_DESCRIPTION_CHARS = 4096
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")

_MANIFEST_FIELDS = {
    "format_version", "name", "version", "method", "backbone", "hyperparameters",
    "description", "tensors_sha256", "created_at",
}  # fmt: skip


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise AdapterNameError(
            f"adapter name {name!r} is invalid: use 1-64 characters of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class Manifest:
    name: str
    method: str
    backbone: dict[str, Any]
    hyperparameters: dict[str, Any]
    tensors_sha256: str
    created_at: str
    version: int | None = None
    description: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(
            {k: getattr(self, k) for k in sorted(_MANIFEST_FIELDS)}, sort_keys=True, allow_nan=False
        )


@dataclass(frozen=True, eq=False)
class Adapter:
    manifest: Manifest
    folded: Folded
    tensor_dtypes: dict[str, str] = field(default_factory=dict)  # as stored in the file

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def method(self) -> Method[Any]:
        return method_named(self.manifest.method)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The folded tensors by file name, in the method's order."""
        return self.method.to_tensors(self.folded)


# ---------------------------------------------------------------- writing


def encode_adapter(adapter: Adapter) -> bytes:
    """Write an adapter; the checksum is recomputed, so manifest edits (e.g. version) are safe."""
    spec = method_named(adapter.manifest.method)
    tensors = {
        k: v.detach().cpu().to(torch.float32).contiguous() for k, v in spec.to_tensors(adapter.folded).items()
    }
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise AdapterValueError(f"tensor '{name}' holds NaN or infinite values")
    manifest = replace(adapter.manifest, tensors_sha256=tensors_sha256(tensors))
    _check_manifest_values(manifest)
    _check_shapes(manifest, {k: list(v.shape) for k, v in tensors.items()})
    return st_save(tensors, metadata={METADATA_KEY: manifest.to_json()})


def dump(
    folded: Folded, *, name: str, backbone: Mapping[str, Any], version: int | None = None,
    description: str = "", hyperparameters: Mapping[str, Any] | None = None, created_at: str | None = None,
) -> bytes:  # fmt: skip
    """Serialize a folded adapter of any method with its manifest; the shape hyperparameters
    (MaPLe's ``n_ctx``/``depth``, M2PT's prompt counts and depths) are filled in."""
    spec = method_of(folded)
    manifest = Manifest(
        name=check_name(name),
        method=spec.name,
        backbone=dict(backbone),
        hyperparameters={**(hyperparameters or {}), **spec.shape(folded)},
        tensors_sha256="",
        created_at=created_at or datetime.now(UTC).isoformat(timespec="seconds"),
        version=version,
        description=description,
    )
    return encode_adapter(Adapter(manifest, folded))


# ---------------------------------------------------------------- reading


def read_adapter_file(path: str | Path, *, max_bytes: int) -> Adapter:
    """Read and fully validate an adapter file, checking its size before reading it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise AdapterTooLarge(f"adapter file is {size} bytes, the limit is {max_bytes}")
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)  # bounded even if the file grew meanwhile
    except OSError as e:
        raise AdapterFormatError(f"cannot read adapter file {str(path)!r}: {e.strerror or e}") from e
    return load_adapter(data, max_bytes=max_bytes)


def load_adapter(data: bytes, *, max_bytes: int) -> Adapter:
    """Parse and validate adapter bytes. Raises only ``adapters.errors`` types."""
    if len(data) > max_bytes:
        raise AdapterTooLarge(f"adapter file is {len(data)} bytes, the limit is {max_bytes}")
    header, data_start = read_header(data)
    metadata = header.pop("__metadata__", None)
    manifest = _parse_manifest(metadata)
    spec = method_named(manifest.method)
    expected = spec.tensors
    if sorted(header) != sorted(expected):
        raise AdapterFormatError(f"adapter tensors must be exactly {list(expected)}, got {sorted(header)}")
    entries = tensor_entries(header, expected, len(data) - data_start)
    _check_shapes(manifest, {n: e.shape for n, e in entries.items()})

    view = memoryview(data)[data_start:]
    if entries_sha256(entries, view) != manifest.tensors_sha256:
        raise AdapterChecksumError(
            f"adapter '{manifest.name}' is corrupted: its tensor bytes do not match the manifest's sha256"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in entries.items():
        t = decode(entry, view)
        if not torch.isfinite(t).all():
            raise AdapterValueError(
                f"tensor '{name}' of adapter '{manifest.name}' holds NaN or infinite values"
            )
        tensors[name] = t
    return Adapter(manifest, spec.from_tensors(tensors), {n: e.dtype for n, e in entries.items()})


def _parse_manifest(metadata: object) -> Manifest:
    if not isinstance(metadata, dict) or not isinstance(metadata.get(METADATA_KEY), str):
        raise AdapterFormatError(f"not a promptswap adapter: header has no '{METADATA_KEY}' manifest")
    try:
        raw = strict_json(metadata[METADATA_KEY])
    except (ValueError, RecursionError) as e:
        raise AdapterFormatError(f"adapter manifest is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise AdapterFormatError("adapter manifest is not a JSON object")
    if type(raw.get("format_version")) is not int or raw["format_version"] != FORMAT_VERSION:
        raise AdapterFormatError(
            f"unsupported adapter format_version {raw.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    unknown, missing = set(raw) - _MANIFEST_FIELDS, _MANIFEST_FIELDS - set(raw)
    if unknown or missing:
        raise AdapterFormatError(
            f"adapter manifest fields: missing {sorted(missing)}, unknown {sorted(unknown)}"
        )
    manifest = Manifest(**raw)
    _check_manifest_values(manifest)
    return manifest


def _check_manifest_values(m: Manifest) -> None:
    check_name(m.name)
    spec = method_named(m.method)
    if m.version is not None and (not is_int(m.version) or m.version < 1):
        raise AdapterValueError(f"manifest version must be null or an integer >= 1, got {m.version!r}")
    if not isinstance(m.description, str) or len(m.description) > MAX_DESCRIPTION_CHARS:
        raise AdapterValueError(
            f"manifest description must be a string of at most {MAX_DESCRIPTION_CHARS} chars"
        )
    if not isinstance(m.created_at, str) or len(m.created_at) > 64:
        raise AdapterValueError("manifest created_at must be a short ISO 8601 string")
    if not isinstance(m.tensors_sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", m.tensors_sha256):
        raise AdapterFormatError("manifest tensors_sha256 must be 64 lowercase hex digits")
    if not isinstance(m.backbone, dict) or not isinstance(m.backbone.get("arch"), str):
        raise AdapterFormatError("manifest backbone must be an object with a string 'arch'")
    arch = m.backbone["arch"]
    if arch != spec.arch:
        raise AdapterMismatch(
            f"a {m.method} adapter needs a {spec.arch} backbone: arch expected {spec.arch!r}, got {arch!r}",
            field="arch", expected=spec.arch, got=arch,
        )  # fmt: skip
    fields = spec.fingerprint_fields
    if not set(fields) <= set(m.backbone) <= set(fields) | set(OPTIONAL_FIELDS):
        raise AdapterFormatError(
            f"manifest backbone must have exactly the keys {sorted(fields)}, "
            f"optionally {' and '.join(OPTIONAL_FIELDS)}"
        )
    for key in OPTIONAL_FIELDS:
        if key in m.backbone:
            check_digest(m.backbone[key], key)
    for key, typ in fields.items():
        value = m.backbone[key]
        ok = is_int(value) and value >= 1 if typ is int else isinstance(value, typ)
        if not ok:
            raise AdapterFormatError(
                f"manifest backbone.{key} must be a {'positive integer' if typ is int else 'string'}, got {value!r}"
            )
    hp = m.hyperparameters
    if not isinstance(hp, dict) or not all(
        isinstance(v, (str, int, float, bool)) or v is None for v in hp.values()
    ):
        raise AdapterFormatError("manifest hyperparameters must be an object of scalars")
    if any(isinstance(v, float) and not math.isfinite(v) for v in hp.values()):
        raise AdapterValueError("manifest hyperparameters must be finite numbers")
    spec.check_hyperparameters(hp, m.backbone)


def _check_shapes(m: Manifest, shapes: Mapping[str, list[int]]) -> None:
    for name, want in method_named(m.method).expected_shapes(m.hyperparameters, m.backbone).items():
        if list(shapes[name]) != want:
            raise AdapterValueError(
                f"tensor '{name}' has shape {list(shapes[name])}, the manifest implies {want}"
            )


# ---------------------------------------------------------------- backbone check


def validate_for_backbone(adapter: Adapter, fingerprint: Mapping[str, Any]) -> None:
    """Raise AdapterMismatch unless the adapter fits this backbone, naming the first field that differs."""
    made_for = adapter.manifest.backbone
    for key in sorted((set(fingerprint) | set(made_for)) - set(OPTIONAL_FIELDS)):
        expected, got = fingerprint.get(key), made_for.get(key)
        if expected != got:
            raise AdapterMismatch(
                f"adapter '{adapter.name}' was made for another backbone: {key} expected {expected!r}, got {got!r}",
                field=key, expected=expected, got=got,
            )  # fmt: skip
    check_weights(adapter.name, made_for, fingerprint)  # after the shapes: they say more
    adapter.method.check_fit(adapter.name, adapter.folded, fingerprint)
