"""``drivers build-shard``: build one shard's drivers. The only thing a builder image runs,
with the same arguments under every runtime (local subprocess, Kubernetes pod, Docker).

A shard (JSON, written by the DAG's pre-build under the run's staging prefix)::

    {"run_id": "...", "builder": "fc36", "index": 3, "cost": 412.0,
     "buckets": {"bundles": "...", "sources": "...", "work": "..."},
     "tasks": [["6.1.0-47-amd64", "2.3.0", "mod"], ...]}        # grouped by kernel

One bundle is on disk at a time: per kernel, download ``bundle-<kernel>.tgz``, extract it
safely, build every task of that kernel, delete it. Driver sources are fetched once per
version per shard. Both kinds build with kbuild, ``make -C <BUNDLE_BUILD_DIR> M=<dir>
modules``, in a fresh copy of the folder the sources' ``build.json`` names for the kind,
which also names the output (driver_sources/README.md); the module is then stripped of
debug info and its vermagic checked, the probe stripped of DWARF (its BTF stays). Kernels
that cannot run eBPF get the empty ``.unavail`` marker without any bundle.

Outputs in the work bucket (names from :mod:`drivers.domain.layout`): staged drivers, a log per
failed task, and the results (JSON lines: one ``task`` record per task, then one ``shard``
record). Exit status: 0 when the shard ran through (compile failures are data), 65 when
some input is bad and a retry cannot help (malformed shard, missing or corrupt bundle or
sources, missing bucket), 75 when storage was unreachable or another transient error
stopped it (retry), 70 on a bug in this program.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import gzip
import hashlib
import io
import json
import os
import queue
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from drivers.build.sources import read_build_spec
from drivers.domain import layout
from drivers.domain.kernels import KernelParseError, ebpf_supported, parse_kernel
from drivers.domain.names import KINDS, DriverKey, DriverVersionError, check_driver_version
from drivers.domain.verify import read_vermagic, verify_driver, vermagic_matches
from drivers.store import ledger

EX_OK = 0
EX_DATAERR = 65  # bad input (shard, bundle, sources, bucket): do not retry
EX_SOFTWARE = 70  # a bug here
EX_TEMPFAIL = 75  # storage unreachable, disk full, pod stopped: retry

LOG_LIMIT = 64 * 1024  # a failed task's log keeps the tail of the compile output
BUILD_TIMEOUT_S = 900  # per make run; a hung compile must not hold a builder forever
# Bounds for an extracted archive: a Debian 6.1 bundle is ~45 MB in ~10,000 files.
MAX_EXTRACTED_BYTES = 4 << 30
MAX_MEMBERS = 500_000
BUNDLE_FILES = ("UNAME", "BUILD_DIR", "DISTRO", "VERSION", "MAJOR", "MINOR", "CHECKSUM")
WORKDIR_IN_LOGS = "$WORKDIR"
# The shard record's split of its time (the rest is start-up and the results upload).
TIMINGS = ("fetch_s", "extract_s", "build_s", "upload_s", "cleanup_s")
# The shard object's name, used to find where results go when the shard file is unreadable.
_SHARD_NAME_RE = re.compile(
    r"staging/(?P<run_id>[^/]+)/shards/(?P<builder>[^/]+)-(?P<index>\d+)\.json$"
)


# --- the shard file ----------------------------------------------------------------------


_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "an integer",
               (int, float): "a number"}  # fmt: skip


class ShardFormatError(ValueError):
    """The shard file is not what pre-build writes; the message names the culprit."""


@dataclasses.dataclass(frozen=True)
class Shard:
    run_id: str
    builder: str
    index: int
    cost: float
    bundles: str  # bucket names
    sources: str
    work: str
    tasks: tuple[DriverKey, ...]

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Shard:
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ShardFormatError(f"{where}: not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ShardFormatError(f"{where}: expected a JSON object, got {type(doc).__name__}")

        def field(name: str, kind: type | tuple[type, ...], within: dict = doc) -> Any:
            value = within.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                what = _JSON_TYPES.get(kind, str(kind))
                raise ShardFormatError(f"{where}: field {name!r} must be {what}, got {value!r}")
            return value

        buckets = field("buckets", dict)
        names = {}
        for role in ("bundles", "sources", "work"):
            value = field(role, str, buckets).removeprefix("gs://").rstrip("/")
            if not value or "/" in value:
                raise ShardFormatError(f"{where}: buckets.{role} {value!r} is not a bucket name")
            names[role] = value
        tasks, seen = [], set()
        for n, task in enumerate(field("tasks", list)):
            if not (
                isinstance(task, list) and len(task) == 3 and all(isinstance(t, str) for t in task)
            ):
                raise ShardFormatError(
                    f"{where}: tasks[{n}] must be [kernel, driver_version, kind], got {task!r}"
                )
            kernel, version, kind = task
            try:
                parse_kernel(kernel)
                check_driver_version(version)
            except (KernelParseError, DriverVersionError) as e:
                raise ShardFormatError(f"{where}: tasks[{n}]: {e}") from None
            if kind not in KINDS:
                raise ShardFormatError(f"{where}: tasks[{n}]: kind {kind!r} is not mod or bpf")
            key = DriverKey(kernel, version, kind)
            if key not in seen:  # a repeated task is built once
                seen.add(key)
                tasks.append(key)
        run_id, builder = field("run_id", str), field("builder", str)
        for name, value in (("run_id", run_id), ("builder", builder)):
            if not value or "/" in value:
                raise ShardFormatError(f"{where}: {name} {value!r} must be non-empty, without '/'")
        index = field("index", int)
        if index < 0:
            raise ShardFormatError(f"{where}: field 'index' must not be negative, got {index}")
        return cls(
            run_id=run_id,
            builder=builder,
            index=index,
            cost=float(field("cost", (int, float))),
            tasks=tuple(tasks),
            **names,
        )

    def by_kernel(self) -> list[tuple[str, list[DriverKey]]]:
        """Tasks per kernel, kernels in first-seen order (one bundle download each)."""
        groups: dict[str, list[DriverKey]] = {}
        for key in self.tasks:
            groups.setdefault(key.kernel, []).append(key)
        return list(groups.items())


# --- safe extraction ---------------------------------------------------------------------
#
# Our own streaming tar reader and writer instead of tarfile.extractall(filter="data"):
# kernel bundles are ~10,000 small files, and tarfile spends ~4x GNU tar's time on them
# (two realpath() calls per member, chown/chmod/utime, header parsing in Python). Here
# gzip is inflated in a thread, headers are unpacked with one struct call, folders are
# resolved once each, and files are written by a small thread pool while the next
# headers are read. Measured in bench/results_builder.md.

EXTRACT_WRITERS = 4
_BATCH_FILES, _BATCH_BYTES = 64, 1 << 20  # files handed to a writer thread at once
_MAX_PENDING_BATCHES = 32  # bounds the memory held by queued writes
_STREAM_ABOVE = 8 << 20  # members larger than this are written as they are inflated
_GZIP_CHUNK = 1 << 20
_TAR_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")
_ZERO_BLOCK = bytes(512)
_REGULAR, _DIRECTORY, _SYMLINK, _HARDLINK = (b"0", b"\0", b"7"), b"5", b"2", b"1"
_NOT_EXTRACTED = {b"3": "a character device", b"4": "a block device", b"6": "a fifo",
                  b"S": "a sparse file"}  # fmt: skip
_CONFLICT = {errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENOTEMPTY}
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeArchive(Exception):
    """An archive that is not a clean tree: unreadable, or with a member that would land
    outside the destination or is not a file, directory or in-tree link."""


class _Gunzip:
    """A gzip file's inflated bytes, in chunks, inflated by a thread: zlib releases the
    GIL, so inflating runs beside the header parsing. Errors arrive as chunks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.chunks: queue.Queue[bytes | Exception | None] = queue.Queue(maxsize=8)
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="gunzip", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with open(self.path, "rb") as f:
                data = f.read(_GZIP_CHUNK)
                if data[:2] != b"\x1f\x8b":
                    raise ValueError(f"not gzip data (starts with {data[:2]!r})")
                inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
                while data and not self.stopped:
                    out = inflate.decompress(data)
                    if out:
                        self.chunks.put(out)
                    if inflate.eof and inflate.unused_data:  # concatenated gzip members
                        data = inflate.unused_data
                        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    else:
                        data = f.read(_GZIP_CHUNK)
                if not inflate.eof and not self.stopped:
                    raise ValueError("truncated gzip data")
        except (OSError, ValueError, zlib.error) as e:
            self.chunks.put(e)
        self.chunks.put(None)

    def close(self) -> None:
        self.stopped = True
        while self.thread.is_alive():  # unblock a put() into a full queue
            with contextlib.suppress(queue.Empty):
                self.chunks.get(timeout=0.05)


@dataclasses.dataclass
class _Member:
    name: str
    kind: bytes  # the tar type flag
    mode: int
    mtime: int
    link: str
    size: int


class _TarReader:
    """Members of a ustar, pax or GNU tar stream. Each member's data must be taken with
    :meth:`data` or :meth:`copy_to` before the next member is read (or it is skipped)."""

    def __init__(self, source: _Gunzip) -> None:
        self.source = source
        self.buf = b""
        self.pos = 0
        self.offset = 0  # position of buf[0] in the tar stream, for messages
        self.unread = 0  # data (and padding) of the current member not taken yet

    def _more(self) -> None:
        chunk = self.source.chunks.get()
        if chunk is None:
            raise ValueError(f"truncated tar data at byte {self.offset + len(self.buf)}")
        if isinstance(chunk, Exception):
            raise chunk
        rest = self.buf[self.pos :]
        self.offset += self.pos
        self.buf, self.pos = (rest + chunk if rest else chunk), 0

    def _read(self, n: int) -> memoryview:
        while len(self.buf) - self.pos < n:
            self._more()
        view = memoryview(self.buf)[self.pos : self.pos + n]
        self.pos += n
        return view

    def data(self, size: int) -> memoryview:
        """The current member's data, whole (for members up to a few MB)."""
        view = self._read(self.unread)[:size]
        self.unread = 0
        return view

    def copy_to(self, fd: int, size: int) -> None:
        """Write the current member's data to ``fd`` as it is inflated."""
        left = size
        while left:
            if self.pos == len(self.buf):
                self._more()
            piece = memoryview(self.buf)[self.pos : self.pos + left]
            self.pos += len(piece)
            left -= len(piece)
            while piece:
                piece = piece[os.write(fd, piece) :]
        self.unread -= size
        self._read(self.unread)  # the padding
        self.unread = 0

    def __iter__(self) -> Iterator[_Member]:
        pax: dict[str, str] = {}
        gnu: dict[bytes, str] = {}
        while True:
            if self.unread:
                self._read(self.unread)
                self.unread = 0
            at = self.offset + self.pos
            block = bytes(self._read(512))
            if block == _ZERO_BLOCK:
                return  # end of archive (what follows is padding)
            name, mode, _u, _g, size, mtime, chksum, kind, link, magic, *_, prefix = (
                _TAR_HEADER.unpack(block)
            )
            if not _checksum_ok(block, chksum):
                raise ValueError(f"bad tar header checksum at byte {at}: not a tar archive")
            self.unread = (_octal(size) + 511) & ~511
            if kind in (b"x", b"L", b"K", b"g"):  # metadata for the next member
                meta = bytes(self.data(_octal(size)))
                if kind == b"x":
                    pax = _pax_records(meta)
                elif kind != b"g":
                    gnu[kind] = _text(meta)
                continue
            path = _text(name)
            if magic == b"ustar\x0000" and prefix[0]:
                path = f"{_text(prefix)}/{path}"
            if "size" in pax:
                raise ValueError(f"member {path!r}: pax size records are not supported")
            yield _Member(
                name=pax.get("path", gnu.get(b"L", path)),
                kind=kind,
                mode=_octal(mode),
                mtime=int(float(pax["mtime"])) if "mtime" in pax else _octal(mtime),
                link=pax.get("linkpath", gnu.get(b"K", _text(link))),
                size=_octal(size),
            )
            pax, gnu = {}, {}


def _checksum_ok(block: bytes, field: bytes) -> bool:
    """The header's checksum: the sum of its bytes, counting the field itself as spaces."""
    try:
        return _octal(field) == sum(block) - sum(block[148:156]) + 256
    except ValueError:
        return False


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256, for sizes of 8 GB and more
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ValueError(f"bad number {field!r} in a tar header: not a tar archive") from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(raw: bytes) -> dict[str, str]:
    """``<length> <key>=<value>\\n`` records."""
    out, pos = {}, 0
    try:
        while pos < len(raw):
            space = raw.index(b" ", pos)
            length = int(raw[pos:space])
            key, _, value = raw[space + 1 : pos + length - 1].partition(b"=")
            out[key.decode()] = value.decode("utf-8", "surrogateescape")
            pos += length
    except ValueError:
        raise ValueError("malformed pax header: not a tar archive") from None
    return out


class _WriteFailed(Exception):
    def __init__(self, name: str, error: OSError) -> None:
        super().__init__(name, error)
        self.name, self.error = name, error


def _write_files(batch: list[tuple[str, str, memoryview, int, int]], done: Any) -> None:
    """Write (name, path, data, mode, mtime) files; runs in a writer thread."""
    try:
        for name, path, data, mode, mtime in batch:
            try:
                fd = os.open(path, _WRITE_FLAGS, mode)
                try:
                    while data:
                        data = data[os.write(fd, data) :]
                    os.utime(fd, (mtime, mtime))
                finally:
                    os.close(fd)
            except OSError as e:
                raise _WriteFailed(name, e) from None
    finally:
        done.release()


class _Extractor:
    """Writes members under ``dest``; every path is resolved against what is on disk, so
    no name, link or chain of links can place anything outside it."""

    def __init__(self, archive: str, dest: Path) -> None:
        self.archive = archive
        self.root = os.path.realpath(dest)
        self.real_dirs: dict[str, str] = {"": self.root}  # member folder -> real path
        self.files: set[str] = set()  # regular files so far (hard link targets)
        self.links: list[str] = []
        self.members = 0
        self.bytes = 0
        self.pool = ThreadPoolExecutor(EXTRACT_WRITERS, thread_name_prefix="extract")
        self.pending: list[Future[None]] = []
        self.batch: list[tuple[str, str, memoryview, int, int]] = []
        self.batch_bytes = 0
        self.slots = threading.BoundedSemaphore(_MAX_PENDING_BATCHES)

    def _inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.root + os.sep)

    def _refuse(self, name: str, why: str) -> UnsafeArchive:
        return UnsafeArchive(f"{self.archive}: member {name!r} {why}")

    def add(self, m: _Member, reader: _TarReader) -> None:
        parts = [p for p in m.name.split("/") if p and p != "."]
        if m.name.startswith("/") or ".." in parts:
            raise self._refuse(m.name, "has an absolute or '..' path")
        self.members += 1
        self.bytes += m.size
        if self.members > MAX_MEMBERS or self.bytes > MAX_EXTRACTED_BYTES:
            raise UnsafeArchive(
                f"{self.archive}: more than {MAX_MEMBERS} members or {MAX_EXTRACTED_BYTES} bytes"
            )
        if not parts:
            return  # the root folder itself
        rel = "/".join(parts)
        try:
            if m.kind == _DIRECTORY:
                self._real_dir(rel, m.name)
                return
            parent = self._real_dir("/".join(parts[:-1]), m.name)
            path = os.path.join(parent, parts[-1])
            if m.kind in _REGULAR:
                self._file(m, rel, path, reader)
            elif m.kind == _SYMLINK:
                self._symlink(m, parent, path)
                self.links.append(rel)
            elif m.kind == _HARDLINK:
                self._hardlink(m, path)
                self.files.add(rel)
            else:
                what = _NOT_EXTRACTED.get(m.kind, f"of unsupported tar type {m.kind!r}")
                raise self._refuse(m.name, f"is {what}")
        except OSError as e:
            if e.errno not in _CONFLICT:
                raise  # disk full and the like: not the archive's fault
            raise self._refuse(m.name, f"clashes with an earlier member: {e.strerror}") from None

    def _real_dir(self, rel: str, name: str) -> str:
        real = self.real_dirs.get(rel)
        if real is not None:
            return real
        parent, _, last = rel.rpartition("/")
        real_parent = self.real_dirs.get(parent)
        if real_parent is not None:  # the common case: one mkdir, nothing to resolve
            real = os.path.join(real_parent, last)
            try:
                os.mkdir(real)
            except FileExistsError:
                if os.path.islink(real) or not os.path.isdir(real):
                    real = None
        if real is None:
            # Resolve first, create after: makedirs must not follow a link out of the tree.
            real = os.path.realpath(os.path.join(self.root, rel))
            if not self._inside(real):
                raise self._refuse(name, f"lies outside the tree (through a link, at {real})")
            os.makedirs(real, exist_ok=True)
        self.real_dirs[rel] = real
        return real

    def _file(self, m: _Member, rel: str, path: str, reader: _TarReader) -> None:
        mode = 0o755 if m.mode & 0o111 else 0o644  # no setuid, no group/other write
        if rel in self.files:
            self.drain()  # the same name twice: the later member must win
        self.files.add(rel)
        if m.size > _STREAM_ABOVE:
            self.drain()
            fd = os.open(path, _WRITE_FLAGS, mode)
            try:
                reader.copy_to(fd, m.size)
                os.utime(fd, (m.mtime, m.mtime))
            finally:
                os.close(fd)
            return
        self.batch.append((m.name, path, reader.data(m.size), mode, m.mtime))
        self.batch_bytes += m.size
        if len(self.batch) >= _BATCH_FILES or self.batch_bytes >= _BATCH_BYTES:
            self._submit()

    def _submit(self) -> None:
        if self.batch:
            self.slots.acquire()
            self.pending.append(self.pool.submit(_write_files, self.batch, self.slots))
            self.batch, self.batch_bytes = [], 0
            if len(self.pending) >= 2 * _MAX_PENDING_BATCHES:
                self._reap(only_done=True)

    def _symlink(self, m: _Member, parent: str, path: str) -> None:
        self.drain()  # a new link changes how paths resolve: nothing may be in flight
        real = os.path.realpath(os.path.join(parent, m.link))
        if m.link.startswith("/") or not self._inside(real):
            raise self._refuse(m.name, f"links to {m.link!r}, outside the tree")
        self._clear(path)
        os.symlink(m.link, path)
        self.real_dirs = {"": self.root}

    def _hardlink(self, m: _Member, path: str) -> None:
        self.drain()
        parts = [p for p in m.link.split("/") if p and p != "."]
        if m.link.startswith("/") or ".." in parts:
            raise self._refuse(m.name, f"links to {m.link!r}, outside the tree")
        if "/".join(parts) not in self.files:
            raise self._refuse(m.name, f"links to {m.link!r}, not an earlier file of the archive")
        real = os.path.realpath(os.path.join(self.root, *parts))
        if not self._inside(real):
            raise self._refuse(m.name, f"links to {m.link!r}, outside the tree")
        self._clear(path)
        os.link(real, path, follow_symlinks=False)

    def _clear(self, path: str) -> None:
        if os.path.isdir(path) and not os.path.islink(path):
            raise OSError(errno.EISDIR, "a folder of that name exists")
        if os.path.lexists(path):
            os.unlink(path)

    def _reap(self, only_done: bool = False) -> None:
        waiting = []
        for future in self.pending:
            if only_done and not future.done():
                waiting.append(future)
                continue
            error = future.exception()
            if isinstance(error, _WriteFailed):
                if error.error.errno not in _CONFLICT:
                    raise error.error
                why = f"clashes with an earlier member: {error.error.strerror}"
                raise self._refuse(error.name, why)
            if error is not None:
                raise error
        self.pending = waiting

    def drain(self) -> None:
        """Wait for every queued write (before links, which change how paths resolve)."""
        self._submit()
        self._reap(only_done=False)

    def finish(self) -> None:
        self.drain()
        # A later link can re-aim an earlier one (a -> b/.., then b replaced): check them
        # all once the tree is complete.
        for rel in self.links:
            real = os.path.realpath(os.path.join(self.root, rel))
            if not self._inside(real):
                raise UnsafeArchive(f"{self.archive}: link {rel!r} ends outside the tree")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        # A SIGTERM raised inside pool.submit() can land after a writer thread started but
        # before the pool recorded it; shutdown() then does not join that thread, and it
        # would go on writing while the tree is deleted. Join every writer by name.
        for thread in threading.enumerate():
            if thread.name.startswith("extract_") and thread is not threading.current_thread():
                thread.join()


def safe_extract(archive: Path, dest: Path) -> int:
    """Extract a .tgz into ``dest`` in one streaming pass, refusing absolute names, ``..``,
    devices, fifos and links leading outside ``dest``; returns the number of members.
    Raises :class:`UnsafeArchive`; an OSError with an errno (disk full) is passed on."""
    dest.mkdir(parents=True, exist_ok=True)
    extractor = _Extractor(archive.name, dest)
    source = _Gunzip(archive)
    try:
        reader = _TarReader(source)
        for member in reader:
            extractor.add(member, reader)
        extractor.finish()
    except (ValueError, zlib.error) as e:  # what _Gunzip and _TarReader say about bad data
        raise UnsafeArchive(f"{archive.name}: not a readable .tgz: {e}") from None
    finally:
        source.close()
        extractor.close()
    return extractor.members


# --- bundles -----------------------------------------------------------------------------


class BundleCorrupt(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Bundle:
    root: Path
    uname: str
    build_dir: Path  # absolute, inside root
    info: dict[str, str]  # every BUNDLE_* value, keyed by the suffix (UNAME, DISTRO, ...)


def open_bundle(root: Path, kernel: str) -> Bundle:
    """Read the BUNDLE_* files of an extracted bundle and check it is the kernel's."""
    bundle = layout.bundle_object(kernel)
    info = {}
    for field in BUNDLE_FILES:
        path = root / f"BUNDLE_{field}"
        if path.is_file() and not path.is_symlink():
            info[field] = path.read_text(errors="replace").strip()
    uname = info.get("UNAME")
    if not uname:
        raise BundleCorrupt(f"{bundle} has no BUNDLE_UNAME at its root")
    if uname != kernel:
        raise BundleCorrupt(f"{bundle} is for another kernel: BUNDLE_UNAME is {uname!r}")
    relative = info.get("BUILD_DIR")
    if not relative:
        raise BundleCorrupt(f"{bundle} has no BUNDLE_BUILD_DIR at its root")
    build_dir = (root / relative).resolve()
    if relative.startswith("/") or not build_dir.is_relative_to(root.resolve()):
        raise BundleCorrupt(f"{bundle}: BUNDLE_BUILD_DIR {relative!r} leaves the tree")
    if not (build_dir / "Makefile").is_file():
        raise BundleCorrupt(f"{bundle}: BUNDLE_BUILD_DIR {relative!r} has no Makefile")
    return Bundle(root, uname, build_dir, info)


# --- building ----------------------------------------------------------------------------


@dataclasses.dataclass
class Built:
    """What building one driver gave: gzip'd bytes, or a failure class and its log."""

    data: bytes | None = None
    failure: str | None = None
    message: str = ""
    log: bytes = b""
    make_s: float = 0.0  # the bare make, for the benchmark's overhead ratio


def gzip_deterministic(data: bytes) -> bytes:
    """gzip without a file name and with mtime 0: a rebuild gives the same bytes."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(data)
    return buf.getvalue()


def make_command(build_dir: Path, src: Path, scratch: Path) -> list[str]:
    """kbuild for an external folder (what driver_sources/README.md says builds both
    kinds). KCFLAGS maps the scratch folder out of the module's debug info and __FILE__,
    so its bytes (build-id included) do not depend on where the shard ran; the probe
    Makefile maps its own paths. A set KBUILD_BUILD_TIMESTAMP is kbuild's switch for
    reproducible builds: without it, pahole < 1.27 encodes a module's BTF with threads
    (-j) and the order of its types varies from build to build (6.12 headers)."""
    return [
        "make",
        "-C",
        str(build_dir),
        f"M={src}",
        f"-j{len(os.sched_getaffinity(0))}",
        f"KCFLAGS=-ffile-prefix-map={scratch}/=",
        "KBUILD_BUILD_TIMESTAMP=1970-01-01T00:00:00Z",
        "modules",
    ]


def _build_env() -> dict[str, str]:
    env = dict(os.environ, LC_ALL="C")
    for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"):  # e.g. run under make
        env.pop(name, None)
    return env


def _run_tool(cmd: list[str]) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(cmd, capture_output=True, env=_build_env(), check=False)
    except FileNotFoundError:
        raise _missing_tool(cmd[0]) from None


def _missing_tool(tool: str) -> ShardStopped:
    # Every build would fail the same way: this builder image is incomplete.
    return ShardStopped(
        f"{tool} is not installed in this builder image (see scripts/host-deps.sh)",
        EX_DATAERR,
        "toolchain",
    )


def _run_make(cmd: list[str], log_path: Path) -> tuple[int | None, float]:
    """Run make with its output in ``log_path``; (exit status or None on timeout, seconds).
    make runs in its own process group, killed whole on a timeout or SIGTERM: compilers
    left behind would write into a scratch folder being deleted."""
    started = time.perf_counter()
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=_build_env(), start_new_session=True
            )
        except FileNotFoundError:
            raise _missing_tool(cmd[0]) from None
        try:
            status: int | None = proc.wait(timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            status = None
        except BaseException:  # Terminated (SIGTERM) included
            _kill_group(proc)
            raise
    return status, time.perf_counter() - started


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _log_tail(log_path: Path, scratch: Path, extra: str = "") -> bytes:
    with open(log_path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - LOG_LIMIT))
        tail = f.read()
    if size > LOG_LIMIT:
        tail = b"[... %d earlier bytes cut ...]\n" % (size - LOG_LIMIT) + tail.split(b"\n", 1)[-1]
    # The scratch folder is random per attempt: without it, a retry writes the same log.
    return tail.replace(str(scratch).encode(), WORKDIR_IN_LOGS.encode()) + extra.encode()


def build_driver(key: DriverKey, sources: Path, bundle: Bundle, scratch: Path) -> Built:
    """Build one driver from a version's extracted sources (``build.json`` says which
    folder and which output file) against an extracted bundle. ``scratch`` holds both
    and is mapped out of the object's paths."""
    try:
        spec = read_build_spec(sources).get(key.kind)
    except ValueError as e:
        return Built(failure="sources_missing", message=f"sources of {key.driver_version}: {e}")
    if spec is None:
        return Built(
            failure="sources_missing",
            message=f"sources of {key.driver_version}: build.json has no {key.kind!r} entry",
        )
    src = scratch / "build" / key.driver_version / key.kind
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(sources / spec["dir"], src, symlinks=True)  # kbuild writes next to them
    log_path = scratch / "build" / f"{key.driver_version}-{key.kind}.log"
    log_path.write_bytes(f"# {key.kernel} {key.driver_version} {key.kind}\n".encode())

    status, make_s = _run_make(make_command(bundle.build_dir, src, scratch), log_path)
    if status != 0:
        log = _log_tail(log_path, scratch)
        why = f"timed out after {BUILD_TIMEOUT_S} s" if status is None else f"exit status {status}"
        return Built(
            failure="compile", message=_first_error(log, f"make {why}"), log=log, make_s=make_s
        )
    output = src / spec["output"]
    if not output.is_file():
        msg = f"make succeeded but left no {spec['dir']}/{spec['output']} (build.json's output)"
        return _failed("compile", msg, log_path, scratch, make_s)
    if key.kind == "mod":
        return _finish_module(key, output, log_path, scratch, make_s)
    return _finish_probe(key, output, log_path, scratch, make_s)


def _first_error(log: bytes, fallback: str) -> str:
    """The compiler's first error line (what a reader wants in a one-line reason)."""
    for line in log.decode(errors="replace").splitlines():
        if "error:" in line or "Error:" in line or "ERROR:" in line:
            return line.strip().removeprefix(WORKDIR_IN_LOGS + "/")[:300]
    return fallback


def _failed(failure: str, msg: str, log_path: Path, scratch: Path, make_s: float) -> Built:
    """A build whose make ran: the log ends with why the result was refused."""
    return Built(
        failure=failure,
        message=msg[:300],
        log=_log_tail(log_path, scratch, f"# {failure}: {msg}\n"),
        make_s=make_s,
    )


def _finish_module(
    key: DriverKey, module: Path, log_path: Path, scratch: Path, make_s: float
) -> Built:
    stripped = module.with_name(module.name + ".stripped")
    strip = _run_tool(["strip", "--strip-debug", "-o", str(stripped), str(module)])
    if strip.returncode != 0:
        msg = f"strip --strip-debug failed: {strip.stderr.decode(errors='replace').strip()}"
        return _failed("compile", msg, log_path, scratch, make_s)
    elf = stripped.read_bytes()
    try:
        vermagic = read_vermagic(elf)
    except ValueError as e:
        return _failed("compile", f"{module.name}: {e}", log_path, scratch, make_s)
    if not vermagic_matches(vermagic, key.kernel):
        msg = (
            f"vermagic {vermagic.strip()!r} does not start with {key.kernel!r}"
            if vermagic is not None
            else f"{module.name} has no vermagic in .modinfo"
        )
        return _failed("vermagic", msg, log_path, scratch, make_s)
    return Built(data=gzip_deterministic(elf), make_s=make_s)


def _finish_probe(
    key: DriverKey, probe: Path, log_path: Path, scratch: Path, make_s: float
) -> Built:
    # -g drops DWARF but keeps .BTF, which libbpf needs for the maps.
    stripped = probe.with_name(probe.name + ".stripped")
    strip = _run_tool(["llvm-strip", "-g", "-o", str(stripped), str(probe)])
    if strip.returncode != 0:
        msg = f"llvm-strip -g failed: {strip.stderr.decode(errors='replace').strip()}"
        return _failed("compile", msg, log_path, scratch, make_s)
    data = gzip_deterministic(stripped.read_bytes())
    problems = verify_driver(key, data, unavailable=False)
    if problems:
        return _failed("compile", "; ".join(problems), log_path, scratch, make_s)
    return Built(data=data, make_s=make_s)


# --- toolchain ---------------------------------------------------------------------------


def toolchain_versions() -> dict[str, str | None]:
    """First line of ``--version`` of each tool (None when missing), read once per shard."""
    versions: dict[str, str | None] = {}
    for tool in ("gcc", "clang", "make"):
        try:
            out = subprocess.run(
                [tool, "--version"], capture_output=True, text=True, timeout=30, check=False
            ).stdout
            versions[tool] = out.splitlines()[0].strip() if out else None
        except (OSError, subprocess.TimeoutExpired):
            versions[tool] = None
    return versions


# --- running a shard ---------------------------------------------------------------------


class ShardStopped(Exception):
    """Something that stops the whole shard: ``exit_status`` says whether to retry,
    ``failure`` is the class recorded for the tasks it left unbuilt."""

    def __init__(self, message: str, exit_status: int, failure: str) -> None:
        super().__init__(message)
        self.exit_status, self.failure = exit_status, failure


class Terminated(BaseException):
    """SIGTERM (a pod being stopped): clean up, write what we have, ask for a retry.
    A BaseException, like KeyboardInterrupt, so no ``except Exception`` swallows it."""


def storage_failure(exc: BaseException) -> ShardStopped | None:
    """Classify a storage exception: transient (retry) or permanent; None if not storage."""
    from google.api_core import exceptions as api
    from google.auth.exceptions import TransportError
    from requests.exceptions import RequestException

    from drivers.store.storage import BucketNotFound, StorageError

    if isinstance(exc, BucketNotFound):
        return ShardStopped(str(exc), EX_DATAERR, "storage")
    transient = (
        api.ServerError,
        api.TooManyRequests,
        api.RetryError,
        RequestException,
        TransportError,
        ConnectionError,
        TimeoutError,
    )
    if isinstance(exc, transient):
        return ShardStopped(
            f"storage unreachable: {type(exc).__name__}: {exc}", EX_TEMPFAIL, "storage"
        )
    if isinstance(exc, api.GoogleAPICallError | StorageError):
        return ShardStopped(f"storage refused: {type(exc).__name__}: {exc}", EX_DATAERR, "storage")
    return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ShardRun:
    """One attempt at one shard. ``store(bucket_name)`` gives the ObjectStore to use."""

    def __init__(
        self,
        shard: Shard,
        store: Callable[[str], Any],
        scratch: Path,
        toolchain: dict[str, str | None] | None = None,
        err: Any = None,
    ) -> None:
        self.shard = shard
        self.bundles, self.sources, self.work = (
            store(shard.bundles),
            store(shard.sources),
            store(shard.work),
        )
        self.scratch = scratch
        self.toolchain = toolchain if toolchain is not None else toolchain_versions()
        self.env = ledger.environment(os.environ.get(ledger.IMAGE_ENV), self.toolchain)
        self.inputs: dict[str, str | None] = {}  # bundle or sources object -> its md5
        self.err = err if err is not None else sys.stderr
        self.records: list[dict[str, Any]] = []
        self.timings = dict.fromkeys(TIMINGS, 0.0)
        self.data_error = False  # a missing/corrupt input: exit 65 at the end
        self.completed = False  # every kernel was attempted
        self._sources: dict[str, Path | str] = {}  # version -> extracted folder or problem

    # records ---------------------------------------------------------------------------

    def _record(
        self,
        key: DriverKey,
        status: str,
        *,
        failure: str | None = None,
        message: str = "",
        obj: str | None = None,
        data: bytes | None = None,
        log: str | None = None,
        duration_s: float = 0.0,
    ) -> dict[str, Any]:
        record = {
            "type": "task",
            "time": _now(),
            "kernel": key.kernel,
            "driver_version": key.driver_version,
            "kind": key.kind,
            "builder": self.shard.builder,
            "status": status,
            "object": obj,
            "sha256": hashlib.sha256(data).hexdigest() if data is not None else None,
            "size": len(data) if data is not None else None,
            "duration_s": round(duration_s, 3),
            "log": log,
            "failure": failure,
            "message": message,
            "toolchain": self.toolchain,
            "env": self.env,
            "sources": self.inputs.get(layout.source_object(key.driver_version)),
            "bundle": self.inputs.get(layout.bundle_object(key.kernel)),
        }
        self.records.append(record)
        return record

    def _infra_failed(self, keys: list[DriverKey], failure: str, message: str) -> None:
        for key in keys:
            self._record(key, "infra_failed", failure=failure, message=message)

    # inputs ----------------------------------------------------------------------------

    def _fetch(self, store: Any, name: str, path: Path) -> bool:
        """Download; False when the object does not exist."""
        from drivers.store.storage import ObjectNotFound

        started = time.perf_counter()
        try:
            store.download_to(name, path)
            self.inputs[name] = store.info(name).md5  # what the build was made from
            return True
        except ObjectNotFound:
            return False
        finally:
            self.timings["fetch_s"] += time.perf_counter() - started

    def _extract(self, archive: Path, dest: Path) -> None:
        started = time.perf_counter()
        try:
            safe_extract(archive, dest)
        finally:
            archive.unlink(missing_ok=True)
            self.timings["extract_s"] += time.perf_counter() - started

    def sources_for(self, version: str) -> Path | str:
        """The extracted sources of a driver version (once per shard), or why not."""
        if version not in self._sources:
            name = layout.source_object(version)
            archive = self.scratch / "sources" / name
            dest = self.scratch / "sources" / version
            if not self._fetch(self.sources, name, archive):
                self._sources[version] = f"gs://{self.shard.sources}/{name} does not exist"
            else:
                try:
                    self._extract(archive, dest)
                    self._sources[version] = _sources_root(dest)
                except UnsafeArchive as e:
                    self._sources[version] = f"gs://{self.shard.sources}/{e}"
        return self._sources[version]

    # outputs ---------------------------------------------------------------------------

    def _upload(self, name: str, data: bytes) -> Any:
        started = time.perf_counter()
        try:
            return self.work.upload_new(name, data)
        finally:
            self.timings["upload_s"] += time.perf_counter() - started

    def _stage(self, key: DriverKey, name: str, data: bytes, started: float, status: str) -> None:
        from drivers.store.storage import UploadResult

        obj = layout.staged_drivers_prefix(self.shard.run_id) + name
        if self._upload(obj, data) is UploadResult.DIFFERENT:
            self._record(
                key,
                "failed",
                failure="nondeterministic",
                data=data,
                message=f"{obj} already staged with other bytes: the build is not reproducible",
                duration_s=time.perf_counter() - started,
            )
            return
        self._record(key, status, obj=obj, data=data, duration_s=time.perf_counter() - started)

    def _fail(self, key: DriverKey, built: Built, started: float) -> None:
        log = None
        if built.log:
            log = layout.staged_log_object(
                self.shard.run_id, key.kernel, key.driver_version, key.kind
            )
            self._upload(log, built.log)  # an earlier attempt's log (DIFFERENT) is kept
        status = "infra_failed" if built.failure == "sources_missing" else "failed"
        self._record(
            key,
            status,
            failure=built.failure,
            message=built.message,
            log=log,
            duration_s=time.perf_counter() - started,
        )

    # the shard ------------------------------------------------------------------------

    def run_kernel(self, kernel: str, keys: list[DriverKey]) -> None:
        supported = ebpf_supported(parse_kernel(kernel))
        to_build = []
        for key in keys:
            if key.kind == "bpf" and not supported:
                self._stage(key, key.unavail_name(), b"", time.perf_counter(), "unavailable")
            else:
                to_build.append(key)
        if not to_build:
            return

        name = layout.bundle_object(kernel)
        archive = self.scratch / name
        root = self.scratch / "bundle"
        if not self._fetch(self.bundles, name, archive):
            self.data_error = True
            msg = f"gs://{self.shard.bundles}/{name} does not exist"
            return self._infra_failed(to_build, "bundle_missing", msg)
        try:
            try:
                self._extract(archive, root)
                bundle = open_bundle(root, kernel)
            except (UnsafeArchive, BundleCorrupt) as e:
                self.data_error = True
                msg = f"gs://{self.shard.bundles}/{e}"
                return self._infra_failed(to_build, "bundle_corrupt", msg)
            for key in to_build:
                self._build(key, bundle)
        finally:
            started = time.perf_counter()
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(self.scratch / "build", ignore_errors=True)
            self.timings["cleanup_s"] += time.perf_counter() - started

    def _build(self, key: DriverKey, bundle: Bundle) -> None:
        started = time.perf_counter()
        sources = self.sources_for(key.driver_version)
        if isinstance(sources, str):
            self.data_error = True
            return self._record(key, "infra_failed", failure="sources_missing", message=sources)
        built = build_driver(key, sources, bundle, self.scratch)
        self.timings["build_s"] += time.perf_counter() - started
        if built.failure == "sources_missing":
            self.data_error = True
        if built.data is None:
            return self._fail(key, built, started)
        self._stage(key, key.object_name(), built.data, started, "built")

    def run(self) -> tuple[int, str | None]:
        """Build every kernel; (exit status, error that stopped the shard or None)."""
        for kernel, keys in self.shard.by_kernel():
            before = len(self.records)
            started = time.perf_counter()
            try:
                self.run_kernel(kernel, keys)
            except (Exception, Terminated) as e:
                stopped = _stopping(e)
                self._not_attempted(stopped)
                return stopped.exit_status, str(stopped)
            self._print_kernel(kernel, self.records[before:], time.perf_counter() - started)
        self.completed = True
        if not self.data_error:
            return EX_OK, None
        bad = sorted(
            {
                f"{r['kernel']} {r['driver_version']} ({r['failure']})"
                for r in self.records
                if r["failure"] in ("bundle_missing", "bundle_corrupt", "sources_missing")
            }
        )
        return EX_DATAERR, f"missing or corrupt inputs, do not retry: {', '.join(bad)}"

    def _not_attempted(self, stopped: ShardStopped) -> None:
        done = {(r["kernel"], r["driver_version"], r["kind"]) for r in self.records}
        for key in self.shard.tasks:
            if key not in done:
                msg = f"stopped: {stopped}"
                self._record(key, "infra_failed", failure=stopped.failure, message=msg)

    def _print_kernel(self, kernel: str, records: list[dict[str, Any]], seconds: float) -> None:
        counts = _counts(records)
        text = ", ".join(f"{n} {status}" for status, n in counts.items())
        problems = "; ".join(
            f"{r['driver_version']} {r['kind']}: {r['failure']}: {r['message']}"
            for r in records
            if r["failure"]
        )
        print(
            f"{kernel}: {text} in {seconds:.1f} s" + (f" ({problems})" if problems else ""),
            file=self.err,
        )


def _stopping(exc: BaseException) -> ShardStopped:
    if isinstance(exc, ShardStopped):
        return exc
    if isinstance(exc, Terminated):
        return ShardStopped("terminated (SIGTERM)", EX_TEMPFAIL, "terminated")
    stopped = storage_failure(exc)
    if stopped is not None:
        return stopped
    if isinstance(exc, OSError):  # disk full, I/O error: another attempt may land elsewhere
        return ShardStopped(f"{type(exc).__name__}: {exc}", EX_TEMPFAIL, "host")
    traceback.print_exception(exc, file=sys.stderr)  # a bug: show where
    return ShardStopped(f"internal error: {type(exc).__name__}: {exc}", EX_SOFTWARE, "internal")


def _sources_root(dest: Path) -> Path:
    """Where ``build.json`` is: at the archive root (drivers.build.sources), or in its only
    folder (a tarball of the version folder itself)."""
    if (dest / "build.json").exists():
        return dest
    entries = [p for p in dest.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return dest


def _counts(records: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


def shard_record(
    shard: Shard,
    run: ShardRun | None,
    exit_status: int,
    error: str | None,
    started: str,
    started_s: float,
) -> dict[str, Any]:
    timings = run.timings if run else dict.fromkeys(TIMINGS, 0.0)
    return {
        "type": "shard",
        "run_id": shard.run_id,
        "builder": shard.builder,
        "index": shard.index,
        # ok: exit 0. infra_failed: some input was bad (65, completed) or the shard stopped.
        "status": "ok" if exit_status == EX_OK else "infra_failed",
        "error": error,
        "exit_status": exit_status,
        "completed": bool(run and run.completed),
        "estimated_cost_s": shard.cost,
        "measured_s": round(time.perf_counter() - started_s, 3),
        **{k: round(v, 3) for k, v in timings.items()},
        "kernels": len(shard.by_kernel()),
        "tasks": len(shard.tasks),
        "counts": _counts(run.records) if run else {},
        "started": started,
        "finished": _now(),
    }


def build_shard(
    shard: Shard, store: Callable[[str], Any], workdir: Path | None = None, err: Any = None
) -> tuple[int, list[dict[str, Any]]]:
    """Run one shard and write its results object; (exit status, records incl. the shard
    record). ``store(bucket)`` gives an ObjectStore for a bucket name."""
    err = err if err is not None else sys.stderr
    started, started_s = _now(), time.perf_counter()
    run: ShardRun | None = None
    with _scratch(workdir) as scratch:
        try:
            run = ShardRun(shard, store, scratch, err=err)
            status, error = run.run()
        except (Exception, Terminated) as e:  # before the first kernel
            stopped = _stopping(e)
            status, error = stopped.exit_status, str(stopped)
    records = [
        *(run.records if run else []),
        shard_record(shard, run, status, error, started, started_s),
    ]
    final = records[-1]
    print(
        f"shard {shard.builder}-{shard.index:04d} of {shard.run_id}: {final['status']}, "
        f"{final['tasks']} tasks on {final['kernels']} kernels "
        f"({', '.join(f'{n} {s}' for s, n in final['counts'].items()) or 'none'}) "
        f"in {final['measured_s']:.1f} s (fetch {final['fetch_s']:.1f}, "
        f"extract {final['extract_s']:.1f}, build {final['build_s']:.1f}), exit {status}"
        + (f": {error}" if error else ""),
        file=err,
    )
    written = write_results(
        store(shard.work), shard.run_id, shard.builder, shard.index, records, err
    )
    if not written and status == EX_OK:
        status = EX_TEMPFAIL  # the DAG learns nothing from a shard without results
    return status, records


def write_results(
    store: Any, run_id: str, builder: str, index: int, records: list[dict[str, Any]], err: Any
) -> bool:
    """Write the results object, replacing an earlier attempt's (the last attempt is the
    truth). Best effort: False, with a message, when storage refuses."""
    name = layout.shard_results_object(run_id, builder, index)
    data = "".join(json.dumps(r, sort_keys=False) + "\n" for r in records).encode()
    try:
        # Not upload_new: results are run state that a retried shard must replace.
        store.put(name, data, "application/x-ndjson")
        return True
    except Exception as e:
        print(f"cannot write results gs://{store.bucket_name}/{name}: {e}", file=err)
        return False


@contextlib.contextmanager
def _scratch(workdir: Path | None) -> Iterator[Path]:
    """A fresh folder for the attempt, inside ``workdir`` when given; always removed."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="build-shard-", dir=workdir)).resolve()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into an exception so clean-up and the results upload still happen."""

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut clean-up
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_build_shard(args: argparse.Namespace) -> int:
    from drivers.store.storage import (
        ObjectNotFound,
        ObjectStore,
        client_from_environment,
        parse_gs_uri,
    )

    bucket, name = parse_gs_uri(args.shard)
    workdir = Path(args.workdir) if args.workdir else None
    with _sigterm_raises():
        try:
            client = client_from_environment()
            stores: dict[str, ObjectStore] = {}

            def store(bucket_name: str) -> ObjectStore:
                if bucket_name not in stores:
                    stores[bucket_name] = ObjectStore(client, bucket_name)
                return stores[bucket_name]

            try:
                data = store(bucket).download(name)
            except ObjectNotFound as e:
                return _bad_shard(store(bucket), name, f"{e}: the shard file is missing")
            try:
                shard = Shard.from_json(data, args.shard)
            except ShardFormatError as e:
                return _bad_shard(store(bucket), name, str(e))
            status, _records = build_shard(shard, store, workdir)
            results = layout.shard_results_object(shard.run_id, shard.builder, shard.index)
            print(f"gs://{shard.work}/{results}")  # stdout: where the records are
            return status
        except Terminated:
            print("build-shard: terminated (SIGTERM)", file=sys.stderr)
            return EX_TEMPFAIL
        except Exception as e:
            stopped = _stopping(e)
            print(f"build-shard {args.shard}: {stopped}", file=sys.stderr)
            return stopped.exit_status


def _bad_shard(store: Any, name: str, error: str) -> int:
    """A shard file we cannot use: say so, and (when its name tells where) write a results
    object with only a failed shard record, so the DAG sees why."""
    print(f"build-shard: {error}", file=sys.stderr)
    m = _SHARD_NAME_RE.search(name)
    if m:
        record = {
            "type": "shard",
            "run_id": m["run_id"],
            "builder": m["builder"],
            "index": int(m["index"]),
            "status": "infra_failed",
            "error": error,
            "exit_status": EX_DATAERR,
            "completed": False,
            "estimated_cost_s": None,
            "measured_s": 0.0,
            **dict.fromkeys(TIMINGS, 0.0),
            "kernels": 0,
            "tasks": 0,
            "counts": {},
            "started": _now(),
            "finished": _now(),
        }
        write_results(store, m["run_id"], m["builder"], int(m["index"]), [record], sys.stderr)
    return EX_DATAERR
