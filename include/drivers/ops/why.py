"""``drivers why KERNEL``: does a driver exist for this kernel, where, or exactly why not
and what to do.

The answer comes from the driver cache (a few object lookups), the coverage index of
each driver version (:mod:`drivers.store.ledger`: one small object per version, whatever the
ledger's size) and the config as a run would use it (:mod:`drivers.store.runtime_config`:
blocklist lines, routes, driver versions). A kernel the system has never seen (no
bundle, no record) gets the same answer a run would give it. The coverage page of the
Airflow UI shows the same :func:`explain`.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from drivers.domain import layout
from drivers.domain.decision import (
    BLOCKED,
    BUILD,
    DONE,
    QUARANTINED,
    REPEATABLE,
    UNROUTABLE,
    Known,
    decide,
)
from drivers.domain.kernels import ebpf_supported, parse_kernel
from drivers.domain.names import KINDS, DriverKey, check_driver_version, check_kinds
from drivers.domain.toolchain import TOOLCHAIN_MISMATCH
from drivers.store import ledger

if TYPE_CHECKING:
    from drivers.domain.config import Config
    from drivers.store.runtime_config import RuntimeConfig
    from drivers.store.storage import Stores

# The verdicts; "present" ones mean an agent on that kernel gets what it needs.
PRESENT = ("published", "unavailable")


@dataclass
class Answer:
    """One driver (version x kind) of the kernel asked about."""

    driver_version: str
    kind: str
    status: str  # a ledger status, or "pending", "no_bundle", "not_configured", "missing"
    summary: str  # one line: where it is, or why not
    # What a run would do with it now (drivers.domain.decision: "done", "build", ...);
    # None for a driver version no run builds.
    decision: str | None = None
    details: list[str] = field(default_factory=list)
    action: str | None = None  # what to do about it
    since: str | None = None
    log: str | None = None

    @property
    def present(self) -> bool:
        return self.status in PRESENT


@dataclass
class Explanation:
    kernel: str
    family: str
    bundle: str | None  # its gs:// URI when the bundle bucket has it
    arrived: str | None  # when the bundle arrived
    answers: list[Answer]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def explain(
    stores: Stores,
    config: Config,
    kernel: str,
    versions: tuple[str, ...] = (),
    kinds: tuple[str, ...] = KINDS,
    runtime: RuntimeConfig | None = None,
) -> Explanation:
    """Why each requested driver of ``kernel`` exists or not. Raises ValueError (a
    KernelParseError naming the string) for something that is not a kernel release."""
    from drivers.store.runtime_config import load_runtime_config

    k = parse_kernel(kernel.strip())
    for v in versions:
        check_driver_version(v)
    kinds = check_kinds(kinds)
    runtime = runtime or load_runtime_config(stores.work, config)
    versions = versions or runtime.driver_versions
    bundle_name = layout.bundle_object(k.release)
    keys = [DriverKey(k.release, v, kind) for v in versions for kind in kinds]

    def cached(name: str) -> Any:
        return _info(stores.drivers, name)

    with ThreadPoolExecutor(8) as pool:  # a dozen small lookups: overlap their latency
        coverage = dict(
            zip(
                versions,
                pool.map(lambda v: ledger.read_coverage(stores.work, v), versions),
                strict=True,
            )
        )
        bundle = pool.submit(_info, stores.bundles, bundle_name)
        sources = pool.submit(ledger.source_hashes, stores.sources)
        objects = dict(
            zip(keys, pool.map(lambda key: cached(key.object_name()), keys), strict=True)
        )
        bpf = [key for key in keys if key.kind == "bpf"]  # only probes have markers
        markers = dict(zip(bpf, pool.map(lambda key: cached(key.unavail_name()), bpf), strict=True))
        bundle_info = bundle.result()
        # What the planner's quarantine compares with: the inputs each would be built from now.
        standing = ledger.Standing(
            coverage,
            config,
            sources.result(),
            {k.release: bundle_info.md5 if bundle_info else None},
            _toolchain,
        )
    arrived = bundle_info.created.isoformat(timespec="seconds") if bundle_info else None
    known = Known(
        blocklist=runtime.blocklist,
        ledger=standing,
        quarantine_after=config.quarantine_after,
        quarantine_release=runtime.quarantine_release,
    )
    answers = [
        _answer(
            key,
            objects[key],
            markers.get(key),
            standing.entry(key),
            known,
            stores,
            config,
            k,
            runtime,
            arrived,
        )
        for key in keys
    ]
    return Explanation(
        k.release,
        k.family,
        f"gs://{stores.bundles.bucket_name}/{bundle_name}" if bundle_info else None,
        arrived,
        answers,
    )


def _info(store: Any, name: str) -> Any:
    """The object's metadata, or None when it does not exist."""
    from drivers.store.storage import ObjectNotFound

    try:
        return store.info(name)
    except ObjectNotFound:
        return None


def _toolchain() -> dict[str, str | None]:
    """This worker's toolchain: only the local runtime needs it, and only for a driver
    with a ledger entry (the builder module is imported then, not on every `why`)."""
    from drivers.build.compile import toolchain_versions

    return toolchain_versions()


def _answer(
    key: DriverKey,
    obj: Any,
    marker: Any,
    entry: dict[str, Any] | None,
    known: Known,
    stores: Stores,
    config: Config,
    kernel: Any,
    runtime: RuntimeConfig,
    arrived: str | None,
) -> Answer:
    """The planner's decision for the driver (:func:`drivers.domain.decision.decide`),
    told with what else is known: where it is, the last failure and its log, ..."""
    version, kind = key.driver_version, key.kind
    entry = entry or {}
    task = f"{key.kernel} {version} {kind}"
    where = f"gs://{stores.drivers.bucket_name}/"
    answer = Answer(version, kind, "pending", "", since=entry.get("since"), log=entry.get("log"))
    if version not in runtime.driver_versions and obj is None and marker is None:
        answer.status = "not_configured"
        answer.summary = (
            f"driver version {version} is not built: the run-time config lists "
            f"{list(runtime.driver_versions)} ({runtime.origins['driver-versions']})"
        )
        answer.action = f"drivers config add driver-versions {version}"
        return answer
    builder = config.route(kernel, kind)
    decision = decide(key, builder, obj is not None or marker is not None, known)
    answer.decision = decision.status
    if decision.status == DONE:
        if obj is not None:
            answer.status = "published"
            answer.summary = (
                f"{where}{obj.name} ({obj.size} bytes, {obj.created:%Y-%m-%d %H:%M} UTC)"
            )
            if entry.get("builder"):  # a run of ours built it (not found in the listing)
                answer.details.append(f"built in run {entry['run_id']} by {entry['builder']}")
            answer.since = obj.created.isoformat(timespec="seconds")
        else:
            answer.status = "unavailable"
            answer.summary = f"this kernel cannot run eBPF probes (marker {where}{marker.name})"
        return answer
    if decision.status == BLOCKED:
        rule = decision.rule
        answer.status = "blocked"
        answer.summary = f"blocklisted by {rule.where}: {rule.text}"
        answer.action = "remove that line to build it " + (
            "(drivers config set blocklist)"
            if rule.where.startswith("gs://")
            else f"(the shipped {rule.source}: a change to the repo)"
        )
        return answer
    if decision.status == UNROUTABLE:
        answer.status = "unroutable"
        x_y_z = f"{kernel.major}.{kernel.minor}.{kernel.patch}"
        answer.summary = f"no builder route takes {kind} for {kernel.family} {x_y_z}"
        answer.action = "add a [[routes]] entry for it in the shipped config"
        return answer
    if kind == "bpf" and not ebpf_supported(kernel):
        answer.details.append("this kernel predates eBPF: the build publishes an .unavail marker")
    status = entry.get("status")
    release = f"drivers config add quarantine-release '{task}'"
    log = f"; log: {entry['log']}" if entry.get("log") else ""
    if decision.reason and decision.status == BUILD:  # released, or its inputs changed
        answer.details.append(decision.reason)
    if decision.status == QUARANTINED and status == "withdrawn":
        answer.status = "withdrawn"
        answer.summary = f"withdrawn {entry['time']}: {entry.get('reason', '')}"
        answer.action = (
            f"it is rebuilt when its builder image, sources or bundle change, or after {release}"
        )
    elif decision.status == QUARANTINED:
        answer.status = "quarantined"
        last = f"; last: {entry['last_reason']}" if entry.get("last_reason") else ""
        answer.summary = f"quarantined: {decision.reason}{last}{log}"
        answer.details.append(f"failing since {entry.get('since')}, last in run {entry['run_id']}")
        answer.action = (
            f"fix the driver sources or the {entry.get('builder', 'builder')} image (either "
            f"change ends the quarantine), or retry as is: {release}"
        )
    elif status in REPEATABLE:
        n = entry.get("failures", 1)
        answer.status = status
        what = "compile failure" if status == "failed" else "refused by its kernel"
        answer.summary = (
            f"{what} ({n} in a row, last in run {entry['run_id']}): {entry.get('reason', '')}{log}"
        )
        left = config.quarantine_after - n
        answer.action = "fix the driver sources; the nightly retries it" + (
            f" ({left} more failure(s) and it is quarantined)" if left > 0 else ""
        )
    elif status == "infra_failed":
        answer.status = status
        answer.summary = (
            f"infrastructure failure in run {entry['run_id']}: {entry.get('reason', '')}"
        )
        answer.action = "nothing: the next run tries again (see the run's report if it repeats)"
    elif status == TOOLCHAIN_MISMATCH:
        answer.status = status
        answer.summary = (
            f"refused before compiling by builder {entry.get('builder', '?')} in run "
            f"{entry['run_id']}: {entry.get('reason', '')}"
        )
        answer.action = (
            "fix the route (the config's [[routes]]): send this kernel to a builder with its "
            "compiler; every run tries again, it is never quarantined"
        )
    elif status in ("built", "published"):
        answer.status = "missing"
        answer.summary = (
            f"{status} in run {entry['run_id']} but not in the cache now "
            "(held back, or deleted outside drivers withdraw)"
        )
        answer.action = "the next run rebuilds it; see that run's report (vm-tests.json, push.json)"
    elif arrived is None:
        answer.status = "no_bundle"
        answer.summary = (
            f"no bundle: gs://{stores.bundles.bucket_name}/{layout.bundle_object(key.kernel)} "
            "does not exist, so no run has seen this kernel"
        )
        answer.action = (
            "add its bundle (the kernel crawler, or drivers bundle ... --upload "
            f"gs://{stores.bundles.bucket_name}); the next nightly builds it on {builder}"
        )
    else:
        answer.status = "pending"
        answer.summary = f"not built yet: its bundle arrived {arrived}; builder {builder} takes it"
        answer.action = (
            "the next nightly builds it, or now: trigger upstream_drivers with "
            f'{{"select": "{key.kernel}", "driver_versions": ["{version}"]}}'
        )
    return answer


def render(exp: Explanation) -> str:
    """One screen for a person."""
    bundle = f"bundle {exp.bundle} (arrived {exp.arrived})" if exp.bundle else "no bundle"
    lines = [f"{exp.kernel} ({exp.family}): {bundle}"]
    # Drivers with the same answer (e.g. every one of a kernel without a bundle) share a row.
    groups: dict[tuple, list[Answer]] = {}
    for a in exp.answers:
        groups.setdefault((a.status, a.summary, a.action, tuple(a.details)), []).append(a)
    for (status, summary, action, details), group in groups.items():
        if len(group) == 1:
            lines.append(
                f"  {group[0].driver_version:<12} {group[0].kind:<4} {status:<13} {summary}"
            )
        else:
            which = "all" if len(group) == len(exp.answers) else f"{len(group)} drivers"
            lines.append(f"  {which:<17} {status:<13} {summary}")
            if which != "all":
                lines.append(
                    f"  {'':<31}({', '.join(f'{a.driver_version} {a.kind}' for a in group)})"
                )
        lines += [f"  {'':<31}{d}" for d in details]
        if action:
            lines.append(f"  {'':<31}-> {action}")
    present = sum(a.present for a in exp.answers)
    lines.append(f"{present} of {len(exp.answers)} driver(s) available to agents on this kernel")
    return "\n".join(lines)


def cmd_why(args: argparse.Namespace) -> int:
    """Exit 0 when every driver asked about is available, 1 otherwise, 2 on bad input."""
    from drivers.domain.config import load_config
    from drivers.store.storage import Stores, client_from_environment

    try:
        exp = explain(
            Stores(client_from_environment()),
            load_config(),
            args.kernel,
            tuple(args.driver_version or ()),
            tuple(args.kind or KINDS),
        )
    except ValueError as e:
        print(f"drivers why: {e}", file=sys.stderr)
        return 2
    print(json.dumps(exp.to_json(), indent=1) if args.json else render(exp))
    return 0 if all(a.present for a in exp.answers) else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("why", help="does a driver exist for a kernel, or why not")
    p.add_argument("kernel", help="a kernel release, e.g. 5.4.0-62-generic")
    p.add_argument("--driver-version", action="append", help="repeatable; default: all")
    p.add_argument("--kind", action="append", choices=KINDS, help="repeatable; default: both")
    p.add_argument("--json", action="store_true", help="the answer as JSON")
    p.set_defaults(func=cmd_why)
