"""A shard in a sandboxed container (runtime "docker"): stage, build offline, upload.

A bundle is untrusted input and kbuild runs its Makefiles and scripts. On the docker
runtime each shard runs in its builder's image as uid 1000 with no network, a read-only
root file system, only the shard's work folder writable (a bind mount; its temporary
files go there too), no capabilities, no privilege escalation, and CPU, memory, process
and time limits (the container is killed past the time limit). Without network, the
worker does the shard's I/O on both sides:

1. **stage**: the shard file, and each bundle and driver version's sources the shard
   needs, into the work folder (an object that does not exist is left out of the
   manifest: the build records it missing, as it would online);
2. **build**: the container runs ``drivers build-shard --offline /work``
   (:func:`drivers.build.shard_run.build_shard_offline`); its lines stream into this
   process's stderr (the Airflow task's log);
3. **upload**: the drivers and failure logs it left, to the same work-bucket objects an
   online shard writes, and the results object, so unify and push are the same for every
   runtime. What the folder holds is checked first: the build could write anything there
   (records only for the shard's tasks, objects only under their own names, bytes
   matching their record, regular files only, never through a symlink).

The Docker API is podman's (``podman system service``) or Docker's, driven with the
``docker`` package (imported on use: DAG parsing never loads it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from drivers.build.shard import Shard
from drivers.build.shard_run import (
    OUTPUTS,
    RECORDS,
    SANDBOX_ENV,
    STAGED_INPUTS,
    STAGED_MANIFEST,
    STAGED_SHARD,
    TIMINGS,
    ShardStopped,
    TaskRecords,
    Terminated,
    _counts,
    _now,
    _sigterm_raises,
    _stopping,
    needs_bundle,
    print_summary,
    read_shard,
    shard_record,
    write_results,
)
from drivers.domain import layout
from drivers.domain.config import Config
from drivers.domain.exit_codes import EX_DATAERR, EX_OK, EX_TEMPFAIL
from drivers.domain.names import DriverKey
from drivers.domain.toolchain import TOOLCHAIN_MISMATCH
from drivers.store import ledger

WORK = "/work"  # the work folder inside the container
USER = "1000:1000"  # the builder images' user (images/*/Dockerfile)
# A task record's statuses (toolchain_mismatch: helper C's toolchain guard, issue 15).
STATUSES = ("built", "unavailable", "failed", "infra_failed", TOOLCHAIN_MISMATCH)
MAX_OUTPUT = 512 * 1024 * 1024  # a file the build left larger than this is not read
TRANSFERS = 8  # parallel downloads and uploads
TMPFS_SIZE = "64m"  # the container's /tmp (builds use the work folder: TMPDIR)
STOP_GRACE_S = 10  # SIGTERM, then SIGKILL: the shard writes what it has
POLL_S = 0.25  # how often the container's state is asked for


@dataclasses.dataclass(frozen=True)
class Sandbox:
    """How one builder's shards run (:func:`for_builder` makes it from the config)."""

    image: str
    docker_url: str
    cpus: float
    memory: str  # Docker's notation: "4g", "512m"
    time_limit_s: float
    pids_limit: int = 4096
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    workdir: Path | None = None  # where the work folders are made (default: the temp dir)


def for_builder(config: Config, builder: str) -> Sandbox:
    """The builder's sandbox: its image, no network, read-only, uid 1000, its cpu and
    memory (the builder's ``resources`` over the [kubernetes] ones), the [docker] time and
    process limits. ValueError when the builder has no image."""
    resources = config.kubernetes["resources"] | config.builders[builder].resources
    image = config.builders[builder].image
    if not image:
        raise ValueError(f"builder {builder!r} has no image: the docker runtime needs one")
    docker = config.docker
    return Sandbox(
        image=image,
        docker_url=os.environ.get("DOCKER_HOST") or docker["url"],
        cpus=float(resources["cpu"]),
        memory=docker_memory(resources["memory"]),
        time_limit_s=float(docker["time_limit_s"]),
        pids_limit=int(docker["pids_limit"]),
        labels={"app": "collector-drivers", "builder": builder},
        workdir=Path(docker["workdir"]) if docker["workdir"] else None,
    )


def docker_memory(memory: str) -> str:
    """A Kubernetes quantity (``4Gi``, ``512Mi``) in Docker's notation (``4g``, ``512m``)."""
    return memory.replace("Gi", "g").replace("Mi", "m")


@dataclasses.dataclass
class ContainerExit:
    status: int | None  # None: killed at the time limit
    seconds: float
    oom_killed: bool = False


# --- 1. stage ---------------------------------------------------------------------------------


def shard_document(shard: Shard, uri: str) -> dict[str, Any]:
    """The shard file as pre-build wrote it (what ``--offline`` parses again)."""
    return {
        "run_id": shard.run_id,
        "builder": shard.builder,
        "index": shard.index,
        "cost": shard.cost,
        "buckets": {"bundles": shard.bundles, "sources": shard.sources, "work": shard.work},
        "tasks": [[k.kernel, k.driver_version, k.kind] for k in shard.tasks],
        "uri": uri,
    }


def needed_inputs(shard: Shard) -> list[tuple[str, str]]:
    """(bucket, object) of every input the shard's builds read: one bundle per kernel
    with something to build, one sources archive per driver version."""
    wanted: dict[tuple[str, str], None] = {}
    for key in shard.tasks:
        if needs_bundle(key):
            wanted[(shard.bundles, layout.bundle_object(key.kernel))] = None
    for key in shard.tasks:
        if needs_bundle(key):
            wanted[(shard.sources, layout.source_object(key.driver_version))] = None
    return list(wanted)


def stage(shard: Shard, uri: str, store: Any, folder: Path) -> dict[str, str | None]:
    """Download the shard's inputs into ``folder`` and write its manifest; the objects
    staged, ``bucket/name`` -> md5 (a missing object is not listed)."""
    from drivers.store.storage import ObjectNotFound

    def fetch(item: tuple[str, str]) -> tuple[str, str | None] | None:
        bucket, name = item
        try:
            store(bucket).download_to(name, folder / STAGED_INPUTS / bucket / name)
            return f"{bucket}/{name}", store(bucket).info(name).md5
        except ObjectNotFound:
            return None

    with ThreadPoolExecutor(TRANSFERS, thread_name_prefix="stage") as pool:
        objects = dict(r for r in pool.map(fetch, needed_inputs(shard)) if r is not None)
    (folder / STAGED_SHARD).write_text(json.dumps(shard_document(shard, uri)))
    (folder / STAGED_MANIFEST).write_text(json.dumps({"uri": uri, "objects": objects}))
    give_to_builder(folder)
    return objects


def work_folder(sandbox: Sandbox) -> Path:
    """A fresh work folder on the worker, for one shard."""
    if sandbox.workdir is not None:
        sandbox.workdir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="sandbox-", dir=sandbox.workdir)).resolve()


def give_to_builder(folder: Path) -> None:
    """Make the staged folder the container's user's (uid 1000): it moves the inputs
    it uses and writes its outputs there. A non-root worker cannot give files away: it
    opens the folders to that user instead."""
    uid, gid = (int(n) for n in USER.split(":"))
    for root, dirs, files in os.walk(folder):
        for name in [".", *dirs, *files]:
            path = os.path.join(root, name)
            if os.geteuid() == 0:
                os.chown(path, uid, gid, follow_symlinks=False)
            elif os.path.isdir(path):
                os.chmod(path, 0o777)


# --- 2. build -----------------------------------------------------------------------------------


def run_container(
    sandbox: Sandbox,
    folder: Path,
    environment: dict[str, str],
    err: Any,
    command: tuple[str, ...] = ("build-shard", "--offline", WORK),
) -> ContainerExit:
    """``drivers build-shard --offline /work`` (or another ``drivers`` command) in the
    sandbox, ``folder`` as its /work; its output streams to ``err``. The container is
    killed past the time limit and always removed."""
    import docker
    from docker.types import Mount

    client = docker.DockerClient(base_url=sandbox.docker_url, timeout=60)
    started = time.monotonic()
    container = None
    try:
        container = client.containers.run(
            sandbox.image,
            list(command),
            user=USER,
            network_mode="none",
            read_only=True,
            mounts=[Mount(WORK, str(folder), type="bind", read_only=False)],
            # explicit, as podman's --read-only gives it: gone with the container
            tmpfs={"/tmp": f"rw,size={TMPFS_SIZE},nosuid,nodev,noexec"},
            working_dir=WORK,
            environment=environment,
            labels=sandbox.labels,
            nano_cpus=int(sandbox.cpus * 1e9),  # 0: no limit
            mem_limit=sandbox.memory,
            memswap_limit=sandbox.memory,  # no swap beyond the limit
            pids_limit=sandbox.pids_limit,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            detach=True,
        )
        streamer = threading.Thread(target=_stream, args=(container, err), daemon=True)
        streamer.start()
        status = _wait(container, started + sandbox.time_limit_s)
        if status is None:  # the time limit
            container.stop(timeout=STOP_GRACE_S)  # SIGTERM: it writes what it has
        streamer.join(STOP_GRACE_S)
        container.reload()
        oom = bool(container.attrs.get("State", {}).get("OOMKilled"))
        return ContainerExit(status, time.monotonic() - started, oom)
    finally:
        if container is not None:
            with contextlib.suppress(Exception):
                container.remove(force=True)
        client.close()


def _wait(container: Any, deadline: float) -> int | None:
    """The container's exit status, or None at the deadline. Polled: podman's Docker API
    ``wait`` spins, burning most of a core while it waits (podman 4.3, measured 0.9 CPU s
    per second against 0.02 polling), which a build on a busy machine pays for."""
    while True:
        container.reload()
        state = container.attrs.get("State", {})
        if container.status in ("exited", "dead") or state.get("Status") in ("exited", "dead"):
            return int(state.get("ExitCode", -1))
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL_S)


def _stream(container: Any, err: Any) -> None:
    with contextlib.suppress(Exception):  # the container went away: nothing more to say
        for chunk in container.logs(stream=True, follow=True, stdout=True, stderr=True):
            err.write(chunk.decode(errors="replace"))
            err.flush()


# --- 3. upload ----------------------------------------------------------------------------------


def read_inside(root: Path, relative: str) -> bytes | None:
    """A regular file at ``root/relative``, never through a symlink nor outside ``root``,
    at most :data:`MAX_OUTPUT` bytes; None otherwise."""
    if relative.startswith("/") or ".." in Path(relative).parts:
        return None
    path = root
    for part in Path(relative).parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return None
        if stat.S_ISLNK(mode):
            return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_OUTPUT:
            return None
        return f.read()


def expected_objects(shard: Shard, key: DriverKey) -> dict[str, str]:
    """The only object names a task's record may name."""
    staged = layout.staged_drivers_prefix(shard.run_id)
    names = {
        "built": staged + key.object_name(),
        "log": layout.staged_log_object(shard.run_id, key.kernel, key.driver_version, key.kind),
    }
    if key.kind == "bpf":
        names["unavailable"] = staged + key.unavail_name()
    return names


def read_records(
    shard: Shard, folder: Path
) -> tuple[dict[DriverKey, dict[str, Any]], dict[str, Any] | None, list[str]]:
    """The container's task records (only for the shard's tasks, each once, well
    formed), its shard record (the last line), and what was wrong with the rest."""
    data = read_inside(folder, f"{OUTPUTS}/{RECORDS}")
    if data is None:
        return {}, None, []
    tasks = set(shard.tasks)
    records: dict[DriverKey, dict[str, Any]] = {}
    final, problems = None, []
    lines = data.decode(errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"line {n} is not JSON")
            continue
        if not isinstance(r, dict):
            problems.append(f"line {n} is not a record")
        elif r.get("type") == "shard" and n == len(lines):
            final = r
        elif r.get("type") != "task":
            problems.append(f"line {n}: unexpected record type {r.get('type')!r}")
        else:
            problem = _task_problem(shard, r, tasks, records)
            if problem:
                problems.append(f"line {n}: {problem}")
            else:
                records[DriverKey(r["kernel"], r["driver_version"], r["kind"])] = r
    return records, final, problems


def _task_problem(
    shard: Shard, r: dict[str, Any], tasks: set[DriverKey], seen: dict[DriverKey, Any]
) -> str | None:
    fields = [r.get("kernel"), r.get("driver_version"), r.get("kind")]
    if not all(isinstance(f, str) for f in fields):
        return "a task record without its kernel, driver_version and kind"
    key = DriverKey(*fields)
    if key not in tasks:
        return f"{key.kernel} {key.driver_version} {key.kind} is not a task of this shard"
    if key in seen:
        return f"{key.kernel} {key.driver_version} {key.kind} recorded twice"
    if r.get("status") not in STATUSES or r.get("builder") != shard.builder:
        return f"{key.kernel} {key.driver_version} {key.kind}: bad status or builder"
    expected = expected_objects(shard, key)
    if r["status"] in ("built", "unavailable") and r.get("object") != expected.get(r["status"]):
        return f"{key.kernel} {key.driver_version} {key.kind}: object {r.get('object')!r}"
    if r["status"] not in ("built", "unavailable") and r.get("object") is not None:
        return f"{key.kernel} {key.driver_version} {key.kind}: an object without a build"
    if r.get("log") not in (None, expected["log"]):
        return f"{key.kernel} {key.driver_version} {key.kind}: log {r.get('log')!r}"
    return None


def upload_outputs(
    work: Any, folder: Path, records: dict[DriverKey, dict[str, Any]]
) -> dict[DriverKey, dict[str, Any]]:
    """Upload each record's object and log from the folder, as an online shard stages
    them (never overwriting; an earlier attempt's log is kept); the records as they
    stand after (another object already under that name: ``nondeterministic``, a file
    that is missing or differs from its record: ``sandbox``)."""
    from drivers.store.storage import UploadResult

    objects = folder / OUTPUTS / "objects"

    def upload(item: tuple[DriverKey, dict[str, Any]]) -> tuple[DriverKey, dict[str, Any]]:
        key, r = item
        r = dict(r)
        if r.get("log"):
            log = read_inside(objects, r["log"])
            if log is not None:
                work.upload_new(r["log"], log)
            else:
                r["log"] = None
        if not r.get("object"):
            return key, r
        data = read_inside(objects, r["object"])
        digest = hashlib.sha256(data).hexdigest() if data is not None else None
        if data is None or digest != r.get("sha256") or len(data) != r.get("size"):
            what = "is missing" if data is None else "differs from its record"
            return key, r | {
                "status": "failed",
                "failure": "sandbox",
                "object": None,
                "message": f"{r['object']} {what} in the build's work folder",
            }
        if work.upload_new(r["object"], data) is UploadResult.DIFFERENT:
            return key, r | {
                "status": "failed",
                "failure": "nondeterministic",
                "object": None,
                "message": f"{r['object']} already staged with other bytes: the build is "
                "not reproducible",
            }
        return key, r

    with ThreadPoolExecutor(TRANSFERS, thread_name_prefix="upload") as pool:
        return dict(pool.map(upload, records.items()))


# --- the whole shard ----------------------------------------------------------------------------


def container_environment(sandbox: Sandbox) -> dict[str, str]:
    """The container's environment: what the records name as the builder's environment,
    and what confines it. No bucket, no credentials: it reaches nothing."""
    return {ledger.IMAGE_ENV: sandbox.image, SANDBOX_ENV: "docker"}


def build_shard_sandboxed(
    shard_uri: str, store: Any, sandbox: Sandbox, err: Any = None
) -> tuple[int, list[dict[str, Any]]]:
    """One shard on the docker runtime (stage, build in the sandbox, upload) and its
    results object; (exit status as ``build-shard``'s, records incl. the shard record).
    ``store(bucket)`` gives an ObjectStore for a bucket name."""
    from drivers.store.storage import parse_gs_uri

    err = err if err is not None else sys.stderr
    bucket, name = parse_gs_uri(shard_uri)
    shard = read_shard(store(bucket), name, shard_uri)
    if shard is None:  # reported, with a results object when its name says where
        return EX_DATAERR, []
    started, started_s = _now(), time.perf_counter()
    timings = dict.fromkeys(TIMINGS, 0.0)
    folder = work_folder(sandbox)
    exit_: ContainerExit | None = None
    objects: dict[str, str | None] = {}
    records: dict[DriverKey, dict[str, Any]] = {}
    inner: dict[str, Any] | None = None
    try:
        with _sigterm_raises():
            try:
                t = time.perf_counter()
                objects = stage(shard, shard_uri, store, folder)
                timings["fetch_s"] += time.perf_counter() - t
                exit_ = run_container(sandbox, folder, container_environment(sandbox), err)
                records, inner, problems = read_records(shard, folder)
                t = time.perf_counter()
                records = upload_outputs(store(shard.work), folder, records)
                timings["upload_s"] += time.perf_counter() - t
                status, error = _outcome(sandbox, exit_, inner, problems)
            except (Exception, Terminated) as e:
                stopped = _stopping(e)
                status, error = stopped.exit_status, str(stopped)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    if exit_ is not None and exit_.status is None:  # what the SIGTERM stopped: the limit
        for key, r in records.items():
            if r.get("failure") == "terminated":
                records[key] = r | {"failure": "timeout", "message": f"stopped: {error}"}
    tasks = TaskRecords(shard.builder, {}, {n.split("/", 1)[1]: m for n, m in objects.items()})
    tasks.env = ledger.environment(sandbox.image, None)
    tasks.all = [records[k] for k in shard.tasks if k in records]
    if len(tasks.all) < len(shard.tasks):  # cut short: the rest never ran
        failure = "timeout" if exit_ is not None and exit_.status is None else "sandbox"
        tasks.not_attempted(shard.tasks, ShardStopped(error or "no record", status, failure))
    final = shard_record(shard, None, status, error, started, started_s)
    for name in ("extract_s", "build_s", "cleanup_s"):
        final[name] = round((inner or {}).get(name) or 0.0, 3)
    final |= {
        "fetch_s": round(timings["fetch_s"], 3),
        "upload_s": round(timings["upload_s"], 3),
        "completed": bool(inner and inner.get("completed")) and status != EX_TEMPFAIL,
        "counts": _counts(tasks.all),
        "sandbox": "docker",
        "container_s": round(exit_.seconds, 3) if exit_ else None,
    }
    print_summary(shard, final, err)
    all_records = [*tasks.all, final]
    written = write_results(
        store(shard.work), shard.run_id, shard.builder, shard.index, all_records, err
    )
    if not written and status == EX_OK:
        status = EX_TEMPFAIL  # the DAG learns nothing from a shard without results
    return status, all_records


def _outcome(
    sandbox: Sandbox, exit_: ContainerExit, inner: dict[str, Any] | None, problems: list[str]
) -> tuple[int, str | None]:
    """The shard's exit status and error from how its container ended."""
    if exit_.status is None:
        return EX_TEMPFAIL, (
            f"killed at the builder's time limit ({sandbox.time_limit_s:.0f} s, "
            f"[docker] time_limit_s)"
        )
    if problems:  # the build wrote into its records: the input is hostile, do not retry
        return EX_DATAERR, "the build's records were tampered with: " + "; ".join(problems[:5])
    if inner is None:
        why = f"out of memory (limit {sandbox.memory})" if exit_.oom_killed else "no shard record"
        return EX_TEMPFAIL, f"builder container exited {exit_.status}: {why}"
    return exit_.status, inner.get("error")
