"""cpaas_drivers end to end through real Airflow (`airflow dags test`, i.e. dag.test()) on the
embedded GCS, with the demo's images (`make run-cpaas`): an image with a compile failure
(push and packages happen, the failure test fails, the run fails with a report), the
fixed image (the run succeeds), the same digest again (nothing happens), a corrupt image
(the run fails and nothing is published). Runs share one set of buckets, in order."""

from __future__ import annotations

import json
import tarfile
from datetime import datetime
from pathlib import Path

import pytest

from drivers.build import oci
from drivers.build.synthetic import driver
from drivers.domain.names import DriverKey
from drivers.flows import cpaas
from drivers.ops.embedded import EmbeddedAirflow
from drivers.store.storage import Stores, client_from_environment
from pipeline_env import pipeline_env

VERSIONS = ("2.3.0", "2.4.0-rc1")
UPSTREAM_KERNELS = ("6.1.0-56-amd64", "6.1.0-56-rt-amd64")
CONFIG = """
driver_versions = ["2.3.0", "2.4.0-rc1"]
blocklists = []
retries = 1
retry_delay_s = 5
[[builders]]
name = "deb"
[[routes]]
builder = "deb"
kernels = "*"
kinds = ["mod", "bpf"]
"""


@pytest.fixture(scope="module")
def env(gcs, tmp_path_factory):
    """Unique buckets, an upstream cache (as `make run` leaves it), the demo images."""
    tmp = tmp_path_factory.mktemp("cpaas-e2e")
    with pipeline_env(gcs, tmp, CONFIG, name="cpaas-e2e"):
        stores = Stores(client_from_environment())  # on the buckets pipeline_env named
        for kernel in UPSTREAM_KERNELS:
            for version in VERSIONS:
                for kind in ("mod", "bpf"):
                    key = DriverKey(kernel, version, kind)
                    stores.drivers.upload_new(key.object_name(), driver(key))
        images = cpaas.make_demo_images(stores, tmp / "images", VERSIONS)
        with EmbeddedAirflow(home=tmp / "airflow") as airflow:
            yield airflow, stores, images, tmp


def run(env, image: Path) -> dict:
    """Trigger one run with ``image``; return its report plus the run's exit status."""
    airflow, stores, _, _ = env
    started = datetime.now().astimezone()
    conf = {"source_image": str(image)}
    # dag.test(): tasks one at a time in the `dags test` process; `make run-cpaas` and
    # the upstream end-to-end tests use the LocalExecutor.
    log = airflow.home / "runs.log"
    status = airflow.dags_test("cpaas_drivers", conf, log=log, timeout=600, use_executor=False)
    reports = [
        i
        for i in stores.work.list(cpaas.REPORTS)
        if i.name.endswith("/report.json") and i.created >= started
    ]
    assert len(reports) == 1, f"no report; see {airflow.home}/runs.log"
    return json.loads(stores.work.download(reports[0].name)) | {"exit_status": status}


def published(stores: Stores) -> dict[str, int]:
    return {
        f"{store.bucket_name}/{i.name}": i.generation
        for store in (stores.cpaas_drivers, stores.support)
        for i in store.list()
    }


@pytest.fixture(scope="module")
def failing_run(env):
    return run(env, env[2]["with-failures"])


def test_an_image_with_failures_fails_the_run_after_push_and_packages(env, failing_run):
    _, stores, _, _ = env
    assert failing_run["exit_status"] != 0
    assert failing_run["status"] == "failed"
    assert failing_run["reasons"] == [
        "task(s) failed: test_drivers_compilation",
        "1 compile failure(s) in the drivers image",
    ]
    [failure] = failing_run["compile_failures"]
    kernel, kind, log = cpaas.DEMO_FAILURE
    assert (failure["kernel"], failure["driver_version"], failure["kind"]) == (
        kernel,
        VERSIONS[-1],
        kind,
    )
    assert failure["first_lines"] == log.decode().splitlines()
    # push and packages did not wait on the failure test
    archs = failing_run["architectures"]
    assert set(archs) == {"x86_64", "s390x", "ppc64le"}
    # the image carries the upstream drivers except the rt kernel's, plus 2 RHEL kernels
    assert archs["x86_64"]["push"]["counts"] == {"created": 4 + 8}
    assert archs["s390x"]["push"]["counts"] == {"created": 8}
    assert len(archs["x86_64"]["pull"]["from_upstream"]) == 4  # the rt kernel's drivers
    for arch in archs:
        assert archs[arch]["packages"]["built"] == 2
        assert stores.support.exists(f"cpaas/{arch}/index.html")
    matrix = json.loads(stores.support.download("cpaas/x86_64/driver-matrix.json"))
    assert matrix["6.1.0-56-rt-amd64"]["2.3.0"] == {"kmod": "upstream", "ebpf": "upstream"}
    assert matrix["6.1.0-56-amd64"]["2.3.0"] == {"kmod": "downstream", "ebpf": "downstream"}
    assert not list(stores.work.list("staging/"))


def test_the_fixed_image_succeeds_and_the_same_digest_again_does_nothing(env, failing_run):
    _, stores, images, _ = env
    fixed = run(env, images["fixed"])
    assert fixed["exit_status"] == 0 and fixed["status"] == "success", fixed["reasons"]
    assert fixed["architectures"]["x86_64"]["push"]["counts"] == {"identical": 12}
    before = published(stores)

    again = run(env, images["fixed"])

    assert again["exit_status"] == 0 and again["status"] == "unchanged"
    assert again["mirror"]["last_success"] == fixed["run_id"]
    assert published(stores) == before


def test_a_corrupt_image_fails_the_run_and_publishes_nothing(env, failing_run):
    _, stores, images, tmp = env
    # A new image: blobs already mirrored (verified) are not read from a source again.
    key = DriverKey("5.14.0-427.13.1.el9_4.x86_64", "2.3.0", "mod")
    tree = tmp / "corrupt-tree" / "kernel-modules"
    (tree / "2.3.0").mkdir(parents=True)
    (tree / key.object_name()).write_bytes(driver(key, size=256 << 10))
    source = tmp / "new.tar"
    oci.build_image({"amd64": tree.parent}, source, tar=True)
    with tarfile.open(source) as tar:
        biggest = max(tar.getmembers(), key=lambda m: m.size)  # a layer blob
    data = bytearray(source.read_bytes())
    data[biggest.offset_data + biggest.size // 2] ^= 0xFF
    corrupt = tmp / "corrupt.tar"
    corrupt.write_bytes(bytes(data))
    before = published(stores)

    doc = run(env, corrupt)

    assert doc["exit_status"] != 0 and doc["status"] == "failed"
    assert doc["reasons"] == ["task(s) failed: mirror_image"]
    assert published(stores) == before
