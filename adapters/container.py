"""The safetensors container of an adapter file, read as if every byte were hostile.

Layout (safetensors): 8-byte little-endian header length N, N bytes of JSON header
(an object, so its first byte is ``{``), then the raw tensor bytes. Every length is
checked against the real size and a bound before anything is parsed, and every failure
is one of the typed errors in ``adapters.errors``. Pickle is never involved. What the
tensors mean is the manifest's business (``adapters.format``).

``tensors_sha256``: sha256 over the tensors in sorted name order; per tensor it
hashes ``name``, NUL, the safetensors dtype code, NUL, the shape as decimal numbers
joined by ``,``, NUL, the data length as 8-byte little-endian, then the raw
little-endian C-order bytes exactly as stored. Length prefixes keep it unambiguous.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from adapters.errors import AdapterFormatError, AdapterValueError

MAX_HEADER_BYTES = 64 * 1024  # a manifest plus four tensor entries is ~2 KiB

DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}

_JSON_SPACE = b" \t\n\r"
# First bytes of what people upload by mistake, to say what the file is instead.
_MAGIC = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"PK\x03\x04", "a zip archive (torch.save writes those)"),
    (b"\x80", "a pickle"),
    (b"\x1f\x8b", "a gzip file"),
)


@dataclass(frozen=True)
class Entry:
    """One tensor's header entry, checked against the data it points into."""

    dtype: str  # a key of DTYPES
    shape: list[int]
    begin: int  # offsets into the data after the header
    end: int


# ---------------------------------------------------------------- writing


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """Canonical checksum of named tensors (see the module docstring)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in DTYPE_CODES:
            raise AdapterValueError(f"tensor '{name}' has unsupported dtype {t.dtype}")
        raw = t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        _hash_entry(h, name, DTYPE_CODES[t.dtype], list(t.shape), raw)
    return h.hexdigest()


def _hash_entry(h: Any, name: str, dtype: str, shape: list[int], raw: bytes | memoryview) -> None:
    h.update(name.encode() + b"\0" + dtype.encode() + b"\0" + ",".join(map(str, shape)).encode() + b"\0")
    h.update(struct.pack("<Q", len(raw)))
    h.update(raw)


# ---------------------------------------------------------------- reading


def read_header(data: bytes) -> tuple[dict[str, Any], int]:
    """The header object and where the tensor data starts."""
    if len(data) < 8:
        raise AdapterFormatError(f"not a safetensors adapter: only {len(data)} bytes")
    _check_looks_like_safetensors(data)
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
        header = strict_json(bytes(data[8 : 8 + n]).decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AdapterFormatError(f"not a safetensors adapter: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise AdapterFormatError("not a safetensors adapter: header is not a JSON object")
    return header, 8 + n


def _check_looks_like_safetensors(data: bytes) -> None:
    """Refuse what is plainly another kind of file before reading any number out of it."""
    start = bytes(data[8 : 8 + MAX_HEADER_BYTES + 1]).lstrip(_JSON_SPACE)[:1]
    if start in (b"", b"{"):
        return  # a header may begin with JSON whitespace; the length checks decide the rest
    what = next((f" (it looks like {kind})" for magic, kind in _MAGIC if data.startswith(magic)), "")
    raise AdapterFormatError(
        f"not a safetensors adapter: this is not a safetensors file{what}; an adapter is the "
        ".safetensors file that `promptswap adapters train` or `import-maple` writes"
    )


def strict_json(text: str) -> Any:
    """JSON without duplicate keys, NaN/Infinity or numbers that overflow to inf."""
    return json.loads(
        text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants, parse_float=_finite_float
    )


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


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def tensor_entries(header: Mapping[str, object], names: Sequence[str], data_len: int) -> dict[str, Entry]:
    """The named entries, each well-formed; together they tile the data exactly."""
    entries = {name: _tensor_entry(name, header[name]) for name in names}
    _check_layout(entries, data_len)
    return entries


def _tensor_entry(name: str, entry: object) -> Entry:
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
    return Entry(dtype, shape, offsets[0], offsets[1])


def _check_layout(entries: Mapping[str, Entry], data_len: int) -> None:
    """Offsets inside the data, sizes matching dtype*shape, no gaps, overlaps or trailing bytes."""
    spans = []
    for name, e in entries.items():
        if not 0 <= e.begin <= e.end <= data_len:
            raise AdapterFormatError(
                f"tensor '{name}': data_offsets [{e.begin}, {e.end}] lie outside the {data_len} data bytes"
            )
        need = math.prod(e.shape) * DTYPES[e.dtype].itemsize
        if e.end - e.begin != need:
            raise AdapterFormatError(
                f"tensor '{name}': {e.end - e.begin} bytes stored, shape {e.shape} {e.dtype} needs {need}"
            )
        spans.append((e.begin, e.end))
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            raise AdapterFormatError("tensor data has gaps or overlaps")
        pos = end
    if pos != data_len:
        raise AdapterFormatError(f"{data_len - pos} unexpected bytes after the tensor data")


def entries_sha256(entries: Mapping[str, Entry], data: memoryview) -> str:
    """``tensors_sha256`` of the stored bytes, without decoding them."""
    h = hashlib.sha256()
    for name in sorted(entries):
        e = entries[name]
        _hash_entry(h, name, e.dtype, e.shape, data[e.begin : e.end])
    return h.hexdigest()


def decode(entry: Entry, data: memoryview) -> torch.Tensor:
    """The stored tensor, widened to fp32."""
    raw = data[entry.begin : entry.end]
    return tensor_from_bytes(raw, DTYPES[entry.dtype]).reshape(entry.shape).to(torch.float32).contiguous()


def tensor_from_bytes(raw: bytes | memoryview, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D tensor owning a copy of little-endian bytes (len must be a multiple of the itemsize)."""
    # numpy holds its buffer properly; torch.frombuffer on a temporary bytearray did not (SystemError).
    flat = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy())  # (nbytes,) uint8
    return flat.view(dtype)
