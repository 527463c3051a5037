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
kernel, :func:`routed_builder`); it is in every record. On the docker runtime (the
embedded default's config) the build runs in that builder's image, sandboxed as a shard
is (:mod:`drivers.build.sandbox`: the inputs staged into its work folder, no network,
uid 1000), so an engineer reproduces any shard's build on their machine; the container
runs this same command with ``--here``. Otherwise (``--here``, or the local and
kubernetes runtimes) it builds with this machine's toolchain. Either way the toolchain
guard compares the kernel's compiler with the one kbuild calls where it builds.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from drivers.build.bundle import Bundle, BundleCorrupt, open_bundle
from drivers.build.compile import BuilderToolchain, ToolMissing, build_driver, task_status
from drivers.build.safetar import UnsafeArchive, safe_extract
from drivers.build.shard_run import SANDBOX_ENV, scratch_dir, sources_root
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
    [--builder NAME] [--here]``."""
    from drivers.domain.config import load_config

    driver_version = check_driver_version(args.driver_version)
    kinds = check_kinds(k.strip() for k in args.kinds.split(",") if k.strip())
    workdir = Path(args.workdir) if args.workdir else None
    inputs = (args.kernel, driver_version, kinds, args.sources, args.bundle, Path(args.out))
    inside = os.environ.get(SANDBOX_ENV) and args.builder  # the worker checked the builder
    config = None if inside else load_config()
    builder = (
        args.builder if config is None else builder_for(config, args.kernel, kinds, args.builder)
    )
    if config is not None and config.runtime == "docker" and not args.here:
        records = build_kernel_in_image(config, builder, *inputs, workdir)
    else:
        where = "in its image" if inside else "with this machine's toolchain"
        print(f"{args.kernel}: building as builder {builder} {where}", file=sys.stderr)
        try:
            records = build_kernel(*inputs, workdir, builder)
        except ToolMissing as e:  # this machine cannot build anything: not the driver's
            raise BadInput(str(e)) from None
    if args.records:  # the in-image run's answer to the worker (a file in its folder)
        Path(args.records).write_text("".join(json.dumps(r) + "\n" for r in records))
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


IN_IMAGE_RECORDS = "out/records.jsonl"  # what the in-image run leaves in its work folder


def build_kernel_in_image(
    config: Config,
    builder: str,
    kernel: str,
    driver_version: str,
    kinds: tuple[str, ...],
    sources: str,
    bundle: str,
    out: Path,
    workdir: Path | None = None,
) -> list[dict[str, Any]]:
    """:func:`build_kernel` in ``builder``'s image, sandboxed as its shards are: the
    inputs staged into a work folder (its /work), the same command inside with
    ``--here``, then the drivers and logs it left copied to ``out``, each checked
    against its record (only the kernel's cache names, the bytes its sha256 says)."""
    from drivers.build import sandbox as sb

    try:
        box = sb.for_builder(config, builder)
    except ValueError as e:
        raise BadInput(f"--builder {builder}: {e}") from None
    if workdir is not None:
        box = dataclasses.replace(box, workdir=workdir)
    folder = sb.work_folder(box)
    try:
        staged = {}
        for what, source in (("sources", sources), ("bundle", bundle)):
            name = source.rsplit("/", 1)[-1]
            (folder / "in").mkdir(exist_ok=True)
            path = fetch_input(source, what, folder / "in" / name)
            if path.parent != folder / "in":
                shutil.copyfile(path, folder / "in" / name)
            staged[what] = f"{sb.WORK}/in/{name}"
        (folder / "out").mkdir()
        sb.give_to_builder(folder)
        command = ("build", kernel, "--driver-version", driver_version, "--kinds",
                   ",".join(kinds), "--sources", staged["sources"], "--bundle",
                   staged["bundle"], "--out", f"{sb.WORK}/out", "--workdir",
                   f"{sb.WORK}/scratch", "--builder", builder, "--here", "--records",
                   f"{sb.WORK}/{IN_IMAGE_RECORDS}")  # fmt: skip
        print(
            f"{kernel}: building as builder {builder} in {box.image} (sandboxed)", file=sys.stderr
        )
        done = sb.run_container(box, folder, sb.container_environment(box), sys.stderr, command)
        if done.status is None:
            raise BadInput(
                f"{kernel}: the build ran past [docker] time_limit_s ({box.time_limit_s:.0f} s)"
            )
        if done.status == 2:
            raise BadInput(f"{kernel}: the build in {box.image} refused its input (above)")
        return _copy_out(folder, kernel, driver_version, kinds, out, builder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _copy_out(
    folder: Path, kernel: str, driver_version: str, kinds: tuple[str, ...], out: Path, builder: str
) -> list[dict[str, Any]]:
    from drivers.build import sandbox as sb

    data = sb.read_inside(folder, IN_IMAGE_RECORDS)
    if data is None:
        raise BadInput(f"{kernel}: the build in the image left no records (its output above)")
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for line in data.decode(errors="replace").splitlines():
        try:
            r = json.loads(line)
            ours = r["kind"] in kinds and (r["kernel"], r["builder"]) == (kernel, builder)
        except (ValueError, TypeError, KeyError):
            ours = False
        if not ours:
            raise BadInput(
                f"{kernel}: the build in the image wrote a record not its own: {line[:200]}"
            )
        key = DriverKey(kernel, driver_version, r["kind"])
        names = {
            "object": cache_file_name(key, r.get("status") == "unavailable"),
            "log": log_file_name(key),
        }
        for field, name in names.items():
            if r.get(field) is None:
                continue
            body = sb.read_inside(folder / "out", name)
            if body is None or (
                field == "object" and hashlib.sha256(body).hexdigest() != r["sha256"]
            ):
                raise BadInput(f"{kernel}: the build in the image left no valid {name}")
            (out / name).write_bytes(body)
            r[field] = str(out / name)
        records.append(r)
    return records


def builder_for(config: Config, kernel: str, kinds: tuple[str, ...], named: str | None) -> str:
    """``--builder NAME`` checked against the config, else the kernel's route."""
    return check_builder(config, named) if named else routed_builder(config, kernel, kinds)
