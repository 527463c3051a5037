"""The cpaas_drivers steps against the embedded GCS, in the DAG's order but without
Airflow (tests/test_cpaas_e2e.py runs them through Airflow): real OCI layouts, real
mirroring, pushing and packaging; bad images push nothing."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
import zipfile
from pathlib import Path

import pytest

from drivers.build import oci
from drivers.build.synthetic import driver
from drivers.domain import layout
from drivers.domain.config import load_config
from drivers.domain.errors import RunInputError
from drivers.domain.names import DriverKey
from drivers.flows import cpaas
from drivers.store.storage import Stores, client_from_environment

K1, K2, K3 = "5.14.0-284.11.1.el9_2", "5.14.0-362.8.1.el9_3", "4.18.0-477.10.1.el8_8"


def arch_kernel(kernel: str, arch: str) -> str:
    return f"{kernel}.{arch}"


def drivers_tree(root: Path, arch: str, kernels=(K1, K2), versions=("2.3.0",), extra=None):
    """/kernel-modules/<version>/ with a module and a probe per kernel, plus ``extra``."""
    files = {}
    for version in versions:
        for k in kernels:
            kernel = arch_kernel(k, arch)
            for kind in ("mod", "bpf"):
                key = DriverKey(kernel, version, kind)
                files[f"kernel-modules/{key.object_name()}"] = driver(key, arch)
    files |= extra or {}
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def make_image(tmp_path: Path, archs=("amd64", "s390x", "ppc64le"), extra=None, **kw) -> Path:
    trees = {
        a: drivers_tree(tmp_path / f"tree-{a}", oci.cache_arch(a), extra=(extra or {}).get(a), **kw)
        for a in archs
    }
    out = tmp_path / f"image-{uuid.uuid4().hex[:6]}.tar"
    oci.build_image(trees, out, tar=True)
    return out


@pytest.fixture
def stores(gcs) -> Stores:
    tag = uuid.uuid4().hex[:8]
    buckets = layout.Buckets(**{r: f"cpaas-{tag}-{r.replace('_', '-')}" for r in layout.ROLES})
    gcs.create_buckets(buckets.all())
    return Stores(client_from_environment(), buckets)


def run(stores: Stores, source: Path, **params) -> dict:
    """One run in the DAG's order: mirror, then per architecture extract → push → pull →
    packages, the compile test beside them, cleanup, report. Returns the report, plus
    what cleanup removed from the run's staging (names under it)."""
    run_id = f"test__{uuid.uuid4().hex[:8]}"
    p = cpaas.CpaasParams.from_params({"source_image": str(source)} | params, load_config())
    failed = []
    steps: dict = {"mirror_image": cpaas.mirror_image(stores, run_id, p)}
    steps["extract_drivers"] = [
        cpaas.extract_drivers(stores, run_id, t) for t in steps["mirror_image"]
    ]
    if steps["extract_drivers"]:
        found = cpaas.find_compile_failures(stores, steps["extract_drivers"])
        if found["failures"]:
            failed.append("test_drivers_compilation")
        else:
            steps["test_drivers_compilation"] = {"failures": 0}
    for step in ("push_drivers", "pull_missing", "build_support_packages"):
        steps[step] = []
    for e in steps["extract_drivers"]:
        steps["push_drivers"].append(cpaas.push_drivers(stores, run_id, e, p.dry_run))
        steps["pull_missing"].append(cpaas.pull_missing(stores, run_id, steps["push_drivers"][-1]))
        pulled = steps["pull_missing"][-1]
        steps["build_support_packages"].append(cpaas.build_support_packages(stores, run_id, pulled))
    staging = cpaas.staging(run_id)
    staged = sorted(i.name.removeprefix(staging) for i in stores.work.list(staging))
    assert cpaas.cleanup_staging(stores, run_id) == len(staged)
    assert list(stores.work.list(staging)) == []
    verdict = cpaas.report(stores, run_id, p, steps, failed)
    doc = json.loads(stores.work.download(verdict["report"].split("/", 3)[3]))
    return doc | {"run_id": run_id, "staging_removed": staged}


def cache(stores: Stores) -> dict[str, int]:
    return {i.name: i.generation for i in stores.cpaas_drivers.list()}


def test_a_multi_arch_image_is_pushed_pulled_and_packaged_per_architecture(stores, tmp_path):
    # Published before: one identical driver, one with other bytes, one the image lacks.
    same = DriverKey(arch_kernel(K1, "x86_64"), "2.3.0", "mod")
    other = DriverKey(arch_kernel(K2, "x86_64"), "2.3.0", "bpf")
    lacking = DriverKey(arch_kernel(K3, "x86_64"), "2.3.0", "mod")
    prefix = layout.cpaas_prefix("x86_64")
    stores.cpaas_drivers.upload_new(prefix + same.object_name(), driver(same))
    stores.cpaas_drivers.upload_new(prefix + other.object_name(), driver(other, seed=1))
    stores.cpaas_drivers.upload_new(prefix + lacking.object_name(), driver(lacking))
    # An upstream driver for x86_64 in a version the image has.
    upstream = DriverKey(arch_kernel(K3, "x86_64"), "2.3.0", "bpf")
    stores.drivers.upload_new(upstream.object_name(), driver(upstream))
    before = cache(stores)
    fail_log = b"error: implicit declaration of function 'bpf_probe_read'\nline 2\n"
    image = make_image(
        tmp_path,
        extra={
            "amd64": {
                f"FAILURES/{K3}.x86_64/2.3.0/bpf.log": fail_log,
                f"FAILURES/{K3}.x86_64/2.3.0/mod.log": b"",  # empty: not a failure
            }
        },
    )

    doc = run(stores, image)

    assert doc["status"] == "failed"
    assert doc["reasons"] == [
        "task(s) failed: test_drivers_compilation",
        "1 compile failure(s) in the drivers image",
    ]
    [failure] = doc["compile_failures"]
    assert failure["kernel"] == f"{K3}.x86_64" and failure["kind"] == "bpf"
    assert failure["first_lines"][0].startswith("error: implicit declaration")
    assert stores.work.download(failure["log"].split("/", 3)[3]) == fail_log
    # push: new ones created, published ones untouched, the different one reported
    after = cache(stores)
    assert {n: g for n, g in after.items() if n in before} == before
    x86 = doc["architectures"]["x86_64"]
    assert x86["push"]["counts"] == {"created": 2, "identical": 1, "different": 1}
    assert x86["push"]["different"] == [other.object_name()]
    assert stores.cpaas_drivers.download(prefix + other.object_name()) == driver(other, seed=1)
    for arch in ("s390x", "ppc64le"):
        assert doc["architectures"][arch]["push"]["counts"] == {"created": 4}
    assert len(after) == len(before) + 2 + 4 + 4
    # pull: the cache's extra driver and the upstream one join the x86_64 package set
    assert x86["pull"]["from_cpaas"] == [lacking.object_name()]
    assert x86["pull"]["from_upstream"] == [upstream.object_name()]
    # packages: same layout as upstream, under cpaas/<arch>/
    support = stores.support
    zip_name = support.download("cpaas/x86_64/2.3.0/latest").decode().strip()
    with zipfile.ZipFile(io.BytesIO(support.download(f"cpaas/x86_64/2.3.0/{zip_name}"))) as z:
        names = {n for n in z.namelist() if n.endswith(".gz")}
        # the published copy of the differing driver is the one packaged
        packaged_other = z.read(f"kernel-modules/{other.object_name()}")
    assert packaged_other == driver(other, seed=1)
    assert len(names) == 6  # 4 from the image + 1 pulled from cpaas + 1 from upstream
    matrix = json.loads(support.download("cpaas/x86_64/driver-matrix.json"))
    assert matrix[f"{K3}.x86_64"]["2.3.0"] == {"kmod": "downstream", "ebpf": "upstream"}
    assert matrix[f"{K1}.x86_64"]["2.3.0"] == {"kmod": "downstream", "ebpf": "downstream"}
    s390 = json.loads(support.download("cpaas/s390x/driver-matrix.json"))
    assert set(s390) == {f"{K1}.s390x", f"{K2}.s390x"}
    assert support.exists("cpaas/ppc64le/index.html")
    # staging (one drivers manifest per architecture) is gone; a failed run records no digest
    assert doc["staging_removed"] == ["ppc64le/image.json", "s390x/image.json", "x86_64/image.json"]
    assert not list(stores.work.list("staging/"))
    assert not stores.work.exists(cpaas.STATE_OBJECT)


def test_a_clean_image_succeeds_and_the_same_digest_again_does_nothing(stores, tmp_path):
    image = make_image(tmp_path, archs=("amd64",))
    first = run(stores, image)
    assert first["status"] == "success", first["reasons"]
    state = json.loads(stores.work.download(cpaas.STATE_OBJECT))
    assert state["digest"] == first["mirror"]["digest"]
    published = cache(stores)
    support = {i.name: i.generation for i in stores.support.list()}

    again = run(stores, image)

    assert again["status"] == "unchanged" and again["mirror"]["unchanged"]
    assert again["architectures"] == {} and again["staging_removed"] == []
    assert cache(stores) == published
    assert {i.name: i.generation for i in stores.support.list()} == support
    # force takes it anyway: everything is already there
    forced = run(stores, image, force=True)
    assert forced["status"] == "success"
    assert forced["architectures"]["x86_64"]["push"]["counts"] == {"identical": 4}
    assert forced["architectures"]["x86_64"]["packages"]["built"] == 0


def test_a_dry_run_publishes_nothing(stores, tmp_path):
    doc = run(stores, make_image(tmp_path, archs=("s390x",)), dry_run=True)
    assert doc["status"] == "success"
    assert doc["architectures"]["s390x"]["push"]["would_create"]
    assert cache(stores) == {} and list(stores.support.list()) == []
    assert not stores.work.exists(cpaas.STATE_OBJECT)


def test_a_driver_failing_verification_is_not_pushed_and_fails_the_run(stores, tmp_path):
    wrong = DriverKey(f"{K3}.x86_64", "2.3.0", "mod")
    built_for_other = driver(DriverKey(f"{K1}.x86_64", "2.3.0", "mod"))
    image = make_image(
        tmp_path,
        archs=("amd64",),
        extra={"amd64": {f"kernel-modules/{wrong.object_name()}": built_for_other}},
    )
    doc = run(stores, image)
    assert doc["status"] == "failed"
    assert doc["reasons"] == ["1 driver(s) in the image failed verification (not pushed)"]
    [problem] = doc["architectures"]["x86_64"]["rejected"][wrong.object_name()]
    assert "vermagic" in problem and "another kernel" in problem
    assert f"cpaas/x86_64/{wrong.object_name()}" not in cache(stores)
    assert doc["architectures"]["x86_64"]["push"]["counts"] == {"created": 4}


def _layer(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def bad_image(tmp_path: Path, what: str) -> Path:
    out = tmp_path / "bad"
    tree = drivers_tree(tmp_path / "tree", "x86_64")
    if what == "missing /kernel-modules":
        (tmp_path / "empty" / "etc").mkdir(parents=True)
        oci.build_image({"amd64": tmp_path / "empty"}, out)
    elif what == "unknown architecture":
        oci.build_image({"amd64": tree, "arm64": tree}, out)
    elif what == "malformed driver names":
        (tree / "kernel-modules/2.3.0/probe.o").write_bytes(b"x")
        (tree / "kernel-modules/not-a-version").mkdir()
        (tree / "kernel-modules/not-a-version/collector-5.4.0.ko.gz").write_bytes(b"x")
        oci.build_image({"amd64": tree}, out)
    elif what == "../ paths":
        layer = _layer([("kernel-modules/../../etc/passwd", b"root")])
        oci.build_image({"amd64": tree}, out, layers={"amd64": [layer]})
    return out


# A corrupt layer is tested once at each level elsewhere: tests/test_oci.py (the blob is
# named) and tests/test_cpaas_e2e.py (the run fails and publishes nothing).
@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("missing /kernel-modules", "has no /kernel-modules: is it a drivers image?"),
        ("unknown architecture", "architecture 'arm64' has no CPaaS cache"),
        ("malformed driver names", "2 bad file(s) in the driver trees"),
        ("../ paths", "has a '..' path component (path traversal)"),
    ],
)
def test_bad_images_give_clear_errors_and_push_nothing(stores, tmp_path, what, message):
    with pytest.raises(ValueError) as error:  # the DAG fails these at once, no retry
        run(stores, bad_image(tmp_path, what))
    assert message in str(error.value)
    assert cache(stores) == {}
    assert list(stores.support.list()) == []


def test_a_registry_reference_needs_the_mirror_pod(stores):
    with pytest.raises(RunInputError, match="only the kubernetes runtime's mirror pod"):
        run(stores, "docker://quay.io/example/drivers:latest")


def test_a_missing_image_path_is_named(stores, tmp_path):
    with pytest.raises(oci.ImageError, match="no such image layout"):
        run(stores, tmp_path / "nowhere.tar")


def test_unknown_architecture_parameters_are_refused():
    with pytest.raises(layout.UnknownArchitecture, match="known are amd64, ppc64le, s390x"):
        cpaas.CpaasParams.from_params({"architectures": ["arm64"]}, load_config())


def test_the_mirror_pod_script_copies_a_multi_arch_image_with_real_skopeo(stores, tmp_path):
    """The production mirror_image script, run here: skopeo reads an OCI archive (the pod
    reads docker://) and writes the "internal registry" as an OCI layout (the pod: a
    registry); then `drivers image mirror` puts the layout in the work bucket."""
    import os
    import shutil
    import subprocess
    import sys

    from drivers.airflow.glue import MIRROR_SCRIPT

    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed (scripts/host-deps.sh installs it)")
    source = make_image(tmp_path)
    with oci.open_image(source) as image:
        digest = image.digest
    env = os.environ | {
        f"DRIVERS_BUCKET_{r.upper()}": getattr(stores.buckets, r) for r in layout.ROLES
    }
    env |= {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SOURCE_IMAGE": f"oci-archive:{source}",
        "INTERNAL_IMAGE": f"oci:{tmp_path / 'internal'}:mirrored",
        "RUN_ID": "scheduled__2026-11-25T00:00:00+00:00",
        "ARCHITECTURES": "amd64,ppc64le",
        "FORCE": "",
        "XCOM_FILE": str(tmp_path / "xcom" / "return.json"),
        "TMPDIR": str(tmp_path),
    }
    subprocess.run(["/bin/sh", "-c", MIRROR_SCRIPT], env=env, check=True, timeout=300)

    targets = json.loads((tmp_path / "xcom" / "return.json").read_text())
    prefix = layout.mirrored_image_prefix(digest)  # skopeo kept the digest
    assert targets == [
        {"image": prefix, "digest": digest, "oci_arch": "amd64"},
        {"image": prefix, "digest": digest, "oci_arch": "ppc64le"},
    ]
    with oci.open_mirrored(stores.work, prefix) as mirrored:
        assert mirrored.architectures() == ["amd64", "ppc64le", "s390x"]
    assert (tmp_path / "internal" / "index.json").exists()
    extracted = cpaas.extract_drivers(stores, "r1", targets[1])
    assert extracted["arch"] == "ppc64le" and extracted["drivers"] == 4
