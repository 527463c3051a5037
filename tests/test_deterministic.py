"""Deterministic gzip and the hashing writer: the bytes published objects are made of."""

from __future__ import annotations

import gzip
import hashlib
import io
import time

from drivers.domain.deterministic import HashingWriter, gzip_bytes, gzip_writer


def test_gzip_has_no_name_no_time_and_the_same_bytes_later():
    a = gzip_bytes(b"driver bytes", 9)
    time.sleep(1.1)
    assert gzip_bytes(b"driver bytes", 9) == a
    assert a[3] == 0 and a[4:8] == b"\0\0\0\0"  # no FNAME flag, mtime 0
    assert gzip.decompress(a) == b"driver bytes"


def test_a_named_file_stream_gives_the_same_bytes_as_gzip_bytes(tmp_path):
    data = b"kernel headers " * 10_000
    with open(tmp_path / "bundle-x.tgz", "wb") as f, gzip_writer(f, 6) as gz:  # f has a name
        gz.write(data[:1000])
        gz.write(data[1000:])
    assert (tmp_path / "bundle-x.tgz").read_bytes() == gzip_bytes(data, 6)


def test_the_level_is_the_callers():
    data = bytes(range(256)) * 2000 + b"x" * 100_000
    assert len(gzip_bytes(data, 1)) > len(gzip_bytes(data, 9))
    assert gzip.decompress(gzip_bytes(data, 1)) == data


def test_the_hashing_writer_passes_everything_through_and_hashes_it_in_order():
    out = io.BytesIO()
    writer = HashingWriter(out)
    for piece in (b"local header", b"", b"driver", memoryview(b"central directory")):
        writer.write(piece)
    assert out.getvalue() == b"local headerdrivercentral directory"
    assert writer.offset == len(out.getvalue())
    assert writer.digest == "sha256:" + hashlib.sha256(out.getvalue()).hexdigest()


def test_the_hashing_writer_hashes_a_gzip_stream_without_a_target():
    plain, compressed = HashingWriter(None), HashingWriter(None)
    with gzip_writer(compressed, 6) as gz:
        inner = HashingWriter(gz)
        inner.write(b"layer tar")
    plain.write(b"layer tar")
    assert inner.digest == plain.digest
    assert compressed.digest == "sha256:" + hashlib.sha256(gzip_bytes(b"layer tar", 6)).hexdigest()
    assert compressed.offset == len(gzip_bytes(b"layer tar", 6))
