"""The adapter file: one ``.safetensors`` file, folded tensors plus a JSON manifest.

Layout (safetensors): 8-byte little-endian header length N, N bytes of JSON header,
then the raw tensor bytes. The header's ``__metadata__["promptswap"]`` holds the
manifest (JSON). For ``method == "maple"`` the tensors are exactly
``text_prompts`` (depth, n_ctx, Dt) and ``vision_prompts`` (depth, n_ctx, Dv),
stored F32 (F16/BF16 accepted on read, widened to fp32). For ``method == "m2pt"``
(a ``llava`` backbone) they are exactly ``vision_prompts`` (vision_depth, n_vision, Dv),
``text_prompts`` (text_depth, n_text, Dt), ``projector_weight`` (Dt, projector_in) and
``projector_bias`` (Dt,), see ``adapters.m2pt``.

Files come from users, so the reader trusts nothing: every length is checked against
the real size and a bound before anything is parsed, and every failure is one of the
typed errors in ``adapters.errors``. Pickle is never involved.

``tensors_sha256``: sha256 over the tensors in sorted name order; per tensor it
hashes ``name``, NUL, the safetensors dtype code, NUL, the shape as decimal numbers
joined by ``,``, NUL, the data length as 8-byte little-endian, then the raw
little-endian C-order bytes exactly as stored. Length prefixes keep it unambiguous.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as st_save
from transformers import CLIPConfig

from adapters.errors import (
    AdapterChecksumError,
    AdapterFormatError,
    AdapterMismatch,
    AdapterNameError,
    AdapterTooLarge,
    AdapterValueError,
)
from adapters.m2pt import LLAVA_FINGERPRINT_FIELDS, FoldedM2pt
from adapters.maple import FoldedMaple

FORMAT_VERSION = 1
METADATA_KEY = "promptswap"
MAX_HEADER_BYTES = 64 * 1024  # a manifest plus two tensor entries is ~1 KiB
MAX_DESCRIPTION_CHARS = 4096
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")

DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_CODES = {v: k for k, v in DTYPES.items()}

CLIP_FINGERPRINT_FIELDS: dict[str, type] = {
    "arch": str,
    "text_width": int,
    "vision_width": int,
    "text_layers": int,
    "vision_layers": int,
    "projection_dim": int,
    "image_size": int,
    "patch_size": int,
    "vocab_size": int,
}

# Per backbone arch: the fingerprint fields and their types.
FINGERPRINT_FIELDS: dict[str, dict[str, type]] = {
    "clip": CLIP_FINGERPRINT_FIELDS,
    "llava": LLAVA_FINGERPRINT_FIELDS,
}

_MANIFEST_FIELDS = {
    "format_version", "name", "version", "method", "backbone", "hyperparameters",
    "description", "tensors_sha256", "created_at",
}  # fmt: skip


def clip_fingerprint(config: CLIPConfig) -> dict[str, Any]:
    """What an adapter must agree on with a CLIP backbone (not the weights themselves)."""
    t, v = config.text_config, config.vision_config
    return {
        "arch": "clip",
        "text_width": t.hidden_size,
        "vision_width": v.hidden_size,
        "text_layers": t.num_hidden_layers,
        "vision_layers": v.num_hidden_layers,
        "projection_dim": config.projection_dim,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "vocab_size": t.vocab_size,
    }


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
    folded: FoldedMaple | FoldedM2pt
    tensor_dtypes: dict[str, str] = field(default_factory=dict)  # as stored in the file

    @property
    def name(self) -> str:
        return self.manifest.name


# ---------------------------------------------------------------- writing


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """Canonical checksum of named tensors (see the module docstring)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _DTYPE_CODES:
            raise AdapterValueError(f"tensor '{name}' has unsupported dtype {t.dtype}")
        raw = t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        _hash_entry(h, name, _DTYPE_CODES[t.dtype], list(t.shape), raw)
    return h.hexdigest()


def _hash_entry(h: Any, name: str, dtype: str, shape: list[int], raw: bytes | memoryview) -> None:
    h.update(name.encode() + b"\0" + dtype.encode() + b"\0" + ",".join(map(str, shape)).encode() + b"\0")
    h.update(struct.pack("<Q", len(raw)))
    h.update(raw)


def encode_adapter(adapter: Adapter) -> bytes:
    """Write an adapter; the checksum is recomputed, so manifest edits (e.g. version) are safe."""
    spec = _method(adapter.manifest.method)
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


def dump_adapter(
    folded: FoldedMaple, *, name: str, backbone: Mapping[str, Any], version: int | None = None,
    description: str = "", hyperparameters: Mapping[str, Any] | None = None, created_at: str | None = None,
) -> bytes:  # fmt: skip
    """Serialize a folded MaPLe adapter with its manifest. ``n_ctx``/``depth`` are filled in."""
    shape = {"n_ctx": folded.n_ctx, "depth": folded.depth}
    return _dump(folded, "maple", shape, name, backbone, version, description, hyperparameters, created_at)


def dump_m2pt_adapter(
    folded: FoldedM2pt, *, name: str, backbone: Mapping[str, Any], version: int | None = None,
    description: str = "", hyperparameters: Mapping[str, Any] | None = None, created_at: str | None = None,
) -> bytes:  # fmt: skip
    """Serialize a folded M2PT adapter with its manifest; prompt counts and depths are filled in."""
    shape = {"n_vision": folded.n_vision, "vision_depth": folded.vision_depth,
             "n_text": folded.n_text, "text_depth": folded.text_depth}  # fmt: skip
    return _dump(folded, "m2pt", shape, name, backbone, version, description, hyperparameters, created_at)


def _dump(
    folded: FoldedMaple | FoldedM2pt,
    method: str,
    shape: Mapping[str, int],
    name: str,
    backbone: Mapping[str, Any],
    version: int | None,
    description: str,
    hyperparameters: Mapping[str, Any] | None,
    created_at: str | None,
) -> bytes:
    manifest = Manifest(
        name=check_name(name),
        method=method,
        backbone=dict(backbone),
        hyperparameters={**(hyperparameters or {}), **shape},
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
    header, data_start = _read_header(data)
    metadata = header.pop("__metadata__", None)
    manifest = _parse_manifest(metadata)
    spec = METHODS[manifest.method]
    expected = spec.tensors
    if sorted(header) != sorted(expected):
        raise AdapterFormatError(f"adapter tensors must be exactly {list(expected)}, got {sorted(header)}")
    entries = {name: _tensor_entry(name, header[name]) for name in expected}
    _check_layout(entries, len(data) - data_start)
    _check_shapes(manifest, {n: e[1] for n, e in entries.items()})

    view = memoryview(data)[data_start:]
    h = hashlib.sha256()
    for name in sorted(entries):
        dtype, shape, (begin, end) = entries[name]
        _hash_entry(h, name, dtype, shape, view[begin:end])
    if h.hexdigest() != manifest.tensors_sha256:
        raise AdapterChecksumError(
            f"adapter '{manifest.name}' is corrupted: its tensor bytes do not match the manifest's sha256"
        )

    tensors: dict[str, torch.Tensor] = {}
    for name, (dtype, shape, (begin, end)) in entries.items():
        t = tensor_from_bytes(view[begin:end], DTYPES[dtype]).reshape(shape).to(torch.float32)
        if not torch.isfinite(t).all():
            raise AdapterValueError(
                f"tensor '{name}' of adapter '{manifest.name}' holds NaN or infinite values"
            )
        tensors[name] = t.contiguous()
    return Adapter(manifest, spec.from_tensors(tensors), {n: e[0] for n, e in entries.items()})


def tensor_from_bytes(raw: bytes | memoryview, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D tensor owning a copy of little-endian bytes (len must be a multiple of the itemsize)."""
    # numpy holds its buffer properly; torch.frombuffer on a temporary bytearray did not (SystemError).
    flat = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy())  # (nbytes,) uint8
    return flat.view(dtype)


def _read_header(data: bytes) -> tuple[dict[str, Any], int]:
    if len(data) < 8:
        raise AdapterFormatError(f"not a safetensors adapter: only {len(data)} bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        raise AdapterFormatError(
            f"not a safetensors adapter: header length {n} exceeds the {MAX_HEADER_BYTES}-byte bound"
        )
    if 8 + n > len(data):
        raise AdapterFormatError(
            f"not a safetensors adapter: header length {n} runs past the end of the file"
        )
    try:
        header = json.loads(
            bytes(data[8 : 8 + n]).decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
            parse_float=_finite_float,
        )
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AdapterFormatError(f"not a safetensors adapter: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise AdapterFormatError("not a safetensors adapter: header is not a JSON object")
    return header, 8 + n


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate keys")
    return out


def _no_constants(token: str) -> Any:
    raise ValueError(f"{token} is not allowed")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):  # 1e999 parses to inf
        raise ValueError(f"{token} is not a finite number")
    return value


def _parse_manifest(metadata: object) -> Manifest:
    if not isinstance(metadata, dict) or not isinstance(metadata.get(METADATA_KEY), str):
        raise AdapterFormatError(f"not a promptswap adapter: header has no '{METADATA_KEY}' manifest")
    try:
        raw = json.loads(
            metadata[METADATA_KEY],
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
            parse_float=_finite_float,
        )
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


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_manifest_values(m: Manifest) -> None:
    check_name(m.name)
    spec = _method(m.method)
    if m.version is not None and (not _is_int(m.version) or m.version < 1):
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
    fields = FINGERPRINT_FIELDS[spec.arch]
    if set(m.backbone) != set(fields):
        raise AdapterFormatError(f"manifest backbone must have exactly the keys {sorted(fields)}")
    for key, typ in fields.items():
        value = m.backbone[key]
        if not isinstance(value, typ) or isinstance(value, bool) or (typ is int and value < 1):
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
    spec.check_hyperparameters(m)


def _method(method: object) -> MethodSpec:
    if not isinstance(method, str) or method not in METHODS:
        raise AdapterFormatError(f"unknown adapter method {method!r}; known: {sorted(METHODS)}")
    return METHODS[method]


def _check_shapes(m: Manifest, shapes: Mapping[str, list[int]]) -> None:
    for name, want in METHODS[m.method].expected_shapes(m).items():
        if list(shapes[name]) != want:
            raise AdapterValueError(
                f"tensor '{name}' has shape {list(shapes[name])}, the manifest implies {want}"
            )


def _tensor_entry(name: str, entry: object) -> tuple[str, list[int], tuple[int, int]]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise AdapterFormatError(
            f"tensor '{name}': header entry must have exactly dtype, shape, data_offsets"
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise AdapterFormatError(f"tensor '{name}': dtype {dtype!r} not allowed, only {sorted(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(s) and s >= 0 for s in shape):
        raise AdapterFormatError(f"tensor '{name}': shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise AdapterFormatError(f"tensor '{name}': data_offsets {offsets!r} is not a pair of integers")
    return dtype, shape, (offsets[0], offsets[1])


def _check_layout(entries: dict[str, tuple[str, list[int], tuple[int, int]]], data_len: int) -> None:
    """Offsets inside the data, sizes matching dtype*shape, no gaps, overlaps or trailing bytes."""
    spans = []
    for name, (dtype, shape, (begin, end)) in entries.items():
        if not 0 <= begin <= end <= data_len:
            raise AdapterFormatError(
                f"tensor '{name}': data_offsets [{begin}, {end}] lie outside the {data_len} data bytes"
            )
        need = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != need:
            raise AdapterFormatError(
                f"tensor '{name}': {end - begin} bytes stored, shape {shape} {dtype} needs {need}"
            )
        spans.append((begin, end))
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            raise AdapterFormatError("tensor data has gaps or overlaps")
        pos = end
    if pos != data_len:
        raise AdapterFormatError(f"{data_len - pos} unexpected bytes after the tensor data")


# ---------------------------------------------------------------- methods


def _check_maple_hyperparameters(m: Manifest) -> None:
    hp = m.hyperparameters
    for key in ("n_ctx", "depth"):
        if not _is_int(hp.get(key)) or hp[key] < 1:
            raise AdapterValueError(f"hyperparameters.{key} must be an integer >= 1, got {hp.get(key)!r}")
    for tower in ("text", "vision"):
        if hp["depth"] > m.backbone[f"{tower}_layers"]:
            raise AdapterValueError(
                f"prompt depth {hp['depth']} exceeds the {tower} tower's {m.backbone[f'{tower}_layers']} layers"
            )


def _maple_shapes(m: Manifest) -> dict[str, list[int]]:
    depth, n_ctx, b = m.hyperparameters["depth"], m.hyperparameters["n_ctx"], m.backbone
    return {
        "text_prompts": [depth, n_ctx, b["text_width"]],
        "vision_prompts": [depth, n_ctx, b["vision_width"]],
    }


M2PT_TENSORS = ("vision_prompts", "text_prompts", "projector_weight", "projector_bias")  # FoldedM2pt's order
_M2PT_DEPTHS = (
    ("n_vision", None),
    ("vision_depth", "vision_layers"),
    ("n_text", None),
    ("text_depth", "text_layers"),
)


def _check_m2pt_hyperparameters(m: Manifest) -> None:
    hp = m.hyperparameters
    for key, layers in _M2PT_DEPTHS:
        if not _is_int(hp.get(key)) or hp[key] < 1:
            raise AdapterValueError(f"hyperparameters.{key} must be an integer >= 1, got {hp.get(key)!r}")
        if layers is not None and hp[key] > m.backbone[layers]:
            raise AdapterValueError(f"{key} {hp[key]} exceeds the backbone's {m.backbone[layers]} {layers}")


def _m2pt_shapes(m: Manifest) -> dict[str, list[int]]:
    hp, b = m.hyperparameters, m.backbone
    return {
        "vision_prompts": [hp["vision_depth"], hp["n_vision"], b["vision_width"]],
        "text_prompts": [hp["text_depth"], hp["n_text"], b["text_width"]],
        "projector_weight": [b["projector_out"], b["projector_in"]],
        "projector_bias": [b["projector_out"]],
    }


@dataclass(frozen=True)
class MethodSpec:
    """What the format knows about one method; another method (m2pt) is another entry."""

    arch: str  # the backbone arch it runs on
    tensors: tuple[str, ...]  # exactly the tensors a file holds
    check_hyperparameters: Callable[[Manifest], None]
    expected_shapes: Callable[[Manifest], dict[str, list[int]]]
    to_tensors: Callable[[Any], dict[str, torch.Tensor]]
    from_tensors: Callable[[dict[str, torch.Tensor]], Any]


METHODS: dict[str, MethodSpec] = {
    "maple": MethodSpec(
        arch="clip",
        tensors=("text_prompts", "vision_prompts"),
        check_hyperparameters=_check_maple_hyperparameters,
        expected_shapes=_maple_shapes,
        to_tensors=lambda f: {"text_prompts": f.text, "vision_prompts": f.vision},
        from_tensors=lambda t: FoldedMaple(t["text_prompts"], t["vision_prompts"]),
    ),
    "m2pt": MethodSpec(
        arch="llava",
        tensors=M2PT_TENSORS,
        check_hyperparameters=_check_m2pt_hyperparameters,
        expected_shapes=_m2pt_shapes,
        to_tensors=lambda f: dict(
            zip(M2PT_TENSORS, (f.vision, f.text, f.projector_weight, f.projector_bias), strict=False)
        ),
        from_tensors=lambda t: FoldedM2pt(*(t[name] for name in M2PT_TENSORS)),
    ),
}


# ---------------------------------------------------------------- backbone check


def validate_for_backbone(adapter: Adapter, fingerprint: Mapping[str, Any]) -> None:
    """Raise AdapterMismatch unless the adapter fits this backbone, naming the first field that differs."""
    made_for = adapter.manifest.backbone
    for key in sorted(set(fingerprint) | set(made_for)):
        expected, got = fingerprint.get(key), made_for.get(key)
        if expected != got:
            raise AdapterMismatch(
                f"adapter '{adapter.name}' was made for another backbone: {key} expected {expected!r}, got {got!r}",
                field=key, expected=expected, got=got,
            )  # fmt: skip
    f = adapter.folded
    if isinstance(f, FoldedM2pt):
        _check_fits(
            adapter.name, fingerprint, "tensors",
            widths=(("vision_width", f.vision_width), ("text_width", f.text_width),
                    ("projector_in", f.projector_in)),
            depths=(("vision_layers", f.vision_depth), ("text_layers", f.text_depth)),
        )  # fmt: skip
        return
    _check_fits(
        adapter.name, fingerprint, "prompts",
        widths=(("text_width", f.text_width), ("vision_width", f.vision_width)),
        depths=(("text_layers", f.depth), ("vision_layers", f.depth)),
    )  # fmt: skip


def _check_fits(
    name: str,
    fingerprint: Mapping[str, Any],
    what: str,
    *,
    widths: tuple[tuple[str, int], ...],
    depths: tuple[tuple[str, int], ...],
) -> None:
    """Each width must equal the backbone's; each prompt depth must fit its layer count."""
    for key, got in widths:
        expected = fingerprint.get(key)
        if expected != got:
            raise AdapterMismatch(
                f"adapter '{name}' {what} have {key} {got}, the backbone has {expected}",
                field=key, expected=expected, got=got,
            )  # fmt: skip
    for key, depth in depths:
        layers = fingerprint.get(key)
        if not isinstance(layers, int) or depth > layers:
            raise AdapterMismatch(
                f"adapter '{name}' prompt depth {depth} exceeds the backbone's {key} {layers}",
                field=key, expected=layers, got=depth,
            )  # fmt: skip
