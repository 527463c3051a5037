"""The build ledger: every decision and attempt, and the coverage they add up to.

**Records** are appended, never changed: one gzip'd JSONL object per run (or per
``drivers withdraw``) under ``ledger/runs/``. A record is one driver's decision or
attempt: kernel, driver version, kind, status (:data:`STATUSES`), builder, the
builder's environment (image, or toolchain versions on the local runtime), the
sources and bundle it was built from, the compiler the kernel was built with (as its
bundle records it: ``kernel_compiler``), reason, failure class, log, duration (and its
bare ``make_s``), sha256, run id, time. A run records attempts and changes of state
only, never the nightly "already done" of every driver.

The **coverage index** (``ledger/coverage/<version>.json.gz``) is the current state of
every (kernel, kind) a driver version has a record for, refreshed after each run from
its records and the cache listing. ``drivers why``, the coverage page and the planner's
quarantine read it instead of the whole ledger: one small object per version, whatever
the ledger's size. Writers replace it only at the generation they read (nightly and
backfill may finish together).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from drivers.domain import layout
from drivers.domain.decision import REPEATABLE  # the failures that count toward quarantine
from drivers.domain.deterministic import gzip_bytes
from drivers.domain.names import DriverKey
from drivers.domain.toolchain import TOOLCHAIN_MISMATCH

if TYPE_CHECKING:  # google-cloud-storage stays out of DAG parsing (IMAGE_ENV)
    from drivers.domain.config import Config
    from drivers.store.storage import ObjectStore, Stores

# What a record says about one driver.
STATUSES = (
    "built",  # compiled and staged by a builder (published next, unless held back)
    "unavailable",  # the kernel cannot run it (an .unavail marker is published)
    "failed",  # compile failure (its log is kept)
    "infra_failed",  # the builder's infrastructure failed: retried, never quarantined
    # routed to a builder whose compiler is not the kernel's (refused before compiling):
    # a routing error, never quarantined (drivers.domain.toolchain)
    TOOLCHAIN_MISMATCH,
    "blocked",  # a blocklist rule matches
    "unroutable",  # no builder takes this kernel
    "quarantined",  # failed the same way too often with the same inputs: skipped
    "refused",  # its kernel refused it in the VM test: not published
    "published",  # in the driver cache
    "withdrawn",  # removed from the cache by `drivers withdraw`
)
RUNS_PREFIX = f"{layout.LEDGER_PREFIX}runs/"
COVERAGE_PREFIX = f"{layout.LEDGER_PREFIX}coverage/"
KERNELS_OBJECT = f"{COVERAGE_PREFIX}_kernels.json.gz"  # kernel -> when its bundle arrived
IMAGE_ENV = "DRIVERS_BUILDER_IMAGE"  # set in builder pods and containers: their image
APPLIED_RUNS_KEPT = 200  # runs an index remembers having applied (retries apply once)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_object(run_id: str) -> str:
    """One object per run; a retried writer replaces it with the same records."""
    return f"{RUNS_PREFIX}{run_id}.jsonl.gz"


def coverage_object(driver_version: str) -> str:
    return f"{COVERAGE_PREFIX}{driver_version}.json.gz"


def environment(image: str | None, toolchain: dict[str, str | None] | None) -> str:
    """What built a driver: the builder image, or on the local runtime its toolchain."""
    if image:
        return image
    text = json.dumps(toolchain or {}, sort_keys=True)
    return "toolchain:" + hashlib.sha256(text.encode()).hexdigest()[:12]


def fingerprint(env: str | None, sources: str | None, bundle: str | None) -> str:
    """The inputs a failure repeats with: environment, sources hash, bundle hash."""
    return f"{env}|sources:{sources}|bundle:{bundle}"


def record(
    key: DriverKey | tuple[str, str, str], status: str, run_id: str, **fields: Any
) -> dict[str, Any]:
    """One ledger record; fields that are None are left out."""
    if status not in STATUSES:
        raise ValueError(f"unknown ledger status {status!r}: one of {STATUSES}")
    kernel, version, kind = key
    doc = {
        "time": fields.pop("time", None) or now(),
        "run_id": run_id,
        "kernel": kernel,
        "driver_version": version,
        "kind": kind,
        "status": status,
    }
    doc.update((k, v) for k, v in fields.items() if v is not None)
    return doc


# --- the records ---------------------------------------------------------------------


def encode(records: Iterable[dict[str, Any]]) -> bytes:
    lines = (json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in records)
    return gzip_bytes("".join(lines).encode(), 6)


def decode(data: bytes) -> Iterator[dict[str, Any]]:
    for line in gzip.decompress(data).decode().splitlines():
        if line.strip():
            yield json.loads(line)


def append(work: ObjectStore, name: str, records: list[dict[str, Any]]) -> str | None:
    """Write one ledger object (``run_object`` or a withdrawal's); None when empty."""
    if not records:
        return None
    work.put(name, encode(records), "application/gzip")
    return f"gs://{work.bucket_name}/{name}"


def history(
    work: ObjectStore, match: Callable[[dict[str, Any]], bool] = lambda r: True
) -> Iterator[dict[str, Any]]:
    """Every record (that ``match`` keeps), run object by run object: the whole ledger.
    For audits; answers about the present come from the coverage index."""
    for info in work.list(RUNS_PREFIX):
        yield from (r for r in decode(work.download(info.name)) if match(r))


# --- the coverage index ----------------------------------------------------------------


@dataclass
class Coverage:
    """One driver version's index: ``entries[kernel][kind]`` is the current state."""

    driver_version: str
    entries: dict[str, dict[str, dict[str, Any]]]
    applied_runs: list[str]
    updated: str | None = None
    generation: int = 0  # of the object read; 0: none yet

    def entry(self, kernel: str, kind: str) -> dict[str, Any] | None:
        return self.entries.get(kernel, {}).get(kind)

    def to_json(self) -> dict[str, Any]:
        return {
            "driver_version": self.driver_version,
            "updated": self.updated,
            "applied_runs": self.applied_runs[-APPLIED_RUNS_KEPT:],
            "entries": self.entries,
        }

    def apply(self, r: dict[str, Any]) -> None:
        """Fold one record into the entry of its (kernel, kind)."""
        old = self.entry(r["kernel"], r["kind"]) or {}
        status = r["status"]
        entry = {
            "status": status,
            "since": old.get("since") if old.get("status") == status else r["time"],
            "time": r["time"],
            "run_id": r["run_id"],
        }
        for k in ("builder", "reason", "failure", "log", "object", "sha256", "duration_s"):
            if k in r:
                entry[k] = r[k]
        # The kernel's compiler, once a builder read it from the bundle (plan views).
        if compiler := r.get("kernel_compiler", old.get("kernel_compiler")):
            entry["kernel_compiler"] = compiler
        # What the quarantine needs survives the states in between (an infra failure,
        # a quarantine decision): the inputs of the last attempt and how many times in a
        # row it failed the same way with them.
        fp = r.get("fingerprint", old.get("fingerprint"))
        failures = old.get("failures", 0)
        if status in REPEATABLE:
            same = old.get("fingerprint") == fp and old.get("last_failure") == r.get("failure")
            failures = failures + 1 if same else 1
            entry["last_failure"] = r.get("failure")
            entry["last_reason"] = r.get("reason")
        elif status in ("built", "published", "unavailable"):
            failures = 0
        else:  # blocked, unroutable, quarantined, infra_failed, mismatch, withdrawn: unchanged
            for k in ("last_failure", "last_reason", "log", "failure"):
                if k in old and k not in entry:
                    entry[k] = old[k]
        if status == "published":
            for k in ("arrived", "published"):
                if k in r:
                    entry[k] = r[k]
        elif status != "withdrawn":
            for k in ("object", "sha256"):
                if old.get("status") == "built" and k in old and k not in entry:
                    entry[k] = old[k]
        if fp is not None:
            entry["fingerprint"] = fp
        if failures:
            entry["failures"] = failures
        self.entries.setdefault(r["kernel"], {})[r["kind"]] = entry


def read_coverage(work: ObjectStore, driver_version: str) -> Coverage:
    from drivers.store.storage import ObjectNotFound

    try:
        data, generation = work.download_with_generation(coverage_object(driver_version))
    except ObjectNotFound:
        return Coverage(driver_version, {}, [])
    doc = json.loads(gzip.decompress(data))
    return Coverage(driver_version, doc["entries"], doc["applied_runs"], doc["updated"], generation)


def update_coverage(
    work: ObjectStore,
    driver_version: str,
    change: Callable[[Coverage], None],
    attempts: int = 10,
) -> Coverage:
    """Read the index, ``change`` it, and write it back only if nobody wrote it
    meanwhile; else read again and redo the change."""
    for _ in range(attempts):
        coverage = read_coverage(work, driver_version)
        change(coverage)
        coverage.updated = now()
        data = gzip_bytes(json.dumps(coverage.to_json(), separators=(",", ":")).encode(), 9)
        if (
            work.put_if_generation(
                coverage_object(driver_version), data, coverage.generation, "application/gzip"
            )
            is not None
        ):
            return coverage
    raise RuntimeError(
        f"gs://{work.bucket_name}/{coverage_object(driver_version)} kept changing under "
        f"{attempts} attempts to update it; retry the task"
    )


def apply_run(
    work: ObjectStore,
    run_id: str,
    records: list[dict[str, Any]],
    in_cache: dict[str, dict[tuple[str, str], bool]] | None = None,
    arrived: dict[str, str] | None = None,
) -> dict[str, Coverage]:
    """Fold a run's records into each driver version's index, once per run, and mark
    what the cache holds (``in_cache``: version -> {(kernel, kind): is an .unavail
    marker}) that the index does not know as published or unavailable (drivers from
    before the ledger, or from the CPaaS flow). Returns each version's index as written."""
    by_version: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_version.setdefault(r["driver_version"], []).append(r)
    written = {}
    for version in sorted(set(by_version) | set(in_cache or {})):

        def change(coverage: Coverage, version: str = version) -> None:
            if run_id not in coverage.applied_runs:
                for r in sorted(by_version.get(version, []), key=lambda r: r["time"]):
                    coverage.apply(r)
                coverage.applied_runs.append(run_id)
            for (kernel, kind), unavailable in (in_cache or {}).get(version, {}).items():
                status = "unavailable" if unavailable else "published"
                entry = coverage.entry(kernel, kind)
                if entry is None or entry["status"] not in ("published", "unavailable"):
                    found = record(
                        (kernel, version, kind),
                        status,
                        run_id,
                        reason="found in the driver cache",
                        arrived=(arrived or {}).get(kernel),
                    )
                    coverage.apply(found)

        written[version] = update_coverage(work, version, change)
    return written


def write_kernels(work: ObjectStore, arrived: dict[str, str]) -> None:
    """kernel -> when its bundle arrived: the kernels the coverage page lists."""
    data = json.dumps(arrived, sort_keys=True, separators=(",", ":")).encode()
    work.put(KERNELS_OBJECT, gzip_bytes(data, 9), "application/gzip")


def read_kernels(work: ObjectStore) -> dict[str, str]:
    from drivers.store.storage import ObjectNotFound

    try:
        return json.loads(gzip.decompress(work.download(KERNELS_OBJECT)))
    except ObjectNotFound:
        return {}


def builder_environment(
    config: Config, builder: str, toolchain: Callable[[], dict[str, str | None]]
) -> str:
    """What a builder builds with now: its image, or on the local runtime this worker's
    toolchain (the builder runs here too; ``toolchain`` reads it:
    :func:`drivers.build.compile.toolchain_versions`, a layer above this one)."""
    if config.runtime == "local":
        return environment(None, toolchain())
    return environment(config.builders[builder].image, None)


def source_hashes(sources: ObjectStore) -> dict[str, str | None]:
    """Each driver sources archive's md5, from one listing of the sources bucket (its
    top level: the consumers built from them live under a prefix)."""
    return {
        info.name: info.md5
        for info in sources.list()
        if info.name.endswith(".tgz") and "/" not in info.name
    }


@dataclass
class Standing:
    """Where each driver stands, as the planner and ``drivers why`` decide it (a
    :class:`drivers.domain.decision.Ledger`): its coverage entry, and the
    :func:`fingerprint` of the inputs it would be built from now."""

    coverage: Mapping[str, Coverage]  # driver version -> its index
    config: Config
    sources: Mapping[str, str | None]  # sources object -> md5 (source_hashes)
    bundles: Mapping[str, str | None]  # kernel -> its bundle's md5
    toolchain: Callable[[], dict[str, str | None]]  # see builder_environment
    _environments: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def read(
        cls,
        stores: Stores,
        config: Config,
        versions: Iterable[str],
        bundles: Mapping[str, str | None],
        toolchain: Callable[[], dict[str, str | None]],
    ) -> Standing:
        """The coverage index of each of ``versions`` and the sources listing."""
        coverage = {v: read_coverage(stores.work, v) for v in versions}
        return cls(coverage, config, source_hashes(stores.sources), bundles, toolchain)

    def entry(self, task: tuple[str, str, str]) -> dict[str, Any] | None:
        kernel, version, kind = task
        return self.coverage[version].entry(kernel, kind)

    def environment(self, builder: str) -> str:
        if builder not in self._environments:  # the local toolchain runs three commands
            self._environments[builder] = builder_environment(self.config, builder, self.toolchain)
        return self._environments[builder]

    def kernel_compilers(self) -> dict[str, str]:
        """kernel -> the compiler its bundle records, for the kernels a builder has read
        (any driver version, kind): what the plan view knows before building."""
        return {
            kernel: entry["kernel_compiler"]
            for coverage in self.coverage.values()
            for kernel, kinds in coverage.entries.items()
            for entry in kinds.values()
            if entry.get("kernel_compiler")
        }

    def fingerprint(self, task: tuple[str, str, str], builder: str) -> str:
        kernel, version, _ = task
        return fingerprint(
            self.environment(builder),
            self.sources.get(layout.source_object(version)),
            self.bundles.get(kernel),
        )
