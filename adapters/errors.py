"""Typed adapter errors: each names what is wrong, so a caller can answer precisely.

The service maps them to HTTP answers; this package knows nothing about HTTP. The
``code`` string is stable and meant for JSON error bodies.
"""

from __future__ import annotations


class AdapterError(Exception):
    """Base of every error this package raises about an adapter, a checkpoint or a training run."""

    code = "adapter_error"


class AdapterFormatError(AdapterError):
    """Not an adapter file at all: pickle, random bytes, a broken header (400/415)."""

    code = "adapter_format"


class AdapterTooLarge(AdapterError):
    """The file or one of its parts is past a size bound (413)."""

    code = "adapter_too_large"


class AdapterValueError(AdapterError, ValueError):
    """Well-formed but unusable values: NaN/inf, inconsistent shapes (422)."""

    code = "adapter_invalid"


class AdapterMismatch(AdapterError):
    """The adapter was made for another backbone (409)."""

    code = "adapter_backbone_mismatch"

    def __init__(self, message: str, *, field: str, expected: object, got: object) -> None:
        super().__init__(message)
        self.field = field
        self.expected = expected
        self.got = got


class AdapterNameError(AdapterError, ValueError):
    """The adapter name is not a safe, canonical name (422)."""

    code = "adapter_name"


class AdapterChecksumError(AdapterError):
    """The stored tensor bytes do not match the manifest's sha256: the file is corrupted."""

    code = "adapter_checksum"


class DeviceUnavailable(AdapterError, ValueError):
    """The device asked for is not there (a CUDA device on a machine without one)."""

    code = "device_unavailable"
