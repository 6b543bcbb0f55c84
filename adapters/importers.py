"""Import checkpoints saved by the MaPLe reference trainer (Dassl ``save_checkpoint``).

A Dassl checkpoint is ``torch.save({state_dict, epoch, optimizer, scheduler,
val_result})``. Its scheduler holds arbitrary class objects, so
``torch.load(weights_only=True)`` refuses it; a user's file must never be loaded
with ``weights_only=False``. On refusal we read torch's zip format ourselves with a
restricted unpickler: tensors are rebuilt from their raw records, and every other
global becomes an inert placeholder that records its arguments and is never called
for effect. Not even ``torch.load`` sees the file then (it would hand TorchScript
archives to ``torch.jit.load``).
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPConfig

from adapters.container import tensor_from_bytes
from adapters.errors import AdapterFormatError, AdapterMismatch, AdapterTooLarge, AdapterValueError
from adapters.format import dump
from adapters.maple import MaplePromptLearner, clip_fingerprint, fold, learner_state
from adapters.weights import WEIGHTS

MAX_CHECKPOINT_BYTES = 4 << 30  # a ViT-L/14 fp16 CustomCLIP with optimizer state fits
MAX_PICKLE_BYTES = 16 << 20  # data.pkl holds structure and names only, tensors live beside it
LEARNER_DIR = "MultiModalPromptLearner"  # Dassl's model name for MaPLe


# ---------------------------------------------------------------- finding the file


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file itself, or the latest one of a Dassl output directory."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise AdapterFormatError(f"no checkpoint at {str(path)!r}")
    d = path / LEARNER_DIR if (path / LEARNER_DIR).is_dir() else path
    marker = d / "checkpoint"
    if marker.is_file():
        # Dassl writes the latest file's basename; never follow anything but a basename.
        with marker.open("rb") as f:
            name = f.read(4096).decode("utf-8", "replace").strip().splitlines()[0:1]
        if not name or not re.fullmatch(r"[A-Za-z0-9._-]+", name[0]) or name[0] in (".", ".."):
            raise AdapterFormatError(f"{str(marker)!r} does not name a checkpoint file")
        target = d / name[0]
        if not target.is_file():
            raise AdapterFormatError(f"{str(marker)!r} names {name[0]!r}, which does not exist")
        return target
    epochs = [
        (int(m.group(1)), p)
        for p in d.glob("model.pth.tar-*")
        if (m := re.fullmatch(r"model\.pth\.tar-(\d+)", p.name))
    ]
    if epochs:
        return max(epochs)[1]
    if (d / "model-best.pth.tar").is_file():
        return d / "model-best.pth.tar"
    raise AdapterFormatError(f"no MaPLe checkpoint (model.pth.tar-N) found in {str(path)!r}")


# ---------------------------------------------------------------- reading it safely


def read_checkpoint(path: str | Path, *, max_bytes: int = MAX_CHECKPOINT_BYTES) -> Any:
    """Load a torch checkpoint without ever executing code from it."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise AdapterTooLarge(f"checkpoint is {size} bytes, the limit is {max_bytes}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # refused: holds non-tensor objects (Dassl's scheduler); read it restricted
    except Exception as e:  # torch raises RuntimeError, EOFError, ... on broken files
        raise AdapterFormatError(f"not a torch checkpoint: {e}") from None
    return read_checkpoint_restricted(path)


class Inert:
    """Stand-in for an untrusted global: creating, calling or filling it only records data."""

    module = ""
    qualname = ""
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: Any
    items: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        self = object.__new__(cls)
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # everything was recorded in __new__; pickle may call either

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Any) -> None:
        self.items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def __repr__(self) -> str:
        return f"<inert {self.module}.{self.qualname}>"


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}  # fmt: skip


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2, with every number checked against the storage."""
    if not isinstance(storage, torch.Tensor):
        raise AdapterFormatError("tensor record does not point at a storage")
    dims = (offset, *size, *stride) if isinstance(size, tuple) and isinstance(stride, tuple) else None
    if dims is None or len(size) != len(stride) or not all(type(x) is int and x >= 0 for x in dims):
        raise AdapterFormatError("tensor record has a malformed size, stride or offset")
    last = (
        offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True))
        if math.prod(size)
        else offset - 1
    )
    if last >= storage.numel():
        raise AdapterFormatError("tensor record reaches past its storage")
    return torch.as_strided(storage, size, stride, offset)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data  # a Parameter's data is all we need


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds tensors from a torch zip archive; every other global becomes Inert."""

    def __init__(self, file: io.BufferedIOBase, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(file)
        self._archive, self._prefix = archive, prefix
        self._storages: dict[str, torch.Tensor] = {}
        self._inert: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        key = (str(module), str(name))
        if key not in self._inert:
            self._inert[key] = type("Inert", (Inert,), {"module": key[0], "qualname": key[1]})
        return self._inert[key]

    def persistent_load(self, pid: Any) -> torch.Tensor:
        # torch writes ("storage", storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise AdapterFormatError("checkpoint has an unknown persistent record")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or type(numel) is not int:
            raise AdapterFormatError("checkpoint has a malformed storage record")
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}data/{key}")
            except KeyError:
                raise AdapterFormatError(f"checkpoint storage {key!r} is missing") from None
            if len(raw) != numel * stype.dtype.itemsize:
                raise AdapterFormatError(f"checkpoint storage {key!r} has the wrong size")
            self._storages[key] = tensor_from_bytes(raw, stype.dtype)  # (numel,)
        return self._storages[key]


_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}


def _check_opcodes(data: bytes) -> None:
    """Walk the pickle once without building anything: every length field must fit the data.

    The C unpickler allocates a buffer of a (possibly hostile) declared length before
    reading it, and grows its memo to the largest PUT index: a few hostile bytes in a
    2 KB pickle could cost gigabytes and seconds.
    """
    try:
        for op, arg, pos in pickletools.genops(data):
            # The C unpickler also grows its memo table to a PUT's index at once.
            if op.name in _MEMO_OPS and isinstance(arg, int) and arg > len(data):
                raise ValueError(f"memo index {arg} at position {pos} is implausible")
            if op.name == "FRAME" and isinstance(arg, int) and arg > len(data) - (pos or 0):
                raise ValueError(f"frame at position {pos} runs past the end")
    except Exception as e:  # ValueError for lengths past the end, unknown opcodes
        raise AdapterFormatError(f"checkpoint pickle is malformed: {e}") from None


def read_checkpoint_restricted(path: str | Path) -> Any:
    """Read a torch zip checkpoint with RestrictedUnpickler (no torch.load involved)."""
    path = Path(path)
    size = path.stat().st_size
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise AdapterFormatError(f"not a torch zip checkpoint: {e}") from None
    with archive:
        infos = archive.infolist()
        # torch stores records uncompressed; anything bigger than the file is a zip bomb.
        if any(i.file_size > size for i in infos):
            raise AdapterFormatError("checkpoint archive has a record larger than the file")
        pkls = [i.filename for i in infos if i.filename.endswith("data.pkl") and i.filename.count("/") == 1]
        if len(pkls) != 1:
            raise AdapterFormatError("not a torch zip checkpoint: expected one <archive>/data.pkl")
        prefix = pkls[0][: -len("data.pkl")]
        try:
            if archive.read(prefix + "byteorder").strip() != b"little":
                raise AdapterFormatError("only little-endian checkpoints are supported")
        except KeyError:
            pass  # older torch wrote no byteorder record; those were little-endian
        if infos[[i.filename for i in infos].index(pkls[0])].file_size > MAX_PICKLE_BYTES:
            raise AdapterTooLarge(f"checkpoint pickle is larger than {MAX_PICKLE_BYTES} bytes")
        data = archive.read(pkls[0])
        _check_opcodes(data)
        try:
            return RestrictedUnpickler(io.BytesIO(data), archive, prefix).load()
        except AdapterFormatError:
            raise
        except Exception as e:  # a malformed pickle can fail in many ways; none is code execution
            raise AdapterFormatError(f"checkpoint pickle is malformed: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------- MaPLe


@dataclass(frozen=True, eq=False)
class ImportedMaple:
    learner: MaplePromptLearner
    source: Path
    epoch: int | None


def import_maple_checkpoint(path: str | Path, *, max_bytes: int = MAX_CHECKPOINT_BYTES) -> ImportedMaple:
    """A MaplePromptLearner (fp32) from a reference checkpoint file or Dassl output dir."""
    source = resolve_checkpoint(path)
    obj = read_checkpoint(source, max_bytes=max_bytes)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise AdapterFormatError(f"{str(source)!r} holds no state_dict")
    learner_sd = learner_state(state)
    if not learner_sd and "ctx" in state:  # a bare prompt_learner state dict
        learner_sd = learner_state({f"prompt_learner.{k}": v for k, v in state.items()})
    if not learner_sd:
        raise AdapterFormatError(f"{str(source)!r} has no prompt_learner.* entries: not a MaPLe checkpoint")
    for key, t in learner_sd.items():
        if not t.is_floating_point():
            raise AdapterValueError(f"prompt_learner.{key} has dtype {t.dtype}, expected a float")
        if not torch.isfinite(t).all():
            raise AdapterValueError(f"prompt_learner.{key} holds NaN or infinite values")
    learner = MaplePromptLearner.from_state_dict(learner_sd)  # fp16 -> fp32 here
    epoch = obj.get("epoch") if isinstance(obj, dict) else None
    return ImportedMaple(learner, source, epoch if type(epoch) is int else None)


def check_learner_fits(learner: MaplePromptLearner, config: CLIPConfig) -> None:
    """AdapterMismatch unless the learner's widths and depth fit this CLIP."""
    fp, c = clip_fingerprint(config), learner.config
    for key, got in (("text_width", c.text_width), ("vision_width", c.vision_width)):
        if fp[key] != got:
            raise AdapterMismatch(
                f"checkpoint was trained for another backbone: {key} expected {fp[key]}, got {got}",
                field=key, expected=fp[key], got=got,
            )  # fmt: skip
    for key in ("text_layers", "vision_layers"):
        if c.depth > fp[key]:
            raise AdapterMismatch(
                f"checkpoint prompt depth {c.depth} exceeds the backbone's {key} {fp[key]}",
                field=key, expected=fp[key], got=c.depth,
            )  # fmt: skip


DEFAULT_CTX_INIT = "a photo of a"  # the reference configs' CTX_INIT


def convert_maple_checkpoint(
    path: str | Path,
    config: CLIPConfig,
    *,
    name: str,
    description: str = "",
    ctx_init: str = DEFAULT_CTX_INIT,
    weights: str | None = None,
) -> bytes:
    """Reference checkpoint -> folded adapter file bytes for this backbone (``weights``: its
    weights digest, see ``adapters.weights``; without it the fingerprint is shapes-only).

    CTX_INIT is not stored in the checkpoint, but the reference prompt is
    ``CTX_INIT + " " + class + "."`` with only its first n_ctx words replaced, so the
    remaining words belong to the adapter: they go into the manifest as ``template``.
    (A run without CTX_INIT used ``"X " * n_ctx``.)
    """
    imported = import_maple_checkpoint(path)
    check_learner_fits(imported.learner, config)
    ctx_init = " ".join(ctx_init.replace("_", " ").split())
    if len(ctx_init.split()) < imported.learner.config.n_ctx:
        raise AdapterValueError(
            f"ctx_init {ctx_init!r} has fewer words than the checkpoint's n_ctx {imported.learner.config.n_ctx}"
        )
    hp: dict[str, Any] = {"source": "maple-reference", "ctx_init": ctx_init, "template": f"{ctx_init} {{}}."}
    if imported.epoch is not None:
        hp["epoch"] = imported.epoch
    return dump(
        fold(imported.learner),
        name=name,
        backbone={**clip_fingerprint(config), **({WEIGHTS: weights} if weights else {})},
        description=description,
        hyperparameters=hp,
    )
