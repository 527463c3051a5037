"""The build ledger, the quarantine, `drivers why` and `drivers withdraw` on the real GCS
emulator. Runs here are the pipeline's own steps (pre_build, record_ledger) with the
builder's results written as a builder writes them; tests/test_upstream_e2e.py runs the
same path with real compilers through Airflow."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime

import pytest

from compile_logs import FIRST_ERROR, KERNEL, log_for
from drivers.build.compile import first_error, toolchain_versions
from drivers.domain import layout
from drivers.domain.config import load_config
from drivers.domain.decision import quarantined
from drivers.domain.kernels import parse_kernel
from drivers.domain.layout import report_prefix
from drivers.domain.names import DriverKey
from drivers.domain.toolchain import TOOLCHAIN_MISMATCH, mismatch, parse_compiler
from drivers.flows import cpaas, upstream
from drivers.ops import cli, report, why
from drivers.ops.withdraw import WithdrawError, withdraw
from drivers.store import ledger
from drivers.store.runtime_config import RuntimeConfigError
from drivers.store.storage import Stores, client_from_environment, read_json, write_json
from pipeline_env import DEBIAN_BUILDERS, pipeline_env

CONFIG = (
    """
driver_versions = ["2.3.0"]
blocklists = []
slots = 2
quarantine_after = 2
"""
    + DEBIAN_BUILDERS
)
OLD, NEW, ANCIENT = "6.1.0-56-amd64", KERNEL, "2.6.32-754.el6.x86_64"
NEW_CLOUD = "6.12.115+deb12-cloud-amd64"


@pytest.fixture
def world(gcs, tmp_path):
    with pipeline_env(gcs, tmp_path, CONFIG, name="ledger") as s:
        for kernel in (OLD, NEW, ANCIENT):
            s["bundles"].upload_new(layout.bundle_object(kernel), f"bundle {kernel}".encode())
        s["sources"].upload_new(layout.source_object("2.3.0"), b"sources, first cut")
        yield Stores(client_from_environment()), load_config()


def fake_run(
    stores,
    config,
    run_id,
    failing=(),
    params=None,
    logs=None,
    reported=False,
    mismatched=(),
    compilers=None,
):
    """pre_build, then what the builders, the push and record_ledger do: every planned
    task is built and published unless its (kernel, kind) is in ``failing``; a failure
    with a compile log in ``logs`` (by (kernel, kind)) is reported with it and its first
    error, as build-shard reports one; one in ``mismatched`` is refused by the toolchain
    guard, as build-shard refuses one. ``compilers``: kernel -> the compiler its bundle
    records (the builders' ``kernel_compiler``). ``reported``: also unify (which keeps
    the logs) and report (the run's verdict in report.json), as the DAG does."""
    run = upstream.RunParams.from_params(params or {}, config)
    pre = upstream.pre_build(stores, config, run_id, run)
    tasks = [
        task
        for uris in pre["shards"].values()
        for shard in uris
        for task in json.loads(stores.work.download(shard.split("/", 3)[3]))["tasks"]
    ]
    lines = []  # every shard reports (unify counts a shard without its record as lost)
    for uri in (uri for uris in pre["shards"].values() for uri in uris):
        builder, index = layout.shard_from_object(uri)
        lines.append(json.dumps({"type": "shard", "builder": builder, "index": index}))
    created = []
    for kernel, version, kind in tasks:
        key = DriverKey(kernel, version, kind)
        builder = config.route(parse_kernel(kernel), kind)
        failed = (kernel, kind) in failing
        refused = (kernel, kind) in mismatched
        message, log_object = "error: this does not compile" if failed else "", None
        log = (logs or {}).get((kernel, kind)) if failed else None
        if log is not None:
            message = first_error(log.encode(), "make exit status 2")
            log_object = layout.staged_log_object(run_id, kernel, version, kind)
            stores.work.put(log_object, log.encode())
        record = {
            "type": "task",
            "time": ledger.now(),
            "kernel": kernel,
            "driver_version": version,
            "kind": kind,
            "builder": builder,
            "status": "failed" if failed else "built",
            "failure": "compile" if failed else None,
            "message": message,
            "log": log_object,
            "sha256": None if failed else "ab" * 32,
            "env": ledger.builder_environment(config, builder, toolchain_versions),
            "sources": stores.sources.info(layout.source_object(version)).md5,
            "bundle": stores.bundles.info(layout.bundle_object(kernel)).md5,
            "kernel_compiler": (compilers or {}).get(kernel),
        }
        if refused:
            kernel_cc = parse_compiler(compilers[kernel])
            why = mismatch(kernel_cc, "gcc-12", "gcc-12 (Debian 12.2.0-14) 12.2.0", builder)
            record |= {"status": TOOLCHAIN_MISMATCH, "failure": TOOLCHAIN_MISMATCH}
            record |= {"message": why, "sha256": None}
        lines.append(json.dumps(record))
        if not failed and not refused:
            stores.drivers.upload_new(key.object_name(), b"driver " + kernel.encode())
            created.append(key.object_name())
    stores.work.put(
        f"{layout.staging_prefix(run_id)}results/0.jsonl", "\n".join(lines).encode() + b"\n"
    )
    unified = upstream.unify(stores, run_id, pre["shards"]) if reported else None
    write_json(stores.work, f"{report_prefix(run_id)}push.json", {"created": created})
    recorded = upstream.record_ledger(stores, run_id)
    upstream.cleanup_staging(stores, run_id)
    if reported:
        steps = {"pre_build": pre, "unify": unified, "record_ledger": recorded}
        upstream.report(stores, run_id, run, steps, failed_tasks=[])
    return pre, recorded


def entry(stores, kernel, kind, version="2.3.0"):
    return ledger.read_coverage(stores.work, version).entry(kernel, kind)


def test_runs_record_attempts_and_state_changes_not_what_is_done(world):
    stores, config = world
    pre, recorded = fake_run(stores, config, "run1", failing={(NEW, "bpf")})
    # 3 built + published, 1 failed, 2 unroutable (the 2.6 kernel)
    assert recorded["statuses"] == {"built": 3, "published": 3, "failed": 1, "unroutable": 2}
    records = list(ledger.decode(stores.work.download(ledger.run_object("run1"))))
    failed = next(r for r in records if r["status"] == "failed")
    assert failed["kernel"] == NEW and failed["reason"] == "compile: error: this does not compile"
    assert failed["fingerprint"].startswith("toolchain:") and "|sources:" in failed["fingerprint"]
    assert entry(stores, OLD, "mod")["status"] == "published"
    assert entry(stores, ANCIENT, "mod")["status"] == "unroutable"
    # the next run records the new attempt only: nothing for done or unchanged decisions
    _, again = fake_run(stores, config, "run2", failing={(NEW, "bpf")})
    assert again["statuses"] == {"failed": 1}
    assert entry(stores, NEW, "bpf")["failures"] == 2
    # applying a run twice (a retried task) changes nothing
    before = stores.work.download(ledger.coverage_object("2.3.0"))
    upstream.record_ledger(stores, "run2")
    after = ledger.read_coverage(stores.work, "2.3.0")
    assert after.entry(NEW, "bpf")["failures"] == 2
    assert json.loads(gzip.decompress(before))["entries"] == after.entries


def test_repeated_failures_are_quarantined_until_an_input_changes(world):
    stores, config = world
    fake_run(stores, config, "run1", failing={(NEW, "bpf")})
    fake_run(stores, config, "run2", failing={(NEW, "bpf")})
    pre, recorded = fake_run(stores, config, "run3")
    assert pre["summary"]["quarantined"] == 1 and pre["summary"]["to_build"] == 0
    assert recorded["statuses"] == {"quarantined": 1}
    assert entry(stores, NEW, "bpf")["status"] == "quarantined"
    answer = why.explain(stores, config, NEW, kinds=("bpf",)).answers[0]
    assert answer.status == "quarantined" and "2 failures in a row (compile)" in answer.summary
    assert "; last: compile: error: this does not compile" in answer.summary
    assert f"drivers config add quarantine-release '{NEW} 2.3.0 bpf'" in answer.action
    # an operator releases it at run time: the next run tries again
    stores.work.put("config/quarantine-release", f"{NEW} 2.3.0 bpf\n".encode())
    pre, _ = fake_run(stores, config, "run4", failing={(NEW, "bpf")})
    assert pre["summary"]["to_build"] == 1 and pre["summary"]["quarantined"] == 0
    stores.work.put("config/quarantine-release", b"")
    assert fake_run(stores, config, "run5")[0]["summary"]["quarantined"] == 1
    # fixed sources (another sources hash) end the quarantine, and the build succeeds
    stores.sources.put(layout.source_object("2.3.0"), b"sources, fixed")
    pre, recorded = fake_run(stores, config, "run6")
    assert pre["summary"]["to_build"] == 1 and recorded["statuses"]["published"] == 1
    assert entry(stores, NEW, "bpf")["status"] == "published"
    assert "failures" not in entry(stores, NEW, "bpf")


def test_infrastructure_failures_are_never_quarantined(world):
    stores, config = world
    coverage = ledger.Coverage("2.3.0", {}, [])
    key, fp = (NEW, "2.3.0", "mod"), "img|sources:a|bundle:b"
    for n in range(5):
        coverage.apply(ledger.record(key, "infra_failed", f"r{n}", fingerprint=fp))
    assert quarantined(coverage.entry(NEW, "mod"), fp, 2) is None
    coverage.apply(ledger.record(key, "failed", "r5", fingerprint=fp, failure="compile"))
    coverage.apply(ledger.record(key, "infra_failed", "r6", fingerprint=fp))  # in between
    coverage.apply(ledger.record(key, "failed", "r7", fingerprint=fp, failure="compile"))
    assert quarantined(coverage.entry(NEW, "mod"), fp, 2) == (
        "2 failures in a row (compile) with the same builder environment, sources and bundle"
    )
    assert quarantined(coverage.entry(NEW, "mod"), "img2|sources:a|bundle:b", 2) is None


def test_an_index_written_meanwhile_is_read_again_not_overwritten(world):
    stores, _ = world
    calls = []

    def publish(kernel, run_id):
        return lambda c: c.apply(ledger.record((kernel, "2.3.0", "mod"), "published", run_id))

    def change(coverage):
        calls.append(coverage.generation)
        if len(calls) == 1:  # another run writes between our read and our write
            ledger.update_coverage(stores.work, "2.3.0", publish(NEW, "backfill"))
        publish(OLD, "nightly")(coverage)

    ledger.update_coverage(stores.work, "2.3.0", change)
    assert len(calls) == 2 and calls[0] != calls[1]
    assert set(ledger.read_coverage(stores.work, "2.3.0").entries) == {OLD, NEW}


def test_why_answers_every_case_in_one_screen(world, capsys):
    stores, config = world
    fake_run(stores, config, "run1", failing={(NEW, "bpf")})
    stores.work.put("config/blocklist", f"{OLD} 2.3.0 bpf  # crashes on load\n".encode())
    stores.work.put("config/driver-versions", b"2.3.0\n2.4.0\n")

    def status(kernel, **kw):
        return {
            (a.driver_version, a.kind): a for a in why.explain(stores, config, kernel, **kw).answers
        }

    old = status(OLD)
    assert old["2.3.0", "mod"].status == "published"
    assert (
        f"gs://{stores.drivers.bucket_name}/2.3.0/collector-{OLD}.ko.gz"
        in old["2.3.0", "mod"].summary
    )
    assert (
        old["2.4.0", "mod"].status == "pending" and "builder deb61" in old["2.4.0", "mod"].summary
    )
    assert status(NEW)["2.3.0", "bpf"].status == "failed"
    assert status(NEW)["2.3.0", "bpf"].action.endswith("(1 more failure(s) and it is quarantined)")
    assert status(ANCIENT)["2.3.0", "mod"].status == "unroutable"
    # the run-time blocklist line, named by object and line
    stores.drivers.put(f"2.3.0/collector-ebpf-{OLD}.o.gz.bak", b"")  # noise, not a driver
    blocked = status("6.1.0-56-rt-amd64", kinds=("bpf",))  # never seen: no bundle
    assert blocked["2.3.0", "bpf"].status == "no_bundle"
    assert "drivers bundle" in blocked["2.3.0", "bpf"].action
    # a version nobody builds
    assert status(OLD, versions=("9.9.9",))["9.9.9", "mod"].status == "not_configured"
    # the CLI: one screen, exit 1 while something is missing, 2 on a bad kernel string
    assert cli.main(["why", OLD, "--driver-version", "2.3.0", "--kind", "mod"]) == 0
    assert cli.main(["why", NEW]) == 1
    screen = capsys.readouterr().out
    assert "compile failure" in screen and "-> fix the driver sources" in screen
    assert len(screen.splitlines()) < 25
    assert cli.main(["why", "not a kernel"]) == 2
    assert "'not a kernel'" in capsys.readouterr().err


def test_why_names_the_blocklist_line(world):
    stores, config = world
    stores.work.put("config/blocklist", f"# bad probes\n{OLD} 2.3.0 bpf\n".encode())
    answer = why.explain(stores, config, OLD, kinds=("bpf",)).answers[0]
    assert answer.status == "blocked"
    assert f"gs://{stores.work.bucket_name}/config/blocklist:2" in answer.summary


def test_withdraw_removes_records_repackages_and_holds_back(world, monkeypatch):
    stores, config = world
    fake_run(stores, config, "run1")
    before = datetime(2026, 1, 1, tzinfo=UTC)
    upstream.update_support_packages(stores, ["2.3.0"], now=before)
    cpaas.publish_cpaas_packages(stores, cpaas.UPSTREAM_ARCH, ["2.3.0"], before)
    matrix = json.loads(stores.support.download("cpaas/x86_64/driver-matrix.json"))
    assert matrix[OLD]["2.3.0"] == {"kmod": "upstream", "ebpf": "upstream"}
    key = DriverKey(OLD, "2.3.0", "mod")
    published = stores.drivers.info(key.object_name())
    # without a terminal and without --yes it refuses, and changes nothing
    monkeypatch.setattr("sys.stdin", open("/dev/null"))
    argv = ["withdraw", OLD, "--driver-version", "2.3.0", "--kind", "mod", "--reason", "oops"]
    assert cli.main(argv) == 2
    assert stores.drivers.exists(key.object_name())
    with pytest.raises(WithdrawError):
        withdraw(stores, config, DriverKey(NEW, "9.9.9", "mod"), "x", "me")
    # only the generation inspected is deleted (another one was published meanwhile: kept)
    assert not stores.drivers.delete_generation(key.object_name(), published.generation + 1)
    result = withdraw(stores, config, key, "panics on boot with lockdown", "alice")
    assert not stores.drivers.exists(key.object_name())
    kept = result["kept"].split("/", 3)[3]
    assert stores.work.download(kept) == b"driver " + OLD.encode()
    assert kept.endswith(f"@{published.generation}")
    e = entry(stores, OLD, "mod")
    assert e["status"] == "withdrawn" and "panics on boot with lockdown (by alice)" in e["reason"]
    matrix = json.loads(stores.support.download("driver-matrix.json"))
    assert matrix[OLD]["2.3.0"] == {"ebpf": "upstream"}  # the package lost the module
    matrix = json.loads(stores.support.download("cpaas/x86_64/driver-matrix.json"))
    assert matrix[OLD]["2.3.0"] == {"ebpf": "upstream"}  # and so did the CPaaS x86_64 one
    answer = why.explain(stores, config, OLD, kinds=("mod",)).answers[0]
    assert answer.status == "withdrawn" and "rebuilt when" in answer.action
    # the nightly does not publish the same bad driver again
    pre, _ = fake_run(stores, config, "run2")
    assert pre["summary"]["quarantined"] == 1 and pre["summary"]["to_build"] == 0
    # new sources: it is rebuilt
    stores.sources.put(layout.source_object("2.3.0"), b"sources, fixed")
    assert fake_run(stores, config, "run3")[0]["summary"]["to_build"] == 1


def test_a_malformed_run_time_config_stops_pre_build_before_it_writes(world):
    stores, config = world
    stores.work.put("config/blocklist", f"{OLD} 2.3.0 bpf extra-field\n".encode())
    params = upstream.RunParams.from_params({}, config)
    with pytest.raises(RuntimeConfigError) as e:
        upstream.pre_build(stores, config, "run1", params)
    assert f"gs://{stores.work.bucket_name}/config/blocklist:1" in str(e.value)
    assert [i.name for i in stores.work.list()] == ["config/blocklist"]  # nothing written


def test_withdraw_repackages_in_the_next_second_when_this_one_is_taken():
    from drivers.build.packages import PackageConflict
    from drivers.ops.withdraw import _repackage

    stamps = []

    def publish(now):
        stamps.append(now)
        if len(stamps) == 1:  # a run published this version's package in this second
            raise PackageConflict("support-pkg-2.3.0-...zip already exists with other bytes")
        return {"built": ["2.3.0"]}

    assert _repackage(publish) == {"built": ["2.3.0"]}
    assert int(stamps[1].timestamp()) > int(stamps[0].timestamp())


# --- the planner and `drivers why` decide alike (drivers.domain.decision) ------------------


def planned(stores, config, key):
    """What a dry run's plan decides for ``key``: "build", "quarantined" or None."""
    params = upstream.RunParams.from_params({"dry_run": True}, config)
    pre = upstream.pre_build(stores, config, "dry", params)
    doc = json.loads(stores.work.download(pre["plan"].split("/", 3)[3]))
    if list(key) in (task for shard in doc["shards"] for task in shard["tasks"]):
        return "build"
    if list(key) in (q["task"] for q in doc["quarantined"]):
        return "quarantined"
    return None


def asked(stores, config, key):
    return why.explain(stores, config, key.kernel, (key.driver_version,), (key.kind,)).answers[0]


def quarantine(stores, config, kernel, kind):
    """Two failures (quarantine_after = 2), then a run that holds it."""
    fake_run(stores, config, "run1", failing={(kernel, kind)})
    fake_run(stores, config, "run2", failing={(kernel, kind)})
    pre, _ = fake_run(stores, config, "run3")
    assert pre["summary"]["quarantined"] == 1
    assert entry(stores, kernel, kind)["status"] == "quarantined"


def test_why_and_the_plan_both_hold_a_quarantine_until_a_release_line_names_it(world):
    stores, config = world
    key = DriverKey(NEW, "2.3.0", "bpf")
    quarantine(stores, config, NEW, "bpf")
    answer = asked(stores, config, key)
    assert (answer.status, answer.decision) == ("quarantined", "quarantined")
    assert planned(stores, config, key) == "quarantined"
    stores.work.put("config/quarantine-release", f"{NEW} 2.3.0 bpf\n".encode())
    answer = asked(stores, config, key)
    assert (answer.status, answer.decision) == ("pending", "build")
    assert (
        f"released by gs://{stores.work.bucket_name}/config/quarantine-release:1"
        in (answer.details[0])
    )
    assert planned(stores, config, key) == "build"
    stores.work.put("config/quarantine-release", b"")
    assert asked(stores, config, key).decision == planned(stores, config, key) == "quarantined"


@pytest.mark.parametrize("change", ["sources", "bundle", "toolchain"])
def test_why_stops_saying_quarantined_when_the_inputs_change_as_the_plan_rebuilds_it(
    world, capsys, monkeypatch, change
):
    stores, config = world
    key = DriverKey(NEW, "2.3.0", "bpf")
    quarantine(stores, config, NEW, "bpf")
    if change == "sources":  # fixed driver sources: a new object for the version
        stores.sources.put(layout.source_object("2.3.0"), b"sources, second cut")
    elif change == "bundle":  # the kernel's bundle rebuilt
        stores.bundles.put(layout.bundle_object(NEW), b"bundle, rebuilt")
    else:  # a new compiler on the local runtime's builder (this worker)
        from drivers.build import compile as builder_compile

        toolchain = builder_compile.toolchain_versions() | {"gcc": "gcc (GCC) 99.1.0"}
        monkeypatch.setattr(builder_compile, "toolchain_versions", lambda: toolchain)
    answer = asked(stores, config, key)
    assert (answer.status, answer.decision) == ("pending", "build")
    assert "was held (2 failures in a row (compile)" in answer.details[0]
    assert "changed since" in answer.details[0]
    assert planned(stores, config, key) == "build"
    assert cli.main(["why", NEW, "--driver-version", "2.3.0", "--kind", "bpf", "--json"]) == 1
    (answered,) = json.loads(capsys.readouterr().out)["answers"]
    assert (answered["status"], answered["decision"]) == ("pending", "build")
    # and the run that rebuilds it publishes it
    pre, recorded = fake_run(stores, config, "run4")
    assert pre["summary"]["to_build"] == 1 and recorded["statuses"]["published"] == 1
    assert asked(stores, config, key).status == "published"


def test_a_withdrawn_driver_stays_held_run_after_run_until_its_inputs_change(world):
    stores, config = world
    fake_run(stores, config, "run1")
    key = DriverKey(OLD, "2.3.0", "mod")
    withdraw(stores, config, key, "panics on boot", "alice")
    for run_id in ("run2", "run3"):  # the second run too: holding it is no change of state
        pre, recorded = fake_run(stores, config, run_id)
        assert pre["summary"]["quarantined"] == 1 and pre["summary"]["to_build"] == 0
        assert "quarantined" not in recorded["statuses"]
        answer = asked(stores, config, key)
        assert (answer.status, answer.decision) == ("withdrawn", "quarantined")
    stores.bundles.put(layout.bundle_object(OLD), b"bundle, rebuilt")
    answer = asked(stores, config, key)
    assert (answer.status, answer.decision) == ("pending", "build")
    assert "was held (withdrawn " in answer.details[0]
    assert planned(stores, config, key) == "build"


def test_a_real_compile_failure_is_counted_held_explained_and_suggested_for_the_blocklist(
    world, capsys
):
    """2.3.0's module on two 6.12 kernels, failing with its real log: each failure is
    recorded with its log and first error, fails a run with max_failures below it, is
    quarantined after quarantine_after runs with the same inputs, and `drivers why`
    says so; `drivers report` suggests one blocklist line that, applied, blocks exactly
    those two."""
    stores, config = world
    stores.bundles.upload_new(layout.bundle_object(NEW_CLOUD), b"bundle of the cloud flavour")
    failing = {(NEW, "mod"), (NEW_CLOUD, "mod")}
    logs = {(kernel, "mod"): log_for(kernel) for kernel in (NEW, NEW_CLOUD)}
    fake_run(stores, config, "run1", failing, logs=logs, reported=True)
    records = ledger.decode(stores.work.download(ledger.run_object("run1")))
    failures = {r["kernel"]: r for r in records if r["status"] == "failed"}
    assert set(failures) == {NEW, NEW_CLOUD}
    for kernel, r in failures.items():
        assert r["reason"] == f"compile: {FIRST_ERROR}"  # the first error, in source order
        log = r["log"].removeprefix(f"gs://{stores.work.bucket_name}/")
        assert log.startswith(report_prefix("run1"))  # kept after staging is gone
        assert stores.work.download(log).decode() == log_for(kernel)
    report = read_json(stores.work, f"{report_prefix('run1')}report.json")
    assert report["status"] == "failed"
    assert "2 compile failure(s) > max_failures=0" in report["reasons"]
    assert cli.main(["report", "run1"]) == 1  # each failure with where its log is kept
    kept = f"gs://{stores.work.bucket_name}/{report_prefix('run1')}logs/{NEW}/2.3.0/mod.log"
    assert f"      log: {kept}" in capsys.readouterr().out.splitlines()
    tolerant = fake_run(stores, config, "run2", failing, {"max_failures": 2}, logs, True)
    assert tolerant[0]["summary"]["to_build"] == 2  # failed once so far: retried
    report = read_json(stores.work, f"{report_prefix('run2')}report.json")
    assert report["status"] == "success" and report["warnings"] == [
        "2 failure(s) tolerated (max_failures=2)"
    ]
    # quarantine_after (2) failures with the same inputs: held, and `drivers why` says so
    pre, recorded = fake_run(stores, config, "run3", reported=True)
    assert pre["summary"]["quarantined"] == 2 and pre["summary"]["to_build"] == 0
    answer = why.explain(stores, config, NEW_CLOUD, kinds=("mod",)).answers[0]
    assert answer.status == "quarantined"
    assert "2 failures in a row (compile) with the same builder" in answer.summary
    assert f"last: compile: {FIRST_ERROR}" in answer.summary
    assert answer.log == f"gs://{stores.work.bucket_name}/{report_prefix('run2')}" + (
        f"logs/{NEW_CLOUD}/2.3.0/mod.log"
    )
    # one suggested line for both, in the report's JSON and in `drivers report`
    [suggestion] = recorded["blocklist_suggestions"]
    assert (suggestion["rule"], suggestion["kernels"]) == ("6.12.* 2.3.0 mod", 2)
    assert cli.main(["report", "run3"]) == 0
    screen = capsys.readouterr().out
    assert "blocklist suggestions (repeated identical failures; nothing applies them)" in screen
    assert "6.12.* 2.3.0 mod  (2 kernels: compile: main.c: error: implicit declaration" in screen
    assert "apply: drivers config add blocklist '6.12.* 2.3.0 mod'" in screen
    # applied as the report says: exactly those two are blocked, and nothing is suggested
    assert cli.main(["config", "add", "blocklist", suggestion["rule"]]) == 0
    pre, recorded = fake_run(stores, config, "run4")
    assert pre["summary"]["blocked"] == 2 and recorded["blocklist_suggestions"] == []
    for kernel in (NEW, NEW_CLOUD):
        answer = why.explain(stores, config, kernel, kinds=("mod",)).answers[0]
        assert answer.status == "blocked" and "config/blocklist:1: 6.12.*" in answer.summary


GCC10 = "gcc-10 (Debian 10.2.1-6) 10.2.1 20210110"  # what bullseye's .config records
GCC12 = "gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"


def test_a_toolchain_mismatch_is_a_routing_error_run_after_run(world, capsys):
    """Two 6.12 kernels (one series, one identical error) routed to a builder whose gcc
    is not theirs: refused every run, never quarantined (quarantine_after = 2), never a
    blocklist suggestion, counted apart from compile failures, failing the run with the
    route to fix; the plan view knows their compiler from the first run on."""
    stores, config = world
    stores.bundles.upload_new(layout.bundle_object(NEW_CLOUD), b"bundle cloud")
    compilers = {OLD: GCC12, NEW: GCC10, NEW_CLOUD: GCC10}
    wrong = {(NEW, "mod"), (NEW_CLOUD, "mod")}
    for n in range(1, 4):
        pre, recorded = fake_run(
            stores, config, f"run{n}", mismatched=wrong, compilers=compilers, reported=True
        )
        assert pre["summary"]["to_build"] >= 2 and pre["summary"]["quarantined"] == 0
        assert recorded["statuses"][TOOLCHAIN_MISMATCH] == 2
        assert recorded["blocklist_suggestions"] == []
    assert pre["summary"]["to_build"] == 2  # run 3 plans only the two refused again
    view = pre["plan_view"]["builders"]["deb612"]
    assert view["compilers"] == {"gcc 10": 2}  # from the ledger: the builders read them
    entry_ = entry(stores, NEW, "mod")
    assert entry_["status"] == TOOLCHAIN_MISMATCH and "failures" not in entry_
    assert entry_["kernel_compiler"] == GCC10
    assert entry(stores, OLD, "mod")["kernel_compiler"] == GCC12
    build = read_json(stores.work, f"{report_prefix('run3')}build.json")
    assert (build["compile_failures"], build["toolchain_mismatches"]) == (0, 2)
    doc = read_json(stores.work, f"{report_prefix('run3')}report.json")
    assert doc["status"] == "failed"
    assert doc["reasons"] == [
        "2 driver(s) refused as toolchain_mismatch: their kernel's compiler is not their "
        "builder's; fix the config's [[routes]]"
    ]
    capsys.readouterr()
    assert report.print_report("run3") == 1
    printed = capsys.readouterr().out
    assert "routing errors (2 toolchain_mismatch: refused before compiling):" in printed
    assert (
        f"MISMATCH {NEW} 2.3.0 mod on deb612: kernel built with {GCC10}; builder deb612 has "
        "gcc 12.2.0 (gcc-12): route it to a builder with gcc 10"
    ) in printed
    assert "fix the route" in printed and "    FAILED " not in printed  # no compile failure
    assert "deb612/mod       0 /     0 /     0 /     0 /     2" in printed
    assert "kernels built with: gcc 10 (2)" in printed  # the plan view in the report
    answer = why.explain(stores, config, NEW, kinds=("mod",)).answers[0]
    assert answer.status == TOOLCHAIN_MISMATCH and "route it to a builder with gcc 10" in (
        answer.summary
    )
    assert "fix the route" in answer.action and "never quarantined" in answer.action
