"""The upstream drivers run, step by step, without Airflow.

Each public function is one DAG task's work; the DAG file only wires them. Big data
(plan, shard task lists, build records, reports) lives in the work bucket under the
run's staging prefix or ``reports/<run_id>/``; the functions return small dicts (URIs
and counts) that fit in XCom.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from drivers.domain import layout
from drivers.domain.config import VM_TEST_MODES, Config
from drivers.domain.dag_ids import UPSTREAM_DRIVERS
from drivers.domain.errors import RunInputError
from drivers.domain.failures import suggest_blocklist
from drivers.domain.kernels import Kernel
from drivers.domain.layout import report_prefix
from drivers.domain.names import (
    KINDS,
    CacheIndex,
    check_driver_version,
    check_kinds,
    parse_object_name,
)
from drivers.domain.planner import plan
from drivers.domain.planview import plan_view
from drivers.domain.selectors import parse_selector
from drivers.domain.toolchain import TOOLCHAIN_MISMATCH
from drivers.domain.verdict import SUCCESS, Verdict
from drivers.store import claims, ledger
from drivers.store.storage import ObjectNotFound, ObjectStore, Stores, read_json, write_json

if TYPE_CHECKING:
    from drivers.store.runtime_config import RuntimeConfig

# The shrink guard's reference: the nightly's and the backfill's (both list the whole
# bundle bucket), so either's success moves it.
STATE_OBJECT = layout.run_state_object(UPSTREAM_DRIVERS)
SUGGESTIONS_KEPT = 50  # blocklist suggestions in record_ledger's summary (an XCom)


class ShrinkGuardError(RuntimeError):
    """The bundle listing lost kernels: stop before building, delete nothing."""


# --- inputs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunParams:
    """Trigger parameters, checked beyond what the JSON schema of the form can say."""

    driver_versions: tuple[str, ...]
    select: str | None = None
    kinds: tuple[str, ...] = KINDS
    builders: tuple[str, ...] = ()
    force: bool = False
    dry_run: bool = False
    max_failures: int = 0
    accept_shrink: bool = False
    vm_tests: str = "enforce"
    vm_tests_budget_s: float = 1800.0

    @classmethod
    def from_params(cls, params: dict[str, Any], config: Config) -> RunParams:
        # The form's choice among the shipped versions plus the versions typed in (blank
        # lines dropped); empty: the run-time config's versions (pre_build resolves them).
        typed = [
            *(params.get("driver_versions") or ()),
            *(params.get("other_driver_versions") or ()),
        ]
        versions = tuple(dict.fromkeys(v.strip() for v in typed if v.strip()))
        for v in versions:
            check_driver_version(v)
        kinds = check_kinds(params.get("kinds") or KINDS)
        builders = tuple(params.get("builders") or ())
        unknown = set(builders) - set(config.builders)
        if unknown:
            raise RunInputError(
                f"unknown builder(s) {sorted(unknown)}: configured are {list(config.builders)}"
            )
        select = (params.get("select") or "").strip() or None
        if select:
            parse_selector(select)  # raises SelectorError (a ValueError) with an example
        max_failures = params.get("max_failures", 0)
        if not isinstance(max_failures, int) or max_failures < 0:
            raise RunInputError(f"max_failures must be an integer >= 0, not {max_failures!r}")
        vm_tests = params.get("vm_tests") or "enforce"
        if vm_tests not in VM_TEST_MODES:
            raise RunInputError(f"vm_tests must be one of {list(VM_TEST_MODES)}, not {vm_tests!r}")
        budget = params.get("vm_tests_budget_s", config.vm_tests["budget_s"])
        if isinstance(budget, bool) or not isinstance(budget, int | float) or budget < 0:
            raise RunInputError(f"vm_tests_budget_s must be seconds >= 0, not {budget!r}")
        return cls(
            driver_versions=versions,
            select=select,
            kinds=kinds,
            builders=builders,
            force=bool(params.get("force")),
            dry_run=bool(params.get("dry_run")),
            max_failures=max_failures,
            accept_shrink=bool(params.get("accept_shrink")),
            vm_tests=vm_tests,
            vm_tests_budget_s=float(budget),
        )


def check_shrink(stores: Stores, kernels: list[Kernel], config: Config) -> dict[str, Any]:
    """Stop when the listing lost more kernels than the config tolerates since the last
    successful run: a broken crawl must not look like "nothing left to build"."""
    try:
        last = read_json(stores.work, STATE_OBJECT)
    except ObjectNotFound:
        return {"reference": None, "missing": 0}
    missing = sorted(set(last["kernels"]) - {k.release for k in kernels})
    allowed = int(len(last["kernels"]) * config.shrink_tolerance)
    if len(missing) > allowed:
        shown = ", ".join(missing[:20]) + (
            f" ... (+{len(missing) - 20})" if len(missing) > 20 else ""
        )
        raise ShrinkGuardError(
            f"the bundle bucket gs://{stores.bundles.bucket_name} lists {len(kernels)} kernels, "
            f"{len(missing)} fewer than the last successful run {last['run_id']} "
            f"({len(last['kernels'])}; tolerated: {allowed}). Missing: {shown}. Nothing was "
            "built or deleted. Restore the bundles, or trigger with accept_shrink=true if "
            "they were removed on purpose."
        )
    return {"reference": last["run_id"], "missing": len(missing)}


# --- steps -------------------------------------------------------------------------------


def run_versions(params: RunParams, runtime: RuntimeConfig) -> tuple[str, ...]:
    """The driver versions of a run: the trigger's, each of which the run-time config
    must list (retired or mistyped versions are refused), else the run-time config's."""
    unknown = [v for v in params.driver_versions if v not in runtime.driver_versions]
    if unknown:
        raise RunInputError(
            f"driver version(s) {unknown} are not in the run-time config "
            f"({runtime.origins['driver-versions']}: {list(runtime.driver_versions)}); "
            f"pick one of those, or add it first: drivers config add driver-versions {unknown[0]}"
        )
    versions = params.driver_versions or runtime.driver_versions
    if not versions:
        raise RunInputError("no driver version: the run-time config lists none")
    return versions


def pre_build(stores: Stores, config: Config, run_id: str, params: RunParams) -> dict[str, Any]:
    """Find what is missing and split it into shards; write the plan and shard files."""
    from drivers.build.compile import toolchain_versions
    from drivers.store.runtime_config import load_runtime_config

    runtime = load_runtime_config(stores.work, config)  # a malformed object stops here
    versions = run_versions(params, runtime)
    bundle_infos = list(stores.bundles.list(layout.BUNDLE_PREFIX))
    kernels, problems = layout.kernels_from_bundles(
        (info.name for info in bundle_infos), f"gs://{stores.bundles.bucket_name}"
    )
    by_kernel = {layout.kernel_from_bundle_object(i.name): i for i in bundle_infos}
    by_kernel.pop(None, None)  # not a bundle name (reported in problems)
    bundles = {kernel: info.md5 for kernel, info in by_kernel.items()}
    guard = {"reference": None, "missing": 0, "accepted": params.accept_shrink}
    if not params.accept_shrink:
        guard |= check_shrink(stores, kernels, config)
    selected = parse_selector(params.select).filter(kernels) if params.select else kernels
    cache = CacheIndex().add_names(info.name for info in stores.drivers.list())
    standing = ledger.Standing.read(stores, config, versions, bundles, toolchain_versions)
    # Under the plan lock: tasks other runs in flight claimed are left to them, and this
    # run claims what it plans (drivers.store.claims; a dry run only reads the claims).
    with claims.Planning(stores.work, run_id, config.claims, not params.dry_run) as planning:
        result = plan(
            selected,
            versions,
            params.kinds,
            cache.done,
            config,
            force=params.force,
            only_builders=set(params.builders) or None,
            blocklist=runtime.blocklist,
            ledger=standing,
            quarantine_release=runtime.quarantine_release,
            claimed=planning.held,
        )
        planning.claim(task for shard in result.shards for task in shard.tasks)
    plan_json = result.to_json(config.builders)
    plan_json["inputs"] = {
        "run_id": run_id,
        "driver_versions": list(versions),
        "kernels_listed": len(kernels),
        "kernels_selected": len(selected),
        "params": params.__dict__,
        "runtime_config": runtime.origins,
        "kernel_problems": problems,
        "cache_unknown_names": cache.unknown_count,
        "shrink_guard": guard,
        "claims": planning.summary(),
    }
    plan_json["quarantined"] = [
        {"task": list(key), "reason": why}
        for key, status, why in result.decisions
        if status == "quarantined"
    ]
    staging = layout.staging_prefix(run_id)
    plan_uri = write_json(stores.work, f"{staging}plan.json", plan_json)
    # when each bundle arrived: the coverage page's kernels, record_ledger's freshness
    arrived = {k: i.created.isoformat(timespec="seconds") for k, i in by_kernel.items()}
    ledger.write_kernels(stores.work, arrived)
    if not params.dry_run:  # the ledger's decisions: changes of state only
        changed = [
            ledger.record(key, status, run_id, reason=why)
            for key, status, why in result.decisions
            if _changed(standing.entry(key), status, why)
        ]
        stores.work.put(f"{staging}decisions.jsonl.gz", ledger.encode(changed))
    # The listing this run planned from: the shrink guard's next reference if it succeeds.
    write_json(stores.work, f"{report_prefix(run_id)}kernels.json", [k.release for k in kernels])
    shards: dict[str, list[str]] = {name: [] for name in config.builders}
    if not params.dry_run:
        for shard in result.shards:
            name = layout.shard_object(run_id, shard.builder, shard.index)
            doc = shard.to_json() | {
                "run_id": run_id,
                "buckets": {
                    "bundles": stores.buckets.bundles,
                    "sources": stores.buckets.sources,
                    "work": stores.buckets.work,
                },
            }
            shards[shard.builder].append(write_json(stores.work, name, doc))
    return {
        "plan": plan_uri,
        "summary": plan_json["summary"],
        "kernels": len(kernels),
        "driver_versions": list(versions),
        "shards": shards,
        "dry_run": params.dry_run,
        # printed in the task log, kept in the report
        "plan_view": plan_view(plan_json, standing.kernel_compilers()),
    }


def _changed(entry: dict[str, Any] | None, status: str, reason: str) -> bool:
    if entry is None:
        return True
    if entry["status"] == "withdrawn" and status == "quarantined":
        return False  # held because withdrawn: it stays so (no failures to hold it by)
    return entry["status"] != status or entry.get("reason") != reason


def unify(stores: Stores, run_id: str, expected_shards: dict[str, list[str]]) -> dict[str, Any]:
    """Merge every shard's records into one build report; a shard without its results
    (pod lost, crash) is an infrastructure failure."""
    results_prefix = f"{layout.staging_prefix(run_id)}results/"
    records, shard_records = [], []
    for info in stores.work.list(results_prefix):
        for line in stores.work.download(info.name).decode().splitlines():
            if line.strip():
                record = json.loads(line)
                (shard_records if record.get("type") == "shard" else records).append(record)
    reported = {(s["builder"], s["index"]) for s in shard_records}
    lost = [
        {"shard": uri}
        for uris in expected_shards.values()
        for uri in uris
        if layout.shard_from_object(uri) not in reported
    ]
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for r in records:
        counts[f"{r['builder']}/{r['kind']}"][r["status"]] += 1
    failures = [r for r in records if r["status"] in ("failed", "infra_failed", TOOLCHAIN_MISMATCH)]
    logs = _keep_failure_logs(stores, run_id, failures)
    build = {
        "counts": {k: dict(v) for k, v in sorted(counts.items())},
        "compile_failures": sum(1 for r in records if r["status"] == "failed"),
        "infra_failures": sum(1 for r in records if r["status"] == "infra_failed"),
        # routing errors: the kernel's compiler is not its builder's (never compiled)
        "toolchain_mismatches": sum(1 for r in records if r["status"] == TOOLCHAIN_MISMATCH),
        "failures": failures,
        "failure_logs": logs,
        "shards": shard_records,
        "lost_shards": lost,
        "calibration": [
            {
                "builder": s["builder"],
                "index": s["index"],
                "estimated_s": s.get("estimated_cost_s"),
                "measured_s": s.get("measured_s"),
            }
            for s in shard_records
        ],
    }
    write_json(stores.work, f"{report_prefix(run_id)}build.json", build)
    return {
        "built": sum(1 for r in records if r["status"] == "built"),
        "unavailable": sum(1 for r in records if r["status"] == "unavailable"),
        "compile_failures": build["compile_failures"],
        "infra_failures": build["infra_failures"] + len(lost),
        "toolchain_mismatches": build["toolchain_mismatches"],
        "shards_reported": len(shard_records),
        "shards_lost": len(lost),
    }


def _keep_failure_logs(stores: Stores, run_id: str, failures: list[dict]) -> list[str]:
    """Copy failure logs out of staging (which is deleted at run end) into the report."""
    kept = []
    staging = layout.staging_prefix(run_id)
    for r in failures:
        if r.get("log"):
            name = report_prefix(run_id) + r["log"].removeprefix(staging)
            try:
                stores.work.put(name, stores.work.download(r["log"]), "text/plain")
            except ObjectNotFound:
                continue
            kept.append(name)
    return kept


def verify_drivers(stores: Stores, run_id: str) -> dict[str, Any]:
    """Check every staged driver; only what passes is pushed."""
    from drivers.domain.verify import verify_driver

    prefix = layout.staged_drivers_prefix(run_id)
    staged = [info.name for info in stores.work.list(prefix)]
    verified, rejected = [], []
    for name in staged:
        entry = parse_object_name(name.removeprefix(prefix))
        problems = (
            ["not a driver object name"]
            if entry is None
            else verify_driver(entry.key, stores.work.download(name), entry.unavailable)
        )
        if problems:
            rejected.append({"object": name.removeprefix(prefix), "problems": problems})
        else:
            verified.append(name.removeprefix(prefix))
    write_json(stores.work, f"{layout.staging_prefix(run_id)}verified.json", verified)
    write_json(stores.work, f"{report_prefix(run_id)}verify.json", {"rejected": rejected})
    return {"staged": len(staged), "verified": len(verified), "rejected": len(rejected)}


def integration_tests(
    stores: Stores, run_id: str, params: RunParams, vm: dict[str, Any]
) -> dict[str, Any]:
    """Boot each kernel that got new drivers in this run and load them there
    (:mod:`drivers.build.vmtest`; ``vm`` is the config's [vm_tests]), each captured
    through by the consumer of its driver version, built from (and cached beside) that
    version's prepared sources in the sources bucket. Writes what push may
    publish: with ``vm_tests=enforce`` a driver the kernel refused (or that could not be
    tested because the VM never booted) is held back; a kernel without a boot image, or
    whose turn came after the time budget, is published marked untested. ``warn``
    publishes everything and reports; ``off`` tests nothing."""
    from drivers.build.consumer import consumer_for
    from drivers.build.vmtest import REFUSED, RETRYABLE, VmResult, fetch_boot_image, test_kernels

    staging, prefix = layout.staging_prefix(run_id), layout.staged_drivers_prefix(run_id)
    try:
        verified = read_json(stores.work, f"{staging}verified.json")
    except ObjectNotFound:
        verified = []
    names: dict[Any, str] = {}
    kernels: dict[str, list] = defaultdict(list)
    for name in verified:
        entry = parse_object_name(name)
        if entry is not None and not entry.unavailable:  # markers have nothing to load
            names[entry.key] = name
            kernels[entry.key.kernel].append(entry.key)

    def load_drivers(kernel: str) -> list:
        return [(key, stores.work.download(prefix + names[key])) for key in kernels[kernel]]

    started = datetime.now(UTC)
    if params.vm_tests == "off":
        off = f"vm_tests=off in run {run_id}: published untested"
        results = [VmResult.of(key, "not_tested", off) for key in names]
    else:
        results = test_kernels(
            kernels,
            lambda kernel, folder: fetch_boot_image(stores.kernel_images, kernel, folder),
            load_drivers,
            lambda version: consumer_for(stores.sources, version),
            events=vm["events"],
            parallel=vm["parallel"],
            budget_s=params.vm_tests_budget_s,
            accel="kvm" if vm["kvm"] else "tcg",
            memory_mb=vm["memory_mb"],
        )
    statuses = Counter(r.status for r in results)
    held = set()
    if params.vm_tests == "enforce":
        held = {names[r.key] for r in results if r.status in (*REFUSED, RETRYABLE)}
    publish = [name for name in verified if name not in held]
    write_json(stores.work, f"{staging}publish.json", publish)
    summary = {
        "mode": params.vm_tests,
        "kernels": len(kernels),
        "drivers": len(results),
        "statuses": dict(sorted(statuses.items())),
        "refused": sum(statuses[s] for s in REFUSED),
        "boot_failed": statuses[RETRYABLE],
        "untested": sum(statuses[s] for s in ("no_boot_image", "not_tested")),
        "held_back": len(held),
        "seconds": round((datetime.now(UTC) - started).total_seconds(), 1),
    }
    doc = summary | {
        "budget_s": params.vm_tests_budget_s,
        "results": [r.to_json() | {"object": names[r.key]} for r in results],
    }
    write_json(stores.work, f"{report_prefix(run_id)}vm-tests.json", doc)
    return summary


def cmd_integration_tests(args: Any) -> int:
    """``drivers integration-tests --run-id ID``: the integration_tests step outside
    Airflow (what the production vm-test pod runs); prints its summary as JSON."""
    from drivers.domain.config import load_config
    from drivers.store.storage import client_from_environment

    config = load_config()
    raw: dict[str, Any] = {"vm_tests": args.mode}
    if args.budget_s is not None:
        raw["vm_tests_budget_s"] = args.budget_s
    params = RunParams.from_params(raw, config)
    summary = integration_tests(
        Stores(client_from_environment()), args.run_id, params, config.vm_tests
    )
    text = json.dumps(summary)
    if args.xcom:
        args.xcom.parent.mkdir(parents=True, exist_ok=True)
        args.xcom.write_text(text)
    print(text)
    return 0


def push_drivers(stores: Stores, run_id: str) -> dict[str, Any]:
    """Promote what the integration tests let through into the cache, never overwriting
    (:mod:`drivers.store.push`)."""
    from drivers.store.push import Candidate, push_new

    prefix = layout.staged_drivers_prefix(run_id)
    try:
        publish = set(read_json(stores.work, f"{layout.staging_prefix(run_id)}publish.json"))
    except ObjectNotFound:
        publish = set()
    candidates = {
        info.name[len(prefix) :]: Candidate(info.size, info.md5)
        for info in stores.work.list(prefix)
        if info.name[len(prefix) :] in publish
    }

    def load(names: list[str]):
        for name in names:
            yield name, lambda name=name: stores.work.download(prefix + name)

    result = push_new(stores.drivers, "", candidates, load)
    doc = result.to_json() | {"created": sorted(result.created)}  # the ledger's "published"
    write_json(stores.work, f"{report_prefix(run_id)}push.json", doc)
    return {
        "created": len(result.created),
        "identical": len(result.identical),
        "different": len(result.different),
        "changed_versions": result.changed_versions(),
    }


def update_support_packages(
    stores: Stores, versions: list[str], now: datetime | None = None
) -> dict[str, Any]:
    """Rebuild the support packages of the versions whose driver set changed."""
    from drivers.build.packages import DriverSource, publish_support_packages

    return publish_support_packages(
        [DriverSource(stores.drivers)], stores.support, versions, timestamp=now or datetime.now(UTC)
    )


def report(
    stores: Stores,
    run_id: str,
    params: RunParams,
    steps: dict[str, Any],
    failed_tasks: list[str],
) -> dict[str, Any]:
    """The run's verdict (:mod:`drivers.domain.verdict`) from every step's summary
    (``steps``, by task id: None for a step that did not finish), written to
    ``reports/<run_id>/report.json``. Never green while wrong: an infrastructure failure,
    a failed task or more compile failures than ``max_failures`` fail the run (after
    everything that succeeded was published). A successful run's bundle listing becomes
    the shrink guard's reference."""
    build = steps.get("unify") or {}
    problems = []
    if build.get("infra_failures"):
        problems.append(f"{build['infra_failures']} infrastructure failure(s) in builders")
    if build.get("toolchain_mismatches"):  # a routing error: not under max_failures
        problems.append(
            f"{build['toolchain_mismatches']} driver(s) refused as {TOOLCHAIN_MISMATCH}: their "
            "kernel's compiler is not their builder's; fix the config's [[routes]]"
        )
    vm = steps.get("integration_tests") or {}
    enforced = vm.get("mode") == "enforce"
    refused = vm.get("refused", 0) if enforced else 0  # warn: reported, published anyway
    if build.get("compile_failures", 0) + refused > params.max_failures:
        what = f"{build.get('compile_failures', 0)} compile failure(s)"
        if refused:
            what += f" + {refused} driver(s) their kernel refused (not published)"
        problems.append(f"{what} > max_failures={params.max_failures}")
    warnings = []
    tolerated = build.get("compile_failures", 0) + refused
    if tolerated and tolerated <= params.max_failures:
        warnings.append(f"{tolerated} failure(s) tolerated (max_failures={params.max_failures})")
    if not enforced and vm.get("refused"):
        warnings.append(
            f"{vm['refused']} driver(s) their kernel refused were published (vm_tests={vm['mode']})"
        )
    if enforced and vm.get("boot_failed"):
        problems.append(
            f"{vm['boot_failed']} driver(s) held back: their VM did not boot (infrastructure; "
            "the next run builds and tests them again)"
        )
    if (steps.get("verify_drivers") or {}).get("rejected"):
        problems.append(
            f"{steps['verify_drivers']['rejected']} staged driver(s) failed verification"
        )
    verdict = Verdict.judge(failed_tasks, problems, warnings)
    pre = steps.get("pre_build")
    doc = verdict.document(
        run_id,
        params.__dict__,
        {step: summary for step, summary in steps.items() if step != "pre_build"},
        plan=pre,  # pre_build's summary, under the key the readers know
        buckets=stores.buckets.__dict__,
    )
    uri = write_json(stores.work, f"{report_prefix(run_id)}report.json", doc)
    if verdict.status == SUCCESS and pre and not params.dry_run:
        kernels = read_json(stores.work, f"{report_prefix(run_id)}kernels.json")
        write_json(stores.work, STATE_OBJECT, {"run_id": run_id, "kernels": kernels})
    return verdict.to_json(uri)


def record_ledger(stores: Stores, run_id: str) -> dict[str, Any]:
    """Append the run's decisions and attempts to the build ledger (one object per run)
    and refresh the coverage index (:mod:`drivers.store.ledger`): the planner's decisions that
    changed, every build attempt, what the VM tests refused, what was published. The
    summary carries the blocklist lines that would cover repeated identical failures
    (:mod:`drivers.domain.failures`; the first SUGGESTIONS_KEPT, each with how many
    kernels it covers, not which: the summary is an XCom)."""
    from drivers.build.vmtest import REFUSED

    staging, reports = layout.staging_prefix(run_id), report_prefix(run_id)
    try:
        records = list(ledger.decode(stores.work.download(f"{staging}decisions.jsonl.gz")))
    except ObjectNotFound:
        records = []  # a dry run, or pre_build did not get that far
    built: dict[tuple[str, str, str], dict[str, Any]] = {}
    for info in stores.work.list(f"{staging}results/"):
        for line in stores.work.download(info.name).decode().splitlines():
            r = json.loads(line) if line.strip() else {}
            if r.get("type") == "task":
                rec = _attempt_record(r, run_id, f"gs://{stores.work.bucket_name}/{reports}")
                built[r["kernel"], r["driver_version"], r["kind"]] = rec
                records.append(rec)
    vm = _read_optional(stores.work, f"{reports}vm-tests.json") or {}
    for v in vm.get("results", []) if vm.get("mode") == "enforce" else []:
        if v["status"] in REFUSED:
            key = (v["kernel"], v["driver_version"], v["kind"])
            why = f"{v['status']} in its kernel's VM: " + " / ".join(v["messages"][:2])
            fp = built.get(key, {}).get("fingerprint")
            records.append(
                ledger.record(
                    key, "refused", run_id, failure=v["status"], reason=why, fingerprint=fp
                )
            )
    arrived = ledger.read_kernels(stores.work)  # pre_build's bundle listing
    published_now = ledger.now()
    for name in (_read_optional(stores.work, f"{reports}push.json") or {}).get("created", []):
        entry = parse_object_name(name)
        if entry is not None and not entry.unavailable:
            key = tuple(entry.key)
            records.append(
                ledger.record(
                    key,
                    "published",
                    run_id,
                    object=f"gs://{stores.drivers.bucket_name}/{name}",
                    builder=built.get(key, {}).get("builder"),
                    sha256=built.get(key, {}).get("sha256"),
                    fingerprint=built.get(key, {}).get("fingerprint"),
                    arrived=arrived.get(entry.key.kernel),
                    published=published_now,
                )
            )
    uri = ledger.append(stores.work, ledger.run_object(run_id), records)
    in_cache: dict[str, dict[tuple[str, str], bool]] = defaultdict(dict)
    for info in stores.drivers.list():
        entry = parse_object_name(info.name)
        if entry is not None:
            in_cache[entry.key.driver_version][entry.key.kernel, entry.key.kind] = entry.unavailable
    indexed = ledger.apply_run(stores.work, run_id, records, in_cache, arrived)
    statuses = Counter(r["status"] for r in records)
    # Repeated identical failures (this run's and earlier ones'), and the blocklist line
    # that would cover each group: in the report, for an operator to apply or not.
    suggestions = suggest_blocklist({v: c.entries for v, c in indexed.items()})
    return {
        "ledger": uri,
        "records": len(records),
        "statuses": dict(statuses),
        "indexed": {v: sum(map(len, c.entries.values())) for v, c in indexed.items()},
        "blocklist_suggestions": [
            s.to_json() | {"kernels": len(s.kernels)} for s in suggestions[:SUGGESTIONS_KEPT]
        ],
        "blocklist_suggestions_total": len(suggestions),
    }


def _attempt_record(r: dict[str, Any], run_id: str, reports: str) -> dict[str, Any]:
    """A builder's task record as a ledger record (its log as kept in the report)."""
    log = r.get("log")
    if log:
        log = reports + log.removeprefix(layout.staging_prefix(run_id))
    reason = f"{r['failure']}: {r['message']}" if r.get("failure") else None
    return ledger.record(
        (r["kernel"], r["driver_version"], r["kind"]),
        r["status"],
        run_id,
        time=r.get("time"),
        builder=r["builder"],
        env=r.get("env"),
        toolchain=r.get("toolchain"),  # gcc, clang, make as the builder reported them
        kernel_compiler=r.get("kernel_compiler"),  # as the kernel's bundle records it
        fingerprint=ledger.fingerprint(r.get("env"), r.get("sources"), r.get("bundle")),
        failure=r.get("failure"),
        reason=reason,
        log=log,
        duration_s=r.get("duration_s"),
        make_s=r.get("make_s"),  # the bare make inside duration_s
        sha256=r.get("sha256"),
    )


def _read_optional(store: ObjectStore, name: str) -> Any:
    try:
        return read_json(store, name)
    except ObjectNotFound:
        return None


def cleanup_staging(stores: Stores, run_id: str) -> int:
    """Delete the run's staging prefix and release its claim (drivers.store.claims: other runs
    may plan what it did not build); reports stay. Also a failed run's teardown."""
    claims.release_claim(stores.work, run_id)
    return stores.work.delete_prefix(layout.staging_prefix(run_id))
