"""``drivers build-shard``: build one shard's drivers. The only thing a builder image runs,
with the same arguments under every runtime (local subprocess, Kubernetes pod, Docker).

Two ways in. ``--shard gs://…`` reads its inputs from their buckets and writes its
outputs there (a pod, the local runtime). ``--offline DIR`` is the inside of a sandboxed
container without network (runtime "docker", :mod:`drivers.build.sandbox`): the worker
staged the shard file and its inputs into DIR, the build writes its outputs and records
there, and the worker uploads them after. The run itself is the same code either way:
only where inputs come from (:class:`StoreFetcher`, :class:`StagedFetcher`) and where
outputs go (an ObjectStore, :class:`FolderOutputs`) differ.

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
# What confines a shard's builds, set by the runtime that starts it (a bundle is untrusted
# input and kbuild runs its Makefiles): the shard record and its summary line say it.
SANDBOX_ENV = "DRIVERS_SANDBOX"
SANDBOXES = {
    "docker": "sandboxed: container as uid 1000, no network, read-only root, "
    "only its work folder writable, CPU/memory/time limits",
    "kubernetes": "sandboxed: pod as uid 1000, read-only root, no privilege escalation, "
    "no capabilities, egress to DNS and Google APIs only",
    "none": "local runtime: not sandboxed (for development only)",
}


def sandbox() -> str:
    """What confines this process's builds (:data:`SANDBOXES`), from ``DRIVERS_SANDBOX``."""
    value = os.environ.get(SANDBOX_ENV, "none")
    return value if value in SANDBOXES else "none"


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


class StoreFetcher:
    """Inputs straight from their buckets: ``store(bucket)`` gives the ObjectStore."""

    def __init__(self, store: Callable[[str], Any]) -> None:
        self.store = store

    def fetch(self, bucket: str, name: str, path: Path) -> tuple[bool, str | None]:
        """Download to ``path``; (False, None) when the object does not exist, else
        (True, its md5)."""
        from drivers.store.storage import ObjectNotFound

        store = self.store(bucket)
        try:
            store.download_to(name, path)
            return True, store.info(name).md5
        except ObjectNotFound:
            return False, None


# The work folder of an offline (sandboxed) shard, written by the worker before the
# container starts and read by it after (drivers.build.sandbox).
STAGED_SHARD = "shard.json"  # the shard file, as downloaded
STAGED_MANIFEST = "inputs.json"  # {"uri": shard URI, "objects": {"bucket/name": md5}}
STAGED_INPUTS = "inputs"  # inputs/<bucket>/<name>: each object staged
OUTPUTS = "out"  # out/objects/<name>: what to upload; out/records.jsonl: the records
RECORDS = "records.jsonl"


class StagedFetcher:
    """Inputs the worker staged into the work folder (a container without network). An
    object the manifest does not list did not exist in its bucket."""

    def __init__(self, folder: Path, objects: dict[str, str | None]) -> None:
        self.folder, self.objects = folder, objects

    def fetch(self, bucket: str, name: str, path: Path) -> tuple[bool, str | None]:
        key = f"{bucket}/{name}"
        if key not in self.objects:
            return False, None
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.folder / STAGED_INPUTS / bucket / name, path)  # used once per shard
        return True, self.objects[key]


class FolderOutputs:
    """Where an offline shard's objects go: ``out/objects/<name>`` in the work folder, for
    the worker to upload (which then decides, against the bucket, what is new)."""

    def __init__(self, folder: Path) -> None:
        self.root = folder / OUTPUTS / "objects"
        self.bucket_name = "(work folder)"

    def upload_new(self, name: str, data: bytes) -> Any:
        from drivers.store.storage import UploadResult

        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return UploadResult.CREATED


class Inputs:
    """The bundles and driver sources one attempt builds from, fetched into ``scratch``,
    with the md5 of each object used (what a build was made from)."""

    def __init__(
        self, shard: Shard, fetcher: Any, scratch: Path, timings: dict[str, float]
    ) -> None:
        self.shard, self.scratch, self.timings = shard, scratch, timings
        self.fetcher = fetcher
        self.md5s: dict[str, str | None] = {}  # bundle or sources object -> its md5
        self._sources: dict[str, Path] = {}  # version -> its extracted sources
        self._sources_missing: dict[str, InputUnavailable] = {}

    def bundle(self, kernel: str) -> Bundle:
        """The kernel's bundle, extracted into ``scratch/bundle`` (the caller removes it);
        raises :class:`InputUnavailable`."""
        name = layout.bundle_object(kernel)
        archive = self.scratch / name
        if not self._fetch(self.shard.bundles, name, archive):
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
        if not self._fetch(self.shard.sources, name, archive):
            msg = f"gs://{self.shard.sources}/{name} does not exist"
            raise InputUnavailable("sources_missing", msg)
        try:
            self._extract(archive, dest)
        except UnsafeArchive as e:
            raise InputUnavailable("sources_missing", f"gs://{self.shard.sources}/{e}") from None
        return sources_root(dest)

    def _fetch(self, bucket: str, name: str, path: Path) -> bool:
        """Fetch; False when the object does not exist."""
        with _timed(self.timings, "fetch_s"):
            found, md5 = self.fetcher.fetch(bucket, name, path)
        if found:
            self.md5s[name] = md5
        return found

    def _extract(self, archive: Path, dest: Path) -> None:
        with _timed(self.timings, "extract_s"):
            try:
                safe_extract(archive, dest)
            finally:
                archive.unlink(missing_ok=True)


def needs_bundle(key: DriverKey) -> bool:
    """False for the probe of a kernel that cannot run eBPF: its ``.unavail`` marker is
    written without a bundle."""
    return key.kind != "bpf" or ebpf_supported(parse_kernel(key.kernel))


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
        self,
        builder: str,
        toolchain: dict[str, str | None],
        md5s: dict[str, str | None],
        on_add: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.builder, self.toolchain, self.md5s = builder, toolchain, md5s
        self.env = ledger.environment(os.environ.get(ledger.IMAGE_ENV), toolchain)
        self.kernel_compilers: dict[str, str] = {}  # kernel -> its bundle's compiler
        self.all: list[dict[str, Any]] = []
        self.on_add = on_add  # each record as it is made (offline: kept if the run is cut)

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
        make_s: float | None = None,
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
                # the bare make of a build that ran it: the compile-bound limit's input
                "make_s": round(make_s, 3) if make_s else None,
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
        if self.on_add is not None:
            self.on_add(self.all[-1])

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
    """One attempt at one shard. ``store(bucket_name)`` gives the ObjectStore to use, or
    (offline) ``fetcher`` and ``outputs`` say where inputs come from and outputs go."""

    def __init__(
        self,
        shard: Shard,
        store: Callable[[str], Any] | None,
        scratch: Path,
        toolchain: dict[str, str | None] | None = None,
        err: Any = None,
        *,
        fetcher: Any = None,
        outputs: Any = None,
        on_record: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.shard, self.scratch = shard, scratch
        self.work = outputs if outputs is not None else store(shard.work)  # type: ignore[misc]
        self.timings = dict.fromkeys(TIMINGS, 0.0)
        self.inputs = Inputs(shard, fetcher or StoreFetcher(store), scratch, self.timings)  # type: ignore[arg-type]
        toolchain = toolchain if toolchain is not None else toolchain_versions()
        self.tasks = TaskRecords(shard.builder, toolchain, self.inputs.md5s, on_record)
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
        to_build = []
        for key in keys:
            if needs_bundle(key):
                to_build.append(key)
            else:
                self._stage(key, key.unavail_name(), b"", time.perf_counter(), "unavailable")
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
        self._stage(key, key.object_name(), built.data, started, "built", built.make_s)

    def _upload(self, name: str, data: bytes) -> Any:
        with _timed(self.timings, "upload_s"):
            return self.work.upload_new(name, data)

    def _stage(
        self,
        key: DriverKey,
        name: str,
        data: bytes,
        started: float,
        status: str,
        make_s: float | None = None,
    ) -> None:
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
                make_s=make_s,
            )
            return
        duration_s = time.perf_counter() - started
        self.tasks.add(key, status, obj=obj, data=data, duration_s=duration_s, make_s=make_s)

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
            make_s=built.make_s,
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
        "sandbox": sandbox(),
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
        "sandbox": sandbox(),
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


def print_summary(shard: Shard, final: dict[str, Any], err: Any) -> None:
    """The shard's last line in its log: counts, times, exit status, and its sandbox."""
    counts = ", ".join(f"{n} {s}" for s, n in final["counts"].items()) or "none"
    error = final["error"]
    print(
        f"shard {shard.builder}-{shard.index:04d} of {shard.run_id}: {final['status']}, "
        f"{final['tasks']} tasks on {final['kernels']} kernels ({counts}) "
        f"in {final['measured_s']:.1f} s (fetch {final['fetch_s']:.1f}, "
        f"extract {final['extract_s']:.1f}, build {final['build_s']:.1f}, "
        f"upload {final['upload_s']:.1f}), "
        f"exit {final['exit_status']}"
        + (f": {error}" if error else "")
        + f"; {SANDBOXES[final.get('sandbox') or 'none']}",
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
    print_summary(shard, records[-1], err)
    written = write_results(
        store(shard.work), shard.run_id, shard.builder, shard.index, records, err
    )
    if not written and status == EX_OK:
        status = EX_TEMPFAIL  # the DAG learns nothing from a shard without results
    return status, records


def build_shard_offline(folder: Path, err: Any = None) -> int:
    """Run one shard from a work folder the worker staged (``--offline``: no storage, no
    network): the shard file and its inputs in, the objects to upload and the records out
    (``out/records.jsonl``, one line per task as it ends, the shard record last), for the
    worker to upload (:mod:`drivers.build.sandbox`). Temporary files stay in the folder
    too: it is the only place a sandboxed build may write. The exit status as
    ``--shard``'s."""
    err = err if err is not None else sys.stderr
    started, started_s = _now(), time.perf_counter()
    tmp = folder / "tmp"
    tmp.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(tmp)  # gcc, kbuild's mktemp, Python: never /tmp
    tempfile.tempdir = None
    manifest = json.loads((folder / STAGED_MANIFEST).read_text())
    shard = Shard.from_json((folder / STAGED_SHARD).read_bytes(), manifest["uri"])
    (folder / OUTPUTS).mkdir(exist_ok=True)
    run: ShardRun | None = None
    with open(folder / OUTPUTS / RECORDS, "a") as out:

        def record(r: dict[str, Any]) -> None:
            out.write(json.dumps(r) + "\n")
            out.flush()

        with _sigterm_raises(), scratch_dir(folder) as scratch:
            try:
                fetcher = StagedFetcher(folder, manifest["objects"])
                run = ShardRun(
                    shard, None, scratch, err=err, fetcher=fetcher,
                    outputs=FolderOutputs(folder), on_record=record,
                )  # fmt: skip
                status, error = run.run()
            except (Exception, Terminated) as e:  # before the first kernel
                stopped = _stopping(e)
                status, error = stopped.exit_status, str(stopped)
        final = shard_record(shard, run, status, error, started, started_s)
        record(final)
    print_summary(shard, final, err)
    return status


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
    """``drivers build-shard --shard gs://…``: prints where the results are on stdout.
    ``--offline DIR``: the shard a worker staged into DIR (a sandboxed container)."""
    if args.offline:
        return build_shard_offline(Path(args.offline))
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

            shard = read_shard(store(bucket), name, args.shard)
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


def read_shard(store: Any, name: str, uri: str) -> Shard | None:
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
