"""Support packages: one zip of every driver of a driver version, for offline installs.

Object layout in the support-package bucket, under a root (``""`` upstream,
``cpaas/<arch>/`` for CPaaS; DESIGN.md §2 "Support packages"):

- ``<root><version>/support-pkg-<version>-<YYYYmmddHHMMSS>.zip``  immutable, never replaced
- ``<root><version>/support-pkg-<version>-<YYYYmmddHHMMSS>.zip.sha256``  ``sha256sum`` format
- ``<root><version>/latest``  names the newest zip (as the original system wrote it)
- ``<root><version>/support-pkg-<version>-latest.zip`` (+ ``.sha256``)  copy of the newest
- ``<root><version>/metadata.json``  what the newest zip holds, and the driver-set digest
- ``<root>index.html``  every version under the root with its newest package
- ``<root>driver-matrix.json``  kernel -> driver version -> {kmod, ebpf}: where it was built

A zip holds ``kernel-modules/<version>/<basename>`` for each driver object exactly as it is
in the cache (``.ko.gz``, ``.o.gz``, ``.unavail``) plus ``kernel-modules/<version>/LICENSE``
(where the original put it). It is a pure function of the driver set and the license: fixed
entry order and attributes, no compression (the drivers are gzip'd already), so the same
set gives the same bytes, and a retried upload of it is recognised as our own.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import queue
import re
import shutil
import struct
import tempfile
import threading
import urllib.parse
import zlib
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Literal

from drivers.domain.deterministic import HashingWriter
from drivers.domain.kernels import version_tokens
from drivers.domain.names import DRIVER_VERSION_RE, check_driver_version, parse_object_name
from drivers.store.storage import ObjectInfo, ObjectNotFound, ObjectStore, UploadResult

__all__ = [
    "LICENSE_TEXT",
    "DriverSource",
    "PACKAGE_FORMAT",
    "IndexEntry",
    "PackageConflict",
    "ZipInfo",
    "build_zip",
    "driver_matrix",
    "latest_package_name",
    "needs_rebuild",
    "package_name",
    "publish_support_packages",
    "render_index",
    "set_digest",
    "sha256_line",
]

# Bumped when the zip layout changes, so every version is rebuilt once in the new layout.
PACKAGE_FORMAT = 1
TIMESTAMP_FORMAT = "%Y%m%d%H%M%S"
LATEST_POINTER = "latest"
METADATA = "metadata.json"
INDEX = "index.html"
MATRIX = "driver-matrix.json"
# Mutable pointers must not be served stale by caches in front of the bucket.
POINTER_CACHE_CONTROL = "no-cache, max-age=0"

Status = Literal["upstream", "downstream", "unavailable"]

LICENSE_TEXT = """\
Collector kernel drivers

The kernel modules in this package (collector-*.ko.gz) are free software, licensed under
the GNU General Public License, version 2 only (GPL-2.0-only). The eBPF probes
(collector-ebpf-*.o.gz) are dual-licensed under the BSD 2-Clause license and the GNU
General Public License, version 2 (BSD-2-Clause OR GPL-2.0-only). Their sources are
published with the collector project. They come WITHOUT ANY WARRANTY; without even the
implied warranty of MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE.
"""


class PackageConflict(Exception):
    """A timestamped package name already holds other bytes: packages are never replaced."""


# ---------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------


def package_name(driver_version: str, timestamp: datetime | str) -> str:
    """``support-pkg-<version>-<YYYYmmddHHMMSS>.zip``; a str timestamp is used as is."""
    stamp = timestamp if isinstance(timestamp, str) else format_timestamp(timestamp)
    return f"support-pkg-{driver_version}-{stamp}.zip"


def latest_package_name(driver_version: str) -> str:
    return f"support-pkg-{driver_version}-latest.zip"


def format_timestamp(timestamp: datetime) -> str:
    """UTC ``YYYYmmddHHMMSS``; a naive datetime is taken as UTC."""
    if timestamp.tzinfo is not None:
        timestamp = timestamp.astimezone(UTC)
    return timestamp.strftime(TIMESTAMP_FORMAT)


def check_root(root: str) -> str:
    if root and (not root.endswith("/") or root.startswith("/") or "//" in root):
        raise ValueError(f"support-package root {root!r} must be '' or end with one '/'")
    return root


# ---------------------------------------------------------------------------------------
# The zip
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZipInfo:
    """A written support package: its sha256 (hex), size in bytes and number of drivers
    (the LICENSE not counted)."""

    sha256: str
    size: int
    count: int


# Fixed attributes: 1980-01-01 00:00 (the DOS epoch), made by Unix, regular file 0644.
_DOS_TIME, _DOS_DATE = 0, (0 << 9) | (1 << 5) | 1
_MADE_BY_UNIX = 3 << 8
_FILE_MODE = 0o100644 << 16
_UTF8_NAME = 0x800
# Above these, ZIP64 records are needed (module constants so tests can lower them).
_ZIP64_LIMIT = 0xFFFFFFFF
_ZIP_MAX_ENTRIES = 0xFFFF
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_END = struct.Struct("<IHHHHIIH")
_END64 = struct.Struct("<IQHHIIQQQQ")
_END64_LOCATOR = struct.Struct("<IIQI")
_PIPELINE_DEPTH = 8  # entries read ahead of the writer: bounds memory to a few drivers


def _zip_entries(
    driver_version: str, drivers: Iterable[tuple[str, Path | bytes]], license_text: str
) -> list[tuple[str, Path | bytes]]:
    """Entry names in their fixed (sorted) order, each with its content; checks the names."""
    folder = f"kernel-modules/{driver_version}/"
    entries: dict[str, Path | bytes] = {}
    for name, content in drivers:
        version, slash, base = name.rpartition("/")
        if slash and version != driver_version:
            raise ValueError(
                f"driver {name!r} is not of driver version {driver_version}: "
                "a support package holds one driver version"
            )
        entry = parse_object_name(f"{driver_version}/{base}")
        if entry is None or entry.key.driver_version != driver_version:
            raise ValueError(
                f"{name!r} is not a driver object name (collector-<kernel>.ko.gz, "
                "collector-ebpf-<kernel>.o.gz or .collector-ebpf-<kernel>.unavail)"
            )
        if folder + base in entries:
            raise ValueError(f"driver {base!r} is given twice for {driver_version}")
        entries[folder + base] = content
    entries[folder + "LICENSE"] = license_text.encode()
    return sorted(entries.items())


def _read(content: Path | bytes) -> bytes:
    return content if isinstance(content, bytes) else Path(content).read_bytes()


def _local_header(name: bytes, flags: int, crc: int, size: int) -> bytes:
    return _LOCAL.pack(
        0x04034B50, 20, flags, 0, _DOS_TIME, _DOS_DATE, crc, size, size, len(name), 0
    )


def build_zip(
    driver_version: str,
    drivers: Iterable[tuple[str, Path | bytes]],
    out: BinaryIO | Path,
    license_text: str = LICENSE_TEXT,
) -> ZipInfo:
    """Write the support package of ``driver_version`` to ``out`` (a path or a binary file
    object written front to back, never seeked).

    ``drivers`` are ``(name, content)`` pairs: the name is the cache object name
    (``2.3.0/collector-….ko.gz``) or its basename; the content is the object's bytes or a
    file holding them. The output depends only on the set of drivers and the license, not
    on the order given. One driver is in memory at a time (plus a few read ahead), so the
    package size is not bounded by RAM. ZIP_STORED: the drivers are gzip'd already.
    """
    check_driver_version(driver_version)
    entries = _zip_entries(driver_version, drivers, license_text)
    if not isinstance(out, Path):
        return _write_zip(entries, out)
    try:
        with open(out, "wb") as f:
            return _write_zip(entries, f)
    except BaseException:
        out.unlink(missing_ok=True)  # no half-written package left behind
        raise


def _write_zip(entries: list[tuple[str, Path | bytes]], out: BinaryIO) -> ZipInfo:
    # Two stages: this thread reads each driver and computes its CRC-32 (needed in the
    # header, before the data); a second thread hashes and writes. Both hashes release the
    # GIL, so on two cores reading and writing overlap.
    ahead: queue.Queue[tuple[str, bytes, int] | None] = queue.Queue(_PIPELINE_DEPTH)
    writer = HashingWriter(out)
    central: list[bytes] = []
    failure: list[BaseException] = []

    def write_all() -> None:
        try:
            while (item := ahead.get()) is not None:
                name, data, crc = item
                central.append(_write_entry(writer, name, data, crc))
        except BaseException as e:  # reported by the reading thread
            failure.append(e)
            while ahead.get() is not None:  # drain, so the reader never blocks forever
                pass

    thread = threading.Thread(target=write_all, name="zip-writer", daemon=True)
    thread.start()
    try:
        for name, content in entries:
            if failure:
                break
            data = _read(content)
            ahead.put((name, data, zlib.crc32(data)))
    finally:
        ahead.put(None)
        thread.join()
    if failure:
        raise failure[0]
    _write_central_directory(writer, central)
    return ZipInfo(writer.sha256.hexdigest(), writer.offset, len(entries) - 1)


def _write_entry(writer: HashingWriter, name: str, data: bytes, crc: int) -> bytes:
    """Write one local header and its data; return the entry's central-directory record."""
    if len(data) >= 0xFFFFFFFF:  # no ZIP64 sizes: a driver is a few MB at most
        raise ValueError(f"{name}: {len(data)} bytes is too large for a support package entry")
    raw_name = name.encode()
    flags = 0 if raw_name.isascii() else _UTF8_NAME
    offset = writer.offset
    writer.write(_local_header(raw_name, flags, crc, len(data)) + raw_name)
    writer.write(data)
    extra, needed = b"", 20
    if offset >= _ZIP64_LIMIT:  # the header offset moves into a ZIP64 extra field
        extra, needed, offset = struct.pack("<HHQ", 0x0001, 8, offset), 45, 0xFFFFFFFF
    record = _CENTRAL.pack(
        0x02014B50, _MADE_BY_UNIX | needed, needed, flags, 0, _DOS_TIME, _DOS_DATE, crc,
        len(data), len(data), len(raw_name), len(extra), 0, 0, 0, _FILE_MODE, offset,
    )  # fmt: skip
    return record + raw_name + extra


def _write_central_directory(writer: HashingWriter, central: list[bytes]) -> None:
    start = writer.offset
    for record in central:
        writer.write(record)
    size, count = writer.offset - start, len(central)
    if count >= _ZIP_MAX_ENTRIES or size >= _ZIP64_LIMIT or start >= _ZIP64_LIMIT:
        end64 = writer.offset
        writer.write(
            _END64.pack(0x06064B50, 44, _MADE_BY_UNIX | 45, 45, 0, 0, count, count, size, start)
        )
        writer.write(_END64_LOCATOR.pack(0x07064B50, 0, end64, 1))
    # Fields that overflow say "see the ZIP64 record" (all ones), as the format wants.
    count16, size32, start32 = min(count, 0xFFFF), min(size, 0xFFFFFFFF), min(start, 0xFFFFFFFF)
    writer.write(_END.pack(0x06054B50, 0, 0, count16, count16, size32, start32, 0))


def sha256_line(sha256: str, filename: str) -> str:
    """A ``.sha256`` file's content, as ``sha256sum`` writes it (``sha256sum -c`` reads it)."""
    return f"{sha256}  {filename}\n"


# ---------------------------------------------------------------------------------------
# Has the driver set changed?
# ---------------------------------------------------------------------------------------


def set_digest(drivers: Iterable[tuple[str, str]]) -> str:
    """sha256 (hex) over a driver set: ``(basename, content checksum)`` pairs in any order.

    The checksum is whatever fingerprints the content without reading it (here the md5
    a cache listing carries); names are taken relative to the driver version, so the same
    drivers give the same digest whichever cache or prefix they come from.
    """
    h = hashlib.sha256()
    seen: set[str] = set()
    for name, checksum in sorted(drivers):
        base = name.rpartition("/")[2]
        if base in seen:
            raise ValueError(f"driver {base!r} appears twice in one driver set")
        seen.add(base)
        h.update(f"{base}\t{checksum}\n".encode())
    return h.hexdigest()


def needs_rebuild(
    previous_metadata: Mapping[str, object] | None,
    digest: str,
    license_sha256: str | None = None,
) -> bool:
    """Whether a driver version needs a new package, given its current ``metadata.json``
    (None when there is none) and the digest of its current driver set."""
    if not previous_metadata:
        return True
    license_changed = license_sha256 not in (None, previous_metadata.get("license_sha256"))
    return (
        previous_metadata.get("format") != PACKAGE_FORMAT
        or previous_metadata.get("driver_set_digest") != digest
        or license_changed
    )


def _fingerprint(info: ObjectInfo) -> str:
    # The cache is never overwritten, so the md5 (or crc32c on composite objects, which
    # have no md5) identifies an object's bytes without downloading them.
    if info.md5:
        return f"md5:{info.md5}"
    if info.crc32c:
        return f"crc32c:{info.crc32c}"
    return f"generation:{info.generation}"


# ---------------------------------------------------------------------------------------
# index.html and driver-matrix.json
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexEntry:
    driver_version: str
    package: str  # file name of the newest zip, inside <root><version>/
    size: int
    sha256: str
    timestamp: str  # YYYYmmddHHMMSS, UTC


def version_order(driver_version: str) -> tuple:
    """Sort key: sha256-fingerprint versions (the oldest scheme) first, then semver, with
    ``-rcN`` before its release."""
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(?:-rc(\d+))?", driver_version)
    if m is None:
        return (0, driver_version)
    major, minor, patch, rc = m.groups()
    return (1, int(major), int(minor), int(patch), rc is None, int(rc or 0))


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def render_index(entries: Iterable[IndexEntry], title: str = "Collector support packages") -> str:
    """A static listing, newest driver version first; every name is escaped."""
    rows = []
    for e in sorted(entries, key=lambda e: version_order(e.driver_version), reverse=True):
        folder = urllib.parse.quote(f"{e.driver_version}/")
        try:
            date = datetime.strptime(e.timestamp, TIMESTAMP_FORMAT).strftime("%Y-%m-%d %H:%M:%S")
        except ValueError:
            date = e.timestamp
        latest = latest_package_name(e.driver_version)
        rows.append(
            "<tr>"
            f"<td>{html.escape(e.driver_version)}</td>"
            f'<td><a href="{html.escape(folder + urllib.parse.quote(e.package))}">'
            f"{html.escape(e.package)}</a>"
            f' (<a href="{html.escape(folder + urllib.parse.quote(latest))}">latest</a>)</td>'
            f'<td title="{e.size} bytes">{html.escape(_human_size(e.size))}</td>'
            f"<td><code>{html.escape(e.sha256)}</code></td>"
            f"<td>{html.escape(date)} UTC</td>"
            "</tr>"
        )
    body = "\n".join(rows) or '<tr><td colspan="5">No support packages yet.</td></tr>'
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 12px;text-align:left}"
        "code{font-size:smaller}</style></head>\n"
        f"<body><h1>{html.escape(title)}</h1>\n"
        "<p>One package per driver version, holding every driver built for it; "
        "<code>.sha256</code> files sit beside each zip.</p>\n"
        "<table><thead><tr><th>Driver version</th><th>Package</th><th>Size</th>"
        "<th>SHA-256</th><th>Built</th></tr></thead>\n<tbody>\n"
        f"{body}\n</tbody></table></body></html>\n"
    )


def driver_matrix(
    upstream: Iterable[str] = (), downstream: Iterable[str] = ()
) -> dict[str, dict[str, dict[str, Status]]]:
    """kernel -> driver version -> {"kmod", "ebpf"} -> where the driver came from.

    Arguments are driver object names relative to their cache root. A ``.unavail`` marker
    gives "unavailable"; a built object beats a marker within one set; the downstream set
    overrides the upstream one, as in the original's matrix script. Other names are ignored.
    """
    found: dict[tuple[str, str, str], Status] = {}
    for names, status in ((upstream, "upstream"), (downstream, "downstream")):
        this_set: dict[tuple[str, str, str], Status] = {}
        for name in names:
            entry = parse_object_name(name)
            if entry is None:
                continue
            kernel, version, kind = entry.key
            key = (kernel, version, "kmod" if kind == "mod" else "ebpf")
            if entry.unavailable:
                this_set.setdefault(key, "unavailable")
            else:
                this_set[key] = status
        found.update(this_set)
    matrix: dict[str, dict[str, dict[str, Status]]] = {}
    for kernel, version, kind in sorted(found, key=_matrix_order):
        matrix.setdefault(kernel, {}).setdefault(version, {})[kind] = found[kernel, version, kind]
    return matrix


def _matrix_order(key: tuple[str, str, str]) -> tuple:
    kernel, version, kind = key
    return (version_tokens(kernel), kernel, version_order(version), kind != "kmod")


# ---------------------------------------------------------------------------------------
# Publishing
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriverSource:
    """A driver cache a support package takes drivers from: its store, the prefix the
    cache lives under there (``cpaas/<arch>/`` for a CPaaS cache) and which cache it is,
    the driver matrix's ``upstream`` or ``downstream``."""

    store: ObjectStore
    prefix: str = ""
    origin: Literal["upstream", "downstream"] = "upstream"


@dataclass(frozen=True)
class _Driver:
    base: str  # object basename, the entry name inside kernel-modules/<version>/
    info: ObjectInfo
    source: DriverSource


def _group_by_version(infos: Iterable[ObjectInfo], prefix: str) -> dict[str, list[ObjectInfo]]:
    versions: dict[str, list[ObjectInfo]] = {}
    for info in infos:
        entry = parse_object_name(info.name[len(prefix) :])
        if entry is not None:
            versions.setdefault(entry.key.driver_version, []).append(info)
    return versions


def publish_support_packages(
    sources: Iterable[DriverSource],
    support_store: ObjectStore,
    versions: Iterable[str],
    *,
    timestamp: datetime,
    root: str = "",
    license_text: str = LICENSE_TEXT,
    work_dir: Path | str | None = None,
    workers: int = 16,
) -> dict[str, object]:
    """Build and publish the support package of each driver version whose driver set
    changed; rewrite ``index.html`` and ``driver-matrix.json`` under ``root``.

    The package of a version holds its drivers from every source; where an upstream and
    a downstream source both have a driver, the downstream one is packaged (as in the
    original CPaaS flow; between two sources of the same origin, the later one). Each
    source is listed once. Returns a JSON-able report.
    """
    check_root(root)
    versions = [check_driver_version(v) for v in dict.fromkeys(versions)]
    stamp = format_timestamp(timestamp)
    license_sha256 = hashlib.sha256(license_text.encode()).hexdigest()
    # upstream first: what a later source has replaces it (sorted() is stable)
    ordered = sorted(sources, key=lambda source: source.origin == "downstream")
    if not ordered:
        raise ValueError("no driver source: give at least one driver cache to package")
    listings = [(source, list(source.store.list(prefix=source.prefix))) for source in ordered]

    by_version: dict[str, dict[str, _Driver]] = {}
    for source, infos in listings:
        for version, objs in _group_by_version(infos, source.prefix).items():
            drivers = by_version.setdefault(version, {})
            for info in objs:
                base = info.name.rpartition("/")[2]
                drivers[base] = _Driver(base, info, source)

    report_versions: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="support-packages-", dir=work_dir) as tmp:
        for version in versions:
            drivers = sorted(by_version.get(version, {}).values(), key=lambda d: d.base)
            folder = f"{root}{version}/"
            if not drivers:
                report_versions[version] = {"status": "no-drivers"}
                continue
            digest = set_digest((d.base, _fingerprint(d.info)) for d in drivers)
            previous = _read_json(support_store, folder + METADATA)
            if not needs_rebuild(previous, digest, license_sha256):
                report_versions[version] = {
                    "status": "unchanged",
                    **{k: previous[k] for k in ("package", "sha256", "size", "drivers")},
                }
                continue
            metadata = _build_and_upload(
                support_store, folder, version, drivers, stamp, license_text, Path(tmp), workers
            )
            metadata.update(driver_set_digest=digest, license_sha256=license_sha256)
            # metadata.json goes last: when it names a package, the package, its checksum
            # and the pointers are all in place.
            support_store.put(
                folder + METADATA, _json_bytes(metadata), "application/json", POINTER_CACHE_CONTROL
            )
            report_versions[version] = {
                "status": "built",
                **{k: metadata[k] for k in ("package", "sha256", "size", "drivers")},
            }

    index_entries = _index_entries(support_store, root)
    title = "Collector support packages" + (f" ({root.rstrip('/')})" if root else "")
    support_store.put(
        root + INDEX,
        render_index(index_entries, title).encode(),
        "text/html",
        POINTER_CACHE_CONTROL,
    )
    names: dict[str, list[str]] = {"upstream": [], "downstream": []}
    for source, infos in listings:
        names[source.origin] += (i.name[len(source.prefix) :] for i in infos)
    matrix = driver_matrix(names["upstream"], names["downstream"])
    support_store.put(root + MATRIX, _json_bytes(matrix), "application/json", POINTER_CACHE_CONTROL)

    statuses = [v["status"] for v in report_versions.values()]
    return {
        "root": root,
        "timestamp": stamp,
        "versions": report_versions,
        "built": statuses.count("built"),
        "unchanged": statuses.count("unchanged"),
        "no_drivers": statuses.count("no-drivers"),
        "index": f"gs://{support_store.bucket_name}/{root}{INDEX}",
        "matrix": f"gs://{support_store.bucket_name}/{root}{MATRIX}",
        "matrix_kernels": len(matrix),
    }


def _build_and_upload(
    support_store: ObjectStore,
    folder: str,
    version: str,
    drivers: list[_Driver],
    stamp: str,
    license_text: str,
    tmp: Path,
    workers: int,
) -> dict[str, object]:
    """Download one version's drivers, write its zip, upload zip, checksum and pointers."""
    work = Path(tempfile.mkdtemp(prefix=f"{version}-", dir=tmp))
    try:
        paths: dict[str, Path] = {}
        stores = {id(d.source.store): d.source.store for d in drivers}.values()
        for n, store in enumerate(stores):
            names = [d.info.name for d in drivers if d.source.store is store]
            got = store.download_many(names, work / f"from-{n}", workers=workers)
            paths.update({name.rpartition("/")[2]: path for name, path in got.items()})
        zip_name = package_name(version, stamp)
        zip_path = work / zip_name
        info = build_zip(version, paths.items(), zip_path, license_text)

        for name, result in (
            (folder + zip_name, support_store.upload_new_file(folder + zip_name, zip_path)),
            (
                folder + zip_name + ".sha256",
                support_store.upload_new(
                    folder + zip_name + ".sha256", sha256_line(info.sha256, zip_name).encode()
                ),
            ),
        ):
            if result is UploadResult.DIFFERENT:
                raise PackageConflict(
                    f"gs://{support_store.bucket_name}/{name} already exists with other bytes: "
                    "a published package is never replaced; publish with a new timestamp"
                )

        # The pointers below are the only objects ever replaced (plain, overwriting
        # uploads): they must follow the newest package. Everything else is upload_new.
        latest_zip = latest_package_name(version)
        support_store.copy(folder + zip_name, folder + latest_zip, POINTER_CACHE_CONTROL)
        latest_sha = sha256_line(info.sha256, latest_zip).encode()
        support_store.put(
            folder + latest_zip + ".sha256", latest_sha, "text/plain", POINTER_CACHE_CONTROL
        )
        support_store.put(
            folder + LATEST_POINTER, f"{zip_name}\n".encode(), "text/plain", POINTER_CACHE_CONTROL
        )
    finally:
        shutil.rmtree(work)  # disk holds one version's drivers and zip at a time

    counts = {"mod": 0, "bpf": 0, "bpf_unavailable": 0, "downstream": 0}
    for d in drivers:
        entry = parse_object_name(f"{version}/{d.base}")
        assert entry is not None  # grouped by parse_object_name already
        kind = "bpf_unavailable" if entry.unavailable else entry.key.kind
        counts[kind] += 1
        counts["downstream"] += d.source.origin == "downstream"
    return {
        "format": PACKAGE_FORMAT,
        "driver_version": version,
        "timestamp": stamp,
        "package": zip_name,
        "latest": latest_package_name(version),
        "size": info.size,
        "sha256": info.sha256,
        "drivers": counts,
    }


def _index_entries(store: ObjectStore, root: str) -> list[IndexEntry]:
    """One entry per ``<root><version>/``: from its metadata.json, else (packages made by
    the original system) from its ``latest`` pointer and that zip's ``.sha256``."""
    folders: dict[str, dict[str, ObjectInfo]] = {}
    for info in store.list(prefix=root):
        version, slash, base = info.name[len(root) :].partition("/")
        if slash and "/" not in base and DRIVER_VERSION_RE.fullmatch(version):
            folders.setdefault(version, {})[base] = info

    def entry(version: str) -> IndexEntry | None:
        objects, folder = folders[version], f"{root}{version}/"
        if METADATA in objects:
            meta = _read_json(store, folder + METADATA) or {}
            if meta.get("package") in objects:
                return IndexEntry(
                    version, meta["package"], meta["size"], meta["sha256"], meta["timestamp"]
                )
        if LATEST_POINTER not in objects:
            return None
        package = store.download(folder + LATEST_POINTER).decode().strip()
        if package not in objects:
            return None
        sha256 = ""
        if package + ".sha256" in objects:
            sha256 = store.download(folder + package + ".sha256").decode().split(" ", 1)[0]
        m = re.search(r"-(\d{14})\.zip$", package)
        stamp = m.group(1) if m else format_timestamp(objects[package].created)
        return IndexEntry(version, package, objects[package].size, sha256, stamp)

    with ThreadPoolExecutor(8, thread_name_prefix="index") as pool:
        return [e for e in pool.map(entry, sorted(folders)) if e is not None]


# ---------------------------------------------------------------------------------------
# Storage helpers storage.py does not have (yet): overwriting writes, for pointers only
# ---------------------------------------------------------------------------------------


def _read_json(store: ObjectStore, name: str) -> dict | None:
    try:
        return json.loads(store.download(name))
    except ObjectNotFound:
        return None


def _json_bytes(value: object) -> bytes:
    return (json.dumps(value, indent=1, sort_keys=False) + "\n").encode()


def iter_driver_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """``(basename, path)`` for the driver files of a local ``kernel-modules/<version>/``
    style folder (what `drivers package` and the benchmark feed to :func:`build_zip`)."""
    for entry in os.scandir(folder):
        if entry.is_file() and parse_object_name(f"0.0.0/{entry.name}") is not None:
            yield entry.name, Path(entry.path)
