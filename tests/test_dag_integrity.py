"""Every DAG parses, follows the team's policies, and has the shape the config gives it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"


def dagbag(env: dict[str, str] | None = None):
    """Parse dags/ in a fresh interpreter, so environment settings (runtime, config) apply
    exactly as a DAG processor would see them."""
    full_env = os.environ | {"AIRFLOW__CORE__LOAD_EXAMPLES": "False"} | (env or {})
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "dagbag_dump.py"), str(DAGS)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    return dagbag({"AIRFLOW_HOME": str(tmp_path_factory.mktemp("airflow"))})


# One factory builds the nightly and the backfill, so they cannot drift apart: the
# backfill's file is the nightly's.
FACTORY_FILES = {"backfill_drivers": "upstream_drivers"}


def test_dags_parse_without_errors(bag):
    assert bag["errors"] == {}
    assert {"upstream_drivers", "backfill_drivers", "cpaas_drivers"} <= set(bag["dags"])


def test_dag_ids_are_file_stems_and_follow_policy(bag):
    for dag_id, dag in bag["dags"].items():
        assert Path(dag["file"]).stem == FACTORY_FILES.get(dag_id, dag_id)
        assert dag["tags"], dag_id
        assert dag["doc"], dag_id
        for task_id, task in dag["tasks"].items():
            assert task["owner"] == "drivers", task_id


# The shipped pipeline.toml: retries = 2, retry_delay_s = 120.
RETRIES, RETRY_DELAY_S = 2, 120.0


def test_every_task_retries_transient_failures_with_exponential_backoff(bag):
    """The configured policy on every task (bad input fails at once, never retried); only
    the watcher (report) is never retried: its verdict is the run's, a retry repeats it."""
    for dag_id, dag in bag["dags"].items():
        for task_id, task in dag["tasks"].items():
            policy = (task["retries"], task["backoff"])
            delays = (task["retry_delay_s"], task["max_retry_delay_s"])
            assert policy == (0 if task_id == "report" else RETRIES, True), (dag_id, task_id)
            assert delays == (RETRY_DELAY_S, 16 * RETRY_DELAY_S), (dag_id, task_id)


def test_upstream_drivers_shape_comes_from_config(bag):
    dag = bag["dags"]["upstream_drivers"]
    assert dag["schedule"] == "0 2 * * *" and dag["catchup"] is False
    assert dag["max_active_runs"] == 1
    assert set(dag["params"]) >= {
        "driver_versions",
        "select",
        "kinds",
        "builders",
        "force",
        "dry_run",
        "max_failures",
        "vm_tests",
        "vm_tests_budget_s",
        "accept_shrink",
        "other_driver_versions",
    }
    tasks = dag["tasks"]
    # drivers are load-tested in their kernel between verification and publication
    assert tasks["verify_drivers"]["downstream"] == ["integration_tests", "report"]
    assert tasks["integration_tests"]["downstream"] == ["push_drivers", "report"]
    assert "trigger_external_suite" not in tasks  # off unless configured
    for builder in ("rhel7", "rhel8", "fc36"):
        assert tasks[f"{builder}.build_shard"]["pool"] == "builders"
        assert tasks[f"{builder}.build_shard"]["downstream"] == ["unify"]
        assert tasks["pre_build"]["downstream"].count(f"{builder}.shards") == 1
    assert {(t["priority_weight"], t["weight_rule"]) for t in tasks.values()} == {(10, "absolute")}
    assert tasks["cleanup_staging"]["downstream"] == ["report"]
    assert "cleanup_staging" in tasks["record_ledger"]["downstream"]
    assert tasks["unify"]["trigger_rule"] == "all_done"
    assert tasks["report"]["trigger_rule"] == "all_done"
    assert tasks["cleanup_staging"]["trigger_rule"] == "all_done"
    assert tasks["cleanup_staging"]["downstream"] == ["report"]
    assert tasks["report"]["downstream"] == []  # the watcher is the only leaf
    assert tasks["report"]["retries"] == 0


def edges(dag: dict) -> dict[str, tuple]:
    return {
        t: (x["type"], x["trigger_rule"], tuple(x["downstream"])) for t, x in dag["tasks"].items()
    }


def test_backfill_drivers_is_the_nightly_by_hand_in_its_own_pool_at_lower_priority(bag):
    nightly, backfill = bag["dags"]["upstream_drivers"], bag["dags"]["backfill_drivers"]
    assert backfill["schedule"] == "None" and backfill["catchup"] is False
    assert backfill["max_active_runs"] == 1  # one backfill at a time
    assert edges(backfill) == edges(nightly)  # same tasks, same order (record_ledger too)
    assert "record_ledger" in backfill["tasks"]
    for task_id, task in backfill["tasks"].items():
        pool = "backfill_builders" if task_id.endswith(".build_shard") else "default_pool"
        assert task["pool"] == pool, task_id
        assert task["weight_rule"] == "absolute", task_id
        assert task["priority_weight"] < nightly["tasks"][task_id]["priority_weight"], task_id
    assert backfill["params"] == nightly["params"]
    select = backfill["param_schemas"]["select"]
    assert select["has_default"] is False  # required: the form will not trigger without it
    assert select["type"] == "string" and select["minLength"] == 1
    assert select["pattern"] == r"\S" and select["examples"]
    assert backfill["param_schemas"]["dry_run"]["default"] is True  # the plan first
    assert nightly["param_schemas"]["dry_run"]["default"] is False
    assert nightly["param_schemas"]["select"]["default"] is None  # every kernel


def test_the_trigger_form_renders_choices_and_proposals(bag):
    """What the Airflow 3.3 form makes of a schema: an array with ``examples`` is a
    multi-select of them, an array of strings without is one value per line, a string
    with ``examples`` a text field proposing them."""
    schemas = bag["dags"]["upstream_drivers"]["param_schemas"]
    assert schemas["driver_versions"]["examples"] == ["2.3.0", "8.1.0"]  # shipped
    assert "examples" not in schemas["other_driver_versions"]  # typed, one per line
    assert schemas["kinds"]["examples"] == ["mod", "bpf"]
    assert schemas["builders"]["examples"] == ["rhel7", "rhel8", "fc36"]
    examples = schemas["select"]["examples"]
    for kind in ("..", "*", "~", ">=", ":"):  # a range, glob, regex, comparison, family
        assert any(kind in e for e in examples), kind
    for name, schema in schemas.items():
        assert schema["title"] and schema["description"], name


def test_cpaas_drivers_shape(bag):
    dag = bag["dags"]["cpaas_drivers"]
    assert dag["schedule"] == "0 0 * * *" and dag["catchup"] is False
    assert dag["max_active_runs"] == 1
    assert dag["params"] == ["architectures", "dry_run", "force", "source_image"]
    tasks = dag["tasks"]
    assert tasks["mirror_image"]["downstream"] == ["extract_drivers", "report"]
    # per architecture: extract -> push -> pull -> packages, all mapped; each step's
    # summary goes to the watcher
    for task, after in [
        ("extract_drivers", ["push_drivers", "report", "test_drivers_compilation"]),
        ("push_drivers", ["pull_missing", "report"]),
        ("pull_missing", ["build_support_packages", "report"]),
        ("build_support_packages", ["cleanup_staging", "report"]),
    ]:
        assert tasks[task]["type"] == "DecoratedMappedOperator", task
        assert tasks[task]["downstream"] == after, task
    # push and packages do not wait on the failure test
    assert tasks["test_drivers_compilation"]["downstream"] == ["cleanup_staging", "report"]
    assert tasks["cleanup_staging"]["trigger_rule"] == "all_done"
    assert tasks["cleanup_staging"]["downstream"] == ["report"]


@pytest.mark.parametrize("dag_id", ["upstream_drivers", "backfill_drivers", "cpaas_drivers"])
def test_report_is_the_watcher_every_task_leads_to(bag, dag_id):
    """One watcher design in every DAG: the last task, run whatever happened upstream,
    never retried, downstream of every other task (so a failure anywhere reaches its
    verdict)."""
    tasks = bag["dags"][dag_id]["tasks"]
    report = tasks["report"]
    assert report["trigger_rule"] == "all_done" and report["retries"] == 0
    assert report["downstream"] == []
    upstream = {t: {u for u in tasks if t in tasks[u]["downstream"]} for t in tasks}
    reached, todo = set(), ["report"]
    while todo:  # walk back from report
        for task in upstream[todo.pop()] - reached:
            reached.add(task)
            todo.append(task)
    assert reached == set(tasks) - {"report"}


def test_parsing_the_dags_imports_no_google_cloud_storage(tmp_path):
    """DAG parsing stays cheap: google-cloud-storage is imported by tasks, not by the DAG
    files or what they import."""
    script = (
        "import runpy, sys\n"
        f"for name in ('upstream_drivers', 'cpaas_drivers'):\n"
        f"    runpy.run_path('{DAGS}/' + name + '.py')\n"
        "print(sorted(m for m in sys.modules if m.startswith('google.cloud.storage')))\n"
    )
    env = os.environ | {"AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_builders_come_from_the_configured_file(tmp_path):
    config = tmp_path / "pipeline.toml"
    config.write_text(
        '[[builders]]\nname = "deb"\n[[builders]]\nname = "deb2"\n'
        '[[routes]]\nbuilder = "deb"\nkernels = ">=6.12"\nkinds = ["mod", "bpf"]\n'
        '[[routes]]\nbuilder = "deb2"\nkernels = "*"\nkinds = ["mod", "bpf"]\n'
    )
    bag = dagbag({"DRIVERS_CONFIG": str(config), "AIRFLOW_HOME": str(tmp_path)})
    tasks = bag["dags"]["upstream_drivers"]["tasks"]
    assert {t.split(".")[0] for t in tasks if t.endswith(".build_shard")} == {"deb", "deb2"}


def test_kubernetes_runtime_maps_pods(tmp_path):
    bag = dagbag({"DRIVERS_RUNTIME": "kubernetes", "AIRFLOW_HOME": str(tmp_path)})
    tasks = bag["dags"]["upstream_drivers"]["tasks"]
    assert tasks["fc36.build_shard"]["type"] == "MappedOperator"
    cpaas = bag["dags"]["cpaas_drivers"]["tasks"]
    for pod in (tasks["fc36.build_shard"], tasks["integration_tests"], cpaas["mirror_image"]):
        # a lost pod (evicted, preempted) is retried sooner and once more than a task
        assert (pod["retries"], pod["backoff"], pod["retry_delay_s"]) == (3, True, 60.0)
    assert tasks["integration_tests"]["type"] == "KubernetesPodOperator"
    assert tasks["integration_tests"]["downstream"] == ["push_drivers", "report"]
    assert cpaas["mirror_image"]["type"] == "KubernetesPodOperator"
    assert cpaas["mirror_image"]["downstream"] == ["extract_drivers", "report"]


def test_an_external_integration_suite_is_triggered_after_push_when_configured(tmp_path):
    from drivers.domain.config import default_config_path

    config = tmp_path / "pipeline.toml"
    shipped = default_config_path().read_text()
    config.write_text(shipped.replace('external_suite = ""', 'external_suite = "agent_suite"'))
    bag = dagbag({"DRIVERS_CONFIG": str(config), "AIRFLOW_HOME": str(tmp_path)})
    tasks = bag["dags"]["upstream_drivers"]["tasks"]
    assert tasks["trigger_external_suite"]["type"] == "TriggerDagRunOperator"
    assert "trigger_external_suite" in tasks["push_drivers"]["downstream"]
    assert tasks["trigger_external_suite"]["downstream"] == ["report"]


def test_docker_runtime_maps_builder_containers(tmp_path):
    """A Python task per shard that stages, runs the sandboxed container and uploads
    (drivers.build.sandbox): its log is the build's."""
    bag = dagbag({"DRIVERS_RUNTIME": "docker", "AIRFLOW_HOME": str(tmp_path)})
    assert bag["errors"] == {}
    tasks = bag["dags"]["upstream_drivers"]["tasks"]
    for builder in ("rhel7", "rhel8", "fc36"):
        shard = tasks[f"{builder}.build_shard"]
        assert shard["type"] == "DecoratedMappedOperator" and shard["pool"] == "builders"
        assert shard["downstream"] == ["unify"]
