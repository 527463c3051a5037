"""Kernel bundles (``bundle-<uname>.tgz``, DESIGN.md §2) made from Debian header packages.

A bundle holds a kernel's header/build tree plus one-value files at the archive root:
``BUNDLE_UNAME``, ``BUNDLE_BUILD_DIR`` (where to run make, relative to the archive root),
``BUNDLE_DISTRO``, ``BUNDLE_VERSION``/``BUNDLE_MAJOR``/``BUNDLE_MINOR`` (the kernel's
x.y.z, named as in the original bundles) and ``BUNDLE_CHECKSUM`` (sha256 of the tree).
Each value file holds the value and a newline.

From Debian, one kernel takes three packages: ``linux-headers-<uname>`` (the flavour's
build tree), the ``-common``/``-common-rt`` tree it includes and the ``linux-kbuild-*``
tools; the last two are read from the first one's Depends, not hard-coded (bullseye's
depend on ``linux-kbuild-5.10 (>= …)``, shared by every 5.10 ABI; bookworm's 6.12 and
trixie's on ``linux-kbuild-6.12.N+debX``, one per upload). All three come from the one
release whose suites offer the headers (:class:`drivers.build.debian.DebianArchive`:
any release this machine's mirror serves, through a private apt per suite), the newest
version satisfying Depends in that release, as apt would install them. As installed,
the flavour Makefile includes the common tree by absolute path and both trees reach the
kbuild tools through symlinks into /usr/lib. The bundle is made self-contained:

- the include becomes relative to the flavour Makefile's own directory;
- links that leave the two trees are replaced by what they point at (the kbuild
  ``scripts`` and ``tools`` are copied into both trees), links inside stay relative;
- ``lib/modules/<uname>/{build,source}`` (absolute links) and docs are left out, and so
  are the other architectures' ``arch/*`` folders of the common tree (a sixth of it).

Layout (``BUNDLE_BUILD_DIR`` = ``usr/src/linux-headers-<uname>``)::

    BUNDLE_*                                  value files
    usr/src/linux-headers-<uname>/            flavour tree: run make here (objtree)
    usr/src/linux-headers-<abi>-common[-rt]/  common tree (srctree)

6.12 flavour trees carry ``vmlinux``, so kbuild adds BTF to modules and needs ``pahole``
(Debian ``dwarves``/``pahole``, see scripts/host-deps.sh); ``make ...
CONFIG_DEBUG_INFO_BTF_MODULES=`` builds without BTF where pahole is missing.

Archives are deterministic (sorted members, fixed mtime and owner, normalised modes, gzip
without name or time): the same packages give the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import posixpath
import re
import stat
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from drivers.build.bundle import METADATA_FILES
from drivers.build.debian import (
    DISTRO,
    HEADERS_PREFIX,
    RELEASES,
    DebianArchive,
    DebianError,
    Dependency,
    cached_release,
    check_uname,
    check_unames,
    deb_field,
    default_archive,
    fetch_deb,
    parse_depends,
    run_tool,
)
from drivers.domain.deterministic import gzip_writer
from drivers.domain.layout import boot_image_object, bundle_object

# 1980-01-01: any fixed time works; GNU tar warns about 0 ("implausibly old time stamp").
ARCHIVE_MTIME = 315_532_800
# Level 6 is ~1.5x faster than 9 on kernel headers for a 1% larger archive.
COMPRESS_LEVEL = 6
# Symlinks followed while copying a link's target in; Debian trees need 1.
MAX_LINK_DEPTH = 8

_COMMON_DEP_RE = re.compile(r"linux-headers-.+-common(?:-rt)?")
_KBUILD_DEP_RE = re.compile(r"linux-kbuild-.+")
_INCLUDE_RE = re.compile(r"^include\s+/(?P<path>\S+)/Makefile[ \t]*$", re.MULTILINE)
_ARCH_RE = re.compile(r"^\s*override\s+ARCH\s*:?=\s*(\S+)\s*$", re.MULTILINE)


class BundleError(RuntimeError):
    """The header packages are not laid out as a bundle needs (apt and dpkg failures are
    :class:`drivers.build.debian.DebianError`)."""


# --- deterministic archives (also used for driver sources) ------------------------------


@dataclass(frozen=True)
class Member:
    """One archive member: a directory, a file (from disk or memory) or a symlink."""

    name: str
    kind: Literal["dir", "file", "symlink"]
    mode: int = 0o644
    source: Path | None = None
    data: bytes | None = None
    target: str = ""

    def open(self) -> BinaryIO:
        return open(self.source, "rb") if self.data is None else io.BytesIO(self.data)

    def size(self) -> int:
        return len(self.data) if self.data is not None else self.source.stat().st_size


def file_mode(st_mode: int) -> int:
    """0755 for anything executable, else 0644: the umask of whoever extracted the
    packages must not change the archive."""
    return 0o755 if st_mode & 0o111 else 0o644


def _sort_key(member: Member) -> list[str]:
    # By path components: a folder's members follow it directly (plain string order
    # would put "a-b" between "a" and "a/b").
    return member.name.split("/")


def sorted_members(members: Iterable[Member]) -> list[Member]:
    result = sorted(members, key=_sort_key)
    for a, b in zip(result, result[1:], strict=False):
        if a.name == b.name:
            raise ValueError(f"two archive members are named {a.name!r}")
    return result


def tree_checksum(members: Iterable[Member]) -> str:
    """sha256 over every member's kind, mode, name and content (or link target)."""
    digest = hashlib.sha256()
    for m in sorted_members(members):
        digest.update(f"{m.kind} {m.mode:o} {m.name}\0".encode())
        if m.kind == "file":
            digest.update(_file_digest(m).encode())
        elif m.kind == "symlink":
            digest.update(m.target.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _file_digest(member: Member) -> str:
    digest = hashlib.sha256()
    with member.open() as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_tgz(members: Iterable[Member], path: Path) -> Path:
    """Write a deterministic .tgz: members sorted, mtime fixed, owner root (0/0), gzip
    header without file name or time. Written to a temporary file first, so a half-written
    archive never appears under ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            gzip_writer(raw, COMPRESS_LEVEL) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for m in sorted_members(members):
                info = tarfile.TarInfo(m.name)
                info.mtime, info.uid, info.gid = ARCHIVE_MTIME, 0, 0
                info.uname = info.gname = "root"
                if m.kind == "dir":
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                elif m.kind == "symlink":
                    info.type, info.mode, info.linkname = tarfile.SYMTYPE, 0o777, m.target
                    tar.addfile(info)
                else:
                    info.mode, info.size = m.mode, m.size()
                    with m.open() as f:
                        tar.addfile(info, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- bundles ------------------------------------------------------------------------------


@dataclass
class BundleReport:
    """What one bundle run did, for logs and the closing report."""

    uname: str
    release: str  # the Debian release whose packages made it
    path: Path
    size: int
    sha256: str
    checksum: str
    build_dir: str
    packages: list[str]
    downloaded: list[str]
    download_bytes: int
    tree_bytes: int
    members: int
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


def make_debian_bundle(
    uname: str, out_dir: Path, deb_cache: Path, archive: DebianArchive | None = None
) -> Path:
    """Make ``<out_dir>/bundle-<uname>.tgz`` from Debian's header packages (cached in
    ``deb_cache``); returns its path."""
    return build_debian_bundle(uname, Path(out_dir), Path(deb_cache), archive).path


def build_debian_bundle(
    uname: str, out_dir: Path, deb_cache: Path, archive: DebianArchive | None = None
) -> BundleReport:
    """The bundle of ``uname`` from the packages of the release that offers its headers
    (the .deb cache first; ``archive``: default beside ``deb_cache``)."""
    kernel = check_uname(uname)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    flavour_package = HEADERS_PREFIX + uname
    release = cached_release(flavour_package, deb_cache)
    if release is None:
        archive = archive or default_archive(deb_cache)
        offered = archive.find(Dependency(flavour_package))
        if offered is None:
            check_unames([uname], deb_cache, archive)  # raises, naming the nearest ones
            raise DebianError(f"no release offers {flavour_package}")
        release = offered.suite.release
    flavour_deb, fetched = fetch_deb(Dependency(flavour_package), deb_cache, archive, release)
    debs, downloaded = [flavour_deb], [flavour_deb] if fetched else []
    for dep in _tree_dependencies(flavour_deb):
        deb, fetched = fetch_deb(dep, deb_cache, archive, release)
        debs.append(deb)
        downloaded += [deb] if fetched else []
    downloaded_at = time.monotonic()

    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".bundle-{uname}-") as scratch:
        root = Path(scratch)
        for deb in debs:  # one root, as dpkg would install them: relative links resolve
            run_tool(["dpkg-deb", "-x", str(deb), str(root)], f"extracting {deb.name}")
        extracted_at = time.monotonic()

        tree = DebianTree(root, uname)
        members = tree.members()
        checksum = tree_checksum(members)
        values = {
            "BUNDLE_UNAME": uname,
            "BUNDLE_BUILD_DIR": tree.flavour,
            "BUNDLE_DISTRO": DISTRO,
            "BUNDLE_VERSION": str(kernel.major),
            "BUNDLE_MAJOR": str(kernel.minor),
            "BUNDLE_MINOR": str(kernel.patch),
            "BUNDLE_CHECKSUM": checksum,
        }
        metadata = [Member(k, "file", data=f"{values[k]}\n".encode()) for k in METADATA_FILES]
        path = write_tgz([*metadata, *members], out_dir / bundle_object(uname))
        tree_bytes = sum(m.size() for m in members if m.kind == "file")
    archived_at = time.monotonic()

    return BundleReport(
        uname=uname,
        release=release,
        path=path,
        size=path.stat().st_size,
        sha256=sha256_file(path),
        checksum=checksum,
        build_dir=tree.flavour,
        packages=[d.name for d in debs],
        downloaded=[d.name for d in downloaded],
        download_bytes=sum(d.stat().st_size for d in downloaded),
        tree_bytes=tree_bytes,
        members=len(members) + len(metadata),
        seconds={
            "download": round(downloaded_at - started, 2),
            "extract": round(extracted_at - downloaded_at, 2),
            "archive": round(archived_at - extracted_at, 2),
        },
    )


def _tree_dependencies(flavour_deb: Path) -> list[Dependency]:
    """The common-tree and kbuild packages the flavour package depends on."""
    deps = parse_depends(deb_field(flavour_deb, "Depends"))
    picked = []
    for what, pattern in (("common headers", _COMMON_DEP_RE), ("kbuild", _KBUILD_DEP_RE)):
        matches = [d for d in deps if pattern.fullmatch(d.name)]
        if len(matches) != 1:
            raise BundleError(
                f"{flavour_deb.name}: expected one {what} package in Depends, found "
                f"{[str(d) for d in matches]}"
            )
        picked += matches
    return picked


class DebianTree:
    """The two header trees of one kernel inside an extracted package root, as members of
    a self-contained archive."""

    def __init__(self, root: Path, uname: str) -> None:
        self.root = root
        self.flavour = f"usr/src/{HEADERS_PREFIX}{uname}"
        makefile = root / self.flavour / "Makefile"
        if not makefile.is_file():
            raise BundleError(f"the header package has no {self.flavour}/Makefile")
        text = makefile.read_text()
        include = _INCLUDE_RE.search(text)
        if include is None:
            raise BundleError(
                f"{self.flavour}/Makefile does not include a common tree by absolute path:\n"
                + text[:500]
            )
        self.common = include["path"]
        if not (root / self.common / "Makefile").is_file():
            raise BundleError(
                f"{self.flavour}/Makefile includes /{self.common}/Makefile, "
                "which no extracted package holds"
            )
        # Relative to the Makefile's own folder, so make -C and make -f both work.
        relative = posixpath.relpath(self.common, self.flavour)
        self.makefile = (
            text[: include.start()]
            + f"include $(dir $(lastword $(MAKEFILE_LIST))){relative}/Makefile"
            + text[include.end() :]
        ).encode()
        self.pruned = self._other_arches()

    def _other_arches(self) -> set[str]:
        """The common tree's arch/* folders other than the flavour's SRCARCH."""
        variables = self.root / self.flavour / ".kernelvariables"
        arch = _ARCH_RE.search(variables.read_text()) if variables.is_file() else None
        arches = self.root / self.common / "arch"
        if arch is None or not (arches / arch[1]).is_dir():
            return set()  # unsure which one is needed: keep them all
        return {f"{self.common}/arch/{a.name}" for a in arches.iterdir() if a.name != arch[1]}

    def members(self) -> list[Member]:
        members = [Member(d, "dir") for d in _parents(self.flavour) | _parents(self.common)]
        for tree in (self.flavour, self.common):
            members += self._walk(tree, tree, depth=0)
        return sorted_members(members)

    def _inside(self, path: str) -> bool:
        return any(path == t or path.startswith(t + "/") for t in (self.flavour, self.common))

    def _walk(self, source: str, name: str, depth: int) -> Iterator[Member]:
        """Members for ``source`` (a path in the package root) stored as ``name``."""
        if source in self.pruned:
            return
        full = self.root / source
        st = full.lstat()
        if stat.S_ISLNK(st.st_mode):
            yield from self._link(source, name, depth)
        elif stat.S_ISDIR(st.st_mode):
            yield Member(name, "dir")
            for child in sorted(os.listdir(full)):
                yield from self._walk(f"{source}/{child}", f"{name}/{child}", depth)
        elif stat.S_ISREG(st.st_mode):
            if source == f"{self.flavour}/Makefile":
                yield Member(name, "file", data=self.makefile)
            else:
                yield Member(name, "file", mode=file_mode(st.st_mode), source=full)
        else:
            raise BundleError(f"/{source} is neither a file, a folder nor a symlink")

    def _link(self, source: str, name: str, depth: int) -> Iterator[Member]:
        link = os.readlink(self.root / source)
        if link.startswith("/"):
            target = posixpath.normpath(link.lstrip("/"))
        else:
            target = posixpath.normpath(posixpath.join(posixpath.dirname(source), link))
        if target == ".." or target.startswith("../"):
            raise BundleError(f"/{source} -> {link} points above the file system root")
        if self._inside(target):
            # Stays inside the bundle: keep it, relative to where the link is stored.
            yield Member(name, "symlink", target=posixpath.relpath(target, posixpath.dirname(name)))
            return
        if not os.path.lexists(self.root / target):
            raise BundleError(f"/{source} -> {link}: no extracted package holds /{target}")
        if depth >= MAX_LINK_DEPTH:
            raise BundleError(f"/{source} -> {link}: more than {MAX_LINK_DEPTH} nested links")
        yield from self._walk(target, name, depth + 1)  # copy what it points at


def _parents(path: str) -> set[str]:
    parts = path.split("/")
    return {"/".join(parts[:i]) for i in range(1, len(parts))}


# --- command ------------------------------------------------------------------------------


def cmd_bundle(args: argparse.Namespace) -> int:
    """``drivers bundle debian UNAME...``: make bundles, optionally upload them;
    ``--list``: the kernels each release offers."""
    if args.source != DISTRO:
        raise ValueError(f"unknown bundle source {args.source!r}: only {DISTRO!r} is supported")
    unames = list(dict.fromkeys(args.unames))
    out_dir, deb_cache = Path(args.out), Path(args.deb_cache)
    archive = (
        DebianArchive(Path(args.apt_state), refresh=args.refresh)
        if args.apt_state
        else default_archive(deb_cache, refresh=args.refresh)
    )
    if args.list:
        if unames:
            raise ValueError("--list takes no UNAME: it lists every kernel the releases offer")
        return _print_offered(archive)
    if not unames:
        raise ValueError("give at least one UNAME (e.g. 6.1.0-47-amd64), or --list")
    store = _bundle_store(args.upload) if args.upload else None
    if store is not None:  # a bundle already published is final: do not make it again
        for uname in [u for u in unames if store.exists(bundle_object(u))]:
            print(
                f"gs://{store.bucket_name}/{bundle_object(uname)}: already there", file=sys.stderr
            )
            unames.remove(uname)
            if args.boot_images:  # its boot image may still be missing
                _publish_boot_image(args, uname, deb_cache, out_dir, archive)
    check_unames(unames, deb_cache, archive)  # every bad name at once, before any slow work

    status = 0
    for uname in unames:
        try:
            report = build_debian_bundle(uname, out_dir, deb_cache, archive)
        except (BundleError, DebianError) as e:
            print(f"drivers bundle: {uname}: {e}", file=sys.stderr)
            status = 1
            continue
        s = report.seconds
        fetched = (
            f"{report.download_bytes / 1e6:.1f} MB downloaded in {s['download']:.1f}s"
            if report.downloaded
            else "packages cached"
        )
        print(
            f"{report.path}: {report.release}, {report.size / 1e6:.1f} MB "
            f"({report.tree_bytes / 1e6:.0f} MB, {report.members} members unpacked); "
            f"{fetched}, extract {s['extract']:.1f}s, archive {s['archive']:.1f}s",
            file=sys.stderr,
        )
        out = report.to_json()
        if store is not None:
            out["upload"] = result = _upload(store, uname, report.path)
            status = max(status, 0 if result != "different" else 1)
        if args.boot_images:
            out["boot_image"] = _publish_boot_image(args, uname, deb_cache, out_dir, archive)
        print(json.dumps(out))
    return status


def _print_offered(archive: DebianArchive) -> int:
    """``--list``: per release, each kernel and the suites offering it; counts."""
    offered = archive.kernels()
    for release in RELEASES:
        mine = [o for o in offered if o.release == release]
        print(f"{release}: {len(mine)} kernel(s)")
        for o in mine:
            print(f"  {release}\t{','.join(o.suites)}\t{o.uname}")
    print(f"total: {len(offered)} kernel(s) in {len(RELEASES)} release(s)")
    for suite, why in archive.unreachable.items():
        print(f"note: suite {suite} not searched: {why}", file=sys.stderr)
    return 0


def _publish_boot_image(
    args: argparse.Namespace,
    uname: str,
    deb_cache: Path,
    out_dir: Path,
    archive: DebianArchive | None = None,
) -> str:
    from drivers.build.boot_images import publish_boot_image
    from drivers.domain.config import load_config
    from drivers.store import storage

    store = storage.ObjectStore(
        storage.client_from_environment(), storage.parse_gs_uri(args.boot_images)[0]
    )
    modules = (
        [m for m in args.boot_modules.split(",") if m]
        if args.boot_modules is not None
        else load_config().vm_tests["modules"]
    )
    result = publish_boot_image(
        store, uname, deb_cache, out_dir.parent / "kernel-images", modules, archive
    )
    where = f"gs://{store.bucket_name}/{boot_image_object(uname)}"
    extra = f" (with module(s) {', '.join(modules)} and their dependencies)" if modules else ""
    print(f"  boot image {where}: {result}{extra}", file=sys.stderr)
    return result


def _bundle_store(uri: str):
    from drivers.store import storage

    bucket, prefix = storage.parse_gs_uri(uri)
    if prefix:
        raise ValueError(f"--upload {uri}: bundles live at the bucket root; give gs://{bucket}")
    return storage.ObjectStore(storage.client_from_environment(), bucket)


def _upload(store, uname: str, path: Path) -> str:
    from drivers.store import storage

    name = bundle_object(uname)
    where = f"gs://{store.bucket_name}/{name}"
    result = store.upload_new_file(name, path)
    if result is storage.UploadResult.CREATED:
        print(f"  uploaded to {where}", file=sys.stderr)
    elif result is storage.UploadResult.IDENTICAL:
        print(f"  {where} already holds these bytes (IDENTICAL): nothing to do", file=sys.stderr)
    else:
        print(
            f"  error: {where} already exists with other bytes (DIFFERENT) and was left "
            "untouched; bundles are never overwritten (compare BUNDLE_CHECKSUM, and delete "
            "the object first if it really must be replaced)",
            file=sys.stderr,
        )
    return result.value
