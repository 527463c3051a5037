"""Bytes that depend only on their content: deterministic gzip, and a writer that hashes
what it writes.

Published objects are compared byte for byte (DESIGN.md §2, "Push"): a rebuild of the same
driver, bundle or image layer must give the same bytes, so gzip is written without a file
name and with mtime 0. Every gzip the project writes goes through :func:`gzip_writer` or
:func:`gzip_bytes`; the compression level is each caller's (see their comments).
"""

from __future__ import annotations

import gzip
import hashlib
import io
from typing import IO, Any


def gzip_writer(fileobj: IO[bytes], level: int) -> gzip.GzipFile:
    """A gzip stream into ``fileobj`` whose header holds no name and mtime 0 (close it to
    write the trailer; ``fileobj`` stays open)."""
    return gzip.GzipFile(filename="", mode="wb", fileobj=fileobj, mtime=0, compresslevel=level)


def gzip_bytes(data: bytes, level: int) -> bytes:
    """``data`` gzip'd like :func:`gzip_writer` does. Not ``gzip.compress``: on Python 3.11
    its header names the OS (Unix) where GzipFile writes "unknown", so the bytes would
    depend on which of the two wrote them."""
    out = io.BytesIO()
    with gzip_writer(out, level) as gz:
        gz.write(data)
    return out.getvalue()


class HashingWriter(io.RawIOBase):
    """Writes through to ``target`` (``None``: hash only) and hashes and counts what it
    writes, in order: a file written strictly front to back gets its sha256 without a
    second pass. A raw stream, so gzip and tarfile can write into it."""

    def __init__(self, target: IO[bytes] | None) -> None:
        self.target = target
        self.sha256 = hashlib.sha256()
        self.offset = 0  # bytes written so far: where the next write lands, the size at the end

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.sha256.update(data)  # releases the GIL: overlaps whatever feeds the writer
        if self.target is not None:
            self.target.write(data)
        self.offset += len(data)
        return len(data)

    @property
    def digest(self) -> str:
        """The OCI form, ``sha256:<hex>``."""
        return f"sha256:{self.sha256.hexdigest()}"
