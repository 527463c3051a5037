"""Sandboxed builds (runtime "docker", drivers.build.sandbox): the worker stages a shard's
inputs, the shard builds in its builder's image through podman's Docker API as uid 1000
with no network, a read-only root and only its work folder writable, under CPU, memory
and time limits, and the worker uploads what it built.

Hostile bundles (their kbuild Makefile is what `make -C <build dir> M=… modules` runs)
try to write outside the work folder, to reach the embedded GCS and the Internet, to read
a host file, to forge the shard's records, and to run forever. The same shard through the
local runtime shows each attempt working there (so these tests can fail); in the sandbox
each build fails, the host keeps nothing, and the example drivers still build.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import uuid
from pathlib import Path

import pytest

from drivers.build.sandbox import Sandbox, build_shard_sandboxed
from drivers.build.shard import Shard
from drivers.build.shard_run import SANDBOXES, build_shard
from drivers.build.sources import package_sources
from drivers.domain import layout
from drivers.domain.config import load_config
from drivers.domain.exit_codes import EX_DATAERR, EX_OK, EX_TEMPFAIL
from drivers.domain.kernels import parse_kernel
from drivers.domain.names import DriverKey
from drivers.domain.toolchain import TOOLCHAIN_MISMATCH
from drivers.domain.verify import verify_driver
from drivers.ops.cli import main
from example_sources import EXAMPLE_SOURCES
from pipeline_env import debian_bundle
from podman import ensure_builder_image, podman_env, podman_service, podman_unavailable_reason
from tarballs import tgz
from test_builder import KERNEL, Env, by_task, real_bundle  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(
    podman_unavailable_reason() is not None, reason=str(podman_unavailable_reason())
)

VERSION = "2.3.0"
WRITER, CALLER, READER = "6.1.0-901-amd64", "6.1.0-902-amd64", "6.1.0-903-amd64"
FORGER, SLEEPER = "6.1.0-904-amd64", "6.1.0-905-amd64"
EXTERNAL_IP = "1.1.1.1"  # any address outside this machine


@pytest.fixture(scope="module")
def docker_url(tmp_path_factory) -> str:
    with podman_service(tmp_path_factory.mktemp("podman")) as url:
        yield url


@pytest.fixture(scope="module")
def image() -> str:
    """The builder image (helper B's per-release images replace it when they land)."""
    return ensure_builder_image(log=print)


def sandbox(image: str, docker_url: str, workdir: Path, **changes) -> Sandbox:
    base = Sandbox(
        image=image,
        docker_url=docker_url,
        cpus=2.0,
        memory="2g",
        time_limit_s=600,
        labels={"app": "collector-drivers", "test": "sandbox"},
        workdir=workdir,
    )
    return dataclasses.replace(base, **changes)


def hostile_bundle(uname: str, recipe: list[str]) -> bytes:
    """A bundle whose build dir's Makefile runs ``recipe`` for ``modules`` (each line's
    failure ignored, so every attempt runs and shows in the log)."""
    makefile = "modules:\n" + "".join(f"\t-@{line}\n" for line in recipe)
    return tgz(
        ("BUNDLE_BUILD_DIR", "file", "build\n"),
        ("BUNDLE_UNAME", "file", f"{uname}\n"),
        ("build/Makefile", "file", makefile),
    )


def python(code: str) -> str:
    return "python3 -c '" + code.replace("'", '"') + "'"


def connect(url: str) -> str:
    return python(
        f"import urllib.request as u; u.urlopen('{url}', timeout=5); print('REACHED {url}')"
    )


@pytest.fixture
def hostile(store, tmp_path, gcs):
    """Buckets with the example sources and three hostile bundles, and what they aim at."""
    env = Env(store, tmp_path)
    token = uuid.uuid4().hex
    aims = {
        "host_file": tmp_path / "escaped" / "written-by-a-build",
        "tmp_file": Path("/tmp") / f"written-by-a-build-{token}",
        "secret": tmp_path / "secret",
        "token": token,
        "gcs_object": f"stolen-{token}",
    }
    aims["host_file"].parent.mkdir()
    aims["secret"].write_text(f"SECRET-{token}\n")
    upload = (
        f"{gcs.url}/upload/storage/v1/b/{env.work.bucket_name}/o?uploadType=media"
        f"&name={aims['gcs_object']}"
    )
    env.add_bundle(
        WRITER,
        hostile_bundle(
            WRITER,
            [
                f"echo escaped > {aims['tmp_file']} && echo WROTE {aims['tmp_file']}",
                f"echo escaped > {aims['host_file']} && echo WROTE {aims['host_file']}",
                "echo escaped > /etc/escaped && echo WROTE /etc/escaped",
            ],
        ),
    )
    env.add_bundle(
        CALLER,
        hostile_bundle(
            CALLER,
            [
                connect(f"{gcs.url}/storage/v1/b"),
                python(
                    "import urllib.request as u; "
                    f"u.urlopen(u.Request('{upload}', data=b'x', method='POST'), timeout=5); "
                    "print('UPLOADED')"
                ),
                connect(f"http://{EXTERNAL_IP}/"),
            ],
        ),
    )
    env.add_bundle(
        READER,
        hostile_bundle(READER, [f"cat {aims['secret']}", "env", "cat /proc/1/environ"]),
    )
    tasks = [(kernel, VERSION, "mod") for kernel in (WRITER, CALLER, READER)]
    return env, tasks, aims


def logs(env: Env, records: list[dict]) -> dict[str, str]:
    return {
        r["kernel"]: env.work.download(r["log"]).decode(errors="replace")
        for r in records[:-1]
        if r.get("log")
    }


def test_hostile_builds_succeed_on_the_local_runtime(hostile, tmp_path):
    """What the sandbox is for: unconfined (the local runtime), each attempt works."""
    env, tasks, aims = hostile
    uri, doc = env.shard(tasks, run_id="local")
    shard = Shard.from_json(json.dumps(doc).encode(), uri)
    try:
        status, records = build_shard(shard, lambda b: _store(env, b), tmp_path / "work")
        assert status == EX_OK
        text = logs(env, records)
        assert aims["host_file"].exists() and aims["tmp_file"].exists()
        assert "REACHED" in text[CALLER] and "UPLOADED" in text[CALLER]
        assert env.work.exists(aims["gcs_object"])
        assert f"SECRET-{aims['token']}" in text[READER]
        assert records[-1]["sandbox"] == "none"
    finally:
        aims["tmp_file"].unlink(missing_ok=True)


def _store(env: Env, bucket: str):
    return {s.bucket_name: s for s in (env.bundles, env.sources, env.work)}[bucket]


def test_hostile_builds_fail_in_the_sandbox_and_leave_nothing_behind(
    hostile, tmp_path, image, docker_url
):
    env, tasks, aims = hostile
    uri, _ = env.shard(tasks, run_id="sandboxed")
    workdir = tmp_path / "work"
    status, records = build_shard_sandboxed(
        uri, lambda b: _store(env, b), sandbox(image, docker_url, workdir)
    )
    assert status == EX_OK, records  # compile failures are data
    tasks_ = by_task(records)
    assert {(r["status"], r["failure"]) for r in tasks_.values()} == {("failed", "compile")}
    text = logs(env, records)
    # (a) no write outside the work folder: not the host's files nor its /tmp, not the
    # image (read-only root); the container's own /tmp is a small tmpfs, gone with it
    assert not aims["host_file"].exists() and not aims["tmp_file"].exists()
    assert f"WROTE {aims['host_file']}" not in text[WRITER]
    assert "WROTE /etc/escaped" not in text[WRITER]
    assert "/etc/escaped: Read-only file system" in text[WRITER]
    # (b) no network: neither the embedded GCS on the host's loopback nor the Internet
    assert "REACHED" not in text[CALLER] and "UPLOADED" not in text[CALLER]
    assert text[CALLER].count("urlopen error") == 3, text[CALLER]
    assert not env.work.exists(aims["gcs_object"])
    # (c) no host file, no credentials or endpoints in its environment
    assert aims["token"] not in text[READER] and "No such file or directory" in text[READER]
    assert "STORAGE_EMULATOR_HOST" not in text[READER] and "GOOGLE" not in text[READER]
    assert "DRIVERS_SANDBOX=docker" in text[READER]
    # nothing left on the host: the work folder and the container are gone
    assert list(workdir.iterdir()) == []
    assert _containers("test=sandbox") == []
    shard = records[-1]
    assert shard["sandbox"] == "docker" and shard["container_s"] > 0
    assert shard["counts"] == {"failed": 3}


def test_a_build_that_forges_its_records_is_refused(store, tmp_path, image, docker_url):
    env = Env(store, tmp_path)
    forged = {"type": "task", "kernel": KERNEL, "driver_version": VERSION, "kind": "mod",
              "builder": "fc36", "status": "built", "object": "../../etc/passwd"}  # fmt: skip
    line = json.dumps(forged).replace('"', '\\"')
    env.add_bundle(FORGER, hostile_bundle(FORGER, [f'echo "{line}" >> /work/out/records.jsonl']))
    uri, _ = env.shard([(FORGER, VERSION, "mod")], run_id="forged")
    status, records = build_shard_sandboxed(
        uri, lambda b: _store(env, b), sandbox(image, docker_url, tmp_path / "work")
    )
    assert status == EX_DATAERR  # a hostile input: never retried
    assert (
        "tampered" in records[-1]["error"]
        and "is not a task of this shard" in (records[-1]["error"])
    )
    assert [(r["kernel"], r["status"]) for r in records[:-1]] == [(FORGER, "failed")]


def test_a_shard_past_its_time_limit_is_killed_and_recorded(store, tmp_path, image, docker_url):
    env = Env(store, tmp_path)
    env.add_bundle(SLEEPER, hostile_bundle(SLEEPER, ["sleep 600"]))
    uri, _ = env.shard([(SLEEPER, VERSION, "mod"), (SLEEPER, VERSION, "bpf")], run_id="slow")
    workdir = tmp_path / "work"
    status, records = build_shard_sandboxed(
        uri, lambda b: _store(env, b), sandbox(image, docker_url, workdir, time_limit_s=8)
    )
    assert status == EX_TEMPFAIL  # retried, as a pod past its deadline
    shard = records[-1]
    assert "time limit (8 s" in shard["error"] and shard["container_s"] < 60
    assert {(r["status"], r["failure"]) for r in records[:-1]} == {("infra_failed", "timeout")}
    assert list(workdir.iterdir()) == [] and _containers("test=sandbox") == []


def test_the_example_drivers_build_in_the_sandbox(store, tmp_path, image, docker_url, real_bundle):  # noqa: F811
    env = Env(store, tmp_path)
    env.add_bundle(KERNEL, real_bundle)
    tasks = [(KERNEL, v, k) for v in ("2.3.0", "2.4.0-rc1") for k in ("mod", "bpf")]
    uri, _ = env.shard(tasks, run_id="example")
    status, records = build_shard_sandboxed(
        uri, lambda b: _store(env, b), sandbox(image, docker_url, tmp_path / "work")
    )
    assert status == EX_OK, records[-1]
    staged = layout.staged_drivers_prefix("example")
    for (kernel, version, kind), r in by_task(records).items():
        key = DriverKey(kernel, version, kind)
        assert (r["status"], r["object"]) == ("built", staged + key.object_name()), r
        assert r["env"] == image  # the ledger's environment: the image
        assert verify_driver(key, env.work.download(r["object"]), unavailable=False) == []
    # the results object is the same as an online shard's: what unify reads
    assert env.results("example") == records
    assert records[-1]["sandbox"] == "docker"
    assert SANDBOXES["docker"].startswith("sandboxed")


# A test config that routes bullseye's kernels to bookworm's builder: a routing error.
WRONG_ROUTE = """
driver_versions = ["2.3.0"]
slots = 1
[[builders]]
name = "bookworm"
image = "localhost/collector-drivers/builder-bookworm:0.1.0"
[[routes]]
builder = "bookworm"
kernels = "debian:*"
kinds = ["mod", "bpf"]
"""
BULLSEYE_KERNEL = "5.10.0-46-amd64"  # built by bullseye's gcc-10


@pytest.fixture(scope="module")
def bullseye_bundle() -> Path:
    return debian_bundle(BULLSEYE_KERNEL)


def test_a_kernel_routed_to_another_releases_builder_is_refused_before_compiling(
    store, tmp_path, docker_url, bullseye_bundle
):
    """bullseye's 5.10 in bookworm's image (gcc-12, no gcc-10): toolchain_mismatch, no
    make run; in its own release's image (bullseye, gcc-10) the same shard builds."""
    config_path = tmp_path / "wrong-route.toml"
    config_path.write_text(WRONG_ROUTE)
    wrong = load_config(config_path).route(parse_kernel(BULLSEYE_KERNEL), "mod")
    assert wrong == "bookworm"
    env = Env(store, tmp_path)
    env.add_bundle(BULLSEYE_KERNEL, bullseye_bundle)
    tasks = [(BULLSEYE_KERNEL, VERSION, kind) for kind in ("mod", "bpf")]
    images = {r: ensure_builder_image(r) for r in ("bookworm", "bullseye")}

    def run(builder: str) -> tuple[int, list[dict]]:
        uri, _ = env.shard(tasks, run_id=f"route-{builder}", builder=builder)
        return build_shard_sandboxed(
            uri, lambda b: _store(env, b), sandbox(images[builder], docker_url, tmp_path / builder)
        )

    status, records = run(wrong)
    assert status == EX_OK  # a routing error is data, counted apart
    for r in by_task(records).values():
        assert (r["status"], r["log"], r["object"]) == (TOOLCHAIN_MISMATCH, None, None), r
        assert r["message"].startswith("kernel built with gcc-10 (Debian 10.2.1-6)"), r
        assert "builder bookworm has no gcc-10" in r["message"], r
        assert r["duration_s"] < 1  # refused before any make ran
    assert records[-1]["counts"] == {TOOLCHAIN_MISMATCH: 2}

    status, records = run("bullseye")
    assert status == EX_OK, records[-1]
    for (kernel, version, kind), r in by_task(records).items():
        assert r["status"] == "built", r
        assert r["kernel_compiler"].startswith("gcc-10 (Debian 10.2.1-6)")
        data = env.work.download(r["object"])
        assert verify_driver(DriverKey(kernel, version, kind), data, unavailable=False) == []


EMBEDDED = Path(__file__).resolve().parents[1] / "include/drivers/config/embedded.toml"


def test_drivers_build_runs_in_the_kernels_builder_image_on_the_docker_runtime(
    tmp_path, docker_url, bullseye_bundle, monkeypatch, capsys
):
    """`drivers build` with the embedded default's config: bullseye's kernel goes to the
    bullseye builder and builds in its image (gcc-10), sandboxed; `--builder bookworm`
    runs in bookworm's image and is refused there (exit 1), leaving no driver."""
    config = load_config(EMBEDDED)
    for release in ("bullseye", "bookworm"):
        assert ensure_builder_image(release) == config.builders[release].image
    monkeypatch.setenv("DRIVERS_CONFIG", str(EMBEDDED))
    monkeypatch.setenv("DOCKER_HOST", docker_url)
    monkeypatch.delenv("DRIVERS_RUNTIME", raising=False)
    sources = package_sources(EXAMPLE_SOURCES / VERSION, tmp_path / "sources")
    argv = ["build", BULLSEYE_KERNEL, "--driver-version", VERSION, "--kinds", "mod"]
    argv += ["--sources", str(sources), "--bundle", str(bullseye_bundle)]

    assert main([*argv, "--out", str(tmp_path / "routed")]) == 0
    out = capsys.readouterr()
    [line] = [json.loads(text) for text in out.out.splitlines()]
    assert (line["builder"], line["status"]) == ("bullseye", "built"), out.err
    assert line["kernel_compiler"].startswith("gcc-10 (Debian 10.2.1-6)")
    assert f"in {config.builders['bullseye'].image} (sandboxed)" in out.err
    key = DriverKey(BULLSEYE_KERNEL, VERSION, "mod")
    data = Path(line["object"]).read_bytes()
    assert Path(line["object"]).parent == tmp_path / "routed"
    assert hashlib.sha256(data).hexdigest() == line["sha256"]
    assert verify_driver(key, data, unavailable=False) == []

    assert main([*argv, "--out", str(tmp_path / "wrong"), "--builder", "bookworm"]) == 1
    out = capsys.readouterr()
    [line] = [json.loads(text) for text in out.out.splitlines()]
    assert (line["builder"], line["status"]) == ("bookworm", TOOLCHAIN_MISMATCH)
    assert "builder bookworm has no gcc-10" in out.err
    assert list((tmp_path / "wrong").iterdir()) == []
    assert _containers("builder=bookworm") == _containers("builder=bullseye") == []


def _containers(label: str) -> list[str]:
    done = subprocess.run(
        ["podman", "ps", "-a", "--filter", f"label={label}", "--format", "{{.ID}}"],
        env=podman_env(), capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.split()
