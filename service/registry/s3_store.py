"""The bucket store: adapter versions as objects in any S3-compatible bucket.

``s3://BUCKET/PREFIX`` holds ``PREFIX/<name>/<version>.safetensors`` (the directory
store's layout, so ``promptswap adapters sync`` copies one into the other) and
``PREFIX/<name>/.claimed/<version>``: empty objects that reserve numbers, and
``PREFIX/<name>/.aliases/<alias>``: one small object per alias holding its version as text.

Promises (store_protocol) and how they are kept here:

- numbers: a writer claims ``name@N`` by creating its claim object with
  ``If-None-Match: *``, which the server refuses (412) when the object exists, so of two
  replicas claiming N one wins and the other takes N+1. Claims are never deleted with
  their version: a deleted number is never given again. The version object itself is
  created the same way, so nothing (not even a writer that skipped claiming) overwrites it;
- whole or absent: an S3 PUT is atomic, readers see the old state or the whole object. A
  refused upload gives its claim back; one whose outcome is unknown (the connection broke)
  deletes its object if it landed and keeps the number spent;
- every object carries the sha256 of its bytes (``x-amz-meta-sha256``), checked on every
  download and on every hit of the local byte cache, before the adapter's own tensor hash;
- listings: one listing of the prefix makes a view that serves ``get``/``names`` for
  ``refresh_s`` seconds, so requests cost no round trip; this process's own writes and
  deletes update the view at once. A listing that fails keeps the last view (the bound
  then stretches by the outage, during which no replica can write) and is retried at most
  every ``refresh_s``; with no view yet, adapter lookups answer 503;
- aliases: in the same view (an alias object is read again only when its ETag changed);
  setting one is one unconditional PUT (atomic: readers see the old version or the new).
  Setting checks the version against a fresh listing of the name, and ``delete`` refuses
  (``VersionAliased``) after a fresh listing and read of the name's aliases. Within one
  process both hold one lock; across replicas a bucket has no lock, so a set racing a
  delete of the same version on another replica can leave an alias naming a deleted
  version (it then answers 404 until moved): move aliases before deleting.

Credentials and endpoint come from the AWS chain as every AWS tool reads them
(AWS_ENDPOINT_URL[_S3], AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, web identity,
instance roles), region from AWS_REGION. boto3 because it *is* that chain, plus bounded
retries and connect/read timeouts in one Config; the store is synchronous by contract (it
runs in the registry's I/O threads), so an async client would buy nothing.

One module (over 400 lines) because every method leans on one view and one failure
mapping: split, the promises above would be kept in two places.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

from adapters.errors import AdapterChecksumError, AdapterError, AdapterTooLarge
from adapters.format import check_name
from service.registry.byte_cache import ByteCache
from service.registry.store import ALIAS_RE, ALIASES, NoSuchVersion, VersionAliased, check_alias
from service.registry.store_protocol import (
    SUFFIX,
    StoredVersion,
    StoreMisconfigured,
    StoreUnavailable,
    VersionGone,
    VersionTaken,
)

log = logging.getLogger("promptswap.registry")

CLAIMED = ".claimed"
CLAIM_ATTEMPTS = 64  # writers racing for numbers: each lost race moves one number up
_VERSION_FILE = re.compile(r"([1-9][0-9]{0,8})\.safetensors")
_CLAIM = re.compile(r"[1-9][0-9]{0,8}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
    "403",
}

View = dict[str, dict[int, StoredVersion]]
Aliases = dict[str, dict[str, int]]  # name -> alias -> version


class Listing:
    """One listing of a prefix: versions, the highest claim and the alias objects' ETags."""

    def __init__(self) -> None:
        self.versions: View = {}
        self.claimed: dict[str, int] = {}
        self.alias_etags: dict[str, dict[str, str]] = {}


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix/"); ("bucket", "") without one."""
    if not url.startswith("s3://"):
        raise ValueError(f"{url!r} is not an s3://BUCKET/PREFIX address")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f"{bucket!r} is not a valid bucket name (3-63 of a-z 0-9 . -)")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def make_client(timeout_s: float, attempts: int) -> Any:
    config = Config(
        connect_timeout=timeout_s,
        read_timeout=timeout_s,
        retries={"mode": "standard", "total_max_attempts": attempts},
        max_pool_connections=16,
    )
    return boto3.session.Session().client("s3", config=config)


class S3Store:
    """Implements ``store_protocol.VersionStore`` on a bucket (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        refresh_s: float = 2.0,
        timeout_s: float = 5.0,
        attempts: int = 3,
        cache_bytes: int = 256 * 2**20,
        client: Any = None,
        clock: Callable[[], float] = time.monotonic,
        retry_after_s: int = 5,
    ) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.location = f"s3://{self.bucket}/{self.prefix}"
        self.refresh_s = refresh_s
        self.client = client if client is not None else make_client(timeout_s, attempts)
        self.cache = ByteCache(cache_bytes)
        self._clock = clock
        self._retry_after_s = retry_after_s
        self._lock = threading.Lock()  # one listing at a time; guards the view
        self._view: View | None = None
        self._aliases: Aliases = {}  # replaced with the view, never mutated
        self._alias_reads: dict[str, tuple[str, int | None]] = {}  # key -> (ETag, version)
        self._changing = threading.Lock()  # alias changes and deletes in this process
        self._view_at = float("-inf")
        self._error: str | None = None
        self._failed_at = float("-inf")

    # ------------------------------------------------------------------ reading

    def names(self) -> list[str]:
        return sorted(name for name, versions in self._current().items() if versions)

    def versions(self, name: str) -> list[StoredVersion]:
        found = self._current().get(check_name(name), {})
        return [found[v] for v in sorted(found)]

    def get(self, name: str, version: int | None = None) -> StoredVersion | None:
        found = self._current().get(check_name(name), {})
        if not found:
            return None
        return found[max(found)] if version is None else found.get(version)

    def read(self, stored: StoredVersion, max_bytes: int) -> bytes:
        if stored.size > max_bytes:
            raise AdapterTooLarge(f"adapter file is {stored.size} bytes, the limit is {max_bytes}")
        ident = (stored.key, stored.file_id)
        cached = self.cache.get(ident)
        if cached is not None:
            return cached
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self._key(stored.name, stored.version))
            with answer["Body"] as body:
                data = body.read(max_bytes + 1)
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                self._forget(stored.name, stored.version)
                raise VersionGone(stored.key) from None
            raise self._failure(exc, f"reading {stored.key}") from None
        except BotoCoreError as exc:
            raise self._failure(exc, f"reading {stored.key}") from None
        if len(data) > max_bytes:
            raise AdapterTooLarge(f"adapter file is over {max_bytes} bytes")
        digest = hashlib.sha256(data).hexdigest()
        recorded = answer.get("Metadata", {}).get("sha256")
        if recorded is not None and recorded != digest:
            raise AdapterChecksumError(
                f"object {stored.key} in {self.location} does not match the sha256 recorded at upload"
            )
        if (answer.get("ETag"), len(data)) == stored.file_id:  # the content that was listed
            self.cache.put(ident, data, digest)
        return data

    def health(self) -> str | None:
        try:
            self._current()
        except (StoreUnavailable, StoreMisconfigured):
            pass
        return self._error

    def check(self) -> None:
        """Start-up: list once. Refused credentials or a missing bucket raise
        ``StoreMisconfigured``; an unreachable server leaves the store degraded."""
        with self._lock:
            self._refresh_locked()

    # ------------------------------------------------------------------ aliases

    def aliases(self, name: str) -> dict[str, int]:
        check_name(name)
        self._current()
        return dict(sorted(self._aliases.get(name, {}).items()))

    def alias(self, name: str, alias: str) -> int | None:
        check_name(name)
        check_alias(alias)
        self._current()
        return self._aliases.get(name, {}).get(alias)

    def set_alias(self, name: str, alias: str, version: int) -> int | None:
        """Point ``alias`` at ``version``; returns what it pointed at before. Raises
        ``NoSuchVersion`` when a fresh listing of the name does not hold that version."""
        check_name(name)
        check_alias(alias)
        with self._changing:
            listing = self._list(f"{self.prefix}{name}/")
            if version not in listing.versions.get(name, {}):
                raise NoSuchVersion(f"{name}@{version}")
            previous = self._read_aliases(listing).get(name, {}).get(alias)
            key = self._alias_key(name, alias)
            try:
                answer = self.client.put_object(
                    Bucket=self.bucket, Key=key, Body=f"{version}\n".encode(), ContentType="text/plain"
                )
            except (ClientError, BotoCoreError) as exc:
                raise self._failure(exc, f"setting {name}@{alias}") from None
            self._alias_reads[key] = (answer["ETag"], version)
            self._set_own_alias(name, alias, version)
            return previous

    def delete_alias(self, name: str, alias: str) -> int | None:
        check_name(name)
        check_alias(alias)
        with self._changing:
            key = self._alias_key(name, alias)
            previous = self._get_alias(key)
            if previous is not None:
                try:
                    self.client.delete_object(Bucket=self.bucket, Key=key)
                except (ClientError, BotoCoreError) as exc:
                    raise self._failure(exc, f"removing {name}@{alias}") from None
            self._set_own_alias(name, alias, None)
            return previous

    def _set_own_alias(self, name: str, alias: str, version: int | None) -> None:
        with self._lock:  # seen by this replica at once; a new dict, as for versions
            mine = {a: v for a, v in self._aliases.get(name, {}).items() if a != alias}
            if version is not None:
                mine[alias] = version
            self._aliases = {**self._aliases, name: mine}

    def _read_aliases(self, listing: Listing) -> Aliases:
        """The versions the listed alias objects hold (read again only when changed)."""
        found: Aliases = {}
        for name, etags in listing.alias_etags.items():
            for alias, etag in etags.items():
                key = self._alias_key(name, alias)
                known = self._alias_reads.get(key)
                version = known[1] if known is not None and known[0] == etag else self._get_alias(key)
                self._alias_reads[key] = (etag, version)
                if version is not None:
                    found.setdefault(name, {})[alias] = version
        return found

    def _get_alias(self, key: str) -> int | None:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
            with answer["Body"] as body:
                text = body.read(64).decode("ascii", "replace").strip()
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return None
            raise self._failure(exc, f"reading {key}") from None
        except BotoCoreError as exc:
            raise self._failure(exc, f"reading {key}") from None
        return int(text) if _VERSION_FILE.fullmatch(f"{text}{SUFFIX}") else None

    # ------------------------------------------------------------------ writing

    def put(self, name: str, encode: Callable[[int], bytes]) -> StoredVersion:
        check_name(name)
        listing = self._list(f"{self.prefix}{name}/")
        version = max([0, listing.claimed.get(name, 0), *listing.versions.get(name, {})]) + 1
        for _ in range(CLAIM_ATTEMPTS):
            if not self._create(self._claim_key(name, version), b""):
                version += 1  # another writer claimed it first
                continue
            try:
                data = encode(version)
            except BaseException:
                self._give_back(name, version)
                raise
            stored = self._put_version(name, version, data)
            if stored is not None:
                return stored
            version += 1  # an object without a claim held it: the number stays spent
        raise StoreUnavailable(
            f"no free version of {name!r} after {CLAIM_ATTEMPTS} tries (contention)", self._retry_after_s
        )

    def put_exact(self, name: str, version: int, data: bytes) -> StoredVersion:
        check_name(name)
        if not self._create(self._claim_key(name, version), b""):
            raise VersionTaken(f"{name}@{version}")
        stored = self._put_version(name, version, data)
        if stored is None:
            raise VersionTaken(f"{name}@{version}")
        return stored

    def delete(self, name: str, version: int | None = None) -> list[StoredVersion]:
        """Remove one version or all of ``name``. Raises ``VersionAliased`` (deleting
        nothing) when an alias, read fresh from the bucket, points at one of them."""
        with self._changing:
            listing = self._list(f"{self.prefix}{check_name(name)}/")
            doomed = [v for n, v in sorted(listing.versions.get(name, {}).items()) if version in (None, n)]
            gone = {v.version for v in doomed}
            held = {a: v for a, v in self._read_aliases(listing).get(name, {}).items() if v in gone}
            if held:
                raise VersionAliased(name, held)
            for stored in doomed:
                try:
                    self.client.delete_object(Bucket=self.bucket, Key=self._key(name, stored.version))
                except (ClientError, BotoCoreError) as exc:
                    raise self._failure(exc, f"deleting {stored.key}") from None
                self._forget(name, stored.version)
            return doomed  # the claims stay: a deleted number is never given again

    def _put_version(self, name: str, version: int, data: bytes) -> StoredVersion | None:
        """Create the version's object; None when one is there already (not ours)."""
        key, upload_id = self._key(name, version), uuid.uuid4().hex
        digest = hashlib.sha256(data).hexdigest()
        try:
            answer = self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                IfNoneMatch="*",
                ContentType="application/octet-stream",
                Metadata={"sha256": digest, "upload-id": upload_id},
            )
            etag = answer["ETag"]
        except ClientError as exc:
            if _code(exc) == "PreconditionFailed":
                # Someone's object, or ours: a retried PUT whose first answer was lost.
                head = self._head(key)
                if head is None or head.get("Metadata", {}).get("upload-id") != upload_id:
                    return None
                etag = head["ETag"]
            else:
                if _status(exc) < 500:
                    self._give_back(name, version)  # refused: nothing was stored
                else:
                    self._take_back(key, upload_id)
                raise self._failure(exc, f"storing {name}@{version}") from None
        except BotoCoreError as exc:
            self._take_back(key, upload_id)  # the outcome is unknown
            raise self._failure(exc, f"storing {name}@{version}") from None
        stored = StoredVersion(name, version, len(data), time.time(), (etag, len(data)))
        self.cache.put((stored.key, stored.file_id), data, digest)
        with self._lock:  # our own write is seen by this replica at once
            if self._view is not None:  # a new dict: readers iterate the old one unlocked
                self._view = {**self._view, name: {**self._view.get(name, {}), version: stored}}
        return stored

    def _create(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if absent (If-None-Match: *); False when it exists."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as exc:
            if _code(exc) == "PreconditionFailed":
                return False
            raise self._failure(exc, f"claiming {key}") from None
        except BotoCoreError as exc:
            raise self._failure(exc, f"claiming {key}") from None
        return True

    def _give_back(self, name: str, version: int) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._claim_key(name, version))
        except (ClientError, BotoCoreError) as exc:  # the number stays spent: harmless
            log.warning("could not give back the claim of %s@%s: %s", name, version, exc)

    def _take_back(self, key: str, upload_id: str) -> None:
        """After a PUT with no answer: delete the object if it landed and is ours."""
        try:
            head = self._head(key)
            if head is not None and head.get("Metadata", {}).get("upload-id") == upload_id:
                self.client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError, StoreUnavailable, StoreMisconfigured) as exc:
            log.warning("could not check for a partial upload of %s: %s", key, exc)

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._failure(exc, f"reading {key}") from None
        except BotoCoreError as exc:
            raise self._failure(exc, f"reading {key}") from None

    # ------------------------------------------------------------------ the view

    def _current(self) -> View:
        with self._lock:
            now = self._clock()
            if self._view is not None and now - self._view_at < self.refresh_s:
                return self._view
            if self._error is not None and now - self._failed_at < self.refresh_s:
                if self._view is not None:
                    return self._view  # the bucket is down: keep the last view
                raise StoreUnavailable(self._error, self._retry_after_s)
            try:
                return self._refresh_locked()
            except (StoreUnavailable, StoreMisconfigured):
                if self._view is not None:
                    return self._view
                raise

    def _refresh_locked(self) -> View:
        started = self._clock()
        try:
            listing = self._list(self.prefix)
            aliases = self._read_aliases(listing)
        except (StoreUnavailable, StoreMisconfigured) as exc:
            if self._error is None:
                log.warning("adapter store %s: %s", self.location, exc)
            self._error, self._failed_at = str(exc), started
            raise
        if self._error is not None:
            log.info("adapter store %s answers again", self.location)
        listed = {self._alias_key(n, a) for n, found in listing.alias_etags.items() for a in found}
        self._alias_reads = {k: v for k, v in self._alias_reads.items() if k in listed}
        self._view, self._aliases, self._view_at, self._error = listing.versions, aliases, started, None
        return listing.versions

    def _forget(self, name: str, version: int) -> None:
        gone = None
        with self._lock:
            if self._view is not None and version in self._view.get(name, {}):
                versions = dict(self._view[name])  # copied, as in _put_version
                gone = versions.pop(version)
                self._view = {**self._view, name: versions}
        if gone is not None:
            self.cache.discard((gone.key, gone.file_id))

    def _list(self, prefix: str) -> Listing:
        """Everything of each name under ``prefix`` (one paginated listing)."""
        listing = Listing()
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            ):
                for obj in page.get("Contents", ()):
                    self._add(obj, listing)
        except ClientError as exc:
            raise self._failure(exc, "listing") from None
        except BotoCoreError as exc:
            raise self._failure(exc, "listing") from None
        return listing

    def _add(self, obj: dict[str, Any], listing: Listing) -> None:
        parts = obj["Key"][len(self.prefix) :].split("/")
        try:
            name = check_name(parts[0])
        except AdapterError:
            return  # not ours: ignore
        if len(parts) == 2 and (match := _VERSION_FILE.fullmatch(parts[1])):
            version = int(match[1])
            listing.versions.setdefault(name, {})[version] = StoredVersion(
                name, version, obj["Size"], obj["LastModified"].timestamp(), (obj["ETag"], obj["Size"])
            )
        elif len(parts) == 3 and parts[1] == CLAIMED and _CLAIM.fullmatch(parts[2]):
            listing.claimed[name] = max(listing.claimed.get(name, 0), int(parts[2]))
        elif len(parts) == 3 and parts[1] == ALIASES and ALIAS_RE.fullmatch(parts[2]):
            listing.alias_etags.setdefault(name, {})[parts[2]] = obj["ETag"]

    # ------------------------------------------------------------------ helpers

    def _key(self, name: str, version: int) -> str:
        return f"{self.prefix}{name}/{version}{SUFFIX}"

    def _claim_key(self, name: str, version: int) -> str:
        return f"{self.prefix}{name}/{CLAIMED}/{version}"

    def _alias_key(self, name: str, alias: str) -> str:
        return f"{self.prefix}{name}/{ALIASES}/{alias}"

    def _failure(self, exc: Exception, doing: str) -> Exception:
        """A client error as the store's error: permanent (misconfigured) or not (unavailable)."""
        where = f"the adapter store {self.location}"
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StoreMisconfigured(
                f"{where}: no AWS credentials found ({exc}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or give the pod a role"
            )
        if isinstance(exc, ClientError):
            code, status = _code(exc), _status(exc)
            if code in _AUTH_CODES or status in (401, 403):
                return StoreMisconfigured(
                    f"{where} refused the credentials {doing} ({code}): check AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY (or the role) and the bucket's policy"
                )
            if code == "NoSuchBucket":
                return StoreMisconfigured(f"{where}: the bucket {self.bucket!r} does not exist")
            if status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout"):
                return StoreUnavailable(
                    f"{where} failed {doing} ({code}); retry shortly", self._retry_after_s
                )
            return StoreMisconfigured(f"{where} refused {doing} ({code}: {exc})")
        return StoreUnavailable(f"{where} did not answer {doing} ({exc}); retry shortly", self._retry_after_s)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
