"""``drivers build-shard``: build one shard's drivers. The only thing a builder image runs,
with the same arguments under every runtime (local subprocess, Kubernetes pod, Docker).

The shard file (:mod:`drivers.build.shard`) lists tasks grouped by kernel. One bundle is on
disk at a time: per kernel, download ``bundle-<kernel>.tgz``, extract it safely
(:mod:`drivers.build.safetar`), build every task of that kernel
(:mod:`drivers.build.compile`), delete it. Driver sources are fetched once per version per
shard. Kernels that cannot run eBPF get the empty ``.unavail`` marker without any bundle.

Outputs in the work bucket (names from :mod:`drivers.domain.layout`): staged drivers, a log
per failed task, and the results (JSON lines: one ``task`` record per task, then one
``shard`` record). Exit status: 0 when the shard ran through (compile failures are data),
65 when some input is bad and a retry cannot help (malformed shard, missing or corrupt
bundle or sources, missing bucket, incomplete builder image), 75 when storage was
unreachable or another transient error stopped it (retry), 70 on a bug in this program.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from drivers.build.bundle import Bundle, BundleCorrupt, open_bundle
from drivers.build.compile import (
    BuilderToolchain,
    Built,
    ToolMissing,
    build_driver,
    task_status,
    toolchain_versions,
)
from drivers.build.safetar import UnsafeArchive, safe_extract
from drivers.build.shard import Shard, ShardFormatError
from drivers.domain import layout
from drivers.domain.exit_codes import EX_DATAERR, EX_OK, EX_SOFTWARE, EX_TEMPFAIL
from drivers.domain.kernels import ebpf_supported, parse_kernel
from drivers.domain.names import DriverKey
from drivers.store import ledger

# The shard record's split of its time (the rest is start-up and the results upload).
TIMINGS = ("fetch_s", "extract_s", "build_s", "upload_s", "cleanup_s")
# Task failures that are a bad input, not the driver's: the shard exits 65.
INPUT_FAILURES = ("bundle_missing", "bundle_corrupt", "sources_missing")


# --- what stops a task, a kernel or the shard -----------------------------------------------


class InputUnavailable(Exception):
    """A bundle or a driver version's sources cannot be used: missing, or not a clean
    archive. ``failure`` is the class recorded for the tasks that needed it (one of
    :data:`INPUT_FAILURES`); a retry cannot help."""

    def __init__(self, failure: str, message: str) -> None:
        super().__init__(message)
        self.failure = failure


class ShardStopped(Exception):
    """Something that stops the whole shard: ``exit_status`` says whether to retry,
    ``failure`` is the class recorded for the tasks it left unbuilt."""

    def __init__(self, message: str, exit_status: int, failure: str) -> None:
        super().__init__(message)
        self.exit_status, self.failure = exit_status, failure


class Terminated(BaseException):
    """SIGTERM (a pod being stopped): clean up, write what we have, ask for a retry.
    A BaseException, like KeyboardInterrupt, so no ``except Exception`` swallows it."""


def storage_failure(exc: BaseException) -> ShardStopped | None:
    """Classify a storage exception: transient (retry) or permanent; None if not storage."""
    from google.api_core import exceptions as api
    from google.auth.exceptions import TransportError
    from requests.exceptions import RequestException

    from drivers.store.storage import BucketNotFound, StorageError

    if isinstance(exc, BucketNotFound):
        return ShardStopped(str(exc), EX_DATAERR, "storage")
    transient = (
        api.ServerError,
        api.TooManyRequests,
        api.RetryError,
        RequestException,
        TransportError,
        ConnectionError,
        TimeoutError,
    )
    if isinstance(exc, transient):
        return ShardStopped(
            f"storage unreachable: {type(exc).__name__}: {exc}", EX_TEMPFAIL, "storage"
        )
    if isinstance(exc, api.GoogleAPICallError | StorageError):
        return ShardStopped(f"storage refused: {type(exc).__name__}: {exc}", EX_DATAERR, "storage")
    return None


def _stopping(exc: BaseException) -> ShardStopped:
    """What an exception that left a kernel's build means for the whole shard."""
    if isinstance(exc, ShardStopped):
        return exc
    if isinstance(exc, Terminated):
        return ShardStopped("terminated (SIGTERM)", EX_TEMPFAIL, "terminated")
    if isinstance(exc, ToolMissing):  # every build would fail the same way
        return ShardStopped(str(exc), EX_DATAERR, "toolchain")
    stopped = storage_failure(exc)
    if stopped is not None:
        return stopped
    if isinstance(exc, OSError):  # disk full, I/O error: another attempt may land elsewhere
        return ShardStopped(f"{type(exc).__name__}: {exc}", EX_TEMPFAIL, "host")
    traceback.print_exception(exc, file=sys.stderr)  # a bug: show where
    return ShardStopped(f"internal error: {type(exc).__name__}: {exc}", EX_SOFTWARE, "internal")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[name] += time.perf_counter() - started


# --- the parts of a run ---------------------------------------------------------------------


class Inputs:
    """The bundles and driver sources one attempt builds from, fetched into ``scratch``,
    with the md5 of each object used (what a build was made from)."""

    def __init__(
        self, shard: Shard, store: Callable[[str], Any], scratch: Path, timings: dict[str, float]
    ) -> None:
        self.shard, self.scratch, self.timings = shard, scratch, timings
        self.bundles, self.sources = store(shard.bundles), store(shard.sources)
        self.md5s: dict[str, str | None] = {}  # bundle or sources object -> its md5
        self._sources: dict[str, Path] = {}  # version -> its extracted sources
        self._sources_missing: dict[str, InputUnavailable] = {}

    def bundle(self, kernel: str) -> Bundle:
        """The kernel's bundle, extracted into ``scratch/bundle`` (the caller removes it);
        raises :class:`InputUnavailable`."""
        name = layout.bundle_object(kernel)
        archive = self.scratch / name
        if not self._fetch(self.bundles, name, archive):
            msg = f"gs://{self.shard.bundles}/{name} does not exist"
            raise InputUnavailable("bundle_missing", msg)
        root = self.scratch / "bundle"
        try:
            self._extract(archive, root)
            return open_bundle(root, kernel)
        except (UnsafeArchive, BundleCorrupt) as e:
            raise InputUnavailable("bundle_corrupt", f"gs://{self.shard.bundles}/{e}") from None

    def sources_for(self, version: str) -> Path:
        """The extracted sources of a driver version, fetched once per shard; raises
        :class:`InputUnavailable` (again on every call) when they cannot be had."""
        if version in self._sources_missing:
            raise self._sources_missing[version]
        if version not in self._sources:
            try:
                self._sources[version] = self._fetch_sources(version)
            except InputUnavailable as e:
                self._sources_missing[version] = e
                raise
        return self._sources[version]

    def _fetch_sources(self, version: str) -> Path:
        name = layout.source_object(version)
        archive = self.scratch / "sources" / name
        dest = self.scratch / "sources" / version
        if not self._fetch(self.sources, name, archive):
            msg = f"gs://{self.shard.sources}/{name} does not exist"
            raise InputUnavailable("sources_missing", msg)
        try:
            self._extract(archive, dest)
        except UnsafeArchive as e:
            raise InputUnavailable("sources_missing", f"gs://{self.shard.sources}/{e}") from None
        return sources_root(dest)

    def _fetch(self, store: Any, name: str, path: Path) -> bool:
        """Download; False when the object does not exist."""
        from drivers.store.storage import ObjectNotFound

        with _timed(self.timings, "fetch_s"):
            try:
                store.download_to(name, path)
                self.md5s[name] = store.info(name).md5
                return True
            except ObjectNotFound:
                return False

    def _extract(self, archive: Path, dest: Path) -> None:
        with _timed(self.timings, "extract_s"):
            try:
                safe_extract(archive, dest)
            finally:
                archive.unlink(missing_ok=True)


def sources_root(dest: Path) -> Path:
    """Where ``build.json`` is: at the archive root (drivers.build.sources), or in its only
    folder (a tarball of the version folder itself)."""
    if (dest / "build.json").exists():
        return dest
    entries = [p for p in dest.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return dest


class TaskRecords:
    """The ``task`` records of one attempt, in the order the tasks ended."""

    def __init__(
        self, builder: str, toolchain: dict[str, str | None], md5s: dict[str, str | None]
    ) -> None:
        self.builder, self.toolchain, self.md5s = builder, toolchain, md5s
        self.env = ledger.environment(os.environ.get(ledger.IMAGE_ENV), toolchain)
        self.kernel_compilers: dict[str, str] = {}  # kernel -> its bundle's compiler
        self.all: list[dict[str, Any]] = []

    def add(
        self,
        key: DriverKey,
        status: str,
        *,
        failure: str | None = None,
        message: str = "",
        obj: str | None = None,
        data: bytes | None = None,
        log: str | None = None,
        duration_s: float = 0.0,
    ) -> None:
        self.all.append(
            {
                "type": "task",
                "time": _now(),
                "kernel": key.kernel,
                "driver_version": key.driver_version,
                "kind": key.kind,
                "builder": self.builder,
                "status": status,
                "object": obj,
                "sha256": hashlib.sha256(data).hexdigest() if data is not None else None,
                "size": len(data) if data is not None else None,
                "duration_s": round(duration_s, 3),
                "log": log,
                "failure": failure,
                "message": message,
                "toolchain": self.toolchain,
                "env": self.env,
                "sources": self.md5s.get(layout.source_object(key.driver_version)),
                "bundle": self.md5s.get(layout.bundle_object(key.kernel)),
                "kernel_compiler": self.kernel_compilers.get(key.kernel),
            }
        )

    def infra_failed(self, keys: list[DriverKey], failure: str, message: str) -> None:
        for key in keys:
            self.add(key, "infra_failed", failure=failure, message=message)

    def not_attempted(self, tasks: tuple[DriverKey, ...], stopped: ShardStopped) -> None:
        """Every task without a record yet: the shard stopped before it."""
        done = {(r["kernel"], r["driver_version"], r["kind"]) for r in self.all}
        left = [key for key in tasks if key not in done]
        self.infra_failed(left, stopped.failure, f"stopped: {stopped}")

    def bad_inputs(self) -> list[str]:
        """The kernels and versions whose inputs were missing or corrupt, for the error."""
        return sorted(
            {
                f"{r['kernel']} {r['driver_version']} ({r['failure']})"
                for r in self.all
                if r["failure"] in INPUT_FAILURES
            }
        )


def _counts(records: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


# --- the run --------------------------------------------------------------------------------


class ShardRun:
    """One attempt at one shard. ``store(bucket_name)`` gives the ObjectStore to use."""

    def __init__(
        self,
        shard: Shard,
        store: Callable[[str], Any],
        scratch: Path,
        toolchain: dict[str, str | None] | None = None,
        err: Any = None,
    ) -> None:
        self.shard, self.scratch = shard, scratch
        self.work = store(shard.work)
        self.timings = dict.fromkeys(TIMINGS, 0.0)
        self.inputs = Inputs(shard, store, scratch, self.timings)
        toolchain = toolchain if toolchain is not None else toolchain_versions()
        self.tasks = TaskRecords(shard.builder, toolchain, self.inputs.md5s)
        self.compilers = BuilderToolchain(shard.builder)  # the toolchain guard's side
        self.err = err if err is not None else sys.stderr
        self.data_error = False  # a missing/corrupt input: exit 65 at the end
        self.completed = False  # every kernel was attempted

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.tasks.all

    def run(self) -> tuple[int, str | None]:
        """Build every kernel; (exit status, error that stopped the shard or None)."""
        for kernel, keys in self.shard.by_kernel():
            before = len(self.records)
            started = time.perf_counter()
            try:
                self.run_kernel(kernel, keys)
            except (Exception, Terminated) as e:
                stopped = _stopping(e)
                self.tasks.not_attempted(self.shard.tasks, stopped)
                return stopped.exit_status, str(stopped)
            self._print_kernel(kernel, self.records[before:], time.perf_counter() - started)
        self.completed = True
        if not self.data_error:
            return EX_OK, None
        bad = ", ".join(self.tasks.bad_inputs())
        return EX_DATAERR, f"missing or corrupt inputs, do not retry: {bad}"

    def run_kernel(self, kernel: str, keys: list[DriverKey]) -> None:
        """Every task of one kernel: markers first, then one bundle for the builds."""
        supported = ebpf_supported(parse_kernel(kernel))
        to_build = []
        for key in keys:
            if key.kind == "bpf" and not supported:
                self._stage(key, key.unavail_name(), b"", time.perf_counter(), "unavailable")
            else:
                to_build.append(key)
        if not to_build:
            return
        try:
            try:
                bundle = self.inputs.bundle(kernel)
            except InputUnavailable as e:
                self.data_error = True
                return self.tasks.infra_failed(to_build, e.failure, str(e))
            if bundle.compiler is not None:
                self.tasks.kernel_compilers[kernel] = bundle.compiler.text
            for key in to_build:
                self._build(key, bundle)
        finally:
            with _timed(self.timings, "cleanup_s"):
                shutil.rmtree(self.scratch / "bundle", ignore_errors=True)
                shutil.rmtree(self.scratch / "build", ignore_errors=True)

    def _build(self, key: DriverKey, bundle: Bundle) -> None:
        started = time.perf_counter()
        try:
            sources = self.inputs.sources_for(key.driver_version)
        except InputUnavailable as e:
            self.data_error = True
            return self.tasks.add(key, "infra_failed", failure=e.failure, message=str(e))
        built = build_driver(key, sources, bundle, self.scratch, self.compilers)
        self.timings["build_s"] += time.perf_counter() - started
        if built.failure == "sources_missing":  # build.json does not say how
            self.data_error = True
        if built.data is None:
            return self._fail(key, built, started)
        self._stage(key, key.object_name(), built.data, started, "built")

    def _upload(self, name: str, data: bytes) -> Any:
        with _timed(self.timings, "upload_s"):
            return self.work.upload_new(name, data)

    def _stage(self, key: DriverKey, name: str, data: bytes, started: float, status: str) -> None:
        from drivers.store.storage import UploadResult

        obj = layout.staged_drivers_prefix(self.shard.run_id) + name
        if self._upload(obj, data) is UploadResult.DIFFERENT:
            self.tasks.add(
                key,
                "failed",
                failure="nondeterministic",
                data=data,
                message=f"{obj} already staged with other bytes: the build is not reproducible",
                duration_s=time.perf_counter() - started,
            )
            return
        self.tasks.add(key, status, obj=obj, data=data, duration_s=time.perf_counter() - started)

    def _fail(self, key: DriverKey, built: Built, started: float) -> None:
        log = None
        if built.log:
            log = layout.staged_log_object(
                self.shard.run_id, key.kernel, key.driver_version, key.kind
            )
            self._upload(log, built.log)  # an earlier attempt's log (DIFFERENT) is kept
        self.tasks.add(
            key,
            task_status(built),
            failure=built.failure,
            message=built.message,
            log=log,
            duration_s=time.perf_counter() - started,
        )

    def _print_kernel(self, kernel: str, records: list[dict[str, Any]], seconds: float) -> None:
        counts = _counts(records)
        text = ", ".join(f"{n} {status}" for status, n in counts.items())
        problems = "; ".join(
            f"{r['driver_version']} {r['kind']}: {r['failure']}: {r['message']}"
            for r in records
            if r["failure"]
        )
        print(
            f"{kernel}: {text} in {seconds:.1f} s" + (f" ({problems})" if problems else ""),
            file=self.err,
        )


# --- the results ----------------------------------------------------------------------------


def shard_record(
    shard: Shard,
    run: ShardRun | None,
    exit_status: int,
    error: str | None,
    started: str,
    started_s: float,
) -> dict[str, Any]:
    timings = run.timings if run else dict.fromkeys(TIMINGS, 0.0)
    return {
        "type": "shard",
        "run_id": shard.run_id,
        "builder": shard.builder,
        "index": shard.index,
        # ok: exit 0. infra_failed: some input was bad (65, completed) or the shard stopped.
        "status": "ok" if exit_status == EX_OK else "infra_failed",
        "error": error,
        "exit_status": exit_status,
        "completed": bool(run and run.completed),
        "estimated_cost_s": shard.cost,
        "measured_s": round(time.perf_counter() - started_s, 3),
        **{k: round(v, 3) for k, v in timings.items()},
        "kernels": len(shard.by_kernel()),
        "tasks": len(shard.tasks),
        "counts": _counts(run.records) if run else {},
        "started": started,
        "finished": _now(),
    }


def _unusable_shard_record(run_id: str, builder: str, index: int, error: str) -> dict[str, Any]:
    """The shard record of a shard file that could not be read."""
    return {
        "type": "shard",
        "run_id": run_id,
        "builder": builder,
        "index": index,
        "status": "infra_failed",
        "error": error,
        "exit_status": EX_DATAERR,
        "completed": False,
        "estimated_cost_s": None,
        "measured_s": 0.0,
        **dict.fromkeys(TIMINGS, 0.0),
        "kernels": 0,
        "tasks": 0,
        "counts": {},
        "started": _now(),
        "finished": _now(),
    }


def write_results(
    store: Any, run_id: str, builder: str, index: int, records: list[dict[str, Any]], err: Any
) -> bool:
    """Write the results object, replacing an earlier attempt's (the last attempt is the
    truth). Best effort: False, with a message, when storage refuses."""
    name = layout.shard_results_object(run_id, builder, index)
    data = "".join(json.dumps(r, sort_keys=False) + "\n" for r in records).encode()
    try:
        # Not upload_new: results are run state that a retried shard must replace.
        store.put(name, data, "application/x-ndjson")
        return True
    except Exception as e:
        print(f"cannot write results gs://{store.bucket_name}/{name}: {e}", file=err)
        return False


def _print_summary(shard: Shard, final: dict[str, Any], err: Any) -> None:
    counts = ", ".join(f"{n} {s}" for s, n in final["counts"].items()) or "none"
    error = final["error"]
    print(
        f"shard {shard.builder}-{shard.index:04d} of {shard.run_id}: {final['status']}, "
        f"{final['tasks']} tasks on {final['kernels']} kernels ({counts}) "
        f"in {final['measured_s']:.1f} s (fetch {final['fetch_s']:.1f}, "
        f"extract {final['extract_s']:.1f}, build {final['build_s']:.1f}), "
        f"exit {final['exit_status']}" + (f": {error}" if error else ""),
        file=err,
    )


# --- the entrypoint -------------------------------------------------------------------------


def build_shard(
    shard: Shard, store: Callable[[str], Any], workdir: Path | None = None, err: Any = None
) -> tuple[int, list[dict[str, Any]]]:
    """Run one shard and write its results object; (exit status, records incl. the shard
    record). ``store(bucket)`` gives an ObjectStore for a bucket name."""
    err = err if err is not None else sys.stderr
    started, started_s = _now(), time.perf_counter()
    run: ShardRun | None = None
    with scratch_dir(workdir) as scratch:
        try:
            run = ShardRun(shard, store, scratch, err=err)
            status, error = run.run()
        except (Exception, Terminated) as e:  # before the first kernel
            stopped = _stopping(e)
            status, error = stopped.exit_status, str(stopped)
    records = [
        *(run.records if run else []),
        shard_record(shard, run, status, error, started, started_s),
    ]
    _print_summary(shard, records[-1], err)
    written = write_results(
        store(shard.work), shard.run_id, shard.builder, shard.index, records, err
    )
    if not written and status == EX_OK:
        status = EX_TEMPFAIL  # the DAG learns nothing from a shard without results
    return status, records


@contextlib.contextmanager
def scratch_dir(workdir: Path | None) -> Iterator[Path]:
    """A fresh folder for the attempt, inside ``workdir`` when given; always removed."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="build-shard-", dir=workdir)).resolve()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into an exception so clean-up and the results upload still happen."""

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut clean-up
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_build_shard(args: argparse.Namespace) -> int:
    """``drivers build-shard --shard gs://…``: prints where the results are on stdout."""
    from drivers.store.storage import ObjectStore, client_from_environment, parse_gs_uri

    bucket, name = parse_gs_uri(args.shard)
    workdir = Path(args.workdir) if args.workdir else None
    with _sigterm_raises():
        try:
            client = client_from_environment()
            stores: dict[str, ObjectStore] = {}

            def store(bucket_name: str) -> ObjectStore:
                if bucket_name not in stores:
                    stores[bucket_name] = ObjectStore(client, bucket_name)
                return stores[bucket_name]

            shard = _read_shard(store(bucket), name, args.shard)
            if shard is None:
                return EX_DATAERR
            status, _records = build_shard(shard, store, workdir)
            results = layout.shard_results_object(shard.run_id, shard.builder, shard.index)
            print(f"gs://{shard.work}/{results}")  # stdout: where the records are
            return status
        except Terminated:
            print("build-shard: terminated (SIGTERM)", file=sys.stderr)
            return EX_TEMPFAIL
        except Exception as e:
            stopped = _stopping(e)
            print(f"build-shard {args.shard}: {stopped}", file=sys.stderr)
            return stopped.exit_status


def _read_shard(store: Any, name: str, uri: str) -> Shard | None:
    """The shard file, or None when it is missing or malformed (reported by _bad_shard)."""
    from drivers.store.storage import ObjectNotFound

    try:
        data = store.download(name)
    except ObjectNotFound as e:
        _bad_shard(store, name, f"{e}: the shard file is missing")
        return None
    try:
        return Shard.from_json(data, uri)
    except ShardFormatError as e:
        _bad_shard(store, name, str(e))
        return None


def _bad_shard(store: Any, name: str, error: str) -> None:
    """A shard file we cannot use: say so, and (when its name tells where) write a results
    object with only a failed shard record, so the DAG sees why."""
    print(f"build-shard: {error}", file=sys.stderr)
    parsed = layout.parse_shard_object(name)
    if parsed is not None:
        record = _unusable_shard_record(*parsed, error)
        write_results(store, *parsed, [record], sys.stderr)
