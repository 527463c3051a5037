"""Airflow glue: the one library module that imports Airflow.

Connections, the trigger form's parameters, the builder pool and the builder runtimes
(local subprocess, Kubernetes pod, Docker container), all running the same entrypoint
with the same arguments. DAG files import from here and from :mod:`drivers.flows.upstream`.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import Param
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from drivers.domain.config import BACKFILL_POOL, BUILDER_POOL, VM_TEST_MODES, Config
from drivers.domain.dag_ids import BACKFILL_DRIVERS, CPAAS_DRIVERS, DAG_IDS, UPSTREAM_DRIVERS
from drivers.domain.exit_codes import EX_DATAERR
from drivers.domain.layout import Buckets
from drivers.domain.names import DRIVER_VERSION_RE, KINDS
from drivers.store.ledger import IMAGE_ENV

if TYPE_CHECKING:
    from collections.abc import Callable

    from drivers.build.sandbox import Sandbox
    from drivers.store.storage import Stores

GCP_CONN_ID = os.environ.get("DRIVERS_GCP_CONN_ID", "google_cloud_default")

# The two DAGs one factory builds (dags/upstream_drivers.py): the nightly
# (UPSTREAM_DRIVERS), and the kernel-range backfill an engineer triggers (BACKFILL_DRIVERS).
# What differs between them is here.
# Builder tasks take a slot of their DAG's pool: a backfill, however large, can only fill
# its own pool (sized from [backfill] slots) and never takes a nightly builder slot.
BUILDER_POOLS = {UPSTREAM_DRIVERS: BUILDER_POOL, BACKFILL_DRIVERS: BACKFILL_POOL}
# Where tasks of both DAGs wait for the same executor slots (worker processes, the
# executor's parallelism, the triggerer), the scheduler queues the higher weight first.
# weight_rule "absolute": a task's weight is its own priority_weight. (The default,
# "downstream", adds the weights of every task downstream of it, so the numbers would
# depend on the DAG's shape; both DAGs have the same shape, absolute keeps it explicit.)
PRIORITY_WEIGHTS = {UPSTREAM_DRIVERS: 10, BACKFILL_DRIVERS: 1}


def run_config(config: Config, dag_id: str) -> Config:
    """The config a run of ``dag_id`` plans with: a backfill balances its shards over its
    own pool's slots."""
    if dag_id == BACKFILL_DRIVERS:
        return dataclasses.replace(config, slots=config.backfill["slots"])
    return config


def stores() -> Stores:
    """Object stores over the Airflow connection's client (GCSHook)."""
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    from drivers.store.storage import Stores

    return Stores(GCSHook(gcp_conn_id=GCP_CONN_ID).get_conn())


def dag_policy(config: Config) -> dict[str, Any]:
    """What every DAG of the project shares (``@dag`` keywords): no catch-up, one run at
    a time, the team as owner, retries for transient failures from the config with
    exponential backoff (bad input raises AirflowFailException: never retried)."""
    return {
        "start_date": datetime(2026, 1, 1, tzinfo=UTC),
        "catchup": False,
        "max_active_runs": 1,
        "default_args": {
            "owner": "drivers",
            "retries": config.retries,
            "retry_delay": timedelta(seconds=config.retry_delay_s),
            "retry_exponential_backoff": True,
            "max_retry_delay": timedelta(seconds=16 * config.retry_delay_s),
        },
    }


def run_id() -> str:
    """The running task's DAG run id."""
    from airflow.sdk import get_current_context

    return get_current_context()["run_id"]


def builder_arguments(shard_uri: str) -> list[str]:
    """What every runtime runs: ``drivers build-shard --shard URI``."""
    return ["build-shard", "--shard", shard_uri]


# A kernel selector of each kind (README, "Kernel selectors"): the form proposes them.
SELECTOR_EXAMPLES = [
    "el8:4.18.0-305..4.18.0-372",
    "4.18.0-305..",
    "..4.18.0-372",
    ">=5.10,<6.0",
    "*-aws",
    "~5\\.4\\.0-\\d+-gcp",
    "5.4.0-62-generic",
]
# JSON-schema patterns (checked at trigger time by the API, whatever sent the trigger):
# a driver version as drivers.domain.names accepts it; a selector with something in it (the
# selector's own syntax is checked by pre_build, which names what is wrong).
VERSION_PATTERN = f"^(?:{DRIVER_VERSION_RE.pattern})$"
SELECTOR_PATTERN = r"\S"


def run_params(config: Config, *, backfill: bool = False) -> dict[str, Param]:
    """Typed, validated trigger parameters, rendered as the trigger form.

    The Airflow 3 form renders an array with ``examples`` as a multi-select of exactly
    those values (nothing else can be typed there), an array of strings without them as
    a text box of one value per line, and a string with ``examples`` as a text field
    proposing them. So the shipped driver versions are a multi-select, and versions the
    config does not ship are typed into their own field; both are checked against the
    run-time config by pre_build. Whatever triggers a run (form, REST API, ``airflow dags
    trigger``), the API validates the values against these schemas and refuses a
    malformed one before the run exists.

    ``backfill``: the backfill_drivers form, where a selector is required (a backfill of
    every kernel is a mistake; the nightly does that) and a dry run is the default, so
    the engineer sees the plan before anything builds."""
    shipped = ", ".join(config.driver_versions) or "none"
    selector_help = (
        "Kernels to build for, e.g. 'el8:4.18.0-305..4.18.0-372' (a range, inclusive), "
        "'4.18.0-305..' (from), '..4.18.0-372' (up to), '>=5.10,<6.0' (comparisons, comma "
        "= and), '*-aws' (glob), '~5\\.4\\.0-\\d+-gcp' (regex), '5.4.0-62-generic' "
        "(exact); 'el8:' limits any of them to a family."
    )
    if backfill:
        select = Param(
            type="string",
            minLength=1,
            maxLength=512,
            pattern=SELECTOR_PATTERN,
            examples=SELECTOR_EXAMPLES,
            title="Kernel selector (required)",
            description=selector_help + " Required: a backfill names its kernels.",
        )
    else:
        select = Param(
            None,
            type=["null", "string"],
            maxLength=512,
            pattern=SELECTOR_PATTERN,
            examples=SELECTOR_EXAMPLES,
            title="Kernel selector",
            description=selector_help + " Empty: every kernel in the bundle bucket.",
        )
    return {
        "select": select,
        "driver_versions": Param(
            None,
            type=["array", "null"],
            items={"type": "string", "pattern": VERSION_PATTERN},
            uniqueItems=True,
            examples=list(config.driver_versions),
            title="Driver versions",
            description=f"Pick among the shipped versions ({shipped}). Empty (and none "
            "typed below): every version the run-time config lists.",
        ),
        "other_driver_versions": Param(
            None,
            type=["array", "null"],
            items={"type": "string", "pattern": f"^(?:{DRIVER_VERSION_RE.pattern})?$"},
            title="Other driver versions",
            description="Versions the shipped config does not list, one per line: semver "
            "(2.5.0, 2.5.0-rc1) or a 64-hex fingerprint. Each must be in the run-time "
            "config (drivers config add driver-versions V), or pre_build refuses it.",
        ),
        "kinds": Param(
            list(KINDS),
            type="array",
            items={"type": "string", "enum": list(KINDS)},
            examples=list(KINDS),
            minItems=1,
            uniqueItems=True,
            title="Kinds",
            description="mod: kernel modules; bpf: eBPF probes.",
        ),
        "builders": Param(
            None,
            type=["array", "null"],
            items={"type": "string", "enum": list(config.builders)},
            examples=list(config.builders),
            uniqueItems=True,
            title="Builders",
            description="Only these builders (empty: all).",
        ),
        "force": Param(
            False,
            type="boolean",
            title="Rebuild drivers already cached",
            description="Build even what the cache holds (never overwritten: a published "
            "driver with other bytes is reported and kept).",
        ),
        "dry_run": Param(
            backfill,
            type="boolean",
            title="Dry run: plan and report only",
            description="Show the plan (tasks per builder and kind, first kernels, "
            "estimated pod-hours and makespan) and build nothing.",
        ),
        "max_failures": Param(
            0,
            type="integer",
            minimum=0,
            title="Failures tolerated",
            description="Compile failures plus drivers their kernel refused that still "
            "leave the run green (reported as degraded).",
        ),
        "accept_shrink": Param(
            False,
            type="boolean",
            title="Accept a bundle listing that lost kernels",
            description="The shrink guard stops a run when the bundle bucket lists clearly "
            "fewer kernels than the last successful run; set this when they were removed "
            "on purpose.",
        ),
        "vm_tests": Param(
            "enforce",
            type="string",
            enum=list(VM_TEST_MODES),
            title="VM load tests",
            description="enforce: a driver its kernel refuses is not published; warn: "
            "publish anyway and report; off: publish untested (when you must).",
        ),
        "vm_tests_budget_s": Param(
            config.vm_tests["budget_s"],
            type="integer",
            minimum=0,
            title="VM test time budget (s)",
            description="Kernels whose turn comes later are published marked untested.",
        ),
    }


def run_shard(config: Config, builder: str, shard_uri: str) -> None:
    """A builder task on the local or docker runtime (the kubernetes runtime's task is the
    pod): the shard's lines go to the task log, its exit status decides the task."""
    if config.runtime == "docker":
        from airflow.providers.google.cloud.hooks.gcs import GCSHook

        from drivers.build.sandbox import build_shard_sandboxed

        stores = _StoresByBucket(GCSHook(gcp_conn_id=GCP_CONN_ID).get_conn())
        status, _ = build_shard_sandboxed(shard_uri, stores, builder_sandbox(config, builder))
    else:
        status = run_local_shard(shard_uri)
    if status == EX_DATAERR:
        raise AirflowFailException(
            f"shard {shard_uri}: bad input (missing or corrupt bundle, malformed shard, a "
            "build that tampered with its records); retrying cannot help, see the task log "
            "and the run report"
        )
    if status != 0:
        raise AirflowException(f"shard {shard_uri}: drivers build-shard exited {status}")


class _StoresByBucket:
    """``store(bucket)``: one ObjectStore per bucket over one client."""

    def __init__(self, client: Any) -> None:
        self.client, self.stores = client, {}

    def __call__(self, bucket: str) -> Any:
        from drivers.store.storage import ObjectStore

        if bucket not in self.stores:
            self.stores[bucket] = ObjectStore(self.client, bucket)
        return self.stores[bucket]


def run_local_shard(shard_uri: str) -> int:
    """The local runtime: the builder entrypoint as a subprocess of the worker, for
    development only: nothing confines the build (its summary line and the shard record
    say so). Its exit status.

    No timeout here (nor an execution_timeout on the task): a shard's length grows with
    its kernels, and each make inside it is already bounded (compile.BUILD_TIMEOUT_S),
    so a hung compile fails its driver and the shard goes on."""
    from drivers.build.shard_run import SANDBOX_ENV

    command = [sys.executable, "-m", "drivers", *builder_arguments(shard_uri)]
    env = dict(os.environ, **{SANDBOX_ENV: "none"})
    return subprocess.run(command, env=env, check=False).returncode


def builder_sandbox(config: Config, builder: str) -> Sandbox:
    """The docker runtime: how one builder's shards run (drivers.build.sandbox)."""
    from drivers.build.sandbox import for_builder

    try:
        return for_builder(config, builder)
    except ValueError as e:  # no image: no retry makes one
        raise AirflowFailException(str(e)) from None


def _pod_kwargs(config: Config, resources: dict[str, str], labels: dict[str, str]) -> dict:
    """The team's pod defaults (KubernetesPodOperator keywords) from the [kubernetes] table."""
    from kubernetes.client import models as k8s

    pod = config.kubernetes
    resources = pod["resources"] | resources
    return {
        # the pods use the buckets the workers use
        "env_vars": [k8s.V1EnvVar(name=k, value=v) for k, v in Buckets.from_env().to_env().items()],
        "namespace": pod["namespace"],
        "kubernetes_conn_id": pod["connection"],
        "service_account_name": pod["service_account"],  # workload identity: no keys
        "container_resources": k8s.V1ResourceRequirements(
            requests={"cpu": resources["cpu"], "memory": resources["memory"]},
            limits={"memory": resources["memory"]},
        ),
        "active_deadline_seconds": pod["active_deadline_seconds"],
        "node_selector": pod.get("node_selector") or None,
        "labels": {"app": "collector-drivers"} | labels,
        "on_finish_action": "delete_pod",
        "deferrable": True,
        "get_logs": True,
        "termination_message_policy": "FallbackToLogsOnError",
        "retries": 3,  # evicted, preempted or timed-out pods
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
    }


def builder_pod_kwargs(config: Config, builder: str, pool: str = BUILDER_POOL) -> dict[str, Any]:
    """One builder's pods (KubernetesPodOperator.partial keywords)."""
    from kubernetes.client import models as k8s

    from drivers.build.shard_run import SANDBOX_ENV
    from drivers.ops import deploy

    image = config.builders[builder].image
    pod = _pod_kwargs(config, config.builders[builder].resources, {"builder": builder})
    pod_context, container_context = deploy.builder_security_context()
    work = k8s.V1EmptyDirVolumeSource(size_limit=deploy.WORK_SIZE_LIMIT)
    env = {
        IMAGE_ENV: image,  # the build records name the image: the quarantine's environment
        SANDBOX_ENV: "kubernetes",  # the shard record says what confined it
        "TMPDIR": deploy.WORK_MOUNT,  # the scratch folder: the root file system is read-only
    }
    return pod | {
        "task_id": "build_shard",
        "image": image,
        "cmds": ["drivers"],
        "pool": pool,
        "env_vars": pod["env_vars"] + [k8s.V1EnvVar(name=k, value=v) for k, v in env.items()],
        # sandboxed: non-root, read-only root, no privilege escalation, no capabilities,
        # no API token; its NetworkPolicy (drivers deploy network-policy) limits egress
        "security_context": pod_context,
        "container_security_context": container_context,
        "automount_service_account_token": False,
        "volumes": [k8s.V1Volume(name=deploy.WORK_VOLUME, empty_dir=work)],
        "volume_mounts": [k8s.V1VolumeMount(name=deploy.WORK_VOLUME, mount_path=deploy.WORK_MOUNT)],
    }


# The mirror pod: skopeo copies the source image to the internal registry and to an OCI
# layout on the pod's disk, then `drivers image mirror` (the embedded mirror_image step)
# puts that layout in the work bucket and hands the extraction targets to XCom.
# (tests/test_cpaas.py runs this script with real skopeo on OCI archives.)
MIRROR_SCRIPT = """set -eu
work=$(mktemp -d)
skopeo copy --all --retry-times 3 "$SOURCE_IMAGE" "oci:$work/image:drivers"
skopeo copy --all --retry-times 3 "oci:$work/image:drivers" "$INTERNAL_IMAGE"
xcom=${XCOM_FILE:-/airflow/xcom/return.json}
mkdir -p "$(dirname "$xcom")"
exec drivers image mirror "$work/image" --run-id "$RUN_ID" \
    --architectures "$ARCHITECTURES" $FORCE --xcom "$xcom"
"""


def mirror_pod_kwargs(config: Config) -> dict[str, Any]:
    """cpaas_drivers' mirror_image task on the kubernetes runtime."""
    from kubernetes.client import models as k8s

    env = {
        "SOURCE_IMAGE": "{{ params.source_image }}",
        "INTERNAL_IMAGE": "docker://" + config.cpaas["internal_registry"] + ":{{ ts_nodash }}",
        "RUN_ID": "{{ run_id }}",
        "ARCHITECTURES": "{{ params.architectures | join(',') }}",
        "FORCE": "{{ '--force' if params.force else '' }}",
    }
    pod = _pod_kwargs(config, {}, {"step": "mirror"})
    return pod | {
        "task_id": "mirror_image",
        "image": config.cpaas["mirror_image"],
        "cmds": ["/bin/sh", "-c"],
        "arguments": [MIRROR_SCRIPT],
        "env_vars": pod["env_vars"] + [k8s.V1EnvVar(name=k, value=v) for k, v in env.items()],
        "do_xcom_push": True,
    }


def vm_test_arguments(xcom: str | None = None) -> list[str]:
    """``drivers integration-tests`` for the running upstream_drivers run (templated)."""
    arguments = ["integration-tests", "--run-id", "{{ run_id }}"]
    arguments += ["--mode", "{{ params.vm_tests }}", "--budget-s", "{{ params.vm_tests_budget_s }}"]
    return arguments + (["--xcom", xcom] if xcom else [])


def vm_test_pod_kwargs(config: Config) -> dict[str, Any]:
    """upstream_drivers' integration_tests on the kubernetes runtime: the same stage in
    a vm-test pod (QEMU in a container; /dev/kvm from the node when it has one)."""
    from kubernetes.client import models as k8s

    vm = config.vm_tests
    pod = _pod_kwargs(config, vm["resources"], {"step": "vm-tests"})
    kvm = {}
    if vm["kvm"]:
        device = k8s.V1HostPathVolumeSource(path="/dev/kvm", type="CharDevice")
        kvm = {
            "volumes": [k8s.V1Volume(name="kvm", host_path=device)],
            "volume_mounts": [k8s.V1VolumeMount(name="kvm", mount_path="/dev/kvm")],
            "container_security_context": k8s.V1SecurityContext(privileged=True),
        }
    return (
        pod
        | kvm
        | {
            "task_id": "integration_tests",
            "image": vm["image"],
            "cmds": ["drivers"],
            "arguments": vm_test_arguments("/airflow/xcom/return.json"),
            "do_xcom_push": True,
            # the stage's own budget bounds it; the deadline only catches a stuck pod
            "active_deadline_seconds": int(vm["budget_s"]) + 3600,
        }
    )


def cpaas_params(config: Config) -> dict[str, Param]:
    from drivers.domain.layout import ARCH_TO_CACHE

    return {
        "source_image": Param(
            config.cpaas["source_image"],
            type="string",
            minLength=1,
            title="Drivers image",
            description="Registry reference (docker://..., kubernetes runtime) or the path "
            "of an OCI image layout, folder or tar (embedded default).",
        ),
        "architectures": Param(
            list(config.cpaas["architectures"]),
            type="array",
            items={"type": "string", "enum": sorted(ARCH_TO_CACHE)},
            minItems=1,
            uniqueItems=True,
            title="Architectures (OCI names)",
        ),
        "dry_run": Param(False, type="boolean", title="Check and report only: publish nothing"),
        "force": Param(
            False, type="boolean", title="Take the image even if its digest is unchanged"
        ),
    }


# --- tearing a run down ---------------------------------------------------------------------


def run_pods_selector(dag_id: str, run_id: str) -> str:
    """The label selector of every pod a run started: the team's ``app`` label plus the
    ``dag_id`` and ``run_id`` labels KubernetesPodOperator puts on each pod it starts
    (with ``task_id`` and ``map_index``: the builder and the shard)."""
    from airflow.providers.cncf.kubernetes.pod_generator import make_safe_label_value

    return (
        f"app=collector-drivers,dag_id={make_safe_label_value(dag_id)},"
        f"run_id={make_safe_label_value(run_id)}"
    )


def delete_run_pods(config: Config, dag_id: str, run_id: str) -> list[str]:
    """Delete the run's pods still there (a cancelled run's builders); their names."""
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    namespace = config.kubernetes["namespace"]
    api = KubernetesHook(conn_id=config.kubernetes["connection"]).core_v1_client
    pods = api.list_namespaced_pod(namespace, label_selector=run_pods_selector(dag_id, run_id))
    names = [pod.metadata.name for pod in pods.items]
    for name in names:
        api.delete_namespaced_pod(name, namespace, grace_period_seconds=30)
    return names


def staging_cleanup() -> dict[str, Callable[[Stores, str], int]]:
    """What removes a run's staging (and releases its claim), per DAG. A function, not a
    module constant: the flows import google-cloud-storage, which DAG parsing must not."""
    from drivers.flows import cpaas, upstream

    return {
        UPSTREAM_DRIVERS: upstream.cleanup_staging,
        BACKFILL_DRIVERS: upstream.cleanup_staging,
        CPAAS_DRIVERS: cpaas.cleanup_staging,
    }


def teardown_run(dag_id: str, run_id: str) -> None:
    """A failed or cancelled run's teardown (plugins/drivers_teardown.py calls it when a
    run fails or is marked failed in the UI): its pods are deleted by label, its
    staging removed and its claim released (upstream and backfill: cleanup_staging);
    reports stay. Runs that end normally are cleaned by their cleanup_staging task."""
    import logging

    from drivers.domain.config import load_config

    if dag_id not in DAG_IDS:  # another team's DAG
        return
    log = logging.getLogger(__name__)
    config = load_config()
    if config.runtime == "kubernetes":
        log.warning(
            "%s %s: deleted pods %s", dag_id, run_id, delete_run_pods(config, dag_id, run_id)
        )
    removed = staging_cleanup()[dag_id](stores(), run_id)
    log.warning("%s %s: removed %d staging object(s)", dag_id, run_id, removed)


NOTIFY_CONN_ID = os.environ.get("DRIVERS_NOTIFY_CONN_ID", "drivers_notify")


def notify_run(context: dict[str, Any], verdict: dict[str, Any]) -> bool:
    """Send one message for a failed or degraded run (:mod:`drivers.ops.notify`) to the
    webhook of the ``drivers_notify`` connection (its host is the webhook URL); no
    connection, no message. Returns whether a message went out."""
    from airflow.configuration import conf
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    from drivers.ops import notify

    dag_id, run_id = context["dag"].dag_id, context["run_id"]
    base = conf.get("api", "base_url", fallback=None)
    run_url = f"{base.rstrip('/')}/dags/{dag_id}/runs/{run_id}" if base else None
    payload = notify.run_message(dag_id, run_id, verdict, run_url)
    if payload is None:
        return False
    try:
        connection = BaseHook.get_connection(NOTIFY_CONN_ID)
    except AirflowNotFoundException:
        return False
    url = connection.host if "://" in (connection.host or "") else connection.get_uri()
    try:
        notify.post(url, payload)
    except notify.NotifyError as e:  # the run's verdict stands; the message is lost, said so
        import logging

        logging.getLogger(__name__).error("%s %s: no notification sent: %s", dag_id, run_id, e)
        return False
    return True


def watch(verdict: dict[str, Any]) -> dict[str, Any]:
    """The watcher's last word, in every DAG (its final task, trigger rule all_done, which
    got every step's summary and judged them: :mod:`drivers.domain.verdict`): one message
    for a failed or degraded run, and a failed verdict fails the task, so the run fails
    instead of going green (the watcher of Airflow's own system tests)."""
    from airflow.sdk import get_current_context

    from drivers.domain.verdict import FAILED

    notify_run(get_current_context(), verdict)
    if verdict["status"] == FAILED:
        raise AirflowFailException("; ".join(verdict["reasons"]) + f" ({verdict['report']})")
    return verdict


def failed_tasks(context: dict[str, Any]) -> list[str]:
    """Tasks of this run that failed (for the report task, the run's watcher); the ones
    that did not run because of them (upstream_failed) are not the culprits."""
    run_id = context["run_id"]
    states = context["ti"].get_task_states(dag_id=context["dag"].dag_id, run_ids=[run_id])
    return sorted({t for t, s in states.get(run_id, {}).items() if s == "failed"})
