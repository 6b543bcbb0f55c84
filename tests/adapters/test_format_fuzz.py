"""Hostile bytes: the reader may accept or refuse, but only ever with a typed error."""

from __future__ import annotations

import json
import struct
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.errors import AdapterError
from adapters.format import Adapter, dump, load_adapter
from adapters.maple import MapleConfig, MaplePromptLearner, clip_fingerprint, fold
from tests.adapters.conftest import tiny_clip_config

torch.manual_seed(0)
VALID = dump(
    fold(MaplePromptLearner(MapleConfig(2, 2, 64, 96))),
    name="fuzz",
    backbone=clip_fingerprint(tiny_clip_config()),
)
(HEADER_LEN,) = struct.unpack("<Q", VALID[:8])
HEADER = json.loads(VALID[8 : 8 + HEADER_LEN])
BODY = VALID[8 + HEADER_LEN :]
MAX = 1 << 20
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def load_or_typed_error(data: bytes) -> Adapter | None:
    try:
        adapter = load_adapter(data, max_bytes=MAX)
    except AdapterError:
        return None
    assert torch.isfinite(adapter.folded.text).all() and torch.isfinite(adapter.folded.vision).all()
    return adapter


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    load_or_typed_error(data)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_after_a_plausible_length(tail: bytes) -> None:
    load_or_typed_error(struct.pack("<Q", len(tail)) + tail)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_bytes(edits: list[tuple[int, int]]) -> None:
    data = bytearray(VALID)
    for pos, value in edits:
        data[pos] = value
    load_or_typed_error(bytes(data))


@FUZZ
@given(st.integers(0, len(VALID)), st.binary(max_size=64))
def test_truncated_or_extended(cut: int, extra: bytes) -> None:
    load_or_typed_error(VALID[:cut] + extra)


@FUZZ
@given(
    st.sampled_from(["text_prompts", "vision_prompts", "__metadata__", "new"]),
    st.sampled_from(["dtype", "shape", "data_offsets", "promptswap", None]),
    json_values,
)
def test_mutated_header_values(entry: str, key: str | None, value: Any) -> None:
    header = json.loads(json.dumps(HEADER))
    if key is None or not isinstance(header.get(entry), dict):
        header[entry] = value
    else:
        header[entry][key] = value
    raw = json.dumps(header).encode()
    load_or_typed_error(struct.pack("<Q", len(raw)) + raw + BODY)


@FUZZ
@given(
    st.sampled_from(
        ["format_version", "name", "version", "method", "backbone", "hyperparameters", "description",
         "tensors_sha256", "created_at", "extra"]
    ),
    json_values,
)  # fmt: skip
def test_mutated_manifest_values(field: str, value: Any) -> None:
    header = json.loads(json.dumps(HEADER))
    manifest = json.loads(header["__metadata__"]["promptswap"])
    manifest[field] = value
    header["__metadata__"]["promptswap"] = json.dumps(manifest)
    raw = json.dumps(header).encode()
    load_or_typed_error(struct.pack("<Q", len(raw)) + raw + BODY)
