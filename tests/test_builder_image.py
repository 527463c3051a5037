"""Slow integration test: the Debian builder image (images/builder-debian/Dockerfile),
built here with podman, builds a real shard.

The container is started through the Docker API (``podman system service``) with the
``docker`` package, as a docker runtime would, on the host network so it reaches the
embedded GCS on 127.0.0.1; it runs ``build-shard --shard gs://...`` and must build a real
kernel module and eBPF probe for a real Debian kernel from its bundle.

Cost: the first run makes the Debian base image (debootstrap) and the builder image,
a few minutes; later runs reuse both (rebuilt only when their inputs change, see
tests/podman.py) and take about half a minute. Skipped where podman cannot run: run
scripts/podman-setup.sh (as root) to install it.
"""

from __future__ import annotations

import dataclasses
import gzip
import time
from pathlib import Path

import docker
import pytest

from drivers.domain import layout
from drivers.domain.exit_codes import EX_OK
from drivers.domain.names import DriverKey
from drivers.domain.verify import elf_sections, verify_driver
from podman import ensure_builder_image, podman_service, podman_unavailable_reason
from test_builder import Env, by_task

pytestmark = pytest.mark.skipif(
    podman_unavailable_reason() is not None, reason=str(podman_unavailable_reason())
)

REPO = Path(__file__).resolve().parents[1]
KERNEL = "6.1.0-56-cloud-amd64"
VERSION = "2.3.0"
TASKS = [(KERNEL, VERSION, "mod"), (KERNEL, VERSION, "bpf")]
RUN_ID = "image-run"
CONTAINER_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def builder_image() -> str:
    """The builder image, built when missing or stale (minutes the first time)."""
    return ensure_builder_image(log=print)


@pytest.fixture(scope="module")
def bundle() -> Path:
    """bundle-6.1.0-56-cloud-amd64.tgz in .cache/bundles (where `make run` keeps it),
    made from Debian's header packages when missing or older than bundles.py."""
    from drivers.build import bundles

    path = REPO / ".cache/bundles" / layout.bundle_object(KERNEL)
    if not path.exists() or path.stat().st_mtime < Path(bundles.__file__).stat().st_mtime:
        bundles.make_debian_bundle(KERNEL, path.parent, REPO / ".cache/debs")
    return path


def test_the_builder_image_builds_a_real_shard_through_the_docker_api(
    gcs, store, tmp_path, builder_image, bundle
):
    env = Env(store, tmp_path)  # buckets for bundles, sources (2.3.0 among them) and work
    env.add_bundle(KERNEL, bundle)
    uri, _doc = env.shard(TASKS, run_id=RUN_ID)
    buckets = dataclasses.replace(
        layout.Buckets.from_env({}),
        bundles=env.bundles.bucket_name,
        sources=env.sources.bucket_name,
        work=env.work.bucket_name,
    )
    environment = {"STORAGE_EMULATOR_HOST": gcs.url} | {
        f"DRIVERS_BUCKET_{role.upper()}": getattr(buckets, role) for role in layout.ROLES
    }

    with podman_service(tmp_path) as docker_url:
        client = docker.DockerClient(base_url=docker_url, timeout=60)
        started = time.monotonic()
        container = client.containers.run(
            builder_image,
            ["build-shard", "--shard", uri],
            network_mode="host",
            environment=environment,
            detach=True,
        )
        try:
            status = container.wait(timeout=CONTAINER_TIMEOUT_S)["StatusCode"]
            stdout = container.logs(stdout=True, stderr=False).decode(errors="replace")
            stderr = container.logs(stdout=False, stderr=True).decode(errors="replace")
            user = container.attrs["Config"]["User"]
        finally:
            container.remove(force=True)
            client.close()
        print(f"build-shard in {builder_image}: exit {status} in {time.monotonic() - started:.1f}s")

    assert status == EX_OK, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    assert user == "1000:1000"  # the image builds as a non-root user
    results = f"gs://{env.work.bucket_name}/{layout.shard_results_object(RUN_ID, 'fc36', 0)}"
    assert stdout.strip().splitlines()[-1] == results

    records = env.results(RUN_ID)
    tasks = by_task(records)
    assert set(tasks) == set(TASKS)
    staged = layout.staged_drivers_prefix(RUN_ID)
    for (kernel, version, kind), r in tasks.items():
        key = DriverKey(kernel, version, kind)
        assert (r["status"], r["failure"]) == ("built", None), r
        assert r["object"] == staged + key.object_name()
        data = env.work.download(r["object"])
        assert r["size"] == len(data)
        assert verify_driver(key, data, unavailable=False) == []  # vermagic, ELF, BTF...
        assert kind == "mod" or ".BTF" in elf_sections(gzip.decompress(data))
        # The image's own toolchain built it (Debian bookworm's).
        assert r["toolchain"]["gcc"] and r["toolchain"]["clang"] and r["toolchain"]["make"]
    assert {i.name for i in env.work.list(staged)} == {
        staged + DriverKey(*task).object_name() for task in TASKS
    }
    shard = records[-1]
    assert (shard["type"], shard["status"], shard["exit_status"]) == ("shard", "ok", EX_OK)
    assert shard["counts"] == {"built": 2}
