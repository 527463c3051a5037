"""The cpaas_drivers run, step by step, without Airflow.

A downstream build system publishes a *drivers image* (``/kernel-modules/<version>/``,
``/FAILURES/<kernel>/<version>/<kind>.log``). Each run mirrors it into the work bucket
(an OCI layout per digest: the embedded "internal registry"), extracts each architecture,
fails loudly on compile failures, pushes the image's new drivers into the CPaaS cache
``cpaas/<arch>/`` (the push of :mod:`drivers.store.push`, never overwriting), takes from the
caches what the image lacks, and rebuilds the CPaaS support packages (the packaging of
:mod:`drivers.build.packages`). An image whose digest the last successful run already took is
"unchanged": nothing else runs.

As in :mod:`drivers.flows.upstream`, each public function is one task's work and returns a
small dict; big documents live under ``staging/cpaas/<run_id>/`` and
``reports/cpaas/<run_id>/`` in the work bucket.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from drivers.build import oci
from drivers.domain import layout
from drivers.domain.config import Config
from drivers.domain.dag_ids import CPAAS_DRIVERS
from drivers.domain.errors import RunInputError
from drivers.domain.layout import report_prefix
from drivers.domain.verdict import SUCCESS, Verdict
from drivers.store.push import Candidate, push_new
from drivers.store.storage import ObjectNotFound, Stores, read_json, write_json

STATE_OBJECT = layout.run_state_object(CPAAS_DRIVERS)  # the digest the last good run took
FIRST_LINES = 20  # of each failure log, in the report


REPORTS = report_prefix("cpaas")  # every run's reports: reports/cpaas/<run_id>/
UPSTREAM_ARCH = layout.cache_arch("amd64")  # its packages also carry the upstream drivers


def reports(run_id: str) -> str:
    return report_prefix(layout.cpaas_run(run_id))


def staging(run_id: str) -> str:
    return layout.staging_prefix(layout.cpaas_run(run_id))


def mirror_report(run_id: str) -> str:
    """What mirror_image found (digest, architectures, unchanged): its XCom is the
    extraction targets only (the mirror pod's too), so the report reads this by name."""
    return f"{reports(run_id)}mirror.json"


@dataclass(frozen=True)
class CpaasParams:
    source_image: str
    architectures: tuple[str, ...]  # OCI names
    dry_run: bool = False
    force: bool = False  # take the image even when its digest is unchanged

    @classmethod
    def from_params(cls, params: dict[str, Any], config: Config) -> CpaasParams:
        source = str(params.get("source_image") or config.cpaas["source_image"]).strip()
        if not source:
            raise RunInputError("source_image is empty: give an image reference or layout path")
        archs = tuple(dict.fromkeys(params.get("architectures") or config.cpaas["architectures"]))
        for arch in archs:
            layout.cache_arch(arch)  # UnknownArchitecture (a ValueError) names the known ones
        return cls(source, archs, bool(params.get("dry_run")), bool(params.get("force")))


# --- steps -------------------------------------------------------------------------------


def mirror_image(stores: Stores, run_id: str, params: CpaasParams) -> list[dict[str, str]]:
    """Copy the source image (an OCI layout, folder or tar, at a path) into the work
    bucket's internal registry; returns what extract_drivers is mapped over. A registry
    reference needs the mirror pod (the kubernetes runtime), which copies it to a layout
    with skopeo and then calls :func:`mirror_opened`."""
    if "://" in params.source_image:
        raise RunInputError(
            f"source_image {params.source_image!r} is a registry reference: only the "
            "kubernetes runtime's mirror pod can copy it (skopeo). On the embedded default "
            "give the path of an OCI image layout, folder or tar (`drivers image build` "
            "makes one)"
        )
    with oci.open_image(Path(params.source_image)) as image:
        return mirror_opened(stores, run_id, image, params)


def mirror_opened(
    stores: Stores, run_id: str, image: oci.Image, params: CpaasParams
) -> list[dict[str, str]]:
    for arch in image.architectures():
        try:  # an image with an architecture no cache knows is a bad image
            layout.cache_arch(arch)
        except layout.UnknownArchitecture as e:
            raise oci.ImageError(f"image {image.digest} ({image.source}): {e}") from None
    selected = [a for a in params.architectures if a in image.manifests]
    if not selected:
        raise oci.ImageError(
            f"image {image.digest} ({image.source}) has none of the requested architectures "
            f"{list(params.architectures)}: it has {image.architectures()}"
        )
    try:
        last = read_json(stores.work, STATE_OBJECT)
    except ObjectNotFound:
        last = None
    prefix = layout.mirrored_image_prefix(image.digest)
    doc: dict[str, Any] = {
        "digest": image.digest,
        "source": params.source_image,
        "image": prefix,
        "architectures": selected,
        "absent": [a for a in params.architectures if a not in image.manifests],
        "unchanged": bool(
            last
            and not params.force
            and last["digest"] == image.digest
            and set(selected) <= set(last["architectures"])
        ),
        "last_success": last and last["run_id"],
    }
    if not doc["unchanged"]:
        doc |= oci.mirror_image(image, stores.work, prefix)
    write_json(stores.work, mirror_report(run_id), doc)
    return _targets(doc)


def _targets(mirror: dict[str, Any]) -> list[dict[str, str]]:
    """What extract_drivers is mapped over: one entry per architecture to take, none when
    the image is unchanged (every later task is then skipped)."""
    if mirror["unchanged"]:
        return []
    return [
        {"image": mirror["image"], "digest": mirror["digest"], "oci_arch": arch}
        for arch in mirror["architectures"]
    ]


def _ref_json(ref: oci.FileRef) -> list[Any]:
    return [ref.layer, ref.member, ref.size, ref.md5, ref.sha256]


def _ref(value: list[Any]) -> oci.FileRef:
    return oci.FileRef(*value)


def extract_drivers(stores: Stores, run_id: str, target: dict[str, str]) -> dict[str, Any]:
    """Read one architecture of the mirrored image (an entry of :func:`mirror_image`'s list): every
    driver hashed and verified, failure logs kept in the report. Writes the
    architecture's manifest to staging and what it found (rejected drivers, failure
    logs) to ``extract-<arch>.json`` in the reports."""
    oci_arch = target["oci_arch"]
    with oci.open_mirrored(stores.work, target["image"]) as image:
        result = oci.extract_drivers(image, oci_arch)
    arch = result.arch
    failures = []
    for f in result.failures:
        entry = {"arch": arch, "kernel": f.kernel, "driver_version": f.driver_version}
        entry |= {"kind": f.kind, "size": f.size}
        if f.size:
            log = f"{reports(run_id)}FAILURES/{arch}/{f.kernel}/{f.driver_version}/{f.kind}.log"
            stores.work.put(log, f.log, "text/plain")
            lines = f.log.decode(errors="replace").splitlines()
            entry |= {
                "log": f"gs://{stores.work.bucket_name}/{log}",
                "first_lines": lines[:FIRST_LINES],
            }
        failures.append(entry)
    manifest = {
        "arch": arch,
        "oci_arch": oci_arch,
        "image": target["image"],
        "digest": target["digest"],
        "drivers": {name: _ref_json(ref) for name, ref in result.drivers.items()},
        "rejected": result.rejected,
        "ignored": result.ignored,
        "failures": failures,
    }
    name = f"{staging(run_id)}{arch}/image.json"
    write_json(stores.work, name, manifest)
    found = {k: manifest[k] for k in ("arch", "digest", "rejected", "ignored", "failures")}
    report = write_json(stores.work, f"{reports(run_id)}extract-{arch}.json", found)
    return {
        "arch": arch,
        "oci_arch": oci_arch,
        "manifest": name,
        "drivers": len(result.drivers),
        "rejected": len(result.rejected),
        "failures": sum(1 for f in failures if f["size"]),
        "report": report,
    }


def find_compile_failures(stores: Stores, extracted: list[dict]) -> dict[str, Any]:
    """The image's non-empty failure logs (empty ones are no failure), from what
    extract_drivers found in each architecture (its summaries)."""
    failures, empty = [], 0
    for e in extracted:
        for f in _read_report(stores, e)["failures"]:
            if f["size"]:
                failures.append(f)
            else:
                empty += 1
    return {"failures": failures, "empty_logs": empty}


def _read_report(stores: Stores, summary: dict[str, Any] | None) -> Any:
    """The report document a step's summary names (None: the step wrote none)."""
    if not summary or not summary.get("report"):
        return None
    return read_json(
        stores.work, summary["report"].removeprefix(f"gs://{stores.work.bucket_name}/")
    )


def describe_failures(failures: list[dict]) -> str:
    """What the failed test prints: kernel, version, kind and the log's first lines."""
    out = [f"{len(failures)} compile failure(s) in the drivers image:"]
    for f in failures:
        out.append(f"- {f['kernel']} {f['driver_version']} {f['kind']} ({f['arch']}): {f['log']}")
        out += [f"    {line}" for line in f["first_lines"]]
    return "\n".join(out)


def push_drivers(stores: Stores, run_id: str, extracted: dict, dry_run: bool) -> dict[str, Any]:
    """The image's verified drivers into ``cpaas/<arch>/``, never overwriting."""
    manifest = read_json(stores.work, extracted["manifest"])
    arch, oci_arch = manifest["arch"], manifest["oci_arch"]
    refs = {n: _ref(v) for n, v in manifest["drivers"].items() if n not in manifest["rejected"]}
    candidates = {n: Candidate(r.size, r.md5) for n, r in refs.items()}

    def load(names: list[str]):
        with oci.open_mirrored(stores.work, manifest["image"]) as image:
            wanted = {n: refs[n] for n in names}
            for name, data in oci.read_files(image, oci_arch, wanted):
                yield name, lambda data=data: data

    prefix = layout.cpaas_prefix(arch)
    result = push_new(stores.cpaas_drivers, prefix, candidates, load, dry_run=dry_run)
    doc = result.to_json() | {"arch": arch, "dry_run": dry_run}
    if dry_run:
        doc["would_create"] = result.new
    report = write_json(stores.work, f"{reports(run_id)}push-{arch}.json", doc)
    return {
        "arch": arch,
        "manifest": extracted["manifest"],
        "created": len(result.created),
        "identical": len(result.identical),
        "different": len(result.different),
        "new": len(result.new),
        "dry_run": dry_run,
        "report": report,
    }


def _upstream_arch(arch: str) -> bool:
    return arch == UPSTREAM_ARCH  # upstream builders build x86_64 only


def pull_missing(stores: Stores, run_id: str, pushed: dict) -> dict[str, Any]:
    """What the caches have and the image lacks joins the package set: the CPaaS cache
    of the architecture, and for x86_64 the upstream cache (downstream wins where both
    have a driver). Packages are built for the versions of the image and the CPaaS cache."""
    manifest = read_json(stores.work, pushed["manifest"])
    arch = manifest["arch"]
    image = set(manifest["drivers"]) - set(manifest["rejected"])
    prefix = layout.cpaas_prefix(arch)
    cpaas = {i.name[len(prefix) :] for i in stores.cpaas_drivers.list(prefix)}
    versions = sorted({n.split("/", 1)[0] for n in image | cpaas})
    upstream: set[str] = set()
    if _upstream_arch(arch):
        for version in versions:
            upstream |= {i.name for i in stores.drivers.list(f"{version}/")}
    from_cpaas = sorted(cpaas - image)
    from_upstream = sorted(upstream - image - cpaas)
    doc = {"arch": arch, "from_cpaas": from_cpaas, "from_upstream": from_upstream}
    report = write_json(stores.work, f"{reports(run_id)}pull-{arch}.json", doc)
    return {
        "arch": arch,
        "versions": versions,
        "from_cpaas": len(from_cpaas),
        "from_upstream": len(from_upstream),
        "package_set": len(image | cpaas | upstream),
        "dry_run": pushed["dry_run"],
        "report": report,
    }


def build_support_packages(
    stores: Stores, run_id: str, pulled: dict, now: datetime | None = None
) -> dict[str, Any]:
    """CPaaS support packages under ``cpaas/<arch>/`` in the support bucket, by the same
    code and in the same layout as the upstream ones."""
    arch = pulled["arch"]
    if pulled["dry_run"]:
        return {"arch": arch, "dry_run": True}
    result = publish_cpaas_packages(stores, arch, pulled["versions"], now or datetime.now(UTC))
    report = write_json(stores.work, f"{reports(run_id)}packages-{arch}.json", result)
    summary = {k: result[k] for k in ("built", "unchanged", "index", "matrix")}
    return {"arch": arch} | summary | {"report": report}


def publish_cpaas_packages(
    stores: Stores, arch: str, versions: list[str], timestamp: datetime
) -> dict[str, Any]:
    """Rebuild the CPaaS support packages of ``arch`` whose driver set changed (also
    after ``drivers withdraw`` removed an upstream driver the x86_64 ones carry)."""
    from drivers.build.packages import DriverSource, publish_support_packages

    root = layout.cpaas_prefix(arch)  # the CPaaS cache's prefix is its packages' root too
    sources = [DriverSource(stores.cpaas_drivers, root, "downstream")]
    if _upstream_arch(arch):  # the upstream drivers too, where the CPaaS cache lacks them
        sources.append(DriverSource(stores.drivers))
    return publish_support_packages(
        sources, stores.support, versions, timestamp=timestamp, root=root
    )


# The steps mapped per architecture, in the order they run.
PER_ARCHITECTURE = ("extract_drivers", "push_drivers", "pull_missing", "build_support_packages")


def report(
    stores: Stores,
    run_id: str,
    params: CpaasParams,
    steps: dict[str, Any],
    failed_tasks: list[str],
) -> dict[str, Any]:
    """The run's verdict (:mod:`drivers.domain.verdict`) from every step's summary
    (``steps``, by task id; a step mapped per architecture gives the list of its
    architectures' summaries), written to ``reports/cpaas/<run_id>/report.json``:
    failed when the image carries compile failures, a driver failed verification or a
    task failed, after push and packages did what they could. A successful run records
    the image's digest (the next run with it is "unchanged")."""
    steps = dict(steps)
    for step in PER_ARCHITECTURE:  # lazy XCom sequences made lists: JSON, read twice
        steps[step] = [summary for summary in steps.get(step) or () if summary]
    try:
        mirror = read_json(stores.work, mirror_report(run_id))
    except ObjectNotFound:
        mirror = None  # mirror_image failed
    by_arch = {
        step: {summary["arch"]: summary for summary in steps[step]} for step in PER_ARCHITECTURE
    }
    found = {arch: _read_report(stores, e) for arch, e in by_arch["extract_drivers"].items()}
    failures = [f for doc in found.values() for f in doc["failures"] if f["size"]]
    rejected = sum(len(doc["rejected"]) for doc in found.values())
    problems = []
    if failures:
        problems.append(f"{len(failures)} compile failure(s) in the drivers image")
    if rejected:
        problems.append(f"{rejected} driver(s) in the image failed verification (not pushed)")
    if mirror is None and not failed_tasks and not problems:
        problems.append("no image was mirrored")
    verdict = Verdict.judge(failed_tasks, problems, unchanged=bool(mirror and mirror["unchanged"]))
    architectures = {
        arch: {
            "push": _read_report(stores, by_arch["push_drivers"].get(arch)),
            "pull": _read_report(stores, by_arch["pull_missing"].get(arch)),
            "packages": _read_report(stores, by_arch["build_support_packages"].get(arch)),
            "rejected": found[arch]["rejected"] or None,
        }
        for arch in sorted(found)
    }
    doc = verdict.document(
        run_id,
        params.__dict__,
        steps,
        dag_id=CPAAS_DRIVERS,
        mirror=mirror,
        compile_failures=failures,
        architectures=architectures,
    )
    uri = write_json(stores.work, f"{reports(run_id)}report.json", doc)
    if verdict.status == SUCCESS and not params.dry_run:
        state = {"run_id": run_id, "digest": mirror["digest"]}
        write_json(stores.work, STATE_OBJECT, state | {"architectures": mirror["architectures"]})
    return verdict.to_json(uri)


def cleanup_staging(stores: Stores, run_id: str) -> int:
    return stores.work.delete_prefix(staging(run_id))


# --- the embedded demo ---------------------------------------------------------------------

# What `make run-cpaas` adds to the upstream run's drivers: downstream RHEL drivers
# (synthetic: nothing can build s390x or ppc64le modules here) and one compile failure.
DEMO_KERNELS = ("5.14.0-284.11.1.el9_2", "5.14.0-362.8.1.el9_3")
DEMO_FAILURE = (
    "5.14.0-362.8.1.el9_3.x86_64",
    "bpf",
    b"probe.c:212:9: error: call to undeclared function 'bpf_probe_read_kernel_str'\n"
    b"  212 |         bpf_probe_read_kernel_str(buf, sizeof(buf), name);\n"
    b"      |         ^\n1 error generated.\n",
)


def make_demo_images(stores: Stores, out: Path, versions: tuple[str, ...]) -> dict[str, Path]:
    """Two multi-arch drivers images, as the downstream build would publish them: the
    upstream cache's drivers plus downstream ones, first with a compile failure
    (``with-failures.tar``), then fixed (``fixed.tar``). Same inputs, same digests."""
    import shutil
    import tempfile

    from drivers.build.synthetic import driver
    from drivers.domain.names import DriverKey

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".demo-") as tmp:
        trees = {a: Path(tmp) / a for a in layout.ARCH_TO_CACHE}
        # Downstream ships no real-time kernels: the rt drivers are what pull_missing takes.
        upstream = [
            i.name
            for i in stores.drivers.list()
            if i.name.split("/")[0] in versions and "-rt-" not in i.name
        ]
        stores.drivers.download_many(upstream, trees["amd64"] / oci.KERNEL_MODULES)
        for oci_arch, tree in trees.items():
            arch = layout.cache_arch(oci_arch)
            for kernel in DEMO_KERNELS:
                for version in versions:
                    for kind in ("mod", "bpf"):
                        key = DriverKey(f"{kernel}.{arch}", version, kind)
                        path = tree / oci.KERNEL_MODULES / key.object_name()
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_bytes(driver(key, arch, size=64 << 10))
        kernel, kind, log = DEMO_FAILURE
        failure = trees["amd64"] / oci.FAILURES / kernel / versions[-1] / f"{kind}.log"
        failure.parent.mkdir(parents=True)
        failure.write_bytes(log)
        (failure.parent / "mod.log").write_bytes(b"")  # an empty log is no failure
        images = {"with-failures": out / "with-failures.tar", "fixed": out / "fixed.tar"}
        for path in images.values():
            path.unlink(missing_ok=True)
        oci.build_image(trees, images["with-failures"], tar=True)
        shutil.rmtree(trees["amd64"] / oci.FAILURES / kernel)
        oci.build_image(trees, images["fixed"], tar=True)
    return images


# --- CLI ---------------------------------------------------------------------------------


def cmd_demo_images(args: Any) -> int:
    """``drivers image demo --out DIR``: the images `make run-cpaas` runs."""
    from drivers.domain.config import load_config
    from drivers.store.storage import client_from_environment

    versions = load_config(args.config).driver_versions
    images = make_demo_images(Stores(client_from_environment()), Path(args.out), versions)
    for name, path in images.items():
        print(f"{name}: {path}")
    return 0


def cmd_mirror(args: Any) -> int:
    """``drivers image mirror LAYOUT --run-id ID``: the mirror_image step outside Airflow
    (the production mirror pod runs it after skopeo); prints the extraction targets as
    JSON and writes them to ``--xcom`` when given."""
    import json

    from drivers.domain.config import load_config
    from drivers.store.storage import client_from_environment

    config = load_config(args.config)
    raw = {"source_image": str(args.layout), "force": args.force}
    if args.architectures:
        raw["architectures"] = [a for a in args.architectures.split(",") if a]
    params = CpaasParams.from_params(raw, config)
    stores = Stores(client_from_environment())
    with oci.open_image(Path(args.layout)) as image:
        targets = mirror_opened(stores, args.run_id, image, params)
    text = json.dumps(targets)
    if args.xcom:
        Path(args.xcom).write_text(text)
    print(text)
    return 0
