"""Object storage adapter over a ``google.cloud.storage.Client``.

No Airflow here: Airflow tasks pass ``GCSHook(gcp_conn_id=...).get_conn()``, the CLI and
builder pods call :func:`client_from_environment`. The same code runs against GCS and
against the embedded fake-gcs-server (see :mod:`drivers.store.emulator`).
"""

from __future__ import annotations

import base64
import enum
import fnmatch
import hashlib
import json
import mimetypes
import os
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import google_crc32c
import requests
from google.api_core.exceptions import NotFound, PreconditionFailed
from google.auth.credentials import AnonymousCredentials
from google.auth.exceptions import DefaultCredentialsError
from google.cloud import storage

from drivers.domain.errors import DriversError
from drivers.domain.layout import ROLES, Buckets, bucket_env_var

EMULATOR_PROJECT = "embedded"
# Only what ObjectInfo needs: a full object resource is ~10x larger (ACLs, links, ...).
LIST_FIELDS = "items(name,size,generation,crc32c,md5Hash,timeCreated),nextPageToken"
# GCS returns at most 1,000 items per page whatever we ask, so asking for more costs nothing
# there. fake-gcs-server honours any size but walks the whole bucket for every page, so on a
# 100,000-object bucket pages of 1,000 take ~290 s, pages of 20,000 ~17 s with ~250 MB peak
# client memory (the emulator ignores `fields`); see bench/results_listing.md.
PAGE_SIZE = 20_000
_CHUNK = 1 << 20
RESUMABLE_THRESHOLD = 8 << 20  # google-cloud-storage uploads bigger files resumably


class StorageError(DriversError):
    """Base of the errors this module raises on purpose."""


class BucketNotFound(StorageError):
    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        roles = [r for r in ROLES if getattr(Buckets.from_env(), r) == bucket]
        setting = bucket_env_var(roles[0]) if roles else bucket_env_var("<role>")
        where = os.environ.get("STORAGE_EMULATOR_HOST")
        super().__init__(
            f"bucket {bucket!r} does not exist"
            + (f" on the emulator at {where}" if where else "")
            + f": create it, or check {setting} names the bucket you meant"
        )


class ObjectNotFound(StorageError):
    def __init__(self, bucket: str, name: str) -> None:
        self.bucket, self.name = bucket, name
        super().__init__(f"object gs://{bucket}/{name} does not exist")


def client_from_environment() -> storage.Client:
    """A client for the CLI and builder pods: the emulator when STORAGE_EMULATOR_HOST is set
    (the library reads that variable for the endpoint), else ambient credentials."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return storage.Client(credentials=AnonymousCredentials(), project=EMULATOR_PROJECT)
    try:
        return storage.Client()
    except DefaultCredentialsError:
        raise StorageError(
            "no Google credentials found: for the embedded GCS run `make gcs-up` and "
            "export STORAGE_EMULATOR_HOST=http://127.0.0.1:4443; for GCS set up "
            "Application Default Credentials (gcloud auth application-default login)"
        ) from None


def parse_gs_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/some/prefix`` -> ``("bucket", "some/prefix")``; the prefix may be ''."""
    bucket, _, prefix = uri.removeprefix("gs://").partition("/")
    if not uri.startswith("gs://") or not bucket or any(c.isspace() for c in bucket):
        raise ValueError(f"not a gs:// URI: {uri!r} (expected gs://<bucket>[/<prefix>])")
    return bucket, prefix


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int
    generation: int
    crc32c: str | None  # base64, as GCS gives it
    md5: str | None  # base64; absent on composite objects
    created: datetime

    @classmethod
    def from_blob(cls, blob: storage.Blob) -> ObjectInfo:
        return cls(
            name=blob.name,
            size=blob.size,
            generation=blob.generation,
            crc32c=blob.crc32c,
            md5=blob.md5_hash,
            created=blob.time_created,
        )


class UploadResult(enum.Enum):
    CREATED = "created"
    IDENTICAL = "identical"  # already there with our bytes: also a retry whose first try landed
    DIFFERENT = "different"  # other bytes are published under that name: left untouched


class ObjectStore:
    """One bucket. Thread-safe for the parallel transfers below (one shared client)."""

    def __init__(self, client: storage.Client, bucket: str, page_size: int = PAGE_SIZE) -> None:
        self.client = client
        self.bucket_name = bucket
        self.page_size = page_size
        self.requests_made = 0  # listing pages fetched, for benchmarks and logs
        self._bucket = client.bucket(bucket)
        self._bucket_seen = False

    def __repr__(self) -> str:
        return f"ObjectStore(gs://{self.bucket_name})"

    # --- listing -------------------------------------------------------------------------

    def list(self, prefix: str = "", glob: str | None = None) -> Iterator[ObjectInfo]:
        """Every object under ``prefix`` in one paged listing, with sizes and checksums.

        ``glob`` is matched (fnmatch: ``*`` also crosses ``/``) against the full name on
        our side: the emulator ignores ``matchGlob`` and GCS's glob dialect differs, so
        filtering here gives the same answer everywhere.
        """
        pages = self.client.list_blobs(
            self.bucket_name, prefix=prefix or None, fields=LIST_FIELDS, page_size=self.page_size
        ).pages
        while True:
            try:
                page = next(pages)
            except StopIteration:
                return
            except NotFound as e:
                raise BucketNotFound(self.bucket_name) from e
            self.requests_made += 1
            for blob in page:
                if glob is None or fnmatch.fnmatchcase(blob.name, glob):
                    yield ObjectInfo.from_blob(blob)

    # --- single objects ------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        if self._bucket.blob(name).exists():
            return True
        self._require_bucket()  # a wrong bucket must not read as "nothing built yet"
        return False

    def info(self, name: str) -> ObjectInfo:
        blob = self._bucket.get_blob(name)
        if blob is None:
            self._require_bucket()
            raise ObjectNotFound(self.bucket_name, name)
        return ObjectInfo.from_blob(blob)

    def download(self, name: str) -> bytes:
        try:
            # raw: the stored bytes, never transcoded; the client checks their checksum.
            return self._bucket.blob(name).download_as_bytes(raw_download=True)
        except NotFound as e:
            self._require_bucket()
            raise ObjectNotFound(self.bucket_name, name) from e

    def download_to(self, name: str, path: Path | str) -> Path:
        """Download into ``path`` via a temporary file, so a half-written file never
        appears under the final name."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                self._bucket.blob(name).download_to_file(f, raw_download=True)
            os.replace(tmp, path)
        except NotFound as e:
            self._require_bucket()
            raise ObjectNotFound(self.bucket_name, name) from e
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def upload_new(self, name: str, data: bytes) -> UploadResult:
        """Create ``name`` unless it exists; never overwrite (published drivers are final)."""
        blob = self._bucket.blob(name)
        try:
            blob.upload_from_string(data, content_type=_content_type(name), if_generation_match=0)
            return UploadResult.CREATED
        except PreconditionFailed:
            return self._compare(name, _digests([data]))
        except NotFound as e:
            raise BucketNotFound(self.bucket_name) from e

    def upload_new_file(self, name: str, path: Path | str) -> UploadResult:
        """``upload_new`` for a file."""
        with open(path, "rb") as f:
            return self.upload_new_stream(name, f, os.path.getsize(path))

    def upload_new_stream(self, name: str, f: BinaryIO, size: int) -> UploadResult:
        """``upload_new`` for ``size`` bytes read from ``f`` (seekable, at its start).
        Over 8 MiB they go up as a resumable upload, where fake-gcs-server ignores
        ``ifGenerationMatch=0`` (fsouza/fake-gcs-server#1967) and would overwrite: on the
        emulator we look first (GCS honours the precondition)."""
        start = f.tell()

        def digests() -> tuple[int, str, str]:
            f.seek(start)
            return _digests(iter(lambda: f.read(_CHUNK), b""))

        if (
            os.environ.get("STORAGE_EMULATOR_HOST")
            and size > RESUMABLE_THRESHOLD
            and self.exists(name)
        ):
            return self._compare(name, digests())
        blob = self._bucket.blob(name)
        try:
            blob.upload_from_file(
                f, size=size, content_type=_content_type(name), if_generation_match=0
            )
            return UploadResult.CREATED
        except PreconditionFailed:
            return self._compare(name, digests())
        except NotFound as e:
            raise BucketNotFound(self.bucket_name) from e

    def open_read(self, name: str, chunk_size: int = 32 << 20) -> BinaryIO:
        """A streaming reader of ``name`` (ranged requests of ``chunk_size``): big objects
        are read without holding them in memory or on disk."""
        blob = self._bucket.blob(name)
        try:
            blob.reload()
        except NotFound as e:
            self._require_bucket()
            raise ObjectNotFound(self.bucket_name, name) from e
        return blob.open("rb", chunk_size=chunk_size, raw_download=True)

    def put(
        self,
        name: str,
        data: bytes,
        content_type: str | None = None,
        cache_control: str | None = None,
    ) -> None:
        """Create or REPLACE ``name``. Only for mutable documents the pipeline owns (plans,
        reports, run state, support-package pointers); never for drivers."""
        blob = self._bucket.blob(name)
        blob.cache_control = cache_control
        try:
            blob.upload_from_string(data, content_type=content_type or _content_type(name))
        except NotFound as e:
            raise BucketNotFound(self.bucket_name) from e

    def download_with_generation(self, name: str) -> tuple[bytes, int]:
        """``download`` plus the generation of the bytes read, from the same response (one
        request): what a later ``put_if_generation`` compares against."""
        blob = self._bucket.blob(name)
        try:
            data = blob.download_as_bytes(raw_download=True)
        except NotFound as e:
            self._require_bucket()
            raise ObjectNotFound(self.bucket_name, name) from e
        if blob.generation is None:  # a condition on None would be no condition at all
            raise StorageError(f"gs://{self.bucket_name}/{name}: no generation in the response")
        return data, blob.generation

    def put_if_generation(
        self, name: str, data: bytes, generation: int, content_type: str | None = None
    ) -> int | None:
        """``put``, only while ``name`` is still at ``generation`` (0: still absent), so
        an edit never silently replaces someone else's. The new generation, or None when
        the object changed since it was read (nothing written)."""
        blob = self._bucket.blob(name)
        try:
            blob.upload_from_string(
                data,
                content_type=content_type or _content_type(name),
                if_generation_match=generation,
            )
        except PreconditionFailed:
            return None
        except NotFound as e:
            raise BucketNotFound(self.bucket_name) from e
        return blob.generation

    def copy(self, source: str, dest: str, cache_control: str | None = None) -> None:
        """Server-side copy over ``dest`` (replacing it): no second upload of big objects.
        rewrite() loops with a token, which large objects need on real GCS."""
        target = self._bucket.blob(dest)
        target.cache_control = cache_control
        target.content_type = _content_type(dest)
        try:
            token, _, _ = target.rewrite(self._bucket.blob(source))
            while token is not None:
                token, _, _ = target.rewrite(self._bucket.blob(source), token=token)
        except NotFound as e:
            self._require_bucket()
            raise ObjectNotFound(self.bucket_name, source) from e

    def delete_generation(self, name: str, generation: int) -> bool:
        """Delete ``name`` only if it still is ``generation``; False when it changed or is
        gone. GCS checks the precondition itself; fake-gcs-server ignores it on delete, so
        look first as well. Of a driver cache, only ``drivers withdraw`` deletes, with this."""
        blob = self._bucket.get_blob(name)
        if blob is None or blob.generation != generation:
            return False
        try:
            blob.delete(if_generation_match=generation)
        except (PreconditionFailed, NotFound):
            return False
        return True

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix`` (a run's staging); returns how many."""
        if not prefix.endswith("/"):
            raise ValueError(f"refusing to delete under {prefix!r}: a prefix must end with '/'")
        names = [info.name for info in self.list(prefix)]
        for name in names:
            try:
                self._bucket.blob(name).delete()
            except NotFound:
                pass  # already gone: a retried cleanup
        return len(names)

    # --- parallel transfers --------------------------------------------------------------

    def upload_many(
        self, items: Iterable[tuple[str, bytes | Path]], workers: int = 16
    ) -> dict[str, UploadResult]:
        """``upload_new``/``upload_new_file`` for each item; the first error is raised
        once the others finished (a retry then sees IDENTICAL for what landed)."""

        def one(item: tuple[str, bytes | Path]) -> tuple[str, UploadResult]:
            name, data = item
            if isinstance(data, bytes):
                return name, self.upload_new(name, data)
            return name, self.upload_new_file(name, data)

        self.widen_connection_pool(workers)
        with ThreadPoolExecutor(workers, thread_name_prefix="upload") as pool:
            return dict(pool.map(one, items))

    def download_many(
        self, names: Iterable[str], dest_dir: Path | str, workers: int = 16
    ) -> dict[str, Path]:
        """Download each object to ``dest_dir/<name>`` (the object's prefixes become
        directories)."""
        dest_dir = Path(dest_dir).resolve()

        def one(name: str) -> tuple[str, Path]:
            path = (dest_dir / name).resolve()
            if not path.is_relative_to(dest_dir):
                raise ValueError(f"object name {name!r} would be written outside {dest_dir}")
            return name, self.download_to(name, path)

        self.widen_connection_pool(workers)
        with ThreadPoolExecutor(workers, thread_name_prefix="download") as pool:
            return dict(pool.map(one, names))

    # --- helpers -------------------------------------------------------------------------

    def _compare(self, name: str, digests: tuple[int, str, str]) -> UploadResult:
        size, md5, crc32c = digests
        existing = self.info(name)
        known = [
            (have, ours) for have, ours in ((existing.md5, md5), (existing.crc32c, crc32c)) if have
        ]
        same = existing.size == size and bool(known) and all(h == o for h, o in known)
        return UploadResult.IDENTICAL if same else UploadResult.DIFFERENT

    def _require_bucket(self) -> None:
        """Turn a 404 into the right error: a missing bucket is a configuration problem."""
        if not self._bucket_seen:
            if not self._bucket.exists():
                raise BucketNotFound(self.bucket_name)
            self._bucket_seen = True

    def widen_connection_pool(self, workers: int) -> None:
        # requests keeps 10 connections per host: more threads than that would open and
        # drop a connection per request ("Connection pool is full" warnings).
        session = self.client._http
        if isinstance(session, requests.Session) and workers > getattr(
            session, "_drivers_pool", 10
        ):
            adapter = requests.adapters.HTTPAdapter(pool_maxsize=workers)
            session.mount("https://", adapter)
            session.mount("http://", adapter)
            session._drivers_pool = workers


def _digests(chunks: Iterable[bytes]) -> tuple[int, str, str]:
    """(size, base64 md5, base64 crc32c), the forms GCS reports."""
    md5, crc, size = hashlib.md5(usedforsecurity=False), google_crc32c.Checksum(), 0
    for chunk in chunks:
        md5.update(chunk)
        crc.update(chunk)
        size += len(chunk)
    return size, base64.b64encode(md5.digest()).decode(), base64.b64encode(crc.digest()).decode()


def _content_type(name: str) -> str:
    # Never set Content-Encoding: GCS would then gunzip .gz drivers on download.
    kind, encoding = mimetypes.guess_type(name)
    if encoding == "gzip":
        return "application/gzip"
    if name.endswith((".sha256", "/latest", ".log")):
        return "text/plain"
    return kind or "application/octet-stream"


@dataclass
class Stores:
    """One ObjectStore per bucket role (``layout.ROLES``), over one client."""

    client: storage.Client
    buckets: Buckets = field(default_factory=Buckets.from_env)
    bundles: ObjectStore = field(init=False)
    kernel_images: ObjectStore = field(init=False)
    sources: ObjectStore = field(init=False)
    drivers: ObjectStore = field(init=False)
    cpaas_drivers: ObjectStore = field(init=False)
    work: ObjectStore = field(init=False)
    support: ObjectStore = field(init=False)

    def __post_init__(self) -> None:
        for role in ROLES:
            setattr(self, role, ObjectStore(self.client, getattr(self.buckets, role)))


def read_json(store: ObjectStore, name: str) -> Any:
    return json.loads(store.download(name))


def write_json(store: ObjectStore, name: str, value: Any) -> str:
    """Write (or replace) a small JSON document; returns its gs:// URI."""
    store.put(name, json.dumps(value, indent=1, sort_keys=True).encode(), "application/json")
    return f"gs://{store.bucket_name}/{name}"
