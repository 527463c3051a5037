"""The ``drivers`` command: one small verb per job over the shared model.

Human-readable messages go to stderr, machine-readable output to stdout. Bad input
exits with status 2 and a message naming the culprit.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import os
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from drivers.domain.config import Config, load_config
from drivers.domain.errors import DriversError
from drivers.domain.kernels import Kernel, read_kernel_list
from drivers.domain.layout import Buckets, kernels_from_bundles
from drivers.domain.names import CacheIndex, check_driver_version, check_kinds
from drivers.domain.selectors import parse_selector


class UsageError(DriversError):
    """Bad input: reported as one message, exit status 2."""


def _gs_names(uri: str) -> Iterator[str]:
    """Object names under a gs:// URI, relative to its prefix."""
    from drivers.store import storage  # google-cloud-storage only when a bucket is used

    bucket, prefix = storage.parse_gs_uri(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    store = storage.ObjectStore(storage.client_from_environment(), bucket)
    for info in store.list(prefix):
        yield info.name[len(prefix) :]


def load_kernels(source: str) -> tuple[list[Kernel], list[str]]:
    """Kernels from a list file (bad lines are fatal) or a bundle bucket listing (bad
    bundle names are reported and skipped)."""
    if source.startswith("gs://"):
        return kernels_from_bundles(_gs_names(source), source.rstrip("/"))
    path = Path(source)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise UsageError(f"cannot read kernel list {path}: {e.strerror}") from None
    kernels, problems = read_kernel_list(lines, str(path))
    bad = [p for p in problems if not p.duplicate]
    if bad:
        shown = "\n".join(f"  {p}" for p in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise UsageError(f"{len(bad)} line(s) of {path} are not kernel releases:\n{shown}{more}")
    return kernels, [str(p) for p in problems]


def load_cache(source: str | None) -> CacheIndex:
    """What a driver cache holds, from a bucket listing or a file of object names."""
    index = CacheIndex()
    if source is None:
        return index
    if source.startswith("gs://"):
        return index.add_names(_gs_names(source))
    try:
        text = Path(source).read_text()
    except OSError as e:
        raise UsageError(f"cannot read cache listing {source}: {e.strerror}") from None
    # One name per line: gs://<bucket>/<version>/<name> or <version>/<name>.
    lines = (line.strip() for line in text.splitlines())
    return index.add_names(
        line[5:].partition("/")[2] if line.startswith("gs://") else line for line in lines if line
    )


def cmd_plan(args: argparse.Namespace) -> int:
    from drivers.domain.planner import plan

    # A short-lived process that allocates up to millions of acyclic objects: the cyclic
    # collector finds nothing to free and costs a third of the run.
    gc.disable()
    config: Config = load_config(args.config)
    versions = args.driver_version or list(config.driver_versions)
    if not versions:
        raise UsageError(
            "no driver version: pass --driver-version or list driver_versions in config"
        )
    for v in versions:
        check_driver_version(v)
    kinds = check_kinds(k.strip() for k in args.kinds.split(",") if k.strip())
    if args.blocklist:
        config = dataclasses.replace(config, blocklist_paths=tuple(map(Path, args.blocklist)))
    if args.slots is not None and args.slots < 1:
        raise UsageError(f"--slots must be at least 1, not {args.slots}")

    kernels, problems = load_kernels(args.kernels)
    if args.select:
        kernels = parse_selector(args.select).filter(kernels)
    cache = load_cache(args.cache)

    result = plan(kernels, versions, kinds, cache.done, config, force=args.force, slots=args.slots)
    out = result.to_json(config.builders)
    out["inputs"] = {
        "kernels": len(kernels),
        "driver_versions": versions,
        "kinds": list(kinds),
        "select": args.select,
        "force": args.force,
        "kernel_problems": problems,
        "cache_unknown_names": cache.unknown_count,
        "cache_unknown_examples": cache.unknown_examples,
    }
    text = json.dumps(out)  # compact: the C encoder; pipe through jq to read
    if args.output:
        Path(args.output).write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    _print_summary(out, cache)
    return 0


def _print_summary(out: dict, cache: CacheIndex) -> None:
    s, i = out["summary"], out["inputs"]
    err = sys.stderr
    print(
        f"{i['kernels']} kernels x {len(i['driver_versions'])} driver versions x "
        f"{len(i['kinds'])} kinds = {s['candidates']} candidates",
        file=err,
    )
    forced = f" (+{s['forced']} cached, rebuilt by --force)" if s["forced"] else ""
    print(
        f"done {s['done']}, blocked {s['blocked']}, unroutable {s['unroutable']}, "
        f"to_build={s['to_build']}{forced}",
        file=err,
    )
    for name, b in out["builders"].items():
        print(
            f"  {name:8} mod {b['mod']:6}  bpf {b['bpf']:6}  kernels {b['kernels']:5}  "
            f"shards {b['shards']:4}",
            file=err,
        )
    if out["shards"]:
        print(
            f"makespan {out['makespan_s'] / 3600:.2f} h on {out['slots']} slots "
            f"(lower bound {out['lower_bound_s'] / 3600:.2f} h)",
            file=err,
        )
    for rule, n in list(out["blocked_by"].items())[:5]:
        print(f"  blocked by {rule}: {n}", file=err)
    if out["unroutable_kernels"]:
        k = out["unroutable_kernels"]
        print(f"  no builder takes {len(k)} kernel(s), e.g. {', '.join(k[:3])}", file=err)
    for p in i["kernel_problems"][:10]:
        print(f"  warning: {p}", file=err)
    if cache.unknown_count:
        print(
            f"  warning: {cache.unknown_count} cache object(s) are not driver names, "
            f"e.g. {cache.unknown_examples[0]}",
            file=err,
        )


def cmd_gcs(args: argparse.Namespace) -> int:
    """Start, stop or show the embedded GCS (fake-gcs-server, data under DRIVERS_GCS_ROOT)."""
    from drivers.store.emulator import EmbeddedGCS

    if args.action == "buckets":  # on the emulator STORAGE_EMULATOR_HOST names (compose)
        from drivers.store.emulator import create_buckets

        url = os.environ.get("STORAGE_EMULATOR_HOST")
        if not url:
            raise UsageError(
                "drivers gcs buckets: STORAGE_EMULATOR_HOST is not set; on GCS the buckets "
                "are created with the deployment (docs/deployment.md)"
            )
        create_buckets(url, Buckets.from_env().all())
        print(f"buckets on {url}: {', '.join(Buckets.from_env().all())}", file=sys.stderr)
        return 0
    server = EmbeddedGCS(port=args.port)
    if args.action == "down":
        server.stop()
        print(f"embedded GCS stopped (data kept in {server.root}/data)", file=sys.stderr)
        return 0
    if args.action == "status":
        running = server.is_running()
        print(f"embedded GCS {'running' if running else 'stopped'}, data in {server.root}/data")
        return 0 if running else 1
    server.ensure_running()
    buckets = Buckets.from_env()
    server.create_buckets(buckets.all())
    print(f"embedded GCS at {server.url}, data in {server.root}/data", file=sys.stderr)
    print(f"  buckets: {', '.join(buckets.all())}", file=sys.stderr)
    print(f"export STORAGE_EMULATOR_HOST={server.url}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """List or fetch drivers in a cache (the embedded one or GCS)."""
    from drivers.domain.names import parse_object_name
    from drivers.store import storage

    uri = args.cache or f"gs://{Buckets.from_env().drivers}"
    bucket, prefix = storage.parse_gs_uri(uri)
    store = storage.ObjectStore(storage.client_from_environment(), bucket)
    if args.action == "get":
        if not args.names:
            raise UsageError("drivers cache get: name the objects, e.g. 2.3.0/collector-<k>.ko.gz")
        paths = store.download_many([prefix + n for n in args.names], args.out)
        for path in paths.values():
            print(path)
        return 0
    for info in store.list(prefix + (f"{args.driver_version}/" if args.driver_version else "")):
        entry = parse_object_name(info.name[len(prefix) :])
        if entry is None or (args.kernel and entry.key.kernel != args.kernel):
            continue
        what = "unavailable" if entry.unavailable else f"{info.size:>9} B"
        print(f"{info.name[len(prefix) :]}\t{what}\t{info.created:%Y-%m-%d %H:%M}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Summarize a run of upstream_drivers from its report in the work bucket."""
    from drivers.ops import report

    return report.print_report(args.run_id)


def cmd_run_dag(args: argparse.Namespace) -> int:
    """One real run of a DAG on the embedded default (LocalExecutor, parallel tasks)."""
    from drivers.domain import dag_ids
    from drivers.ops import report
    from drivers.ops.embedded import EmbeddedAirflow

    conf = json.loads(args.conf) if args.conf else None
    started = datetime.now(UTC)
    with EmbeddedAirflow() as airflow:
        log = airflow.home / f"{args.dag_id}.log"
        print(f"running {args.dag_id} (Airflow log: {log})", file=sys.stderr)
        status = airflow.dags_test(
            args.dag_id, conf, log=log, progress=lambda line: print(line, file=sys.stderr)
        )
    print(f"{args.dag_id}: {'success' if status == 0 else 'FAILED'}", file=sys.stderr)
    printer = {
        dag_ids.UPSTREAM_DRIVERS: report.print_report,
        dag_ids.BACKFILL_DRIVERS: report.print_report,
        dag_ids.CPAAS_DRIVERS: report.print_cpaas_report,
    }
    if args.dag_id in printer and printer[args.dag_id](since=started) == 1 and status == 0:
        status = 1
    return status


def cmd_ui(args: argparse.Namespace) -> int:
    """The embedded default's Airflow UI (api-server, every user an admin) with the
    coverage page, until interrupted."""
    from drivers.ops.embedded import EmbeddedAirflow

    with EmbeddedAirflow(port=args.port) as airflow:
        url = f"http://127.0.0.1:{airflow.port}"
        print(f"Airflow UI: {url}/  driver coverage: {url}/plugin/driver-coverage", file=sys.stderr)
        print(f"(log: {airflow.home}/api-server.log; Ctrl-C stops it)", file=sys.stderr)
        try:
            while airflow.api_alive():
                time.sleep(1)
        except KeyboardInterrupt:
            return 0
    print(f"the api-server exited; see {airflow.home}/api-server.log", file=sys.stderr)
    return 1


def _lazy(module: str, function: str):
    """A verb implemented elsewhere, imported only when it runs (keeps `plan` fast)."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="drivers", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="pipeline config (default: $DRIVERS_CONFIG or shipped)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="decide which drivers to build and split them into shards")
    p.add_argument("--kernels", required=True, help="kernel list FILE or gs://BUCKET[/PREFIX]")
    p.add_argument("--driver-version", action="append", help="repeatable; default: config")
    p.add_argument("--blocklist", action="append", help="repeatable; replaces config's")
    p.add_argument("--cache", help="cache listing FILE or gs://BUCKET[/PREFIX]")
    p.add_argument("--select", help="kernel selector, e.g. 'el8:4.18.0-305..4.18.0-372'")
    p.add_argument("--kinds", default="mod,bpf", help="mod,bpf (default both)")
    p.add_argument("--force", action="store_true", help="rebuild drivers already cached")
    p.add_argument("--slots", type=int, help="builder slots (default: config)")
    p.add_argument("--output", help="write the plan JSON here instead of stdout")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("bundle", help="make kernel bundles")
    p.add_argument("source", choices=["debian"], help="where the kernel headers come from")
    p.add_argument("unames", nargs="*", metavar="UNAME", help="e.g. 6.1.0-47-cloud-amd64")
    p.add_argument(
        "--list", action="store_true", help="print every kernel each Debian release offers"
    )
    p.add_argument("--out", default=".cache/bundles", help="folder for bundle-<uname>.tgz")
    p.add_argument("--deb-cache", default=".cache/debs", help="downloaded .deb packages")
    p.add_argument(
        "--apt-state",
        help="private apt state per suite (default: beside --deb-cache, e.g. .cache/apt)",
    )
    p.add_argument(
        "--refresh", action="store_true", help="apt-get update every suite's lists first"
    )
    p.add_argument("--upload", metavar="gs://BUCKET", help="upload, never overwriting")
    p.add_argument(
        "--boot-images", metavar="gs://BUCKET", help="also store each kernel's boot image there"
    )
    p.add_argument(
        "--boot-modules",
        metavar="MOD,...",
        help="modules drivers depend on, kept beside each boot image (default: the config's)",
    )
    p.set_defaults(func=_lazy("drivers.build.bundles", "cmd_bundle"))

    p = sub.add_parser("image", help="OCI drivers images: build, mirror")
    image_sub = p.add_subparsers(dest="action", required=True)
    b = image_sub.add_parser("build", help="make an OCI image layout from driver trees")
    b.add_argument("--out", required=True, type=Path, help="layout folder, or tar with --tar")
    b.add_argument("--tar", action="store_true", help="write the layout as one tar file")
    b.add_argument(
        "--arch",
        action="append",
        required=True,
        metavar="ARCH=DIR",
        help="OCI arch (amd64, s390x, ppc64le) and its tree; repeat an arch to add layers",
    )
    b.set_defaults(func=_lazy("drivers.build.oci", "cmd_image"))
    m = image_sub.add_parser(
        "mirror", help="copy an OCI image layout into the work bucket (cpaas mirror_image)"
    )
    m.add_argument("layout", type=Path, help="OCI image layout, folder or tar")
    m.add_argument("--run-id", required=True, help="the cpaas_drivers run it is for")
    m.add_argument("--architectures", help="OCI names, comma-separated (default: config's)")
    m.add_argument("--force", action="store_true", help="even if the digest is unchanged")
    m.add_argument("--xcom", type=Path, help="also write the targets JSON here")
    m.set_defaults(func=_lazy("drivers.flows.cpaas", "cmd_mirror"))
    d = image_sub.add_parser(
        "demo", help="the demo's drivers images: upstream cache + downstream extras"
    )
    d.add_argument("--out", required=True, type=Path, help="folder for the image tars")
    d.set_defaults(func=_lazy("drivers.flows.cpaas", "cmd_demo_images"))

    p = sub.add_parser("vm-test", help="boot a kernel under QEMU and load its drivers")
    p.add_argument(
        "drivers", nargs="+", help="one kernel's driver files, e.g. collector-6.1.0-56-amd64.ko.gz"
    )
    p.add_argument("--driver-version", default="0.0.0", help="recorded in the result")
    p.add_argument("--boot-image", type=Path, help="kernel image (default: Debian's, via apt)")
    p.add_argument("--boot-images", metavar="gs://BUCKET", help="take it from this bucket")
    p.add_argument(
        "--sources",
        metavar="gs://BUCKET",
        help="the sources bucket: V's prepared sources give its consumer, scap-open "
        "(default: the sources bucket of the environment)",
    )
    p.add_argument("--cache", default=".cache", help="where Debian packages are kept")
    p.add_argument("--timeout", type=float, help="seconds for the whole VM (default: by count)")
    p.add_argument("--accel", default="tcg", help="QEMU accelerator (kvm where it works)")
    p.set_defaults(func=_lazy("drivers.build.vmtest", "cmd_vm_test"))

    p = sub.add_parser("sources", help="prepared driver sources: prepare")
    sources_sub = p.add_subparsers(dest="action", required=True)
    s = sources_sub.add_parser(
        "prepare", help="a falcosecurity-libs tree as <driver_version>.tgz, ready to build"
    )
    s.add_argument("tree", type=Path, help="the tree: a folder, or a .tar.gz of one top folder")
    s.add_argument("--driver-version", required=True, help="the version it is published as")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="write DIR/<driver_version>.tgz")
    where.add_argument(
        "--upload",
        metavar="gs://BUCKET",
        help="put it at the sources bucket root, never overwriting",
    )
    s.set_defaults(func=_lazy("drivers.build.sources", "cmd_sources"))

    p = sub.add_parser("build-shard", help="build one shard (what a builder image runs)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--shard", help="gs://WORK/staging/<run>/shards/<b>-<i>.json")
    where.add_argument(
        "--offline",
        metavar="DIR",
        help="the shard a worker staged into DIR, outputs left there (a sandboxed container)",
    )
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    p.set_defaults(func=_lazy("drivers.build.shard_run", "cmd_build_shard"))

    p = sub.add_parser(
        "build", help="build one kernel's drivers on this machine (as a shard would)"
    )
    p.add_argument("kernel", metavar="KERNEL", help="e.g. 6.1.0-56-amd64")
    p.add_argument("--driver-version", required=True, help="e.g. 2.3.0")
    p.add_argument("--kinds", default="mod,bpf", help="mod,bpf (default both)")
    p.add_argument(
        "--sources", required=True, help="prepared sources: <V>.tgz or gs://BUCKET/V.tgz"
    )
    p.add_argument("--bundle", required=True, help="bundle-<kernel>.tgz or gs://BUCKET/OBJECT")
    p.add_argument("--out", required=True, help="folder for the drivers (cache names) and logs")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    p.add_argument(
        "--builder", default=None, help="the builder to build as (default: the kernel's route)"
    )
    p.add_argument(
        "--here",
        action="store_true",
        help="with this machine's toolchain, even on the docker runtime (default there: in "
        "the builder's image, sandboxed)",
    )
    p.add_argument("--records", default=None, help=argparse.SUPPRESS)  # the in-image run's
    p.set_defaults(func=_lazy("drivers.build.one_kernel", "cmd_build"))

    p = sub.add_parser(
        "integration-tests", help="upstream_drivers' VM load tests of a run's staged drivers"
    )
    p.add_argument("--run-id", required=True)
    p.add_argument("--mode", default="enforce", help="enforce, warn or off")
    p.add_argument("--budget-s", type=float, help="time budget (default: the config's)")
    p.add_argument("--xcom", type=Path, help="also write the summary JSON here")
    p.set_defaults(func=_lazy("drivers.flows.upstream", "cmd_integration_tests"))

    p = sub.add_parser("cache", help="list (ls) or fetch (get) drivers in a cache")
    p.add_argument("action", choices=["ls", "get"])
    p.add_argument("names", nargs="*", help="get: object names, e.g. 2.3.0/collector-<k>.ko.gz")
    p.add_argument("--cache", help="gs://BUCKET[/PREFIX] (default: the configured cache)")
    p.add_argument("--driver-version", help="ls: only this driver version")
    p.add_argument("--kernel", help="ls: only this kernel")
    p.add_argument("--out", default=".", help="get: destination folder")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("report", help="summary of an upstream_drivers run")
    p.add_argument("run_id", nargs="?", help="default: the newest run")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("ui", help="the embedded Airflow UI with the coverage page")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("run-dag", help="run a DAG once on the embedded Airflow")
    p.add_argument("dag_id")
    p.add_argument("--conf", help="trigger parameters as JSON")
    p.set_defaults(func=cmd_run_dag)

    p = sub.add_parser(
        "gcs",
        help="embedded GCS: up (start + create buckets), down, status; buckets (create them "
        "on the emulator STORAGE_EMULATOR_HOST names, e.g. docker-compose's)",
    )
    p.add_argument("action", choices=["up", "down", "status", "buckets"])
    p.add_argument("--port", type=int, default=4443)
    p.set_defaults(func=cmd_gcs)

    from drivers.store.runtime_config import add_parser as add_config_parser  # no storage import

    add_config_parser(sub)  # drivers config show|get|set|add

    from drivers.ops.why import add_parser as add_why_parser

    add_why_parser(sub)  # drivers why KERNEL

    from drivers.ops.withdraw import add_parser as add_withdraw_parser

    add_withdraw_parser(sub)  # drivers withdraw KERNEL ...

    from drivers.ops.costs import add_parser as add_costs_parser

    add_costs_parser(sub)  # drivers costs: [costs] calibrated from the build records

    from drivers.ops.deploy import add_parser as add_deploy_parser

    add_deploy_parser(sub)  # drivers deploy network-policy

    from drivers.ops.images import add_parser as add_images_parser

    add_images_parser(sub)  # drivers images build [RELEASE...]: the builder images (podman)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DriversError, ValueError) as e:
        print(f"drivers {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
