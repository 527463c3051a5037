"""OCI drivers images: build one from driver trees, open one, read its drivers.

A downstream *drivers image* carries ``/kernel-modules/<version>/*.gz`` and
``/FAILURES/<kernel>/<version>/<kind>.log`` (DESIGN.md §2, "CPaaS"). This module reads
such an image from an OCI image layout (a directory or a tar of one, as an image-copy
tool writes it) and makes one from directories, so tests and the demo need no registry.

Only the two driver trees are taken from the layers; everything else (the base image)
is skipped unread. The safety rules of :func:`drivers.build.safetar.safe_extract` apply to the
members that are taken: no ``..``, no absolute links or links leaving the tree, no
devices. A ``..`` in any member name is refused wherever it is. Absolute links outside
the driver trees are a base image's business (``/etc/alternatives`` has plenty) and are
ignored. Nothing is written to disk while reading.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import io
import json
import os
import posixpath
import re
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from drivers.domain.deterministic import HashingWriter, gzip_writer
from drivers.domain.layout import UnknownArchitecture, cache_arch
from drivers.domain.names import DriverVersionError, check_driver_version, parse_object_name
from drivers.domain.verify import MAX_DRIVER_SIZE, DriverFacts, check_driver, inspect_driver
from drivers.store.storage import ObjectStore, UploadResult

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
# What an image-copy tool keeps when it copies a Docker-format image without converting.
_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
_INDEX_TYPES = {MEDIA_INDEX, _DOCKER_LIST}
_MANIFEST_TYPES = {MEDIA_MANIFEST, _DOCKER_MANIFEST}
_GZIP_LAYERS = {MEDIA_LAYER_GZIP, _DOCKER_LAYER_GZIP}

KERNEL_MODULES = "kernel-modules"
FAILURES = "FAILURES"
_KEPT_ROOTS = (KERNEL_MODULES, FAILURES)

_DIGEST_RE = re.compile(r"(sha256):([0-9a-f]{64})|(sha512):([0-9a-f]{128})")
_ARCH_RE = re.compile(r"[a-z0-9_]+")
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_CHUNK = 1 << 20
_MAX_LINK_HOPS = 40


class ImageError(ValueError):
    """The image cannot be used; the message says which blob, layer or member and why."""


class CorruptBlob(ImageError):
    pass


def _cache_arch(oci_arch: str) -> str:
    """:func:`cache_arch`, refusing an architecture no cache knows as a bad image."""
    try:
        return cache_arch(oci_arch)
    except UnknownArchitecture as e:
        raise ImageError(str(e)) from None


# --- building ----------------------------------------------------------------------------

Layer = Path | bytes  # a directory, or an uncompressed tar archive (tests: hand-made members)


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _blob_path(root: Path, digest: str) -> Path:
    match = _DIGEST_RE.fullmatch(digest)
    if match is None:  # also what keeps a crafted digest from naming a path outside blobs/
        raise ImageError(f"{digest!r} is not a sha256 or sha512 digest")
    algorithm, hex_ = (match[1], match[2]) if match[1] else (match[3], match[4])
    return root / "blobs" / algorithm / hex_


def _put_json(root: Path, doc: dict[str, Any], media_type: str) -> dict[str, Any]:
    data = _canonical(doc)
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    _blob_path(root, digest).write_bytes(data)
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def _tar_info(name: str, kind: bytes, size: int = 0, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.mtime = kind, size, mode, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _write_tree(tar: tarfile.TarFile, tree: Path) -> None:
    """Every entry of ``tree`` in sorted order, owner root, mtime 0, modes 755/644."""
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        here = Path(dirpath)
        for name in sorted([*dirnames, *filenames]):
            path = here / name
            rel = path.relative_to(tree).as_posix()
            st = path.lstat()
            mode = 0o755 if st.st_mode & 0o111 else 0o644
            if path.is_symlink():
                info = _tar_info(rel, tarfile.SYMTYPE, mode=0o777)
                info.linkname = os.readlink(path)
                tar.addfile(info)
            elif path.is_dir():
                tar.addfile(_tar_info(rel, tarfile.DIRTYPE, mode=0o755))
            elif path.is_file():
                with path.open("rb") as f:
                    tar.addfile(_tar_info(rel, tarfile.REGTYPE, st.st_size, mode), f)
            else:
                raise ImageError(f"{path}: only files, folders and links go into an image")


def _put_layer(root: Path, layer: Layer) -> tuple[dict[str, Any], str]:
    """Write one gzip'd tar layer blob; (its descriptor, the uncompressed diff_id)."""
    blobs = root / "blobs" / "sha256"
    with tempfile.NamedTemporaryFile(dir=blobs, prefix=".layer-", delete=False) as out:
        compressed = HashingWriter(out)
        # Deterministic gzip: the same tree gives the same digest.
        # Level 6, not 9: drivers are gzip'd already, more effort only costs time.
        with gzip_writer(compressed, 6) as gz:
            plain = HashingWriter(gz)
            if isinstance(layer, bytes):
                plain.write(layer)
            else:
                with tarfile.open(fileobj=plain, mode="w|", format=tarfile.GNU_FORMAT) as tar:
                    _write_tree(tar, layer)
    os.replace(out.name, _blob_path(root, compressed.digest))
    desc = {"mediaType": MEDIA_LAYER_GZIP, "digest": compressed.digest, "size": compressed.offset}
    return desc, plain.digest


def _put_image(root: Path, arch: str, layers: list[Layer]) -> dict[str, Any]:
    descriptors, diff_ids = [], []
    for layer in layers:
        desc, diff_id = _put_layer(root, layer)
        descriptors.append(desc)
        diff_ids.append(diff_id)
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": _put_json(root, config, MEDIA_CONFIG),
        "layers": descriptors,
    }
    return _put_json(root, manifest, MEDIA_MANIFEST)


def _write_layout(root: Path, trees: dict[str, Path], layers: dict[str, list[Layer]] | None) -> str:
    (root / "blobs" / "sha256").mkdir(parents=True)
    images = []
    for arch in sorted(trees):
        desc = _put_image(root, arch, [trees[arch], *(layers or {}).get(arch, [])])
        images.append({**desc, "platform": {"architecture": arch, "os": "linux"}})
    if len(images) == 1:
        top = images[0]
    else:
        index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": images}
        top = _put_json(root, index, MEDIA_INDEX)
    top_index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [top]}
    (root / "index.json").write_bytes(_canonical(top_index))
    (root / "oci-layout").write_bytes(_canonical({"imageLayoutVersion": "1.0.0"}))
    return top["digest"]


def _tar_layout(root: Path, out: Path) -> None:
    """The layout as one tar, entries sorted, owner root, mtime 0 (reproducible)."""
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
        _write_tree(tar, root)


def build_image(
    trees: dict[str, Path],
    out: Path,
    *,
    tar: bool = False,
    layers: dict[str, list[Layer]] | None = None,
) -> str:
    """Make an OCI image layout at ``out`` (a directory, or with ``tar`` one tar file) from
    one directory per architecture (OCI names: amd64, s390x, ppc64le); returns the digest
    of what ``index.json`` points at. One architecture gives an image manifest, several an
    image index with a ``platform`` per manifest. ``layers`` adds layers per architecture
    on top of the tree (a directory, or an uncompressed tar as bytes): files named
    ``.wh.<name>`` / ``.wh..wh..opq`` in them are whiteouts. The same input gives the same
    digest. Any architecture name is accepted so tests can make images the cache refuses.
    """
    if not trees:
        raise ImageError("an image needs at least one architecture")
    for arch, tree in trees.items():
        if not _ARCH_RE.fullmatch(arch):
            raise ImageError(f"{arch!r} is not an OCI architecture name (amd64, s390x, ...)")
        if not Path(tree).is_dir():
            raise ImageError(f"{arch}: {tree} is not a directory")
    unused = set(layers or {}) - set(trees)
    if unused:
        raise ImageError(f"extra layers for architectures without a tree: {sorted(unused)}")
    out = Path(out)
    if out.exists() and (tar or not out.is_dir() or any(out.iterdir())):
        raise ImageError(f"{out} already exists: choose a new path (an image is never merged)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside ``out`` and renamed: a failed build leaves no half-written image.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        layout = Path(tmp) / "layout"
        digest = _write_layout(layout, {a: Path(t) for a, t in trees.items()}, layers)
        if tar:
            _tar_layout(layout, Path(tmp) / "image.tar")
            os.replace(Path(tmp) / "image.tar", out)
        else:
            if out.exists():
                out.rmdir()
            os.replace(layout, out)
    return digest


# --- opening -----------------------------------------------------------------------------


def _blob_name(digest: str) -> str:
    """A blob's name inside a layout (``blobs/sha256/<hex>``); refuses a crafted digest."""
    return _blob_path(Path("."), digest).as_posix()


class _Blobs:
    """Blob access for a layout directory or a layout tar (plain or gzip'd)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)
        self.tar: tarfile.TarFile | None = None
        self.members: dict[str, tarfile.TarInfo] = {}
        if path.is_dir():
            return
        try:
            self.tar = tarfile.open(path, "r:*")
            for m in self.tar.getmembers():
                if m.isfile():
                    self.members[posixpath.normpath(m.name.lstrip("/"))] = m
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            why = f"{path}: neither an OCI layout folder nor a readable tar: {e}"
            raise ImageError(why) from None

    def open(self, name: str) -> IO[bytes]:
        """``name`` is ``index.json`` or a blob path made by :func:`_blob_path`."""
        if self.tar is None:
            return (self.path / name).open("rb")
        member = self.members.get(name)
        f = self.tar.extractfile(member) if member is not None else None
        if f is None:
            raise FileNotFoundError(name)
        return f

    def size(self, name: str) -> int:
        if self.tar is None:
            return (self.path / name).stat().st_size
        if name not in self.members:
            raise FileNotFoundError(name)
        return self.members[name].size

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()


class _StoreBlobs:
    """Blob access for a layout mirrored into a bucket: one listing gives every size,
    blobs are streamed."""

    def __init__(self, store: ObjectStore, prefix: str) -> None:
        self.store, self.prefix = store, prefix
        self.where = f"gs://{store.bucket_name}/{prefix}"
        self.sizes = {i.name[len(prefix) :]: i.size for i in store.list(prefix)}

    def open(self, name: str) -> IO[bytes]:
        if name not in self.sizes:
            raise FileNotFoundError(name)
        return self.store.open_read(self.prefix + name)

    def size(self, name: str) -> int:
        if name not in self.sizes:
            raise FileNotFoundError(name)
        return self.sizes[name]

    def close(self) -> None:
        pass


def _check_descriptor(desc: Any, where: str) -> dict[str, Any]:
    if not isinstance(desc, dict) or not isinstance(desc.get("size"), int):
        raise ImageError(f"{where}: a descriptor without a digest and size: {desc!r}")
    _blob_path(Path("."), str(desc.get("digest")))
    return desc


@dataclass
class _Manifest:
    digest: str
    config: dict[str, Any]
    layers: list[dict[str, Any]]


@dataclass
class Image:
    """An opened OCI image layout. Small JSON blobs are checked when it is opened; layer
    blobs are checked for size then, and hashed while :func:`extract_drivers` reads them."""

    source: str
    top: dict[str, Any]  # what index.json points at: the image's descriptor
    manifests: dict[str, _Manifest]  # OCI architecture -> its image manifest
    blobs: list[dict[str, Any]]  # descriptors of every blob the image uses
    _blobs: _Blobs | _StoreBlobs = field(repr=False)

    @property
    def digest(self) -> str:
        return self.top["digest"]

    def architectures(self) -> list[str]:
        return sorted(self.manifests)

    def close(self) -> None:
        self._blobs.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_json(blobs: _Blobs | _StoreBlobs, desc: dict[str, Any], what: str) -> dict[str, Any]:
    digest = desc["digest"]
    name = _blob_name(digest)
    try:
        with blobs.open(name) as f:
            data = f.read(desc["size"] + 1)
    except FileNotFoundError:
        raise CorruptBlob(f"{what} blob {digest} is missing from the image") from None
    algorithm, _, expected = digest.partition(":")
    if len(data) != desc["size"] or hashlib.new(algorithm, data).hexdigest() != expected:
        raise CorruptBlob(
            f"{what} blob {digest} is corrupt: its bytes do not match its digest and size"
        )
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise ImageError(f"{what} blob {digest} is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ImageError(f"{what} blob {digest} is not a JSON object")
    return doc


def _read_manifest(
    blobs: _Blobs | _StoreBlobs, desc: dict[str, Any]
) -> tuple[_Manifest, str | None]:
    """The manifest and the architecture its config names."""
    doc = _read_json(blobs, desc, "manifest")
    config = _check_descriptor(doc.get("config"), f"manifest {desc['digest']}")
    arch = _read_json(blobs, config, "config").get("architecture")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise ImageError(f"manifest {desc['digest']} has no layers list")
    for layer in layers:
        _check_descriptor(layer, f"manifest {desc['digest']}")
        name = _blob_name(layer["digest"])
        try:
            size = blobs.size(name)
        except FileNotFoundError:
            raise CorruptBlob(f"layer blob {layer['digest']} is missing from the image") from None
        if size != layer["size"]:
            raise CorruptBlob(
                f"layer blob {layer['digest']} is corrupt: {size} bytes, "
                f"its manifest says {layer['size']}"
            )
    return _Manifest(desc["digest"], config, layers), arch if isinstance(arch, str) else None


def open_image(path: Path | str) -> Image:
    """Open an OCI image layout, a directory or a tar of one. ``index.json`` must point at
    exactly one image: a manifest (one architecture) or an index (one per architecture)."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such image layout (folder or tar)")
    return _open(_Blobs(path))


def open_mirrored(store: ObjectStore, prefix: str) -> Image:
    """Open an image layout that :func:`mirror_image` copied under ``prefix``."""
    blobs = _StoreBlobs(store, prefix)
    if "index.json" not in blobs.sizes:
        raise ImageError(f"{blobs.where}: no mirrored image there (no index.json)")
    return _open(blobs)


def _open(blobs: _Blobs | _StoreBlobs) -> Image:
    where = blobs.where
    try:
        try:
            with blobs.open("index.json") as f:
                top_index = json.loads(f.read())
        except FileNotFoundError:
            raise ImageError(f"{where}: not an OCI image layout: no index.json") from None
        except ValueError as e:
            raise ImageError(f"{where}: index.json is not JSON: {e}") from None
        entries = top_index.get("manifests") if isinstance(top_index, dict) else None
        if not isinstance(entries, list) or len(entries) != 1:
            count = len(entries) if isinstance(entries, list) else 0
            raise ImageError(f"{where}: index.json lists {count} images; expected exactly one")
        top = _check_descriptor(entries[0], f"{where}/index.json")
        manifests: dict[str, _Manifest] = {}
        used = [top]
        if top.get("mediaType") in _INDEX_TYPES:
            index = _read_json(blobs, top, "index")
            for desc in index.get("manifests") or []:
                desc = _check_descriptor(desc, f"index {top['digest']}")
                platform = desc.get("platform") or {}
                if platform.get("os") != "linux":  # e.g. attestations: "unknown/unknown"
                    used.append(desc)
                    continue
                arch = platform.get("architecture")
                if not isinstance(arch, str) or arch in manifests:
                    raise ImageError(
                        f"index {top['digest']}: architecture {arch!r} is missing or "
                        "appears twice (variants are not supported)"
                    )
                manifests[arch] = _read_manifest(blobs, desc)[0]
                used.append(desc)
        elif top.get("mediaType") in _MANIFEST_TYPES:
            manifest, arch = _read_manifest(blobs, top)
            arch = (top.get("platform") or {}).get("architecture") or arch
            if not arch:
                raise ImageError(f"manifest {top['digest']}: its config names no architecture")
            manifests[arch] = manifest
        else:
            raise ImageError(f"{where}: index.json points at a {top.get('mediaType')!r}")
        if not manifests:
            raise ImageError(f"{where}: the image has no linux manifests")
        for m in manifests.values():
            used += [m.config, *m.layers]
        unique = list({d["digest"]: d for d in used}.values())
        return Image(where, top, manifests, unique, blobs)
    except BaseException:
        blobs.close()
        raise


def mirror_image(image: Image, store: ObjectStore, prefix: str) -> dict[str, int]:
    """Copy ``image`` into ``store`` under ``prefix`` as an OCI image layout, never
    overwriting: blobs already there are skipped, each blob is checked against its digest
    before it goes up (a corrupt image is refused whole), ``index.json`` goes last, so a
    layout with an ``index.json`` is complete. Returns blob counts."""
    have = {i.name[len(prefix) :]: i.size for i in store.list(prefix)}
    copied = skipped = 0
    for desc in image.blobs:
        name = _blob_name(desc["digest"])
        if have.get(name) == desc["size"]:
            skipped += 1
            continue
        with image._blobs.open(name) as f:
            _check_blob(f, desc)
        with image._blobs.open(name) as f:
            result = store.upload_new_stream(prefix + name, f, desc["size"])
        if result is UploadResult.DIFFERENT:
            raise CorruptBlob(
                f"gs://{store.bucket_name}/{prefix}{name} holds other bytes than its digest "
                "says: delete that mirrored image and run again"
            )
        copied += 1
    store.upload_new(prefix + "oci-layout", _canonical({"imageLayoutVersion": "1.0.0"}))
    index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [image.top]}
    store.put(prefix + "index.json", _canonical(index), "application/json")
    return {"blobs_copied": copied, "blobs_present": skipped}


def _check_blob(f: IO[bytes], desc: dict[str, Any]) -> None:
    algorithm, _, expected = desc["digest"].partition(":")
    hashed, size = hashlib.new(algorithm), 0
    while data := f.read(_CHUNK):
        hashed.update(data)
        size += len(data)
    if size != desc["size"] or hashed.hexdigest() != expected:
        raise CorruptBlob(
            f"blob {desc['digest']} is corrupt: its bytes do not match its digest and size"
        )


# --- reading drivers ---------------------------------------------------------------------

# A failure log is kept in memory up to this size (the report shows its first lines).
MAX_LOG = 1 << 20


@dataclass(frozen=True)
class FileRef:
    """One file of the driver trees: where its bytes are (layer index, member ordinal in
    that layer's tar) and what they are. Drivers are not kept in memory: a second pass
    (:func:`read_files`) streams the ones that are wanted."""

    layer: int
    member: int
    size: int
    md5: str  # base64, as GCS reports it
    sha256: str
    facts: DriverFacts | None = None  # drivers: what verification needs
    log: bytes | None = None  # failure logs: their bytes, up to MAX_LOG


@dataclass(frozen=True)
class Failure:
    """A compile failure the downstream build recorded; an empty ``log`` is no failure."""

    kernel: str
    driver_version: str
    kind: str
    log: bytes
    size: int = field(default=0, compare=False)  # the full log's (``log`` stops at MAX_LOG)


@dataclass
class DriverImage:
    arch: str  # the cache's architecture name (x86_64, ...)
    drivers: dict[str, FileRef]  # cache-relative name <version>/<basename> -> its file
    failures: list[Failure]
    ignored: list[str] = field(default_factory=list)  # files right under /kernel-modules
    rejected: dict[str, list[str]] = field(default_factory=dict)  # name -> problems

    def verified(self) -> dict[str, FileRef]:
        return {n: f for n, f in self.drivers.items() if n not in self.rejected}


class _HashingReader(io.RawIOBase):
    def __init__(self, f: IO[bytes], algorithm: str) -> None:
        self.f, self.hash = f, hashlib.new(algorithm)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.f.read(len(buffer))
        self.hash.update(data)
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> str:
        """Hash whatever the reader left (the end-of-archive padding) and return the hex."""
        while data := self.f.read(_CHUNK):
            self.hash.update(data)
        return self.hash.hexdigest()


def _kept(name: str) -> bool:
    return any(name == r or name.startswith(r + "/") for r in _KEPT_ROOTS)


def _normalize(name: str) -> str | None:
    """A member name relative to the image root ('./' and '/' dropped); None for '..'."""
    parts = [p for p in name.split("/") if p and p != "."]
    if ".." in parts:
        return None
    return "/".join(parts)


# State entries: ("dir", None) | ("file", FileRef) | ("link", target relative to the root)
_Entry = tuple[str, Any]


def _drop_under(state: dict[str, _Entry], path: str, itself: bool) -> None:
    prefix = path + "/" if path else ""
    for name in [n for n in state if n.startswith(prefix)]:
        del state[name]
    if itself:
        state.pop(path, None)


def _file_ref(layer: int, member: int, name: str, data: bytes) -> FileRef:
    md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
    sha256 = hashlib.sha256(data).hexdigest()
    if name.startswith(FAILURES + "/"):
        return FileRef(layer, member, len(data), md5, sha256, log=data[:MAX_LOG])
    return FileRef(layer, member, len(data), md5, sha256, facts=inspect_driver(data))


class _LayerReader:
    def __init__(self, layer: str, index: int) -> None:
        self.layer, self.index = layer, index

    def refuse(self, member: str, why: str) -> ImageError:
        return ImageError(f"layer {self.layer}: member {member!r} {why}")

    def read(self, tar: tarfile.TarFile, state: dict[str, _Entry]) -> None:
        upper: dict[str, _Entry] = {}
        whiteouts: list[str] = []
        opaque: list[str] = []
        for ordinal, m in enumerate(tar):
            name = _normalize(m.name)
            if name is None:
                raise self.refuse(m.name, "has a '..' path component (path traversal)")
            parent, _, base = name.rpartition("/")
            if base == _OPAQUE:
                opaque.append(parent)
                continue
            if base.startswith(_WHITEOUT):
                whiteouts.append(posixpath.join(parent, base[len(_WHITEOUT) :]))
                continue
            if not name or not _kept(name):
                continue
            upper[name] = self.entry(tar, m, ordinal, name, parent, upper, state)
        # Whiteouts hide the lower layers only, whatever their order inside this layer.
        for path in opaque:
            _drop_under(state, path, itself=False)
        for path in whiteouts:
            _drop_under(state, path, itself=True)
        for name, entry in upper.items():
            old = state.get(name)
            if old is not None and old[0] == "dir" and entry[0] != "dir":
                _drop_under(state, name, itself=False)  # a file or link replaces a folder
            ancestor = name
            while "/" in ancestor:
                ancestor = ancestor.rpartition("/")[0]
                above = state.get(ancestor)
                if above is not None and above[0] == "link":
                    raise self.refuse(name, f"lies under the link {ancestor!r}")
                if above is not None and above[0] == "file":
                    del state[ancestor]  # this layer turns the file into a folder
            state[name] = entry

    def entry(
        self,
        tar: tarfile.TarFile,
        m: tarfile.TarInfo,
        ordinal: int,
        name: str,
        parent: str,
        upper: dict[str, _Entry],
        state: dict[str, _Entry],
    ) -> _Entry:
        if m.isdir():
            return ("dir", None)
        if m.isreg():
            if m.size > MAX_DRIVER_SIZE:
                raise self.refuse(m.name, f"is {m.size} bytes: too big for a driver or a log")
            f = tar.extractfile(m)
            data = f.read() if f is not None else b""
            return ("file", _file_ref(self.index, ordinal, name, data))
        if m.issym():
            if m.linkname.startswith("/"):
                raise self.refuse(m.name, f"is an absolute link (to {m.linkname!r})")
            target = posixpath.normpath(posixpath.join(parent, m.linkname))
            if target == ".." or target.startswith("../"):
                raise self.refuse(m.name, f"links to {m.linkname!r}, outside the image")
            return ("link", target)
        if m.islnk():
            target = _normalize(m.linkname)
            if m.linkname.startswith("/") or target is None:
                raise self.refuse(m.name, f"hard-links to {m.linkname!r}, outside the image")
            earlier = upper.get(target) or state.get(target)
            if earlier is None or earlier[0] != "file":
                raise self.refuse(m.name, f"hard-links to {m.linkname!r}, not a driver file")
            return earlier
        what = "a device" if m.ischr() or m.isblk() else "a fifo" if m.isfifo() else "special"
        raise self.refuse(m.name, f"is {what}; only files, folders and links are accepted")


@contextmanager
def _layer_tar(image: Image, desc: dict[str, Any]) -> Iterator[tarfile.TarFile]:
    """One layer's tar, streamed; the blob's digest is checked to its last byte, and a
    corrupt blob is reported as such whatever error it caused."""
    digest = desc["digest"]
    media_type = desc.get("mediaType")
    if media_type not in _GZIP_LAYERS and media_type != MEDIA_LAYER_TAR:
        raise ImageError(f"layer {digest}: media type {media_type!r} is not tar or tar+gzip")
    algorithm, _, expected = digest.partition(":")
    with image._blobs.open(_blob_name(digest)) as raw:
        hashed = _HashingReader(raw, algorithm)
        stream: IO[bytes] = io.BufferedReader(hashed, _CHUNK)
        try:
            if media_type in _GZIP_LAYERS:
                stream = gzip.GzipFile(fileobj=stream, mode="rb")
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                yield tar
        except (tarfile.TarError, OSError, EOFError, zlib.error, ImageError) as e:
            if hashed.drain() != expected:
                raise CorruptBlob(f"layer blob {digest} is corrupt: digest mismatch") from None
            if isinstance(e, ImageError):
                raise
            raise ImageError(f"layer {digest} is not a readable tar ({media_type}): {e}") from e
        if hashed.drain() != expected:
            raise CorruptBlob(f"layer blob {digest} is corrupt: digest mismatch")


def _resolve(state: dict[str, _Entry], name: str) -> FileRef | None:
    path = name
    for _ in range(_MAX_LINK_HOPS):
        entry = state.get(path)
        if entry is None or entry[0] == "dir":
            return None
        if entry[0] == "file":
            return entry[1]
        path = entry[1]
    return None


def _manifest(image: Image, arch: str) -> _Manifest:
    _cache_arch(arch)
    manifest = image.manifests.get(arch)
    if manifest is None:
        have = ", ".join(image.architectures())
        raise ImageError(f"image {image.digest} has no {arch} image (it has {have})")
    return manifest


def extract_drivers(image: Image, arch: str) -> DriverImage:
    """The drivers and failure logs of one architecture (OCI name) of ``image``: its
    layers in order, whiteouts honoured, ``/kernel-modules/**`` and ``/FAILURES/**`` only,
    each driver verified for that architecture (``rejected``). Drivers are hashed, not
    kept: :func:`read_files` streams them. Raises :class:`ImageError` naming the layer and
    member, or listing every bad name."""
    manifest = _manifest(image, arch)
    state: dict[str, _Entry] = {}
    for index, desc in enumerate(manifest.layers):
        with _layer_tar(image, desc) as tar:
            _LayerReader(desc["digest"], index).read(tar, state)
    where = f"image {image.digest} ({arch})"
    if not any(n.split("/")[0] == KERNEL_MODULES for n in state):
        raise ImageError(f"{where} has no /{KERNEL_MODULES}: is it a drivers image?")
    if state.get(KERNEL_MODULES, ("dir",))[0] != "dir":
        raise ImageError(f"{where}: /{KERNEL_MODULES} is not a folder")
    result = DriverImage(_cache_arch(arch), {}, [])
    bad: list[str] = []
    for name, (kind, _) in sorted(state.items()):
        if kind == "dir":
            continue
        ref = _resolve(state, name)
        if ref is None:
            bad.append(f"/{name}: a link that does not lead to a file of the driver trees")
            continue
        parts = name.split("/")
        if parts[0] == KERNEL_MODULES:
            if len(parts) == 2:
                result.ignored.append(f"/{name}")
                continue
            rel = "/".join(parts[1:])
            try:
                version = check_driver_version(parts[1])
            except DriverVersionError as e:
                bad.append(f"/{name}: {e}")
                continue
            entry = parse_object_name(rel) if len(parts) == 3 else None
            if entry is None or ref.facts is None:
                bad.append(f"/{name}: not a driver name (collector-<kernel>.ko.gz, ...)")
                continue
            result.drivers[f"{version}/{parts[2]}"] = ref
            problems = check_driver(entry.key, ref.facts, entry.unavailable, result.arch)
            if problems:
                result.rejected[rel] = problems
        else:
            kind_ = parts[-1].removesuffix(".log")
            if len(parts) != 4 or not parts[-1].endswith(".log") or kind_ not in ("mod", "bpf"):
                bad.append(f"/{name}: not /{FAILURES}/<kernel>/<version>/<mod|bpf>.log")
                continue
            try:
                check_driver_version(parts[2])
            except DriverVersionError as e:
                bad.append(f"/{name}: {e}")
                continue
            result.failures.append(Failure(parts[1], parts[2], kind_, ref.log or b"", ref.size))
    if bad:
        shown = "\n  ".join(bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise ImageError(f"{where}: {len(bad)} bad file(s) in the driver trees:\n  {shown}{more}")
    return result


def read_files(image: Image, arch: str, wanted: dict[str, FileRef]) -> Iterator[tuple[str, bytes]]:
    """Stream the bytes of ``wanted`` (name -> its :class:`FileRef` from
    :func:`extract_drivers`) in layer order, one file in memory at a time; a file whose
    bytes no longer hash as recorded raises :class:`CorruptBlob`."""
    manifest = _manifest(image, arch)
    by_place: dict[tuple[int, int], list[str]] = {}
    for name, ref in wanted.items():
        by_place.setdefault((ref.layer, ref.member), []).append(name)
    for index in sorted({layer for layer, _ in by_place}):
        desc = manifest.layers[index]
        with _layer_tar(image, desc) as tar:
            for ordinal, m in enumerate(tar):
                names = by_place.get((index, ordinal))
                if not names:
                    continue
                f = tar.extractfile(m)
                data = f.read() if f is not None else b""
                if hashlib.sha256(data).hexdigest() != wanted[names[0]].sha256:
                    raise CorruptBlob(f"layer {desc['digest']}: {m.name!r} changed between reads")
                for name in names:
                    yield name, data


# --- CLI -----------------------------------------------------------------------------------


def cmd_image(args: argparse.Namespace) -> int:
    """``drivers image build --out PATH [--tar] --arch ARCH=DIR [--arch ARCH=DIR ...]``.
    The first DIR of an architecture is its base layer; repeating it adds layers."""
    trees: dict[str, Path] = {}
    layers: dict[str, list[Layer]] = {}
    for item in args.arch:
        arch, eq, directory = item.partition("=")
        if not eq or not arch or not directory:
            raise ImageError(f"--arch {item!r}: expected ARCH=DIR, e.g. amd64=./drivers")
        _cache_arch(arch)  # the CLI makes images the pipeline can use
        if arch in trees:
            layers.setdefault(arch, []).append(Path(directory))
        else:
            trees[arch] = Path(directory)
    digest = build_image(trees, Path(args.out), tar=args.tar, layers=layers)
    archs = ", ".join(sorted(trees))
    print(f"built {args.out} ({archs})", file=sys.stderr)
    print(digest)
    return 0


__all__ = [
    "CorruptBlob",
    "DriverImage",
    "Failure",
    "FileRef",
    "Image",
    "ImageError",
    "build_image",
    "cmd_image",
    "extract_drivers",
    "mirror_image",
    "open_image",
    "open_mirrored",
    "read_files",
]
