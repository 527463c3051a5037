"""The deployment files: docker-compose.yaml validated by Compose itself (Debian's
docker-compose) and checked for the services, mounts and settings the pipeline needs;
the images' versions come from one place."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from drivers.domain import layout
from drivers.domain.config import load_config

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yaml"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
AIRFLOW_SERVICES = {
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-triggerer": "triggerer",
    "airflow-worker": "celery worker",
}

needs_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose is not installed (scripts/host-deps.sh installs Debian's)",
)


def compose_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["docker-compose", "-f", str(path), "config"],
        capture_output=True,
        text=True,
        cwd=path.parent,
        check=False,
    )


@pytest.fixture(scope="module")
def config() -> dict:
    result = compose_config(COMPOSE)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@needs_compose
def test_the_compose_file_is_valid_and_compose_really_checks(config, tmp_path):
    broken = tmp_path / "docker-compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    restart: always", "    restrat: always"))
    result = compose_config(broken)
    assert result.returncode != 0
    assert "Unsupported config option for services.postgres: 'restrat'" in result.stderr


@needs_compose
def test_it_has_the_official_shape_plus_the_gcs_emulator(config):
    services = config["services"]
    expected = {"postgres", "redis", "gcs", "airflow-init", "airflow-cli", *AIRFLOW_SERVICES}
    assert set(services) == expected
    assert services["airflow-cli"]["profiles"] == ["debug"]  # only with --profile debug
    for name, expected in AIRFLOW_SERVICES.items():
        service = services[name]
        command = service["command"]
        assert (" ".join(command) if isinstance(command, list) else command) == expected, name
        assert "healthcheck" in service, name
        needs = service["depends_on"]
        assert needs["postgres"]["condition"] == "service_healthy", name
        assert needs["gcs"]["condition"] == "service_healthy", name
        assert needs["airflow-init"]["condition"] == "service_completed_successfully", name
    gcs = services["gcs"]
    assert gcs["image"].startswith("fsouza/fake-gcs-server:")
    assert "-backend=filesystem" in gcs["command"]


@needs_compose
def test_every_airflow_service_mounts_the_code_and_gets_the_embedded_settings(config):
    for name in [*AIRFLOW_SERVICES, "airflow-init"]:
        service = config["services"][name]
        # Compose 1.x prints bind mounts as SOURCE:TARGET:MODE
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert mounts["/opt/airflow/dags"] == str(REPO / "dags"), name
        assert mounts["/opt/airflow/plugins"] == str(REPO / "plugins"), name
        assert mounts["/opt/airflow/include"] == str(REPO / "include"), name
        env = service["environment"]
        assert env["PYTHONPATH"] == "/opt/airflow/include"  # the mounted library is imported
        assert env["STORAGE_EMULATOR_HOST"] == "http://gcs:4443"
        assert '"is_anonymous": true' in env["AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT"]
        assert env["DRIVERS_RUNTIME"] == "local"
        for role in layout.ROLES:  # every bucket role, named as the library expects
            assert env[f"DRIVERS_BUCKET_{role.upper()}"] == layout.DEFAULT_BUCKETS[role]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == (
            "http://airflow-apiserver:8080/execution/"
        )
    init = " ".join(config["services"]["airflow-init"]["command"])
    assert "airflow db migrate" in init and "drivers gcs buckets" in init
    assert "pools set builders" in init and "load_config().slots" in init
    assert "pools set backfill_builders" in init and 'load_config().backfill["slots"]' in init


def test_the_images_take_their_versions_from_one_place():
    """pyproject's version tags every image the config and compose name; the Airflow
    image extends the official one of the Airflow version requirements.txt pins."""
    airflow = re.search(r"^apache-airflow==(\S+)$", (REPO / "requirements.txt").read_text(), re.M)
    assert re.search(
        rf"^FROM apache/airflow:{re.escape(airflow[1])}-python3\.11$",
        (REPO / "Dockerfile").read_text(),
        re.M,
    )
    config = load_config()
    images = [b.image for b in config.builders.values()]
    images += [config.vm_tests["image"], config.cpaas["mirror_image"]]
    images.append(yaml.safe_load(COMPOSE.read_text())["x-airflow-common"]["image"])
    for image in images:
        assert image.rsplit(":", 1)[1].removesuffix("}") == VERSION, image


def test_drivers_gcs_buckets_creates_every_bucket_on_the_emulator_it_is_pointed_at(gcs, tmp_path):
    from drivers.ops.cli import main
    from drivers.store.storage import client_from_environment

    names = {role: f"compose-{role.replace('_', '-')}" for role in layout.ROLES}
    with pytest.MonkeyPatch.context() as env:
        for role, name in names.items():
            env.setenv(f"DRIVERS_BUCKET_{role.upper()}", name)
        assert main(["gcs", "buckets"]) == 0
        assert main(["gcs", "buckets"]) == 0  # again: nothing to do, no error
        env.delenv("STORAGE_EMULATOR_HOST")
        assert main(["gcs", "buckets"]) == 2  # not on GCS: says so
    listed = {b.name for b in client_from_environment().list_buckets()}
    assert set(names.values()) <= listed
