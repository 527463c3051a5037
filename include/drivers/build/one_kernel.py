"""``drivers build KERNEL``: the drivers of one kernel on this machine, through the code a
shard runs (:mod:`drivers.build.shard_run`: the same safe extraction of the bundle and the
sources, the same :func:`drivers.build.compile.build_driver` and its checks), without a
shard, a work bucket or a ledger. What an engineer runs to debug one kernel.

Each driver lands in ``--out`` under its cache name (``collector-<kernel>.ko.gz``,
``collector-ebpf-<kernel>.o.gz``, or the empty ``.collector-ebpf-<kernel>.unavail`` marker
of a kernel that cannot run eBPF), a failed one's log beside it; stdout has one JSON line
per driver. Exit status: 0 every driver built (or is unavailable), 1 some driver failed
(its log path on stderr) or was refused by the toolchain guard (the kernel was built with
another compiler than the builder's: ``toolchain_mismatch``, both named on stderr), 2 bad
input (unknown kind or builder, missing file or object, a bundle of another kernel,
sources of another driver version, ...).

``--builder NAME`` names the builder it builds as (default: the config's route for the
kernel, :func:`routed_builder`); it is in every record, and the guard compares the
kernel's compiler with the one kbuild calls on this machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from drivers.build.bundle import Bundle, BundleCorrupt, open_bundle
from drivers.build.compile import BuilderToolchain, ToolMissing, build_driver, task_status
from drivers.build.safetar import UnsafeArchive, safe_extract
from drivers.build.shard_run import scratch_dir, sources_root
from drivers.build.sources import read_build_spec
from drivers.domain import layout
from drivers.domain.config import Config
from drivers.domain.errors import DriversError
from drivers.domain.kernels import KernelParseError, ebpf_supported, parse_kernel
from drivers.domain.names import KINDS, DriverKey, check_driver_version, check_kinds
from drivers.domain.toolchain import TOOLCHAIN_MISMATCH

EXIT_BUILT, EXIT_FAILED = 0, 1  # bad input: 2, as every verb (drivers.ops.cli)


class BadInput(DriversError):
    """An input of ``drivers build`` that no build can use; the message names it."""


def routed_builder(config: Config, kernel: str, kinds: tuple[str, ...] = KINDS) -> str:
    """The builder the config's routes give ``kernel`` for ``kinds``; raises
    :class:`BadInput` when no route takes it, or its kinds go to different builders."""
    try:
        release = parse_kernel(kernel)
    except KernelParseError as e:
        raise BadInput(str(e)) from None
    routes = {kind: config.route(release, kind) for kind in kinds}
    builders = set(routes.values())
    if None in builders:
        missing = ", ".join(k for k, b in routes.items() if b is None)
        raise BadInput(
            f"no route in {config.path} takes {kernel} ({missing}): pass --builder NAME "
            f"(one of {', '.join(config.builders)})"
        )
    if len(builders) > 1:
        split = ", ".join(f"{k} -> {b}" for k, b in routes.items())
        raise BadInput(
            f"{kernel}'s kinds go to different builders ({split}): pass --kinds with one "
            "kind, or --builder NAME"
        )
    return builders.pop()  # type: ignore[return-value]


def check_builder(config: Config, builder: str) -> str:
    if builder not in config.builders:
        raise BadInput(
            f"--builder {builder}: not a builder of {config.path} "
            f"(its builders: {', '.join(config.builders)})"
        )
    return builder


def cache_file_name(key: DriverKey, unavailable: bool = False) -> str:
    """The driver's file name in a cache folder (the object name without its version)."""
    return Path(key.unavail_name() if unavailable else key.object_name()).name


def log_file_name(key: DriverKey) -> str:
    """A failed driver's log beside the drivers: ``collector-<kernel>.ko.log``,
    ``collector-ebpf-<kernel>.o.log``."""
    return cache_file_name(key).removesuffix(".gz") + ".log"


def fetch_input(source: str, what: str, dest: Path) -> Path:
    """A local file, or a gs://BUCKET/OBJECT downloaded to ``dest`` (as build-shard reads
    its inputs: storage.parse_gs_uri, client_from_environment)."""
    if not source.startswith("gs://"):
        path = Path(source)
        if not path.is_file():
            raise BadInput(f"--{what} {source}: no such file")
        return path
    from drivers.store import storage

    bucket, name = storage.parse_gs_uri(source)
    if not name or name.endswith("/"):
        raise BadInput(f"--{what} {source}: name an object, gs://BUCKET/OBJECT")
    store = storage.ObjectStore(storage.client_from_environment(), bucket)
    try:
        return store.download_to(name, dest)
    except storage.ObjectNotFound as e:
        raise BadInput(f"--{what} {source}: {e}") from None


def extract_sources(
    archive: Path, name: str, driver_version: str, kinds: tuple[str, ...], dest: Path
) -> Path:
    """The prepared sources, extracted and checked to be ``driver_version``'s, with a
    ``build.json`` entry for each of ``kinds``."""
    stem = name.rsplit("/", 1)[-1].removesuffix(".tgz")
    if stem != name.rsplit("/", 1)[-1] and _is_driver_version(stem) and stem != driver_version:
        raise BadInput(f"--sources {name}: the sources of {stem}, not of {driver_version}")
    try:
        safe_extract(archive, dest)
    except UnsafeArchive as e:
        raise BadInput(f"--sources {name}: {e}") from None
    root = sources_root(dest)
    try:
        spec = read_build_spec(root, driver_version)
    except ValueError as e:
        raise BadInput(f"--sources {name}: {e}") from None
    missing = [kind for kind in kinds if kind not in spec]
    if missing:
        raise BadInput(
            f"--sources {name}: build.json has no {' or '.join(missing)} entry "
            f"(it builds {', '.join(spec)}): pass --kinds {','.join(spec)}"
        )
    return root


def _is_driver_version(text: str) -> bool:
    try:
        check_driver_version(text)
    except ValueError:
        return False
    return True


def extract_bundle(archive: Path, name: str, kernel: str, dest: Path) -> Bundle:
    try:
        safe_extract(archive, dest)
        return open_bundle(dest, kernel)
    except (UnsafeArchive, BundleCorrupt) as e:
        raise BadInput(f"--bundle {name}: {e}") from None


def build_kernel(
    kernel: str,
    driver_version: str,
    kinds: tuple[str, ...],
    sources: str,
    bundle: str,
    out: Path,
    workdir: Path | None = None,
    builder: str = "local",
) -> list[dict[str, Any]]:
    """Build ``kinds`` of ``driver_version`` for ``kernel`` into ``out`` as ``builder``
    (with this machine's toolchain); one record per driver. Raises :class:`BadInput`."""
    release = parse_kernel(kernel)
    toolchain = BuilderToolchain(builder)
    keys = [DriverKey(kernel, driver_version, kind) for kind in kinds]
    out.mkdir(parents=True, exist_ok=True)
    records = []
    with scratch_dir(workdir) as scratch:
        tree = extract_sources(
            fetch_input(sources, "sources", scratch / "sources.tgz"),
            sources,
            driver_version,
            kinds,
            scratch / "sources",
        )
        to_build = []
        for key in keys:
            if key.kind == "bpf" and not ebpf_supported(release):
                (out / cache_file_name(key, unavailable=True)).write_bytes(b"")
                records.append(
                    _record(key, builder, "unavailable", out / cache_file_name(key, True), b"")
                )
            else:
                to_build.append(key)
        if not to_build:
            return records
        built_bundle = extract_bundle(
            fetch_input(bundle, "bundle", scratch / layout.bundle_object(kernel)),
            bundle,
            kernel,
            scratch / "bundle",
        )
        compiler = built_bundle.compiler.text if built_bundle.compiler else None
        for key in to_build:
            started = time.perf_counter()
            built = build_driver(key, tree, built_bundle, scratch, toolchain)
            seconds = time.perf_counter() - started
            if built.failure == "sources_missing":
                raise BadInput(f"--sources {sources}: {built.message}")
            if built.data is None:
                log = None
                if built.log:  # a refused kernel never ran make: no log
                    log = out / log_file_name(key)
                    log.write_bytes(built.log)
                records.append(
                    _record(key, builder, task_status(built), None, None, seconds)
                    | {
                        "failure": built.failure,
                        "message": built.message,
                        "log": str(log) if log else None,
                        "kernel_compiler": compiler,
                    }
                )
                continue
            path = out / cache_file_name(key)
            path.write_bytes(built.data)
            records.append(
                _record(key, builder, "built", path, built.data, seconds)
                | {"kernel_compiler": compiler}
            )
    return sorted(records, key=lambda r: kinds.index(r["kind"]))


def _record(
    key: DriverKey,
    builder: str,
    status: str,
    path: Path | None,
    data: bytes | None,
    seconds: float = 0.0,
) -> dict[str, Any]:
    return {
        "kernel": key.kernel,
        "driver_version": key.driver_version,
        "kind": key.kind,
        "builder": builder,
        "status": status,
        "object": str(path) if path is not None else None,
        "sha256": hashlib.sha256(data).hexdigest() if data is not None else None,
        "seconds": round(seconds, 3),
        "failure": None,
        "message": "",
        "log": None,
        "kernel_compiler": None,  # the bundle's, when it was opened
    }


def cmd_build(args: argparse.Namespace) -> int:
    """``drivers build KERNEL --driver-version V --sources … --bundle … --out DIR
    [--builder NAME]``."""
    from drivers.domain.config import load_config

    driver_version = check_driver_version(args.driver_version)
    kinds = check_kinds(k.strip() for k in args.kinds.split(",") if k.strip())
    workdir = Path(args.workdir) if args.workdir else None
    config = load_config()
    builder = builder_for(config, args.kernel, kinds, args.builder)
    print(
        f"{args.kernel}: building as builder {builder} with this machine's toolchain",
        file=sys.stderr,
    )
    try:
        records = build_kernel(
            args.kernel,
            driver_version,
            kinds,
            args.sources,
            args.bundle,
            Path(args.out),
            workdir,
            builder,
        )
    except ToolMissing as e:  # this machine cannot build anything: not the driver's failure
        raise BadInput(str(e)) from None
    for r in records:
        print(json.dumps(r))
        if r["status"] == TOOLCHAIN_MISMATCH:
            print(
                f"{r['kernel']} {r['driver_version']} {r['kind']}: refused before compiling, "
                f"{TOOLCHAIN_MISMATCH}: {r['message']}",
                file=sys.stderr,
            )
        elif r["status"] == "failed":
            print(
                f"{r['kernel']} {r['driver_version']} {r['kind']}: {r['failure']}: "
                f"{r['message']} (log: {r['log']})",
                file=sys.stderr,
            )
    failed = any(r["status"] in ("failed", TOOLCHAIN_MISMATCH) for r in records)
    return EXIT_FAILED if failed else EXIT_BUILT


def builder_for(config: Config, kernel: str, kinds: tuple[str, ...], named: str | None) -> str:
    """``--builder NAME`` checked against the config, else the kernel's route."""
    return check_builder(config, named) if named else routed_builder(config, kernel, kinds)
