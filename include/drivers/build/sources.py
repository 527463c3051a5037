"""Prepared driver sources: one deterministic ``<driver_version>.tgz`` per driver version.

A sources folder holds one sub-folder per driver version (named exactly as the version,
checked by :func:`drivers.domain.names.check_driver_version`), each with a ``build.json`` that
says where each kind's sources are and what it produces (see driver_sources/README.md)::

    {"mod": {"dir": "module", "output": "collector.ko"},
     "bpf": {"dir": "bpf", "output": "probe.o"}}

The archive holds the version folder's contents at its root. Publishing never overwrites:
a published version's sources are final, so other bytes under the same name are an error.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from pathlib import Path

from drivers.build.bundles import Member, file_mode, write_tgz
from drivers.domain.layout import source_object
from drivers.domain.names import KINDS, check_driver_version

BUILD_FILE = "build.json"
# Build outputs and editor droppings never belong in published sources.
_SKIPPED_SUFFIXES = (".o", ".ko", ".mod", ".mod.c", ".cmd", ".order", ".symvers", ".swp", "~")


class SourcesChanged(ValueError):
    """A driver version is already published with other sources."""


def shipped_sources_dir() -> Path:
    """The example driver sources that ship with this package."""
    return Path(__file__).parents[1] / "driver_sources"


def version_dirs(root: Path) -> list[Path]:
    """The driver version folders under ``root``, sorted; a folder whose name is not a
    driver version is an error (files such as README.md are ignored)."""
    if not root.is_dir():
        raise ValueError(f"driver sources folder {root} does not exist")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    bad = []
    for d in dirs:
        try:
            check_driver_version(d.name)
        except ValueError as e:
            bad.append(f"{d}: {e}")
    if bad:
        raise ValueError(
            "folders in a driver sources folder must be named after a driver version:\n  "
            + "\n  ".join(bad)
        )
    if not dirs:
        raise ValueError(f"{root} holds no driver version folder (e.g. {root}/2.3.0/)")
    return dirs


# Top-level keys of build.json that describe the prepared tree rather than a kind
# (the prepared sources of `drivers sources prepare`); every other key is a kind.
SPEC_INFO_KEYS = ("driver_version", "driver_name", "generation", "tree")


def read_build_spec(
    version_dir: Path, driver_version: str | None = None
) -> dict[str, dict[str, str]]:
    """``build.json`` of a version folder, checked: for each kind a ``dir`` that exists
    and the ``output`` file name the build leaves in it. With ``driver_version``, sources
    whose ``build.json`` names another driver version are refused. Returns the kinds'
    entries only."""
    path = version_dir / BUILD_FILE
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: it says how to build each kind") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    problems = []
    if not isinstance(spec, dict) or not spec:
        problems.append('expected an object such as {"mod": {...}, "bpf": {...}}')
        spec = {}
    named = spec.get("driver_version")
    if driver_version is not None and named is not None and named != driver_version:
        problems.append(
            f"these are the sources of driver version {named!r}, not {driver_version!r}"
        )
    kinds = {k: v for k, v in spec.items() if k not in SPEC_INFO_KEYS}
    for kind, entry in kinds.items():
        if kind not in KINDS:
            problems.append(f"unknown kind {kind!r} (kinds: {', '.join(KINDS)})")
        elif not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), str) and entry[k] for k in ("dir", "output")
        ):
            problems.append(f'{kind}: expected {{"dir": "<folder>", "output": "<file name>"}}')
        elif not (version_dir / entry["dir"]).is_dir() or ".." in Path(entry["dir"]).parts:
            problems.append(f"{kind}: folder {entry['dir']!r} does not exist in {version_dir}")
    if not kinds and not problems:
        problems.append("it names no kind to build (mod, bpf)")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return kinds


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


def cmd_sources(args: argparse.Namespace) -> int:
    """``drivers sources publish``: package every version folder, optionally upload."""
    if args.action != "publish":
        raise ValueError(f"unknown sources action {args.action!r}: use publish")
    root = Path(args.dir) if args.dir else shipped_sources_dir()
    dirs = version_dirs(root)
    for d in dirs:  # every problem before anything is written
        read_build_spec(d)

    store = None
    if args.upload:
        from drivers.store import storage

        bucket, prefix = storage.parse_gs_uri(args.upload)
        if prefix:
            raise ValueError(f"--upload {args.upload}: sources live at the bucket root")
        store = storage.ObjectStore(storage.client_from_environment(), bucket)

    changed = []
    for d in dirs:
        path = package_sources(d, Path(args.out))
        line = f"{d.name}: {path} ({path.stat().st_size} bytes)"
        if store is not None:
            result = store.upload_new_file(source_object(d.name), path)
            line += f", gs://{store.bucket_name}/{source_object(d.name)} {result.value.upper()}"
            if result.value == "different":
                changed.append(d.name)
        print(line, file=sys.stderr)
        print(str(path))
    if changed:
        raise SourcesChanged(
            f"driver version(s) {', '.join(changed)} are already published with other "
            f"sources in gs://{store.bucket_name}; published sources never change: "
            "give changed sources a new driver version (left the published ones untouched)"
        )
    return 0
