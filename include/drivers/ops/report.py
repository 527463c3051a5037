"""Human summary of a run (upstream_drivers, backfill_drivers, cpaas_drivers), read from
its report in the work bucket."""

from __future__ import annotations

import json
import sys
from datetime import datetime

from drivers.domain.layout import REPORTS_PREFIX, Buckets, report_prefix, staging_prefix
from drivers.domain.planview import format_plan_view
from drivers.domain.toolchain import TOOLCHAIN_MISMATCH
from drivers.store import storage


def newest_run_id(
    work: storage.ObjectStore, since: datetime | None = None, prefix: str = REPORTS_PREFIX
) -> str | None:
    """The newest run with a report right under ``prefix`` (reports/<run_id>/report.json)."""
    reports = [
        i
        for i in work.list(prefix)
        if i.name.endswith("/report.json")
        and i.name.count("/") == prefix.count("/") + 1
        and (since is None or i.created >= since)
    ]
    if not reports:
        return None
    newest = max(reports, key=lambda i: i.created)
    return newest.name.removeprefix(prefix).removesuffix("/report.json")


class NoRunReport(LookupError):
    """No run has a report where one was looked for."""


def _load(reports: str, run_id: str | None, since: datetime | None):
    """(buckets, work store, run id, report) of a run reported under ``reports`` (default:
    the newest, or the newest since ``since``); raises NoRunReport when there is none."""
    buckets = Buckets.from_env()
    work = storage.ObjectStore(storage.client_from_environment(), buckets.work)
    run_id = run_id or newest_run_id(work, since, reports)
    if run_id is None:
        when = f" since {since:%H:%M:%S}" if since else ""
        raise NoRunReport(f"no run report in gs://{buckets.work}/{reports}{when}")
    return buckets, work, run_id, json.loads(work.download(f"{reports}{run_id}/report.json"))


def print_report(run_id: str | None = None, since: datetime | None = None, out=None) -> int:
    """Print a run's summary (default: the newest run, or the newest since ``since``) to
    ``out`` (default: the stdout of the moment, not of import time); returns 0 when that
    run succeeded."""
    out = out or sys.stdout
    try:
        buckets, work, run_id, doc = _load(REPORTS_PREFIX, run_id, since)
    except NoRunReport as e:
        print(e, file=out)
        return 1
    prefix = report_prefix(run_id)
    plan = doc.get("plan") or {}
    summary = plan.get("summary", {})
    dry = " (dry run: planned only, nothing built or published)" if doc["params"]["dry_run"] else ""
    print(f"run {run_id}: {doc['status'].upper()}{dry}", file=out)
    for reason in doc.get("reasons", []):
        print(f"  reason: {reason}", file=out)
    if summary:
        print(
            f"  plan: {plan.get('kernels', '?')} kernels, candidates {summary['candidates']}, "
            f"done {summary['done']}, blocked {summary['blocked']}, "
            f"unroutable {summary['unroutable']}, quarantined {summary.get('quarantined', 0)}, "
            f"to_build={summary['to_build']}",
            file=out,
        )
    if plan.get("plan_view"):  # per builder and kind, first kernels, claims, estimates
        for line in format_plan_view(plan["plan_view"]).splitlines()[1:]:
            print(f"  {line}", file=out)
    try:
        build = json.loads(work.download(prefix + "build.json"))
    except storage.ObjectNotFound:
        build = None
    if build and build["counts"]:
        print(
            "  builds (builder/kind: built / unavailable / failed / infra_failed / "
            f"{TOOLCHAIN_MISMATCH}):",
            file=out,
        )
        for key, counts in build["counts"].items():
            print(
                f"    {key:12} {counts.get('built', 0):5} / {counts.get('unavailable', 0):5} / "
                f"{counts.get('failed', 0):5} / {counts.get('infra_failed', 0):5} / "
                f"{counts.get(TOOLCHAIN_MISMATCH, 0):5}",
                file=out,
            )
        routing = [f for f in build["failures"] if f["status"] == TOOLCHAIN_MISMATCH]
        _print_routing_errors(routing, out)
        kept = set(build.get("failure_logs", []))  # the logs kept after staging is gone
        staged = staging_prefix(run_id)
        for failure in [f for f in build["failures"] if f not in routing][:10]:
            print(
                f"    FAILED {failure['kernel']} {failure['driver_version']} {failure['kind']}: "
                f"{failure.get('failure')} {failure.get('message', '')}",
                file=out,
            )
            log = report_prefix(run_id) + (failure.get("log") or "").removeprefix(staged)
            if log in kept:
                print(f"      log: gs://{work.bucket_name}/{log}", file=out)
    sandboxes = sorted({s.get("sandbox") or "none" for s in (build or {}).get("shards", [])})
    if sandboxes:  # what confined the builds; the local runtime: nothing (development only)
        from drivers.build.shard_run import SANDBOXES

        print("  builders: " + "; ".join(SANDBOXES.get(s, s) for s in sandboxes), file=out)
    _print_suggestions((doc.get("steps", {}).get("record_ledger") or {}), out)
    calibration = [c for c in (build or {}).get("calibration", []) if c.get("measured_s")]
    if calibration:
        estimated = sum(c["estimated_s"] or 0 for c in calibration)
        measured = sum(c["measured_s"] for c in calibration)
        print(
            f"  cost model: {len(calibration)} shard(s) estimated {estimated:.0f} s, "
            f"measured {measured:.0f} s (x{measured / estimated:.2f}; recalibrate [costs]: "
            "drivers costs)",
            file=out,
        )
    steps = doc.get("steps", {})
    _print_vm_tests(work, prefix, steps.get("integration_tests"), out)
    push = steps.get("push_drivers") or {}
    if push:
        print(
            f"  push: {push['created']} new, {push['identical']} already published, "
            f"{push['different']} differing from the published copy (kept)",
            file=out,
        )
    print(f"  drivers:  gs://{buckets.drivers}/<version>/", file=out)
    print(f"  packages: gs://{buckets.support}/index.html", file=out)
    print(f"  report:   gs://{buckets.work}/{prefix}report.json", file=out)
    return 0 if doc["status"] == "success" else 1


def _print_routing_errors(refused: list[dict], out) -> None:
    """Drivers the toolchain guard refused: the route is wrong, not the driver."""
    if not refused:
        return
    print(
        f"  routing errors ({len(refused)} {TOOLCHAIN_MISMATCH}: refused before compiling):",
        file=out,
    )
    for r in refused[:10]:
        print(
            f"    MISMATCH {r['kernel']} {r['driver_version']} {r['kind']} on {r['builder']}: "
            f"{r.get('message', '')}",
            file=out,
        )
    if len(refused) > 10:
        print(f"    ... and {len(refused) - 10} more", file=out)
    print(
        "    fix the route: a [[routes]] entry that sends these kernels to a builder with "
        "their compiler (drivers build KERNEL --builder NAME ... tries one); not a "
        "blocklist case, never quarantined",
        file=out,
    )


def _print_suggestions(recorded: dict, out) -> None:
    """The blocklist lines that would cover repeated identical failures (record_ledger
    finds them: drivers.domain.failures), and how to apply one; never applied here."""
    suggestions = recorded.get("blocklist_suggestions") or []
    if not suggestions:
        return
    print("  blocklist suggestions (repeated identical failures; nothing applies them):", file=out)
    for s in suggestions[:10]:
        print(f"    {s['rule']}  ({s['kernels']} kernels: {s['failure']}: {s['error']})", file=out)
        print(f"      apply: drivers config add blocklist '{s['rule']}'", file=out)
    more = recorded.get("blocklist_suggestions_total", len(suggestions)) - min(10, len(suggestions))
    if more:
        print(f"    ... and {more} more", file=out)


def _print_vm_tests(work: storage.ObjectStore, prefix: str, vm: dict | None, out) -> None:
    if not vm:
        return
    if vm["mode"] == "off":
        print(f"  vm tests: off ({vm['drivers']} driver(s) published untested)", file=out)
        return
    counts = ", ".join(f"{n} {status}" for status, n in vm["statuses"].items()) or "nothing new"
    print(
        f"  vm tests ({vm['mode']}): {vm['kernels']} kernel(s), {counts} in {vm['seconds']} s; "
        f"{vm['held_back']} held back",
        file=out,
    )
    if vm["drivers"] == vm["statuses"].get("loaded", 0):
        return
    results = json.loads(work.download(prefix + "vm-tests.json"))["results"]
    for r in [r for r in results if r["status"] != "loaded"][:10]:
        why = (r["messages"] or [""])[0]
        print(
            f"    {r['status'].upper()} {r['kernel']} {r['driver_version']} {r['kind']}: {why}",
            file=out,
        )


def print_cpaas_report(run_id: str | None = None, since: datetime | None = None, out=None) -> int:
    """Print a cpaas_drivers run's summary: what was pushed, pulled and packaged per
    architecture, and the compile failures found; returns 0 unless the run failed."""
    from drivers.flows import cpaas

    out = out or sys.stdout

    try:
        buckets, _, run_id, doc = _load(cpaas.REPORTS, run_id, since)
    except NoRunReport as e:
        print(e, file=out)
        return 1
    mirror = doc.get("mirror") or {}
    dry = " (dry run: nothing published)" if doc["params"]["dry_run"] else ""
    print(f"cpaas run {run_id}: {doc['status'].upper()}{dry}", file=out)
    if mirror:
        what = (
            "unchanged since " + str(mirror["last_success"])
            if mirror["unchanged"]
            else (f"mirrored to gs://{buckets.work}/{mirror['image']}")
        )
        print(f"  image {mirror['digest']}: {what}", file=out)
        if mirror.get("absent"):
            print(f"  not in the image: {', '.join(mirror['absent'])}", file=out)
    for reason in doc.get("reasons", []):
        print(f"  reason: {reason}", file=out)
    for arch, steps in doc.get("architectures", {}).items():
        push = (steps.get("push") or {}).get("counts", {})
        pull = steps.get("pull") or {}
        packages = steps.get("packages") or {}
        print(
            f"  {arch:8} pushed {push.get('created', 0)} new, {push.get('identical', 0)} "
            f"already published, {push.get('different', 0)} differing (published copy kept); "
            f"pulled {len(pull.get('from_cpaas', []))} from the CPaaS cache, "
            f"{len(pull.get('from_upstream', []))} from upstream; packages "
            f"{packages.get('built', 0)} built, {packages.get('unchanged', 0)} unchanged",
            file=out,
        )
        for name in (steps.get("push") or {}).get("different", [])[:10]:
            print(f"           differs from the published copy: {name}", file=out)
        for name, problems in list((steps.get("rejected") or {}).items())[:10]:
            print(f"           REJECTED {name}: {'; '.join(problems)}", file=out)
    for f in doc.get("compile_failures", []):
        print(
            f"  COMPILE FAILURE {f['kernel']} {f['driver_version']} {f['kind']} ({f['arch']}):",
            file=out,
        )
        for line in f["first_lines"][:5]:
            print(f"    | {line}", file=out)
        print(f"    log: {f['log']}", file=out)
    print(f"  drivers:  gs://{buckets.cpaas_drivers}/cpaas/<arch>/<version>/", file=out)
    print(f"  packages: gs://{buckets.support}/cpaas/<arch>/index.html", file=out)
    print(f"  report:   gs://{buckets.work}/{cpaas.reports(run_id)}report.json", file=out)
    return 1 if doc["status"] == "failed" else 0
