"""Safe extraction of a .tgz (kernel bundles, driver sources): one streaming pass that
refuses anything that is not a clean tree under the destination: absolute names, ``..``,
links (or chains of links) leading outside, hard links to anything but an earlier file of
the archive, devices, fifos and sparse files, and more than :data:`MAX_MEMBERS` members or
:data:`MAX_EXTRACTED_BYTES` bytes.

Our own streaming tar reader and writer instead of tarfile.extractall(filter="data"):
kernel bundles are ~10,000 small files, and tarfile spends ~4x GNU tar's time on them
(two realpath() calls per member, chown/chmod/utime, header parsing in Python). Here
gzip is inflated in a thread, headers are unpacked with one struct call, folders are
resolved once each, and files are written by a small thread pool while the next
headers are read. Measured in bench/results_builder.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import queue
import struct
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

# Bounds for an extracted archive: a Debian 6.1 bundle is ~45 MB in ~10,000 files.
MAX_EXTRACTED_BYTES = 4 << 30
MAX_MEMBERS = 500_000
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
