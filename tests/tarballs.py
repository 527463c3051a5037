"""Small hand-made .tgz archives for the safe-extraction and builder tests."""

from __future__ import annotations

import io
import tarfile

_TYPES = {
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
}


def tgz(*members: tuple[str, str | bytes, bytes | str]) -> bytes:
    """A small .tgz: (name, type, data or link target); type is file, dir, symlink,
    hardlink, fifo, chr, blk, or a raw tar type flag (bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            data = None
            if kind == "file":
                data = payload.encode() if isinstance(payload, str) else payload
                info.size = len(data)
            else:
                info.type = kind if isinstance(kind, bytes) else _TYPES[kind]
                info.linkname = payload if isinstance(payload, str) else ""
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def rewritten(archive, edit, keep=lambda name: True) -> bytes:
    """A copy of the .tgz ``archive`` (a path) where ``edit(name, data)`` gives each
    regular file's new bytes (``name`` without a leading ./), without the members
    ``keep(name)`` refuses; gzip level 1, quick."""
    import gzip

    out = io.BytesIO()
    with (
        tarfile.open(archive, "r:gz") as src,
        gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=1) as gz,
        tarfile.open(fileobj=gz, mode="w") as dst,
    ):
        for member in src:
            if not keep(member.name.removeprefix("./")):
                continue
            data = src.extractfile(member).read() if member.isreg() else None
            if data is not None:
                data = edit(member.name.removeprefix("./"), data)
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def without_common_tree(name: str) -> bool:
    """For ``rewritten``: a Debian bundle without its common tree (usr/src/linux-headers-
    <abi>-common[-rt]/, nine tenths of it), for a test that must stop before make reads
    it (were it not to stop, make would fail there)."""
    parts = name.split("/")
    return not (
        len(parts) > 2
        and parts[:2] == ["usr", "src"]
        and parts[2].endswith(("-common", "-common-rt"))
    )
