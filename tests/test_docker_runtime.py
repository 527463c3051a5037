"""The docker runtime end to end: upstream_drivers run by Airflow (`airflow dags test`)
with DRIVERS_RUNTIME=docker, each shard's task staging its inputs, running the shard in a
sandboxed container of the Debian builder image (built here with podman, tests/podman.py;
no network, read-only, uid 1000) through podman's Docker API socket, and uploading what it
built; real bundle, real compilers inside the container, the embedded GCS."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime

import pytest

from drivers.ops.embedded import EmbeddedAirflow
from pipeline_env import pipeline_env, publish_bundle, publish_sources
from podman import ensure_builder_image, podman_env, podman_service, podman_unavailable_reason

pytestmark = pytest.mark.skipif(
    podman_unavailable_reason() is not None, reason=str(podman_unavailable_reason())
)

KERNEL = "6.1.0-56-cloud-amd64"
CONFIG = """
driver_versions = ["2.3.0"]
blocklists = []
slots = 2
retries = 0
[schedules]
upstream_drivers = ""
[docker]
time_limit_s = 900
[[builders]]
name = "debian"
toolchain = "Debian 12 gcc-12 + clang 14 (images/builder-debian)"
image = "{image}"
[[routes]]
builder = "debian"
kernels = ">=3"
kinds = ["mod", "bpf"]
"""


def test_each_shard_runs_in_its_builder_container_and_publishes(gcs, tmp_path):
    image = ensure_builder_image()
    with (
        podman_service(tmp_path) as docker_url,
        pipeline_env(gcs, tmp_path, CONFIG.format(image=image), "docker", "docker") as stores,
        pytest.MonkeyPatch.context() as mp,
    ):
        mp.setenv("DOCKER_HOST", docker_url)
        publish_bundle(stores, KERNEL)
        publish_sources(stores, "2.3.0", tmp_path)

        started = datetime.now(UTC)
        with EmbeddedAirflow(home=tmp_path / "airflow") as airflow:
            status = airflow.dags_test(
                "upstream_drivers",
                {"vm_tests": "off"},
                log=tmp_path / "run.log",
                timeout=900,
                use_executor=False,
            )
        assert status == 0, (tmp_path / "run.log").read_text()[-3000:]
        assert {i.name for i in stores["drivers"].list()} == {
            f"2.3.0/collector-{KERNEL}.ko.gz",
            f"2.3.0/collector-ebpf-{KERNEL}.o.gz",
        }
        # The shard ran in one sandboxed container of the builder image, labelled, and
        # its task log has the build's lines.
        events = subprocess.run(
            ["podman", "events", "--stream=false", "--format", "json", "--since",
             started.isoformat(), "--filter", "event=died", "--filter", "label=builder=debian"],
            env=podman_env(), capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        died = [json.loads(line) for line in events.splitlines() if line.strip()]
        assert [(e["Image"], e["Attributes"]["app"]) for e in died] == [
            (image, "collector-drivers")
        ], died
        run_log = (tmp_path / "run.log").read_text()
        assert f"{KERNEL}: 2 built in" in run_log
        assert "sandboxed: container as uid 1000, no network" in run_log
