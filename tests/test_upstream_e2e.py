"""upstream_drivers end to end: real Airflow (LocalExecutor + api-server), the real GCS
emulator, real Debian bundles, real compilers. Runs share one set of buckets in order:
build (the collector's real 2.3.0 drivers, captured through by its own consumer in their
own kernel under QEMU, and the toy example's), no-op rerun, a broken driver version, then
the shrink guard."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest

from drivers.build import boot_images
from drivers.build.sources import package_sources
from drivers.domain import layout
from drivers.domain.config import load_config
from drivers.ops import cli
from drivers.ops.embedded import EmbeddedAirflow
from drivers.store import ledger, runtime_config
from example_sources import EXAMPLE_SOURCES
from pipeline_env import (
    DEBIAN_BUILDERS,
    pipeline_env,
    publish_bundle,
    publish_real_sources,
    publish_sources,
)
from webhook import webhook

REPO = Path(__file__).resolve().parents[1]
# Two kernels on two builders, so the multi-builder path runs for real.
KERNELS = ("6.1.0-56-cloud-amd64", "6.12.115+deb12-cloud-amd64")
VERSIONS = ("2.3.0", "2.4.0-rc1")  # the collector's real sources; the toy example's
REAL = "2.3.0"
# 2022's 2.3.0 does not compile on 6.12 (test_ledger covers that failure with its real log);
# the original blocklisted old drivers on new kernels the same way.
BLOCKLIST = "6.12.* 2.3.0\n"
CONFIG = (
    """
driver_versions = ["2.3.0", "2.4.0-rc1"]
blocklists = ["BLOCKLIST"]
slots = 4
retries = 1
retry_delay_s = 5
quarantine_after = 1
"""
    + DEBIAN_BUILDERS
)
BROKEN = 'MODULE_LICENSE("GPL");\nthis does not compile;\n'


@pytest.fixture(scope="module")
def env(gcs, tmp_path_factory):
    """Unique buckets, a two-builder config, bundles and sources published."""
    tmp = tmp_path_factory.mktemp("e2e")
    (tmp / "BLOCKLIST").write_text(BLOCKLIST)
    with pipeline_env(gcs, tmp, CONFIG) as stores:
        for kernel in KERNELS:
            publish_bundle(stores, kernel)
        # A boot image for the first kernel only: the second's drivers go out untested.
        assert (
            boot_images.publish_boot_image(
                stores["kernel_images"], KERNELS[0], REPO / ".cache" / "debs", tmp / "images"
            )
            == "created"
        )
        publish_real_sources(stores, REAL, tmp)
        publish_sources(stores, "2.4.0-rc1", tmp)
        with (
            webhook() as (url, received),
            EmbeddedAirflow(home=tmp / "airflow") as airflow,
            pytest.MonkeyPatch.context() as mp,
        ):
            conn = {"conn_type": "http", "host": url}
            mp.setenv("AIRFLOW_CONN_DRIVERS_NOTIFY", json.dumps(conn))
            yield airflow, stores, received


@pytest.fixture(autouse=True)
def runtime_config_as_found(env):
    """Each test leaves the run-time config (``config/`` in the work bucket) as it found
    it: a driver version one test adds is not built, or asked about, by the next, so the
    tests pass in any order."""
    _, stores, _ = env
    work = stores["work"]
    found = {i.name: work.download(i.name) for i in work.list(layout.RUNTIME_CONFIG_PREFIX)}
    yield
    for info in work.list(layout.RUNTIME_CONFIG_PREFIX):
        if info.name not in found:
            work.delete_generation(info.name, info.generation)
    for name, data in found.items():
        if not work.exists(name) or work.download(name) != data:
            work.put(name, data)


def run(
    airflow: EmbeddedAirflow, stores, conf: dict | None = None, dag_id: str = "upstream_drivers"
) -> dict:
    """Trigger one run to its end; return its report (the newest in the work bucket)."""
    started = datetime.now().astimezone()
    progress: list[str] = []
    log = airflow.home / "runs.log"
    status = airflow.dags_test(dag_id, conf, log=log, timeout=900, progress=progress.append)
    reports = [
        i
        for i in stores["work"].list("reports/")
        if i.name.endswith("/report.json") and i.created >= started
    ]
    assert len(reports) == 1, f"no report; see {airflow.home}/runs.log"
    doc = json.loads(stores["work"].download(reports[0].name))
    doc["exit_status"], doc["progress"] = status, progress
    prefix = reports[0].name.removesuffix("report.json")
    for part in ("build", "push", "vm-tests"):
        name = f"{prefix}{part}.json"
        doc[part] = (
            json.loads(stores["work"].download(name)) if stores["work"].exists(name) else None
        )
    return doc


def cache_names(stores) -> dict[str, int]:
    return {i.name: i.generation for i in stores["drivers"].list()}


@pytest.fixture(scope="module")
def first_run(env):
    """The first run's report, plus the driver cache right after it (later tests add)."""
    airflow, stores, messages = env
    doc = run(airflow, stores)
    return doc | {"cache_after": cache_names(stores)}


def test_first_run_builds_verifies_and_publishes_real_drivers(env, first_run):
    _, stores, messages = env
    assert first_run["status"] == "success" and first_run["exit_status"] == 0, first_run["reasons"]
    toy = "2.4.0-rc1"
    expected = {f"{v}/collector{e}-{k}{x}" for e, x in (("", ".ko.gz"), ("-ebpf", ".o.gz"))
                for v, k in ((REAL, KERNELS[0]), (toy, KERNELS[0]), (toy, KERNELS[1]))}  # fmt: skip
    assert set(first_run["cache_after"]) == expected  # 2.3.0 on 6.12: blocklisted
    counts = first_run["build"]["counts"]
    assert counts == {
        "deb61/bpf": {"built": 2},
        "deb61/mod": {"built": 2},
        "deb612/bpf": {"built": 1},
        "deb612/mod": {"built": 1},
    }
    assert first_run["push"]["counts"] == {"created": 6}
    # each kernel booted once: the real drivers captured events through the real consumer;
    # the toy's sources have no consumer, and the second kernel has no boot image
    statuses = {
        (r["kernel"], r["driver_version"], r["kind"]): r for r in first_run["vm-tests"]["results"]
    }
    assert {k: r["status"] for k, r in statuses.items()} == {
        (kernel, version, kind): status
        for kernel, version, status in (
            (KERNELS[0], REAL, "loaded"),
            (KERNELS[0], toy, "not_tested"),
            (KERNELS[1], toy, "no_boot_image"),
        )
        for kind in ("mod", "bpf")
    }
    events = load_config().vm_tests["events"]
    assert all(r["events"] >= events for r in statuses.values() if r["status"] == "loaded")
    assert first_run["steps"]["integration_tests"]["held_back"] == 0
    # a progress line per finished builder shard, as `drivers run-dag` prints them
    shards = [line for line in first_run["progress"] if "build_shard" in line]
    assert len(shards) == len(first_run["build"]["shards"]) and all(
        "success in" in line for line in shards
    ), first_run["progress"]
    # staging is gone, reports stay
    assert not list(stores["work"].list(layout.STAGING_PREFIX))


def test_the_ledger_records_the_run_and_why_answers_from_it(env, first_run, capsys):
    _, stores, _ = env
    records = list(ledger.decode(stores["work"].download(ledger.run_object(first_run["run_id"]))))
    built = [r for r in records if r["status"] == "built"]
    assert len(built) == 6 and len([r for r in records if r["status"] == "published"]) == 6
    assert all(r["fingerprint"] and r["sha256"] and r["duration_s"] > 0 for r in built)
    assert all(r["toolchain"]["gcc"].startswith("gcc") for r in built)
    coverage = ledger.read_coverage(stores["work"], "2.3.0")
    published = coverage.entry(KERNELS[0], "mod")
    assert published["status"] == "published" and published["arrived"] <= published["published"]
    assert cli.main(["why", KERNELS[0]]) == 0  # every driver there: exit 0
    screen = capsys.readouterr().out
    assert screen.count(" published ") == 4 and f"built in run {first_run['run_id']}" in screen


def test_builder_shards_ran_in_parallel(first_run):
    shards = first_run["build"]["shards"]
    assert {s["builder"] for s in shards} == {"deb61", "deb612"}
    a, b = (
        (datetime.fromisoformat(s["started"]), datetime.fromisoformat(s["finished"]))
        for s in shards
    )
    assert a[0] < b[1] and b[0] < a[1], f"shards did not overlap: {a} {b}"


def test_support_packages_are_published(env, first_run):
    _, stores, messages = env
    names = {i.name for i in stores["support"].list()}
    for version in VERSIONS:
        assert f"{version}/latest" in names
        assert f"{version}/support-pkg-{version}-latest.zip" in names
        assert f"{version}/metadata.json" in names
    assert "index.html" in names and "driver-matrix.json" in names


def test_second_run_builds_nothing(env, first_run):
    airflow, stores, messages = env
    before = cache_names(stores)
    sent = len(messages)  # by earlier tests' failed runs
    second = run(airflow, stores)
    assert second["status"] == "success", second["reasons"]
    assert messages[sent:] == []  # clean runs send no notification
    assert second["plan"]["summary"]["to_build"] == 0
    assert second["plan"]["summary"]["done"] == 6
    assert second["vm-tests"]["kernels"] == 0 and second["vm-tests"]["results"] == []  # no VM
    assert cache_names(stores) == before  # same objects, same generations


def test_a_backfill_builds_only_its_kernel_range(env, first_run, tmp_path):
    airflow, stores, _ = env
    shutil.copytree(EXAMPLE_SOURCES / "2.4.0-rc1", tmp_path / "2.6.0")
    path = package_sources(tmp_path / "2.6.0", tmp_path / "out")
    stores["sources"].upload_new_file(layout.source_object("2.6.0"), path)
    runtime_config.add_line(stores["work"], "driver-versions", "2.6.0", load_config())
    conf = {"select": "debian:>=6.12", "driver_versions": ["2.6.0"], "dry_run": False}
    backfill = run(airflow, stores, conf, dag_id="backfill_drivers")
    assert backfill["status"] == "success", backfill["reasons"]
    assert backfill["plan"]["summary"]["to_build"] == 2
    new = {n for n in cache_names(stores) if n.startswith("2.6.0/")}
    assert new == {f"2.6.0/collector-{KERNELS[1]}.ko.gz", f"2.6.0/collector-ebpf-{KERNELS[1]}.o.gz"}
    records = ledger.decode(stores["work"].download(ledger.run_object(backfill["run_id"])))
    assert {(r["kernel"], r["status"]) for r in records} == {
        (KERNELS[1], "built"),
        (KERNELS[1], "published"),
    }


def test_compile_failures_fail_the_run_then_are_quarantined(env, first_run, tmp_path, capsys):
    airflow, stores, messages = env
    broken = tmp_path / "9.9.9-rc1"
    shutil.copytree(EXAMPLE_SOURCES / "2.4.0-rc1", broken)
    for f in (broken / "module").glob("*.c"):
        f.write_text(BROKEN)
    path = package_sources(broken, tmp_path / "out")
    stores["sources"].upload_new_file(layout.source_object("9.9.9-rc1"), path)
    conf = {"driver_versions": ["9.9.9-rc1"], "max_failures": 1}
    refused = run(airflow, stores, conf)  # a version the run-time config does not list
    assert refused["status"] == "failed" and refused["build"] is None
    assert "['9.9.9-rc1'] are not in the run-time config" in (airflow.home / "runs.log").read_text()
    runtime_config.add_line(stores["work"], "driver-versions", "9.9.9-rc1", load_config())

    sent = len(messages)
    failed = run(airflow, stores, conf)
    assert failed["status"] == "failed" and failed["exit_status"] != 0
    assert len(messages) == sent + 1  # one message to the drivers_notify webhook
    assert "*FAILED*" in messages[-1]["text"] and "compile failure(s)" in messages[-1]["text"]
    assert any("compile failure" in r for r in failed["reasons"]), failed["reasons"]
    assert failed["build"]["compile_failures"] == 2
    assert all(f["failure"] == "compile" for f in failed["build"]["failures"])
    assert failed["build"]["failure_logs"]  # logs kept after staging is cleaned
    log = stores["work"].download(failed["build"]["failure_logs"][0]).decode()
    assert "error" in log
    # the probes of that version compiled: they are published despite the failures
    published = set(cache_names(stores))
    assert {f"9.9.9-rc1/collector-ebpf-{k}.o.gz" for k in KERNELS} <= published
    assert not any(n.startswith("9.9.9-rc1/collector-6") for n in published)

    # The same toolchain, sources and bundles would only repeat the same logs (builds are
    # reproducible; the shipped quarantine_after): the two modules are quarantined instead
    # of failing every night.
    quiet = run(airflow, stores, conf)
    assert quiet["status"] == "success", quiet["reasons"]
    assert (
        quiet["plan"]["summary"]["quarantined"] == 2 and quiet["plan"]["summary"]["to_build"] == 0
    )
    assert cli.main(["why", KERNELS[0], "--driver-version", "9.9.9-rc1", "--kind", "mod"]) == 1
    assert "1 failure in a row (compile)" in capsys.readouterr().out


def test_a_corrupt_bundle_fails_the_run_but_other_shards_publish(env, first_run, tmp_path):
    airflow, stores, messages = env
    corrupt = layout.bundle_object("6.1.0-50-cloud-amd64")
    stores["bundles"].upload_new(corrupt, b"\x1f\x8b this is not a bundle")
    shutil.copytree(EXAMPLE_SOURCES / "2.4.0-rc1", tmp_path / "2.5.0")
    path = package_sources(tmp_path / "2.5.0", tmp_path / "out")
    stores["sources"].upload_new_file(layout.source_object("2.5.0"), path)
    runtime_config.add_line(stores["work"], "driver-versions", "2.5.0", load_config())
    try:
        failed = run(airflow, stores, {"driver_versions": ["2.5.0"]})
    finally:
        stores["bundles"].client.bucket(stores["bundles"].bucket_name).blob(corrupt).delete()
    assert failed["status"] == "failed"
    assert any("infrastructure failure" in r for r in failed["reasons"]), failed["reasons"]
    infra = [f for f in failed["build"]["failures"] if f["status"] == "infra_failed"]
    assert {f["failure"] for f in infra} == {"bundle_corrupt"}
    assert {f["kernel"] for f in infra} == {"6.1.0-50-cloud-amd64"}
    published = set(cache_names(stores))
    assert {f"2.5.0/collector-{k}.ko.gz" for k in KERNELS} <= published
    assert not any("6.1.0-50" in n for n in published)


def test_shrink_guard_stops_before_building_and_deletes_nothing(env, first_run):
    airflow, stores, messages = env
    before = cache_names(stores)
    missing = layout.bundle_object(KERNELS[1])
    data = stores["bundles"].download(missing)
    stores["bundles"].client.bucket(stores["bundles"].bucket_name).blob(missing).delete()
    try:
        guarded = run(airflow, stores)
    finally:
        stores["bundles"].upload_new(missing, data)
    assert guarded["status"] == "failed"
    assert any("pre_build" in r for r in guarded["reasons"])
    assert guarded["build"] is None or not guarded["build"]["shards"]
    assert cache_names(stores) == before
    log = (airflow.home / "runs.log").read_text()
    assert f"Missing: {KERNELS[1]}" in log
