"""Airflow glue: the one library module that imports Airflow.

Connections, the trigger form's parameters, the builder pool and the builder runtimes
(local subprocess, Kubernetes pod), all running the same entrypoint with the same
arguments. DAG files import from here and from :mod:`drivers.pipeline`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import Param
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from drivers.config import Config
from drivers.names import DRIVER_VERSION_RE, KINDS

if TYPE_CHECKING:
    from drivers.pipeline import Stores

GCP_CONN_ID = os.environ.get("DRIVERS_GCP_CONN_ID", "google_cloud_default")
BUILDER_POOL = "builders"  # sized from the config's `slots` by `make run` / deployment
EX_DATAERR, EX_TEMPFAIL = 65, 75  # drivers build-shard: bad input / transient failure


def stores() -> Stores:
    """Object stores over the Airflow connection's client (GCSHook)."""
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    from drivers.pipeline import Stores

    return Stores(GCSHook(gcp_conn_id=GCP_CONN_ID).get_conn())


def builder_arguments(shard_uri: str) -> list[str]:
    """What every runtime runs: ``drivers build-shard --shard URI``."""
    return ["build-shard", "--shard", shard_uri]


def run_params(config: Config) -> dict[str, Param]:
    """Typed, validated trigger parameters (rendered as the trigger form)."""
    return {
        "driver_versions": Param(
            list(config.driver_versions),
            type="array",
            items={"type": "string", "pattern": f"^(?:{DRIVER_VERSION_RE.pattern})$"},
            title="Driver versions",
            description="Driver versions to build (semver or 64-hex). Default: the config's.",
        ),
        "select": Param(
            None,
            type=["null", "string"],
            title="Kernel selector",
            description="Limit kernels, e.g. 'el8:4.18.0-305..4.18.0-372', '>=5.10,<6.0', "
            "'*-aws'. Empty: every kernel in the bundle bucket.",
        ),
        "kinds": Param(
            list(KINDS),
            type="array",
            items={"type": "string", "enum": list(KINDS)},
            minItems=1,
            uniqueItems=True,
            title="Kinds",
        ),
        "builders": Param(
            [],
            type="array",
            items={"type": "string", "enum": list(config.builders)},
            uniqueItems=True,
            title="Builders",
            description="Only these builders (empty: all).",
        ),
        "force": Param(False, type="boolean", title="Rebuild drivers already cached"),
        "dry_run": Param(False, type="boolean", title="Plan and report only"),
        "max_failures": Param(
            0, type="integer", minimum=0, title="Compile failures tolerated before failing"
        ),
        "accept_shrink": Param(
            False, type="boolean", title="Accept a bundle listing that lost kernels"
        ),
    }


def run_local_shard(shard_uri: str) -> None:
    """The local runtime: the builder entrypoint as a subprocess of the worker."""
    command = [sys.executable, "-m", "drivers", *builder_arguments(shard_uri)]
    status = subprocess.run(command, check=False).returncode
    if status == EX_DATAERR:
        raise AirflowFailException(
            f"shard {shard_uri}: bad input (missing or corrupt bundle, malformed shard); "
            "retrying cannot help, see the task log and the run report"
        )
    if status != 0:
        raise AirflowException(f"shard {shard_uri}: drivers build-shard exited {status}")


def builder_pod_kwargs(config: Config, builder: str) -> dict[str, Any]:
    """Team defaults for one builder's pods (KubernetesPodOperator.partial keywords)."""
    from kubernetes.client import models as k8s

    pod = config.kubernetes
    resources = pod["resources"] | config.builders[builder].resources
    return {
        "task_id": "build_shard",
        "image": config.builders[builder].image,
        "cmds": ["drivers"],
        "namespace": pod["namespace"],
        "kubernetes_conn_id": pod["connection"],
        "service_account_name": pod["service_account"],  # workload identity: no keys
        "container_resources": k8s.V1ResourceRequirements(
            requests={"cpu": resources["cpu"], "memory": resources["memory"]},
            limits={"memory": resources["memory"]},
        ),
        "active_deadline_seconds": pod["active_deadline_seconds"],
        "node_selector": pod.get("node_selector") or None,
        "labels": {"app": "collector-drivers", "builder": builder},
        "on_finish_action": "delete_pod",
        "deferrable": True,
        "get_logs": True,
        "termination_message_policy": "FallbackToLogsOnError",
        "pool": BUILDER_POOL,
        "retries": 3,  # evicted or preempted pods
        "retry_delay": timedelta(minutes=1),
    }
