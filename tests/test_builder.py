"""`drivers build-shard` end to end: a real Debian 6.1 bundle, the example driver sources,
gcc/clang/make, and the real GCS emulator. Plus the builder's safety checks on their own.

The real bundle is made once with drivers.build.bundles (cached under .cache/builder-tests/,
remade when bundles.py changes); each real-kernel shard costs ~5 s of extraction and
~2-3 s per driver on a 2-core machine.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from drivers.build.bundle import BundleCorrupt, open_bundle
from drivers.build.compile import LOG_LIMIT, WORKDIR_IN_LOGS, gzip_driver, tool_version
from drivers.build.safetar import UnsafeArchive, safe_extract
from drivers.build.shard import Shard, ShardFormatError
from drivers.build.shard_run import build_shard
from drivers.build.sources import package_sources
from drivers.domain import layout
from drivers.domain.exit_codes import EX_DATAERR, EX_OK, EX_TEMPFAIL
from drivers.domain.names import DriverKey
from drivers.domain.toolchain import TOOLCHAIN_MISMATCH, parse_compiler
from drivers.domain.verify import elf_sections, read_vermagic, verify_driver
from drivers.ops.cli import main
from drivers.store.storage import ObjectStore
from example_sources import EXAMPLE_SOURCES
from tarballs import rewritten, tgz, without_common_tree

REPO = Path(__file__).resolve().parents[1]
KERNEL = "6.1.0-47-cloud-amd64"
OTHER_KERNEL = "6.1.0-47-amd64"  # a real release whose bundle we fake from KERNEL's
VERSIONS = ("2.3.0", "2.4.0-rc1")
CACHE = REPO / ".cache/builder-tests"


# --- inputs ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_bundle() -> Path:
    """bundle-6.1.0-47-cloud-amd64.tgz from Debian's header packages."""
    from drivers.build import bundles

    path = CACHE / layout.bundle_object(KERNEL)
    if not path.exists() or path.stat().st_mtime < Path(bundles.__file__).stat().st_mtime:
        bundles.make_debian_bundle(KERNEL, CACHE, REPO / ".cache/debs")
    return path


@pytest.fixture(scope="session")
def relabelled_bundle(real_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """KERNEL's bundle with BUNDLE_UNAME edited to OTHER_KERNEL: its modules carry
    KERNEL's vermagic, so a build 'for' OTHER_KERNEL must be refused."""
    out = io.BytesIO()
    with (
        tarfile.open(real_bundle, "r:gz") as src,
        gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=1) as gz,
        tarfile.open(fileobj=gz, mode="w") as dst,
    ):
        for member in src:
            data = src.extractfile(member).read() if member.isreg() else None
            if member.name.lstrip("./") == "BUNDLE_UNAME":
                data = f"{OTHER_KERNEL}\n".encode()
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


GCC10 = "gcc-10 (Debian 10.2.1-6) 10.2.1 20210110"  # bullseye's 5.10 kernels were built so


@pytest.fixture(scope="session")
def gcc10_bundle(real_bundle: Path) -> bytes:
    """KERNEL's real bundle whose .config says bullseye's gcc-10 built it (autoconf.h and
    compile.h still say gcc-12, and .kernelvariables still calls gcc-12: .config wins)."""
    config = f"usr/src/linux-headers-{KERNEL}/.config"

    def edit(name: str, data: bytes) -> bytes:
        if name != config:
            return data
        line = f'CONFIG_CC_VERSION_TEXT="{GCC10}"'.encode()
        edited, n = re.subn(rb"^CONFIG_CC_VERSION_TEXT=.*$", line, data, flags=re.MULTILINE)
        assert n == 1
        return edited

    return rewritten(real_bundle, edit, without_common_tree)


def fake_bundle(uname: str | None, *extra: tuple[str, str, bytes | str]) -> bytes:
    """A tiny bundle: BUNDLE_* files and a build dir whose Makefile cannot build anything."""
    files = [("BUNDLE_BUILD_DIR", "file", "build\n"), ("build/Makefile", "file", "all:\n")]
    if uname is not None:
        files.append(("BUNDLE_UNAME", "file", f"{uname}\n"))
    return tgz(*files, *extra)


class Env:
    """Three fresh buckets, the sources of both example versions, and a shard runner."""

    def __init__(self, store: Callable[..., ObjectStore], tmp_path: Path) -> None:
        self.bundles, self.sources, self.work = store(), store(), store()
        self.tmp_path = tmp_path
        self.runs = 0
        for version in VERSIONS:
            self.add_sources(EXAMPLE_SOURCES / version)

    def add_sources(self, version_dir: Path) -> None:
        out = self.tmp_path / "sources-out"
        out.mkdir(exist_ok=True)
        self.sources.upload_new_file(
            layout.source_object(version_dir.name), package_sources(version_dir, out)
        )

    def add_bundle(self, kernel: str, data: bytes | Path) -> None:
        name = layout.bundle_object(kernel)
        if isinstance(data, Path):
            self.bundles.upload_new_file(name, data)
        else:
            self.bundles.upload_new(name, data)

    def shard(
        self,
        tasks: list[tuple[str, str, str]],
        run_id: str = "run1",
        index: int = 0,
        builder: str = "fc36",
    ):
        doc = {
            "run_id": run_id,
            "builder": builder,
            "index": index,
            "cost": 12.5,
            "buckets": {
                "bundles": self.bundles.bucket_name,
                "sources": self.sources.bucket_name,
                "work": self.work.bucket_name,
            },
            "tasks": [list(t) for t in tasks],
        }
        name = layout.shard_object(run_id, builder, index)
        self.work.put(name, json.dumps(doc).encode())
        return f"gs://{self.work.bucket_name}/{name}", doc

    def build(self, tasks, run_id: str = "run1", index: int = 0):
        """Run `drivers build-shard` (the CLI entrypoint); (exit status, records, workdir)."""
        uri, _doc = self.shard(tasks, run_id, index)
        self.runs += 1
        workdir = self.tmp_path / f"work-{self.runs}"
        status = main(["build-shard", "--shard", uri, "--workdir", str(workdir)])
        return status, self.results(run_id, index), workdir

    def results(self, run_id: str = "run1", index: int = 0, builder: str = "fc36") -> list[dict]:
        data = self.work.download(layout.shard_results_object(run_id, builder, index))
        return [json.loads(line) for line in data.decode().splitlines()]


@pytest.fixture
def env(store, tmp_path) -> Env:
    return Env(store, tmp_path)


def by_task(records: list[dict]) -> dict[tuple[str, str, str], dict]:
    return {(r["kernel"], r["driver_version"], r["kind"]): r for r in records[:-1]}


ALL_KINDS = [(KERNEL, v, k) for v in VERSIONS for k in ("mod", "bpf")]


# --- end to end on a real kernel -----------------------------------------------------------


@pytest.fixture(scope="module")
def first_build(gcs, tmp_path_factory, real_bundle):
    """One shard: both kinds of both example versions for the real kernel."""
    from drivers.store.storage import client_from_environment

    tmp = tmp_path_factory.mktemp("first-build")
    client = client_from_environment()
    count = iter(range(100))

    def store() -> ObjectStore:
        name = f"test-first-build-{os.getpid()}-{next(count)}"
        gcs.create_buckets([name])
        return ObjectStore(client, name)

    e = Env(store, tmp)
    e.add_bundle(KERNEL, real_bundle)
    status, records, workdir = e.build(ALL_KINDS)
    return e, status, records, workdir


def test_a_real_kernel_builds_both_kinds_of_both_versions_and_stages_them(first_build):
    e, status, records, workdir = first_build

    assert status == EX_OK
    tasks = by_task(records)
    assert set(tasks) == set(ALL_KINDS)
    for (kernel, version, kind), r in tasks.items():
        key = DriverKey(kernel, version, kind)
        assert r["status"] == "built", r
        assert r["failure"] is None and r["log"] is None
        assert r["object"] == layout.staged_drivers_prefix("run1") + key.object_name()
        data = e.work.download(r["object"])
        assert r["size"] == len(data)
        assert r["sha256"] == __import__("hashlib").sha256(data).hexdigest()
        assert verify_driver(key, data, unavailable=False) == []
        sections = elf_sections(gzip.decompress(data))
        assert ".debug_info" not in sections  # stripped
        assert kind == "mod" or ".BTF" in sections  # libbpf needs it for the maps
        assert data[4:8] == b"\0\0\0\0" and not data[3] & 0x08  # gzip: mtime 0, no name
        assert set(r["toolchain"]) == {"gcc", "clang", "make"}
        assert r["toolchain"]["gcc"] and r["toolchain"]["clang"] and r["toolchain"]["make"]
        # the toolchain guard read the bundle's .config; this host's gcc-12 may build it
        assert parse_compiler(r["kernel_compiler"]).label == "gcc 12", r["kernel_compiler"]

    shard = records[-1]
    assert shard["type"] == "shard"
    assert (shard["status"], shard["error"], shard["exit_status"]) == ("ok", None, EX_OK)
    assert (shard["run_id"], shard["builder"], shard["index"]) == ("run1", "fc36", 0)
    assert (shard["kernels"], shard["tasks"], shard["counts"]) == (1, 4, {"built": 4})
    assert shard["estimated_cost_s"] == 12.5
    assert shard["fetch_s"] > 0 and shard["extract_s"] > 0 and shard["build_s"] > 0
    assert shard["measured_s"] >= shard["fetch_s"] + shard["extract_s"] + shard["build_s"]
    # the attempt's scratch folder is gone
    assert list(workdir.iterdir()) == [], [str(p) for p in workdir.rglob("*")][:20]


def test_the_vermagic_reader_agrees_with_modinfo(first_build, tmp_path):
    e, _status, records, _ = first_build
    if shutil.which("modinfo") is None:
        pytest.skip("modinfo (kmod) is not installed")
    module = tmp_path / "collector.ko"
    obj = by_task(records)[(KERNEL, "2.3.0", "mod")]["object"]
    module.write_bytes(gzip.decompress(e.work.download(obj)))
    modinfo = subprocess.run(
        ["modinfo", "-F", "vermagic", str(module)], capture_output=True, text=True, check=True
    ).stdout.rstrip("\n")
    assert read_vermagic(module.read_bytes()) == modinfo
    assert modinfo.startswith(KERNEL + " ")


def test_a_rebuild_elsewhere_gives_identical_bytes(first_build):
    e, _status, first, _ = first_build

    # The retried shard: same run, another scratch folder; upload_new must see IDENTICAL.
    status, again, _workdir = e.build(ALL_KINDS)

    assert status == EX_OK
    first_tasks, again_tasks = by_task(first), by_task(again)
    assert set(again_tasks) == set(first_tasks) and again_tasks  # every task, not none
    for task, r in again_tasks.items():
        assert r["status"] == "built", r
        assert r["sha256"] == first_tasks[task]["sha256"]


# --- the toolchain guard -------------------------------------------------------------------


def test_a_kernel_built_by_another_gcc_major_is_refused_before_anything_compiles(env, gcc10_bundle):
    env.add_bundle(KERNEL, gcc10_bundle)

    status, records, workdir = env.build(ALL_KINDS)

    assert status == EX_OK  # a routing error is data: the shard ran through
    host = parse_compiler(tool_version("gcc-12"))  # what this tree's kbuild would call
    for r in by_task(records).values():
        assert (r["status"], r["failure"], r["object"], r["log"], r["sha256"]) == (
            TOOLCHAIN_MISMATCH,
            TOOLCHAIN_MISMATCH,
            None,
            None,
            None,
        ), r
        assert r["message"] == (
            f"kernel built with {GCC10}; builder fc36 has gcc {host.version} (gcc-12): "
            "route it to a builder with gcc 10"
        )
        assert r["kernel_compiler"] == GCC10
        assert r["duration_s"] < 0.5  # no make ran (a real build takes seconds)
    shard = records[-1]
    assert shard["counts"] == {TOOLCHAIN_MISMATCH: 4}  # apart from failed and infra_failed
    assert shard["build_s"] < 1
    staged = [i.name for i in env.work.list(layout.staging_prefix("run1"))]
    assert not [n for n in staged if "/drivers/" in n or "/logs/" in n], staged
    assert layout.shard_results_object("run1", "fc36", 0) in staged


# --- kernels without eBPF -----------------------------------------------------------------


def test_a_kernel_older_than_4_14_gets_an_empty_unavail_marker_without_a_bundle(env):
    old = "4.9.0-13-amd64"
    status, records, _ = env.build([(old, "2.3.0", "bpf"), (old, "2.4.0-rc1", "bpf")])

    assert status == EX_OK
    for version in VERSIONS:
        r = by_task(records)[(old, version, "bpf")]
        key = DriverKey(old, version, "bpf")
        assert (r["status"], r["failure"], r["size"]) == ("unavailable", None, 0)
        assert r["object"] == layout.staged_drivers_prefix("run1") + key.unavail_name()
        assert env.work.download(r["object"]) == b""
    # Nothing was downloaded: there is no bundle for that kernel at all.
    assert records[-1]["fetch_s"] == 0 and records[-1]["extract_s"] == 0


# --- bad inputs ---------------------------------------------------------------------------

BAD_BUNDLES = {
    # kernel: (bundle bytes or None for missing, failure class, words in the message)
    "5.10.0-1-amd64": (b"this is not gzip", "bundle_corrupt", "not a readable .tgz"),
    "5.10.0-2-amd64": (
        fake_bundle("5.10.0-2-amd64", ("../x", "file", "escaped")),
        "bundle_corrupt",
        "'..'",
    ),
    "5.10.0-3-amd64": (
        fake_bundle("5.10.0-3-amd64", ("build/etc", "symlink", "/etc")),
        "bundle_corrupt",
        "outside the tree",
    ),
    "5.10.0-4-amd64": (fake_bundle(None), "bundle_corrupt", "no BUNDLE_UNAME"),
    "5.10.0-5-amd64": (None, "bundle_missing", "does not exist"),
}


def test_bad_bundles_fail_their_kernels_as_infra_while_the_shard_goes_on(env, real_bundle):
    for kernel, (data, _failure, _words) in BAD_BUNDLES.items():
        if data is not None:
            env.add_bundle(kernel, data)
    env.add_bundle(KERNEL, real_bundle)
    tasks = [(k, "2.3.0", kind) for k in BAD_BUNDLES for kind in ("mod", "bpf")]
    # 7.7.7: no sources; 8.8.8: sources without build.json
    env.sources.upload_new(layout.source_object("8.8.8"), tgz(("module/Makefile", "file", "")))
    tasks += [(KERNEL, "2.3.0", "mod"), (KERNEL, "7.7.7", "mod"), (KERNEL, "8.8.8", "mod")]

    status, records, workdir = env.build(tasks)

    assert status == EX_DATAERR
    results = by_task(records)
    for kernel, (_data, failure, words) in BAD_BUNDLES.items():
        for kind in ("mod", "bpf"):
            r = results[(kernel, "2.3.0", kind)]
            assert (r["status"], r["failure"]) == ("infra_failed", failure), r
            assert words in r["message"]
            assert r["object"] is None
    assert results[(KERNEL, "2.3.0", "mod")]["status"] == "built"
    no_sources = results[(KERNEL, "7.7.7", "mod")]
    assert (no_sources["status"], no_sources["failure"]) == ("infra_failed", "sources_missing")
    assert "7.7.7.tgz does not exist" in no_sources["message"]
    no_spec = results[(KERNEL, "8.8.8", "mod")]
    assert (no_spec["status"], no_spec["failure"]) == ("infra_failed", "sources_missing")
    assert "build.json is missing" in no_spec["message"]
    shard = records[-1]
    assert (shard["status"], shard["exit_status"], shard["completed"]) == (
        "infra_failed",
        EX_DATAERR,
        True,
    )
    assert "5.10.0-5-amd64" in shard["error"] and "do not retry" in shard["error"]
    assert not (workdir.parent / "x").exists() and list(workdir.iterdir()) == []
    staged = {i.name for i in env.work.list(layout.staged_drivers_prefix("run1"))}
    assert staged == {layout.staged_drivers_prefix("run1") + "2.3.0/collector-" + KERNEL + ".ko.gz"}


def test_a_module_that_does_not_compile_fails_with_its_log(env, real_bundle, tmp_path):
    broken = tmp_path / "9.9.9"
    shutil.copytree(EXAMPLE_SOURCES / "2.3.0", broken)
    source = broken / "module/collector.c"
    source.write_text(source.read_text() + "\nstatic int oops = undeclared_thing;\n")
    env.add_sources(broken)
    env.add_bundle(KERNEL, real_bundle)

    status, records, _ = env.build([(KERNEL, "9.9.9", "mod"), (KERNEL, "9.9.9", "bpf")])

    assert status == EX_OK  # compile failures are data, not exit codes
    r = by_task(records)[(KERNEL, "9.9.9", "mod")]
    assert (r["status"], r["failure"], r["object"], r["sha256"]) == (
        "failed",
        "compile",
        None,
        None,
    )
    assert r["log"] == layout.staged_log_object("run1", KERNEL, "9.9.9", "mod")
    log = env.work.download(r["log"]).decode()
    assert "undeclared_thing" in log and "error" in log
    assert WORKDIR_IN_LOGS in log and str(tmp_path) not in log
    assert len(log) <= LOG_LIMIT + 200
    assert by_task(records)[(KERNEL, "9.9.9", "bpf")]["status"] == "built"  # the shard went on


def test_a_module_whose_vermagic_is_for_another_kernel_is_refused(env, relabelled_bundle):
    env.add_bundle(OTHER_KERNEL, relabelled_bundle)

    status, records, _ = env.build([(OTHER_KERNEL, "2.3.0", "mod")])

    assert status == EX_OK
    r = by_task(records)[(OTHER_KERNEL, "2.3.0", "mod")]
    assert (r["status"], r["failure"], r["object"]) == ("failed", "vermagic", None)
    assert KERNEL in r["message"] and OTHER_KERNEL in r["message"]
    assert "vermagic" in env.work.download(r["log"]).decode()


def test_other_bytes_already_staged_under_the_name_are_a_nondeterministic_failure(env, real_bundle):
    env.add_bundle(KERNEL, real_bundle)
    key = DriverKey(KERNEL, "2.3.0", "mod")
    staged = layout.staged_drivers_prefix("run1") + key.object_name()
    env.work.upload_new(staged, b"an earlier, different build")

    status, records, _ = env.build([key])

    assert status == EX_OK
    r = by_task(records)[key]
    assert (r["status"], r["failure"]) == ("failed", "nondeterministic")
    assert env.work.download(staged) == b"an earlier, different build"  # never overwritten


# --- the shard file -------------------------------------------------------------------------


def test_a_malformed_shard_exits_65_with_a_failed_shard_record(env):
    name = layout.shard_object("run9", "rhel8", 7)
    env.work.put(name, b'{"run_id": "run9", "tasks": [["not a kernel", "2.3.0", "mod"]]}')

    status = main(["build-shard", "--shard", f"gs://{env.work.bucket_name}/{name}"])

    assert status == EX_DATAERR
    data = env.work.download(layout.shard_results_object("run9", "rhel8", 7))
    (record,) = [json.loads(line) for line in data.decode().splitlines()]
    assert (record["type"], record["status"], record["exit_status"]) == (
        "shard",
        "infra_failed",
        EX_DATAERR,
    )
    assert "buckets" in record["error"]


def test_a_missing_shard_file_exits_65(env):
    name = layout.shard_object("run9", "rhel8", 8)
    status = main(["build-shard", "--shard", f"gs://{env.work.bucket_name}/{name}"])
    assert status == EX_DATAERR


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda d: d.pop("buckets"), "'buckets'"),
        (lambda d: d.update(index="3"), "'index'"),
        (lambda d: d["tasks"].append(["6.1.0-1-amd64", "two", "mod"]), "tasks[1]"),
        (lambda d: d["tasks"].append(["6.1.0-1-amd64", "2.3.0", "ko"]), "kind 'ko'"),
        (lambda d: d["tasks"].append(["6.1.0-1-amd64", "2.3.0"]), "tasks[1]"),
        (lambda d: d["buckets"].update(work="a/b"), "buckets.work"),
    ],
)
def test_shard_format_errors_name_the_culprit(change, words):
    doc = {
        "run_id": "r",
        "builder": "fc36",
        "index": 0,
        "cost": 1,
        "buckets": {"bundles": "b", "sources": "s", "work": "w"},
        "tasks": [["6.1.0-1-amd64", "2.3.0", "mod"]],
    }
    Shard.from_json(json.dumps(doc).encode(), "shard.json")  # the unchanged one is fine
    change(doc)
    with pytest.raises(ShardFormatError, match="shard.json") as e:
        Shard.from_json(json.dumps(doc).encode(), "shard.json")
    assert words in str(e.value)


def test_tasks_are_grouped_by_kernel_in_first_seen_order():
    doc = {
        "run_id": "r",
        "builder": "fc36",
        "index": 0,
        "cost": 1,
        "buckets": {"bundles": "b", "sources": "s", "work": "w"},
        "tasks": [
            ["6.1.0-2-amd64", "2.3.0", "mod"],
            ["6.1.0-1-amd64", "2.3.0", "mod"],
            ["6.1.0-2-amd64", "2.3.0", "bpf"],
            ["6.1.0-2-amd64", "2.3.0", "bpf"],
        ],
    }
    shard = Shard.from_json(json.dumps(doc).encode(), "s")
    assert [(k, [t.kind for t in ts]) for k, ts in shard.by_kernel()] == [
        ("6.1.0-2-amd64", ["mod", "bpf"]),
        ("6.1.0-1-amd64", ["mod"]),
    ]


# --- storage failures ------------------------------------------------------------------------


class FailingUploads:
    """The real store, except that uploads fail as when the network goes away (a real
    outage makes the client retry for minutes before giving up)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def __getattr__(self, name):
        return getattr(self.store, name)

    def upload_new(self, name, data):
        raise requests.ConnectionError("connection refused (injected)")


def test_unreachable_storage_stops_the_shard_with_75_and_accounts_for_every_task(env):
    old = "4.9.0-13-amd64"
    env.shard([(old, "2.3.0", "bpf"), ("4.9.0-14-amd64", "2.3.0", "bpf")])
    stores = {s.bucket_name: s for s in (env.bundles, env.sources)}
    stores[env.work.bucket_name] = FailingUploads(env.work)
    shard = Shard.from_json(env.work.download(layout.shard_object("run1", "fc36", 0)), "shard.json")

    status, records = build_shard(shard, stores.__getitem__, env.tmp_path / "w")

    assert status == EX_TEMPFAIL
    assert [(r["status"], r["failure"]) for r in records[:-1]] == [("infra_failed", "storage")] * 2
    assert "stopped: storage unreachable" in records[0]["message"]
    assert records[-1]["completed"] is False and "ConnectionError" in records[-1]["error"]
    assert env.results() == records  # written all the same (put is not an upload_new)
    assert list((env.tmp_path / "w").iterdir()) == []


def test_a_missing_work_bucket_is_not_retried(env):
    uri, _ = env.shard([("4.9.0-13-amd64", "2.3.0", "bpf")])
    doc = json.loads(env.work.download(uri.split("/", 3)[3]))
    doc["buckets"]["work"] = "no-such-bucket-here"
    env.work.put(uri.split("/", 3)[3], json.dumps(doc).encode())

    assert main(["build-shard", "--shard", uri]) == EX_DATAERR


def test_a_builder_image_without_make_stops_with_65(env, real_bundle, tmp_path, monkeypatch):
    env.add_bundle(KERNEL, real_bundle)
    uri, _ = env.shard([(KERNEL, "2.3.0", "mod"), (KERNEL, "2.3.0", "bpf")])
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no make, gcc, strip, clang

    assert main(["build-shard", "--shard", uri]) == EX_DATAERR

    records = env.results()
    assert [(r["status"], r["failure"]) for r in records[:-1]] == [
        ("infra_failed", "toolchain")
    ] * 2
    # the toolchain guard asks first: the CC the bundle's kbuild calls (Debian: gcc-12)
    assert "gcc-12 is not installed in this builder image" in records[0]["message"]
    assert records[0]["toolchain"] == {"gcc": None, "clang": None, "make": None}
    assert records[-1]["exit_status"] == EX_DATAERR and records[-1]["completed"] is False


def processes_naming(folder: Path, but: int) -> list[str]:
    """Command lines of the running processes (but pid ``but``) that name ``folder``:
    make and the compilers it started in a shard's scratch folder."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:  # ended meanwhile
            continue
        if cmdline.parent.name != str(but) and any(str(folder) in a for a in args):
            found.append(" ".join(args))
    return found


def in_stage(stage: str, workdir: Path, proc: subprocess.Popen) -> Path | None:
    """The shard's scratch folder once it is in ``stage`` (else None): "bundle" while
    extracting the bundle (its tree is there, no build started yet), "build" while make
    runs (a process names the scratch folder)."""
    for scratch in workdir.glob("*"):
        if stage == "bundle" and (scratch / "bundle").is_dir():
            return None if (scratch / "build").exists() else scratch
        if stage == "build" and processes_naming(scratch, but=proc.pid):
            return scratch
    return None


@pytest.mark.parametrize("stage", ["bundle", "build"])  # while extracting / compiling
def test_sigterm_cleans_up_writes_results_and_asks_for_a_retry(env, real_bundle, tmp_path, stage):
    env.add_bundle(KERNEL, real_bundle)
    uri, _ = env.shard([(KERNEL, "2.3.0", "mod")])
    workdir = tmp_path / "sigterm"
    proc = subprocess.Popen(
        [sys.executable, "-m", "drivers", "build-shard", "--shard", uri, "--workdir", workdir],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while (scratch := in_stage(stage, workdir, proc)) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the shard never was in its {stage} stage: {proc.communicate()[1]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    build_started = False  # after the signal: it must stop in the stage it was in
    while proc.poll() is None:
        build_started = build_started or (scratch / "build").exists()
        time.sleep(0.05)
    _out, err = proc.communicate(timeout=60)

    assert proc.returncode == EX_TEMPFAIL, err
    [task, shard] = env.results()
    assert (task["status"], task["failure"]) == ("infra_failed", "terminated"), task
    assert task["message"] == "stopped: terminated (SIGTERM)" and task["log"] is None
    assert shard["exit_status"] == EX_TEMPFAIL and shard["completed"] is False
    if stage == "bundle":  # interrupted while extracting: no build began
        assert not build_started
    else:  # interrupted while compiling: make and its compilers were killed with it
        assert processes_naming(scratch, but=proc.pid) == []
    assert list(env.work.list(layout.staged_drivers_prefix("run1"))) == []  # nothing staged
    assert list(workdir.iterdir()) == [], [str(p) for p in workdir.rglob("*")][:20]


# --- bundle checks (safe extraction: test_safetar.py) -----------------------------------------


def test_a_truncated_bundle_is_corrupt(tmp_path, real_bundle):
    archive = tmp_path / "cut.tgz"
    archive.write_bytes(real_bundle.read_bytes()[:200_000])
    with pytest.raises(UnsafeArchive, match="not a readable .tgz"):
        safe_extract(archive, tmp_path / "out")


@pytest.mark.parametrize(
    ("files", "words"),
    [
        ({"BUNDLE_UNAME": "6.1.0-1-amd64\n"}, "no BUNDLE_BUILD_DIR"),
        ({"BUNDLE_UNAME": "6.1.0-9-amd64\n", "BUNDLE_BUILD_DIR": "b"}, "6.1.0-9-amd64"),
        ({"BUNDLE_UNAME": "6.1.0-1-amd64\n", "BUNDLE_BUILD_DIR": "../b"}, "leaves the tree"),
        ({"BUNDLE_UNAME": "6.1.0-1-amd64\n", "BUNDLE_BUILD_DIR": "/usr"}, "leaves the tree"),
        ({"BUNDLE_UNAME": "6.1.0-1-amd64\n", "BUNDLE_BUILD_DIR": "nope"}, "no Makefile"),
    ],
)
def test_bundle_metadata_problems_are_corrupt_bundles(tmp_path, files, words):
    (tmp_path / "b").mkdir()
    (tmp_path / "b/Makefile").write_text("all:\n")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(BundleCorrupt) as e:
        open_bundle(tmp_path, "6.1.0-1-amd64")
    assert words in str(e.value)


def test_deterministic_gzip_has_no_name_and_no_time():
    a = gzip_driver(b"driver bytes")
    time.sleep(1.1)
    assert gzip_driver(b"driver bytes") == a
    assert a[3] == 0 and a[4:8] == b"\0\0\0\0"  # no FNAME flag, mtime 0
    assert gzip.decompress(a) == b"driver bytes"
