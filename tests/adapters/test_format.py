from __future__ import annotations

import json
import pickle
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from adapters.container import MAX_HEADER_BYTES, tensors_sha256
from adapters.errors import (
    AdapterChecksumError,
    AdapterFormatError,
    AdapterMismatch,
    AdapterNameError,
    AdapterTooLarge,
    AdapterValueError,
)
from adapters.format import (
    check_name,
    dump,
    encode_adapter,
    load_adapter,
    read_adapter_file,
    validate_for_backbone,
)
from adapters.maple import FoldedMaple, MapleConfig, MaplePromptLearner, clip_fingerprint, fold
from tests.adapters.conftest import tiny_clip_config

MAX = 1 << 20
FP = clip_fingerprint(tiny_clip_config())


def make_folded(depth: int = 3, n_ctx: int = 2, seed: int = 0) -> FoldedMaple:
    torch.manual_seed(seed)
    return fold(MaplePromptLearner(MapleConfig(n_ctx, depth, 64, 96)))


def valid_bytes(**kwargs: Any) -> bytes:
    return dump(make_folded(), name="digits", backbone=FP, **kwargs)


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def manifest_of(header: dict) -> dict:
    return json.loads(header["__metadata__"]["promptswap"])


def with_manifest(header: dict, **changes: Any) -> dict:
    m = manifest_of(header) | changes
    return header | {"__metadata__": {"promptswap": json.dumps(m)}}


def honest_file(text: torch.Tensor, vision: torch.Tensor, **manifest_changes: Any) -> bytes:
    """A file whose checksum is right for these tensors, whatever their values."""
    tensors = {"text_prompts": text, "vision_prompts": vision}
    header, _ = split(valid_bytes())
    m = manifest_of(header) | {"tensors_sha256": tensors_sha256(tensors)} | manifest_changes
    return st_save(tensors, metadata={"promptswap": json.dumps(m)})


# ---------------------------------------------------------------- round trip


def test_round_trip() -> None:
    folded = make_folded()
    data = dump(folded, name="digits", backbone=FP, description="d", hyperparameters={"lr": 0.01})
    adapter = load_adapter(data, max_bytes=MAX)
    assert torch.equal(adapter.folded.text, folded.text) and torch.equal(adapter.folded.vision, folded.vision)
    m = adapter.manifest
    assert (m.name, m.method, m.version, m.description, m.format_version) == ("digits", "maple", None, "d", 1)
    assert m.backbone == FP
    assert m.hyperparameters == {"lr": 0.01, "n_ctx": 2, "depth": 3}
    assert m.tensors_sha256 == tensors_sha256({"text_prompts": folded.text, "vision_prompts": folded.vision})
    assert adapter.tensor_dtypes == {"text_prompts": "F32", "vision_prompts": "F32"}
    validate_for_backbone(adapter, FP)


def test_file_is_plain_safetensors() -> None:
    data = valid_bytes()
    header, _ = split(data)
    assert set(header) == {"__metadata__", "text_prompts", "vision_prompts"}
    assert header["text_prompts"]["shape"] == [3, 2, 64]


def test_safetensors_library_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(valid_bytes())
    with safe_open(path, framework="pt") as f:
        assert json.loads(f.metadata()["promptswap"])["name"] == "digits"
        assert f.get_tensor("vision_prompts").shape == (3, 2, 96)


def test_version_can_be_set_later() -> None:
    adapter = load_adapter(valid_bytes(), max_bytes=MAX)
    again = load_adapter(
        encode_adapter(replace(adapter, manifest=replace(adapter.manifest, version=7))), max_bytes=MAX
    )
    assert again.manifest.version == 7
    assert again.manifest.tensors_sha256 == adapter.manifest.tensors_sha256


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_are_read_as_fp32(dtype: torch.dtype) -> None:
    folded = make_folded()
    data = honest_file(folded.text.to(dtype), folded.vision.to(dtype))
    adapter = load_adapter(data, max_bytes=MAX)
    assert adapter.folded.text.dtype == torch.float32
    assert torch.equal(adapter.folded.text, folded.text.to(dtype).float())


def test_read_adapter_file(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(valid_bytes())
    assert read_adapter_file(path, max_bytes=MAX).name == "digits"
    with pytest.raises(AdapterTooLarge, match="limit is 100"):
        read_adapter_file(path, max_bytes=100)
    with pytest.raises(AdapterFormatError, match="cannot read"):
        read_adapter_file(tmp_path / "missing.safetensors", max_bytes=MAX)


# ---------------------------------------------------------------- not an adapter


def test_rejects_pickle() -> None:
    data = pickle.dumps({"text_prompts": [1.0, 2.0]})
    with pytest.raises(AdapterFormatError, match="not a safetensors adapter"):
        load_adapter(data, max_bytes=MAX)


@pytest.mark.parametrize(
    "data, kind",
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(200), "a JPEG image"),
        (b"\x89PNG\r\n\x1a\n" + bytes(200), "a PNG image"),
        (pickle.dumps({"text_prompts": [1.0, 2.0]}), "a pickle"),
    ],
)
def test_other_files_are_named_before_any_length_is_read(data: bytes, kind: str) -> None:
    with pytest.raises(AdapterFormatError, match=f"not a safetensors file \\(it looks like {kind}\\)") as e:
        load_adapter(data, max_bytes=MAX)
    assert "header length" not in str(e.value)


def test_rejects_torch_save(tmp_path: Path) -> None:
    torch.save({"text_prompts": torch.zeros(3, 2, 64)}, tmp_path / "x.pt")
    with pytest.raises(AdapterFormatError):
        load_adapter((tmp_path / "x.pt").read_bytes(), max_bytes=MAX)


@pytest.mark.parametrize("data", [b"", b"\x01\x02", bytes(range(256)) * 8, b"\x00" * 64])
def test_rejects_random_bytes(data: bytes) -> None:
    with pytest.raises(AdapterFormatError):
        load_adapter(data, max_bytes=MAX)


def test_rejects_too_large() -> None:
    data = valid_bytes()
    with pytest.raises(AdapterTooLarge):
        load_adapter(data, max_bytes=len(data) - 1)


@pytest.mark.parametrize("cut", [4, 8, 20, -1, -100])
def test_rejects_truncated(cut: int) -> None:
    with pytest.raises(AdapterFormatError):
        load_adapter(valid_bytes()[:cut], max_bytes=MAX)


def test_header_length_checked_before_parsing() -> None:
    huge = struct.pack("<Q", 2**63) + b"{}"
    with pytest.raises(AdapterFormatError, match="bound"):
        load_adapter(huge, max_bytes=MAX)
    past_end = struct.pack("<Q", 1000) + b"{}"
    with pytest.raises(AdapterFormatError, match="past the end"):
        load_adapter(past_end, max_bytes=MAX)
    big = struct.pack("<Q", MAX_HEADER_BYTES + 1) + b" " * (MAX_HEADER_BYTES + 1)
    with pytest.raises(AdapterFormatError, match="bound"):
        load_adapter(big, max_bytes=MAX)


@pytest.mark.parametrize(
    "raw", [b"[1, 2]", b"not json", b'"str"', b"\xff\xfe", b'{"a": NaN}', b"[" * 5000, b'{"a":1,"a":2}']
)
def test_header_must_be_a_json_object(raw: bytes) -> None:
    with pytest.raises(AdapterFormatError, match="not a safetensors adapter"):
        load_adapter(struct.pack("<Q", len(raw)) + raw, max_bytes=MAX)


def test_rejects_safetensors_without_manifest() -> None:
    data = st_save({"text_prompts": torch.zeros(3, 2, 64), "vision_prompts": torch.zeros(3, 2, 96)})
    with pytest.raises(AdapterFormatError, match="manifest"):
        load_adapter(data, max_bytes=MAX)


def test_rejects_offsets_past_the_end() -> None:
    header, body = split(valid_bytes())
    header["vision_prompts"]["data_offsets"][1] += 10**12
    with pytest.raises(AdapterFormatError, match="outside"):
        load_adapter(join(header, body), max_bytes=MAX)


def test_rejects_header_claiming_huge_tensor() -> None:
    header, body = split(valid_bytes())
    header["text_prompts"]["shape"] = [10**9, 10**9, 64]
    with pytest.raises(AdapterFormatError, match="needs"):
        load_adapter(join(header, body), max_bytes=MAX)


def test_rejects_overlapping_and_trailing_data() -> None:
    header, body = split(valid_bytes())
    h = json.loads(json.dumps(header))
    h["text_prompts"]["data_offsets"] = h["vision_prompts"]["data_offsets"]
    with pytest.raises(AdapterFormatError):
        load_adapter(join(h, body), max_bytes=MAX)
    with pytest.raises(AdapterFormatError, match="unexpected bytes"):
        load_adapter(join(header, body + b"\0" * 4), max_bytes=MAX)


@pytest.mark.parametrize("dtype", ["I64", "F64", "U8", "BOOL", ["F32"], None])
def test_rejects_other_dtypes(dtype: Any) -> None:
    header, body = split(valid_bytes())
    header["text_prompts"]["dtype"] = dtype
    with pytest.raises(AdapterFormatError, match="dtype"):
        load_adapter(join(header, body), max_bytes=MAX)


def test_rejects_real_f64_file() -> None:
    folded = make_folded()
    with pytest.raises(AdapterValueError):  # even writing refuses it
        honest_file(folded.text.double(), folded.vision.double())
    m = manifest_of(split(valid_bytes())[0])
    data = st_save(
        {"text_prompts": folded.text.double(), "vision_prompts": folded.vision.double()},
        metadata={"promptswap": json.dumps(m)},
    )
    with pytest.raises(AdapterFormatError, match="dtype"):
        load_adapter(data, max_bytes=MAX)


@pytest.mark.parametrize("names", [["text_prompts"], ["text_prompts", "vision_prompts", "extra"]])
def test_rejects_unexpected_tensor_names(names: list[str]) -> None:
    folded = make_folded()
    tensors = {n: (folded.vision if n == "vision_prompts" else folded.text).clone() for n in names}
    m = manifest_of(split(valid_bytes())[0])
    with pytest.raises(AdapterFormatError, match="exactly"):
        load_adapter(st_save(tensors, metadata={"promptswap": json.dumps(m)}), max_bytes=MAX)


# ---------------------------------------------------------------- values and shapes


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_rejects_non_finite(bad: float) -> None:
    folded = make_folded()
    text = folded.text.clone()
    text[1, 0, 5] = bad
    with pytest.raises(AdapterValueError, match="NaN or infinite"):
        load_adapter(honest_file(text, folded.vision), max_bytes=MAX)
    with pytest.raises(AdapterValueError, match="NaN or infinite"):
        dump(FoldedMaple(text, folded.vision), name="x", backbone=FP)


def test_rejects_overflow_to_inf_in_f16() -> None:
    folded = make_folded()
    text = folded.text.half()
    text.view(torch.int16)[0, 0, 0] = 0x7C00  # +inf in fp16
    with pytest.raises(AdapterValueError):
        load_adapter(honest_file(text, folded.vision.half()), max_bytes=MAX)


@pytest.mark.parametrize(
    ("text_shape", "vision_shape"),
    [((3, 2, 64), (3, 3, 96)), ((2, 2, 64), (2, 2, 96)), ((3, 2, 32), (3, 2, 96)), ((3, 2, 64), (3, 2, 48))],
)
def test_rejects_shapes_inconsistent_with_manifest(text_shape: tuple, vision_shape: tuple) -> None:
    data = honest_file(torch.zeros(text_shape), torch.zeros(vision_shape))  # manifest says depth 3, n_ctx 2
    with pytest.raises(AdapterValueError, match="shape"):
        load_adapter(data, max_bytes=MAX)


def test_rejects_depth_beyond_backbone_layers() -> None:
    data = honest_file(torch.zeros(5, 2, 64), torch.zeros(5, 2, 96), hyperparameters={"n_ctx": 2, "depth": 5})
    with pytest.raises(AdapterValueError, match="exceeds"):
        load_adapter(data, max_bytes=MAX)


@pytest.mark.parametrize(
    "changes",
    [
        {"format_version": 2},
        {"format_version": True},
        {"method": "lora"},
        {"backbone": {"arch": "clip"}},
        {"backbone": "clip"},
        {"hyperparameters": {"n_ctx": 2}},
        {"hyperparameters": {"n_ctx": 2, "depth": 3, "nested": {"a": 1}}},
        {"tensors_sha256": "abc"},
        {"surprise": 1},
    ],
)
def test_rejects_bad_manifests(changes: dict) -> None:
    header, body = split(valid_bytes())
    with pytest.raises((AdapterFormatError, AdapterValueError)):
        load_adapter(join(with_manifest(header, **changes), body), max_bytes=MAX)


def test_rejects_manifest_that_is_not_json() -> None:
    header, body = split(valid_bytes())
    header["__metadata__"]["promptswap"] = "{broken"
    with pytest.raises(AdapterFormatError, match="manifest is not valid JSON"):
        load_adapter(join(header, body), max_bytes=MAX)


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["digits", "a", "0-x.y_z", "a" * 64])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "Digits", "-x", ".hidden", "a" * 65, "a/b", "../x", "a b", "ä", 3, None, "x\n"]
)
def test_bad_names(name: Any) -> None:
    with pytest.raises(AdapterNameError, match="adapter name"):
        check_name(name)
    if isinstance(name, str):
        with pytest.raises(AdapterNameError):
            dump(make_folded(), name=name, backbone=FP)


def test_bad_name_in_file() -> None:
    header, body = split(valid_bytes())
    with pytest.raises(AdapterNameError):
        load_adapter(join(with_manifest(header, name="../../etc"), body), max_bytes=MAX)


# ---------------------------------------------------------------- checksum


def test_checksum_detects_a_flipped_byte() -> None:
    data = bytearray(valid_bytes())
    data[-7] ^= 0x01  # inside the tensor data
    with pytest.raises(AdapterChecksumError, match="corrupted"):
        load_adapter(bytes(data), max_bytes=MAX)


def test_checksum_is_canonical() -> None:
    a = {"text_prompts": torch.ones(1, 1, 2), "vision_prompts": torch.zeros(1, 1, 3)}
    assert tensors_sha256(a) == tensors_sha256(dict(reversed(a.items())))
    assert tensors_sha256(a) != tensors_sha256(
        a | {"text_prompts": torch.ones(1, 2, 1)}
    )  # same bytes, other shape
    assert tensors_sha256(a) != tensors_sha256(a | {"text_prompts": torch.ones(1, 1, 2).half()})


# ---------------------------------------------------------------- backbone


@pytest.mark.parametrize(
    ("field", "value"), [("text_width", 512), ("vision_layers", 12), ("patch_size", 32), ("arch", "llava")]
)
def test_mismatched_fingerprint_names_the_field(field: str, value: Any) -> None:
    adapter = load_adapter(valid_bytes(), max_bytes=MAX)
    other = FP | {field: value}
    with pytest.raises(AdapterMismatch) as err:
        validate_for_backbone(adapter, other)
    assert err.value.field == field and err.value.expected == value and err.value.got == FP[field]
    assert field in str(err.value) and repr(value) in str(err.value) and repr(FP[field]) in str(err.value)


def test_fingerprint_from_config() -> None:
    assert FP == {
        "arch": "clip", "text_width": 64, "vision_width": 96, "text_layers": 4, "vision_layers": 4,
        "projection_dim": 48, "image_size": 64, "patch_size": 16, "vocab_size": 1000,
    }  # fmt: skip


def test_validate_checks_depth_against_layers() -> None:
    adapter = load_adapter(dump(make_folded(depth=4), name="deep", backbone=FP), max_bytes=MAX)
    validate_for_backbone(adapter, FP)
    # a (hypothetical) manifest that agrees with the backbone but prompts that are too deep
    shallow_backbone = FP | {"text_layers": 3}
    too_deep = replace(adapter, manifest=replace(adapter.manifest, backbone=shallow_backbone))
    with pytest.raises(AdapterMismatch, match="depth 4"):
        validate_for_backbone(too_deep, shallow_backbone)
