"""Builder pods, rendered offline and checked as Kubernetes objects (no API server here)."""

import contextlib
import json

import pytest

DUMMY_KUBECONFIG = """
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: u, user: {token: dummy}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Pods render without a cluster: a dummy kubeconfig, a private Airflow home."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(DUMMY_KUBECONFIG)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))


@pytest.fixture
def rendered(offline):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import ApiClient

    from drivers.airflow import glue as glue
    from drivers.domain.config import load_config

    def render(builder: str, shard: str = "gs://collector-work/staging/r1/shards/x-0000.json"):
        kwargs = glue.builder_pod_kwargs(load_config(), builder)
        kwargs.pop("pool"), kwargs.pop("retries"), kwargs.pop("retry_delay")
        operator = KubernetesPodOperator(arguments=glue.builder_arguments(shard), **kwargs)
        pod = operator.build_pod_request_obj()
        return operator, ApiClient().sanitize_for_serialization(pod)

    return render


def test_builder_pod_runs_the_entrypoint_with_the_shard(rendered):
    operator, pod = rendered("fc36", "gs://w/staging/run/shards/fc36-0003.json")
    container = pod["spec"]["containers"][0]
    assert container["image"] == "quay.io/stackrox-io/collector-drivers-builder-fc36:0.1.0"
    assert container["command"] == ["drivers"]
    assert container["args"] == [
        "build-shard",
        "--shard",
        "gs://w/staging/run/shards/fc36-0003.json",
    ]
    assert container["resources"] == {
        "limits": {"memory": "4Gi"},
        "requests": {"cpu": "2", "memory": "4Gi"},
    }
    assert pod["spec"]["serviceAccountName"] == "drivers-builder"
    assert pod["spec"]["activeDeadlineSeconds"] == 21600
    assert pod["spec"]["nodeSelector"] == {"cloud.google.com/gke-nodepool": "builders"}
    assert pod["metadata"]["namespace"] == "collector-drivers"
    assert pod["metadata"]["labels"]["builder"] == "fc36"
    assert operator.deferrable and operator.on_finish_action.value == "delete_pod"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["DRIVERS_BUILDER_IMAGE"] == container["image"]  # the ledger's environment
    # an evicted, preempted or timed-out pod is retried 3 times, after 1, 2, 4 minutes
    from datetime import timedelta

    from drivers.airflow import glue as glue
    from drivers.domain.config import load_config

    kwargs = glue.builder_pod_kwargs(load_config(), "fc36", glue.BUILDER_POOL)
    retry = (kwargs["retries"], kwargs["retry_delay"], kwargs["retry_exponential_backoff"])
    assert retry == (3, timedelta(minutes=1), True)


def test_builder_pod_carries_no_credentials(rendered):
    _, pod = rendered("rhel7")
    env = pod["spec"]["containers"][0].get("env") or []
    assert not [
        e
        for e in env
        if any(w in e["name"].upper() for w in ("KEY", "SECRET", "TOKEN", "CREDENTIAL"))
    ]
    # its only volume is the shard's scratch, an emptyDir; no API token either
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["work"]
    assert pod["spec"]["volumes"][0]["emptyDir"] == {"sizeLimit": "8Gi"}
    assert pod["spec"]["automountServiceAccountToken"] is False


@pytest.mark.parametrize("builder", ["rhel7", "rhel8", "fc36"])
def test_builder_pods_are_sandboxed(rendered, builder):
    """Non-root (the images' uid 1000), read-only root with the scratch an emptyDir
    (TMPDIR), no privilege escalation, no capabilities, RuntimeDefault seccomp."""
    _, pod = rendered(builder)
    spec, container = pod["spec"], pod["spec"]["containers"][0]
    assert spec["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }  # fmt: skip
    assert container["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
        "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
        "privileged": False, "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }  # fmt: skip
    assert container["volumeMounts"] == [{"mountPath": "/work", "name": "work"}]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TMPDIR"] == "/work"  # build-shard's scratch folder: the emptyDir
    assert env["DRIVERS_SANDBOX"] == "kubernetes"
    from drivers.ops.deploy import builder_pod_selector

    labels = pod["metadata"]["labels"]
    selector = builder_pod_selector()  # the NetworkPolicy applies to this pod
    assert labels.items() >= selector["matchLabels"].items()
    assert all(e["key"] in labels for e in selector["matchExpressions"])


def test_the_builders_network_policy_allows_only_dns_metadata_and_google_apis(tmp_path):
    import kubernetes_validate

    from drivers.domain.config import load_config
    from drivers.ops.cli import main

    out = tmp_path / "policy.json"
    with open(out, "w") as f, contextlib.redirect_stdout(f):
        assert main(["deploy", "network-policy"]) == 0
    policy = json.loads(out.read_text())
    kubernetes_validate.validate(policy, "1.33", strict=True)
    assert policy["metadata"]["namespace"] == load_config().kubernetes["namespace"]
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"] and spec["ingress"] == []
    allowed = {
        (peer.get("ipBlock", {}).get("cidr") or peer["podSelector"]["matchLabels"]["k8s-app"],
         port["protocol"], port["port"])
        for rule in spec["egress"] for peer in rule["to"] for port in rule["ports"]
    }  # fmt: skip
    assert allowed == {
        ("kube-dns", "UDP", 53), ("kube-dns", "TCP", 53),
        ("169.254.169.254/32", "TCP", 80), ("169.254.169.254/32", "TCP", 988),
        ("169.254.169.252/32", "TCP", 80), ("169.254.169.252/32", "TCP", 988),
        ("199.36.153.8/30", "TCP", 443),
    }  # fmt: skip


@pytest.mark.parametrize("builder", ["rhel7", "rhel8", "fc36"])
def test_builder_pod_is_a_valid_kubernetes_object(rendered, builder):
    import kubernetes_validate

    _, pod = rendered(builder)
    kubernetes_validate.validate(pod, "1.33", strict=True)


def render_pod(kwargs: dict, context: dict) -> tuple:
    """A pod operator's request with its templates rendered for a run."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from jinja2.sandbox import SandboxedEnvironment
    from kubernetes.client import ApiClient

    kwargs = dict(kwargs)
    kwargs.pop("retries"), kwargs.pop("retry_delay")
    operator = KubernetesPodOperator(**kwargs)
    operator.render_template_fields(context, jinja_env=SandboxedEnvironment())
    pod = operator.build_pod_request_obj()
    return operator, ApiClient().sanitize_for_serialization(pod)


@pytest.fixture
def mirror_pod(offline):
    """cpaas_drivers' mirror pod with its templates rendered for a run."""
    from drivers.airflow import glue as glue
    from drivers.domain.config import load_config

    context = {
        "params": {"source_image": "docker://quay.io/x/drivers:1", "architectures": ["amd64",
                   "s390x"], "force": True},
        "run_id": "scheduled__2026-11-25T00:00:00+00:00",
        "ts_nodash": "20261125T000000",
    }  # fmt: skip
    return render_pod(glue.mirror_pod_kwargs(load_config()), context)


def test_mirror_pod_copies_with_skopeo_and_hands_targets_to_xcom(mirror_pod):
    from drivers.airflow.glue import MIRROR_SCRIPT

    operator, pod = mirror_pod
    container = pod["spec"]["containers"][0]
    assert container["image"] == "quay.io/stackrox-io/collector-drivers-mirror:0.1.0"
    assert container["command"] == ["/bin/sh", "-c"]
    assert container["args"] == [MIRROR_SCRIPT.strip()]  # Jinja drops the last newline
    env = {e["name"]: e["value"] for e in container["env"]}
    assert (
        env.items()
        >= {
            "SOURCE_IMAGE": "docker://quay.io/x/drivers:1",
            "INTERNAL_IMAGE": "docker://us-docker.pkg.dev/collector-drivers/internal/"
            "drivers-downstream:20261125T000000",
            "RUN_ID": "scheduled__2026-11-25T00:00:00+00:00",
            "ARCHITECTURES": "amd64,s390x",
            "FORCE": "--force",
            "DRIVERS_BUCKET_WORK": "collector-work",
        }.items()
    )
    assert operator.do_xcom_push  # the xcom sidecar reads /airflow/xcom/return.json
    assert pod["metadata"]["labels"]["step"] == "mirror"
    assert pod["spec"]["serviceAccountName"] == "drivers-builder"
    import kubernetes_validate

    kubernetes_validate.validate(pod, "1.33", strict=True)


UPSTREAM_CONTEXT = {
    "params": {"vm_tests": "warn", "vm_tests_budget_s": 600},
    "run_id": "scheduled__2026-11-25T02:00:00+00:00",
}


@pytest.mark.parametrize("kvm", [False, True])
def test_vm_test_pod_runs_the_stage_on_the_runs_staged_drivers(offline, tmp_path, kvm, monkeypatch):
    import kubernetes_validate

    from drivers.airflow import glue as glue
    from drivers.domain.config import default_config_path, load_config

    monkeypatch.setenv("DRIVERS_BUCKET_WORK", "prod-work")
    config = tmp_path / "pipeline.toml"
    shipped = default_config_path().read_text()
    config.write_text(shipped.replace("kvm = false", f"kvm = {str(kvm).lower()}"))
    operator, pod = render_pod(glue.vm_test_pod_kwargs(load_config(config)), UPSTREAM_CONTEXT)
    container = pod["spec"]["containers"][0]
    assert container["image"] == "quay.io/stackrox-io/collector-drivers-vmtest:0.1.0"
    assert container["command"] == ["drivers"]
    assert container["args"] == [
        "integration-tests", "--run-id", "scheduled__2026-11-25T02:00:00+00:00",
        "--mode", "warn", "--budget-s", "600", "--xcom", "/airflow/xcom/return.json",
    ]  # fmt: skip
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["DRIVERS_BUCKET_WORK"] == "prod-work"  # the workers' buckets, not defaults
    assert env["DRIVERS_BUCKET_KERNEL_IMAGES"] == "collector-kernel-images"
    assert container["resources"]["requests"] == {"cpu": "2", "memory": "3Gi"}
    assert pod["metadata"]["labels"]["step"] == "vm-tests"
    assert operator.do_xcom_push
    mounts = [m["mountPath"] for m in container.get("volumeMounts") or []]
    assert ("/dev/kvm" in mounts) == kvm
    assert (container.get("securityContext") or {}).get("privileged", False) == kvm
    kubernetes_validate.validate(pod, "1.33", strict=True)


def test_builder_containers_run_in_the_builders_image_with_its_limits(monkeypatch, tmp_path):
    from drivers.airflow import glue as glue
    from drivers.domain.config import default_config_path, load_config

    monkeypatch.setenv("DOCKER_HOST", "unix:///run/podman/podman.sock")
    config = tmp_path / "pipeline.toml"
    config.write_text(default_config_path().read_text() + "\n[docker]\ntime_limit_s = 3600\n")
    sandbox = glue.builder_sandbox(load_config(config), "fc36")
    assert sandbox.image == "quay.io/stackrox-io/collector-drivers-builder-fc36:0.1.0"
    assert sandbox.docker_url == "unix:///run/podman/podman.sock"  # DOCKER_HOST wins
    assert (sandbox.cpus, sandbox.memory) == (2.0, "4g")  # the builder's resources
    assert (sandbox.time_limit_s, sandbox.pids_limit) == (3600, 4096)  # [docker], defaults
    assert sandbox.labels == {"app": "collector-drivers", "builder": "fc36"}


def test_a_docker_table_cannot_give_builders_a_network(tmp_path):
    from drivers.domain.config import ConfigError, default_config_path, load_config

    config = tmp_path / "pipeline.toml"
    config.write_text(default_config_path().read_text() + '\n[docker]\nnetwork_mode = "host"\n')
    with pytest.raises(ConfigError, match="never has network: network_mode is not a setting"):
        load_config(config)


def test_a_cancelled_runs_pods_are_found_by_the_labels_they_really_carry(rendered, monkeypatch):
    """The teardown selector matches the labels KubernetesPodOperator puts on a builder
    pod of that run (rendered with a task context), and only that run's."""
    from types import SimpleNamespace

    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    from drivers.airflow import glue as glue
    from drivers.domain.config import load_config

    run_id = "manual__2026-11-25T02:00:00.123456+00:00"
    operator, _ = rendered("fc36")
    ti = SimpleNamespace(dag_id="upstream_drivers", task_id="fc36.build_shard", map_index=3,
                         try_number=1)  # fmt: skip
    context = {"ti": ti, "run_id": run_id, "dag": SimpleNamespace(dag_id="upstream_drivers")}
    labels = operator.build_pod_request_obj(context).metadata.labels
    assert labels["map_index"] == "3" and labels["task_id"] == "fc36.build_shard"  # the shard

    def matches(selector: str, labels: dict) -> bool:
        return all(labels.get(k) == v for k, v in (r.split("=") for r in selector.split(",")))

    assert matches(glue.run_pods_selector("upstream_drivers", run_id), labels)
    assert not matches(glue.run_pods_selector("upstream_drivers", run_id + "x"), labels)

    calls = []

    class FakeCoreV1:  # no API server here: record what would be asked of it
        def list_namespaced_pod(self, namespace, label_selector):
            calls.append(("list", namespace, label_selector))
            pods = [SimpleNamespace(metadata=SimpleNamespace(name=n)) for n in ("p0", "p3")]
            return SimpleNamespace(items=pods)

        def delete_namespaced_pod(self, name, namespace, grace_period_seconds):
            calls.append(("delete", namespace, name))

    monkeypatch.setattr(KubernetesHook, "core_v1_client", FakeCoreV1())
    assert glue.delete_run_pods(load_config(), "upstream_drivers", run_id) == ["p0", "p3"]
    assert calls == [
        ("list", "collector-drivers", glue.run_pods_selector("upstream_drivers", run_id)),
        ("delete", "collector-drivers", "p0"),
        ("delete", "collector-drivers", "p3"),
    ]
