"""upstream_drivers through the real scheduler (`make test-distributed`): PostgreSQL,
`airflow scheduler`, `dag-processor`, `api-server` and `triggerer` as separate processes
(LocalExecutor), runs triggered and watched through the REST API with a token, the
embedded GCS, the local runtime, real Debian bundles and compilers.

Then the scheduler's whole process group is SIGKILLed in the middle of a second run with
new kernels and started again: the run still succeeds, what was published before is
untouched, shards that had finished are not built again, and every upload planned as new
creates its object (none meets a precondition failure)."""

from __future__ import annotations

import json
import time
import urllib.parse

import pytest

from distributed import CONFIG, DistributedAirflow, unavailable_reason
from drivers.domain import layout
from drivers.domain.layout import report_prefix
from pipeline_env import pipeline_env, publish_bundle, publish_sources

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

DAG = "upstream_drivers"
FIRST = ("6.1.0-56-cloud-amd64", "6.12.115+deb12-cloud-amd64")
SECOND = (  # new kernels for the run the scheduler dies in: one shard each
    "6.1.0-47-cloud-amd64",
    "6.1.0-47-amd64",
    "6.12.113+deb12-cloud-amd64",
    "6.12.113+deb12-amd64",
)


@pytest.fixture(scope="module")
def deployment(gcs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    with pipeline_env(gcs, tmp, CONFIG, name="dist") as stores:
        for kernel in FIRST:
            publish_bundle(stores, kernel)
        publish_sources(stores, "2.3.0", tmp)
        with DistributedAirflow(home=tmp / "airflow", heartbeat_timeout_s=30) as airflow:
            airflow.wait_for_dag(DAG)
            yield airflow, stores


def report(stores, run_id: str, part: str = "report") -> dict:
    return json.loads(stores["work"].download(f"{report_prefix(run_id)}{part}.json"))


def generations(stores) -> dict[str, int]:
    return {i.name: i.generation for i in stores["drivers"].list()}


def shard_attempts(airflow, run_id: str) -> dict[tuple[str, int], tuple[str, int]]:
    """(task, map index) -> (state, try number) of every builder shard."""
    return {
        (ti["task_id"], ti["map_index"]): (ti["state"], ti["try_number"])
        for ti in airflow.task_instances(DAG, run_id)
        if ti["task_id"].endswith(".build_shard") and ti["map_index"] >= 0
    }


@pytest.fixture(scope="module")
def first_run(deployment):
    airflow, stores = deployment
    run_id = airflow.trigger(DAG)  # through POST /api/v2/dags/{id}/dagRuns, token auth
    return run_id, airflow.wait_for_run(DAG, run_id, timeout=900)


def test_a_run_triggered_through_the_api_succeeds_on_the_real_scheduler(deployment, first_run):
    _, stores = deployment
    run_id, state = first_run
    assert state == "success", report(stores, run_id)["reasons"]
    assert set(generations(stores)) == {
        f"2.3.0/collector{kind}-{k}.{ext}"
        for k in FIRST
        for kind, ext in (("", "ko.gz"), ("-ebpf", "o.gz"))
    }
    assert report(stores, run_id, "push")["counts"] == {"created": 4}


def test_a_scheduler_killed_mid_run_recovers_without_rebuilding_or_overwriting(
    deployment, first_run
):
    airflow, stores = deployment
    before = generations(stores)
    for kernel in SECOND:
        publish_bundle(stores, kernel)
    run_id = airflow.trigger(DAG)

    # Wait until some shards have finished and others have not, then kill.
    deadline = time.monotonic() + 600
    while True:
        attempts = shard_attempts(airflow, run_id)
        finished = {k: v for k, v in attempts.items() if v[0] == "success"}
        if finished and len(finished) < len(attempts):
            break
        assert airflow.run_state(DAG, run_id) in ("queued", "running"), attempts
        assert time.monotonic() < deadline, f"no shard finished in time: {attempts}"
        time.sleep(0.5)
    airflow.kill("scheduler")  # SIGKILL to its process group: executor workers die too
    killed_at = time.monotonic()
    time.sleep(5)
    airflow.start("scheduler")

    assert airflow.wait_for_run(DAG, run_id, timeout=900) == "success", report(stores, run_id)[
        "reasons"
    ]
    after = shard_attempts(airflow, run_id)
    assert len(after) == 4, after  # one shard per new kernel
    for shard, (state, tries) in finished.items():  # not built again
        assert after[shard] == (state, tries), (shard, after[shard])
    assert all(state == "success" for state, _ in after.values())
    # The published drivers of the first run: the same objects, same generations.
    now = generations(stores)
    assert {name: now[name] for name in before} == before
    # Every upload planned as new created its object: no precondition failure.
    assert report(stores, run_id, "push")["counts"] == {"created": 8}
    assert len(now) == len(before) + 8
    print(f"recovered {time.monotonic() - killed_at:.0f} s after the kill; shards {after}")


def test_a_run_marked_failed_in_the_middle_loses_its_staging(deployment, first_run):
    """Cancelling a run (marking it failed through the API, as the UI does) runs the
    DAG's failure callback: its staging goes (and, on Kubernetes, its pods, by label:
    tests/test_pods.py); published drivers stay."""
    airflow, stores = deployment
    before = generations(stores)
    run_id = airflow.trigger(DAG, {"force": True, "select": FIRST[0]})
    staging = layout.staging_prefix(run_id)
    deadline = time.monotonic() + 300
    while not any(s == "running" for s, _ in shard_attempts(airflow, run_id).values()):
        assert time.monotonic() < deadline, "no builder shard started"
        time.sleep(0.5)
    assert list(stores["work"].list(staging))  # the plan and shard files are there
    quoted = urllib.parse.quote(run_id, safe="")
    airflow.api("PATCH", f"/dags/{DAG}/dagRuns/{quoted}", {"state": "failed"})
    deadline = time.monotonic() + 120
    while list(stores["work"].list(staging)):
        assert time.monotonic() < deadline, "the failed run's staging is still there"
        time.sleep(1)
    assert airflow.run_state(DAG, run_id) == "failed"
    assert generations(stores) == before
