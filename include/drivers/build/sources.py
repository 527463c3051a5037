"""Prepared driver sources: one deterministic ``<driver_version>.tgz`` per driver version,
at the sources bucket's root, with a ``build.json`` at the archive's root that says where
each kind's sources are and what their build leaves there::

    {"driver_version": "2.3.0", "driver_name": "collector", "generation": "2.x",
     "tree": "falcosecurity-libs-2.3.0",
     "mod": {"dir": "driver", "output": "collector.ko"},
     "bpf": {"dir": "driver/bpf", "output": "probe.o"}}

``drivers sources prepare`` makes one from a falcosecurity-libs tree
(:mod:`drivers.build.prepare`); :func:`package_sources` packs a folder that is already
prepared (the test fixture's toy sources). Publishing never overwrites: a published
version's sources are final, so other bytes under the same name are an error.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import tempfile
from pathlib import Path

from drivers.build.bundles import Member, file_mode, sha256_file, write_tgz
from drivers.build.prepare import opened_tree, prepare_tree
from drivers.domain.layout import source_object
from drivers.domain.names import KINDS, check_driver_version

BUILD_FILE = "build.json"
# What build.json may say about the sources besides the kinds (drivers sources prepare
# writes them all; the test fixture's toy sources none).
SPEC_INFO = ("driver_version", "driver_name", "generation", "tree")
# Build outputs (kbuild's, and the probe's LLVM IR) and editor droppings never belong in
# published sources.
_SKIPPED_SUFFIXES = (
    ".o",
    ".ko",
    ".mod",
    ".mod.c",
    ".cmd",
    ".order",
    ".symvers",
    ".ll",
    ".swp",
    "~",
)


class SourcesChanged(ValueError):
    """A driver version is already published with other sources."""


def read_build_spec(
    version_dir: Path, driver_version: str | None = None
) -> dict[str, dict[str, str]]:
    """``build.json`` of a prepared folder, checked: for each kind a ``dir`` inside it that
    exists and the ``output`` file name the build leaves there; optionally what the
    sources are (:data:`SPEC_INFO`, each a string). With ``driver_version``, sources whose
    ``build.json`` names another driver version are refused. Returns the kinds' entries
    only."""
    path = version_dir / BUILD_FILE
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: it says how to build each kind") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    problems = []
    if not isinstance(spec, dict) or not set(spec) & set(KINDS):
        problems.append('expected an object such as {"mod": {...}, "bpf": {...}}')
        spec = {}
    for key, entry in spec.items():
        if key in SPEC_INFO:
            if not isinstance(entry, str) or not entry:
                problems.append(f"{key}: expected a non-empty string")
        elif key not in KINDS:
            known = ", ".join((*KINDS, *SPEC_INFO))
            problems.append(f"unknown key {key!r} (keys: {known})")
        elif not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), str) and entry[k] for k in ("dir", "output")
        ):
            problems.append(f'{key}: expected {{"dir": "<folder>", "output": "<file name>"}}')
        elif (
            Path(entry["dir"]).is_absolute()
            or ".." in Path(entry["dir"]).parts
            or not (version_dir / entry["dir"]).is_dir()
        ):
            problems.append(f"{key}: {entry['dir']!r} is not a folder inside {version_dir}")
    named = spec.get("driver_version")
    if driver_version is not None and named is not None and named != driver_version:
        problems.append(
            f"these are the sources of driver version {named!r}, not {driver_version!r}"
        )
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return {kind: entry for kind, entry in spec.items() if kind in KINDS}


def source_members(version_dir: Path) -> list[Member]:
    """The version folder's files and folders as archive members (names relative to it)."""
    members = []
    for dirpath, dirnames, filenames in os.walk(version_dir):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        base = Path(dirpath)
        rel = base.relative_to(version_dir).as_posix()
        if rel != ".":
            members.append(Member(rel, "dir"))
        for name in filenames:
            if name.startswith(".") or name.endswith(_SKIPPED_SUFFIXES):
                continue
            path = base / name
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{path} is not a regular file (links are not published)")
            arcname = name if rel == "." else f"{rel}/{name}"
            members.append(Member(arcname, "file", mode=file_mode(st.st_mode), source=path))
    return members


def package_sources(version_dir: Path, out_dir: Path) -> Path:
    """Write ``<out_dir>/<driver_version>.tgz`` for one version folder; the same files give
    the same bytes, whatever their times, owners or the umask."""
    version_dir = Path(version_dir)
    version = check_driver_version(version_dir.name)
    read_build_spec(version_dir, version)
    return write_tgz(source_members(version_dir), Path(out_dir) / source_object(version))


def prepare_sources(source: Path, driver_version: str, out_dir: Path) -> Path:
    """Write ``<out_dir>/<driver_version>.tgz`` from a falcosecurity-libs tree (a folder,
    or a .tar.gz whose single top folder is the tree): the tree as it is, with the files
    :func:`~drivers.build.prepare.prepare_tree` generates added or replaced and its
    ``build.json``. The same tree gives the same bytes, from a folder or a tarball."""
    check_driver_version(driver_version)
    with opened_tree(Path(source)) as tree:
        prepared = prepare_tree(tree, driver_version)
        spec = json.dumps(prepared.spec, indent=2) + "\n"
        members = {m.name: m for m in source_members(tree.root)}
        for m in [*prepared.files, Member(BUILD_FILE, "file", mode=0o644, data=spec.encode())]:
            members[m.name] = m  # a generated file replaces the tree's (e.g. a leftover)
        return write_tgz(members.values(), Path(out_dir) / source_object(driver_version))


def cmd_sources(args: argparse.Namespace) -> int:
    """``drivers sources prepare TREE --driver-version V (--out DIR | --upload gs://B)``."""
    version = check_driver_version(args.driver_version)
    if not args.upload:
        path = prepare_sources(args.tree, version, args.out)
        print(
            f"{args.tree}: driver version {version} prepared, {_described(path)}", file=sys.stderr
        )
        print(path)
        return 0

    from drivers.store import storage  # google-cloud-storage only when a bucket is used

    bucket, prefix = storage.parse_gs_uri(args.upload)
    if prefix:
        raise ValueError(f"--upload {args.upload}: sources live at the bucket root (gs://BUCKET)")
    store = storage.ObjectStore(storage.client_from_environment(), bucket)
    name = source_object(version)
    with tempfile.TemporaryDirectory(prefix="drivers-sources-") as scratch:
        path = prepare_sources(args.tree, version, Path(scratch))
        result = store.upload_new_file(name, path)
        described = _described(path)
    uri = f"gs://{bucket}/{name}"
    if result is storage.UploadResult.DIFFERENT:
        raise SourcesChanged(
            f"{uri} is already published with other sources than {args.tree} prepares "
            f"({described}); published sources never change: give changed sources a new "
            "driver version (the published object is untouched)"
        )
    what = "uploaded" if result is storage.UploadResult.CREATED else "unchanged (already there)"
    print(f"{args.tree}: driver version {version} prepared, {described}: {what}", file=sys.stderr)
    print(uri)
    return 0


def _described(path: Path) -> str:
    return f"{path.name} {path.stat().st_size} bytes, sha256 {sha256_file(path)}"
