"""backfill_drivers on the embedded Airflow (LocalExecutor + api-server, the real GCS
emulator): a dry run of a kernel range shows the plan (in pre_build's log, the report and
`drivers report`) and builds nothing; what the nightly claimed is left to it; the REST
API judges each trigger conf of tests/trigger_cases.py before a run exists. Bundles are
placeholders: a dry run only lists them."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest

from drivers.domain import layout
from drivers.ops import report
from drivers.ops.embedded import EmbeddedAirflow
from drivers.store import claims
from pipeline_env import pipeline_env
from trigger_cases import TRIGGER_CASES, case_id, refusal

CONFIG = """
driver_versions = ["2.3.0", "2.4.0-rc1"]
blocklists = []
slots = 4
retries = 0
[backfill]
slots = 2
[[builders]]
name = "rhel8"
toolchain = "CentOS Stream 8 gcc"
[[builders]]
name = "fc36"
toolchain = "Fedora 36 gcc + clang"
[[routes]]
builder = "fc36"
kernels = ">=4.18"
kinds = ["bpf"]
[[routes]]
builder = "rhel8"
kernels = ">=4"
kinds = ["mod"]
"""
BELOW, K305, K305_10, K348, K372, ABOVE, EL9 = (
    "4.18.0-240.el8.x86_64",
    "4.18.0-305.el8.x86_64",
    "4.18.0-305.10.2.el8_4.x86_64",
    "4.18.0-348.el8.x86_64",
    "4.18.0-372.9.1.el8_6.x86_64",
    "4.18.0-425.3.1.el8_7.x86_64",
    "5.14.0-70.13.1.el9_0.x86_64",
)
SELECT = "el8:4.18.0-305..4.18.0-372"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def env(gcs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("backfill")
    with pipeline_env(gcs, tmp, CONFIG, name="backfill") as stores:
        for kernel in (BELOW, K305, K305_10, K348, K372, ABOVE, EL9):
            stores["bundles"].upload_new(layout.bundle_object(kernel), b"listed, never built")
        stores["drivers"].upload_new(f"2.3.0/collector-{K305}.ko.gz", b"done already")
        # the nightly in flight holds K348; a run that died long ago held K372
        work = stores["work"]
        claims.write_claim(
            work, "scheduled__nightly", [(K348, "2.3.0", k) for k in ("mod", "bpf")], 3600
        )
        claims.write_claim(
            work,
            "scheduled__died",
            [(K372, "2.3.0", "mod")],
            3600,
            now=datetime.now(UTC) - timedelta(days=2),
        )
        with pytest.MonkeyPatch.context() as mp:
            # task logs at INFO, as deployed (the embedded default keeps WARNING)
            mp.setenv("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")
            with EmbeddedAirflow(home=tmp / "airflow") as airflow:
                yield airflow, stores


@pytest.fixture(scope="module")
def dry_run(env):
    airflow, stores = env
    started = datetime.now().astimezone()
    conf = {"select": SELECT, "driver_versions": ["2.3.0"]}  # dry_run: true by default
    status = airflow.dags_test("backfill_drivers", conf, log=airflow.home / "runs.log", timeout=300)
    names = [
        i.name
        for i in stores["work"].list("reports/")
        if i.name.endswith("/report.json") and i.created >= started
    ]
    assert len(names) == 1, f"no report; see {airflow.home}/runs.log"
    doc = json.loads(stores["work"].download(names[0]))
    return status, doc


def test_a_backfill_dry_run_shows_the_plan_and_builds_nothing(env, dry_run):
    airflow, stores = env
    status, doc = dry_run
    assert status == 0 and doc["status"] == "success", doc["reasons"]
    assert doc["params"]["dry_run"] is True and doc["params"]["select"] == SELECT
    view = doc["plan"]["plan_view"]
    # 4 kernels in range x 2 kinds; K305's module is cached; the nightly holds K348
    assert (view["to_build"], view["done"], view["claimed"]) == (5, 1, 2)
    assert view["claimed_by"] == {"scheduled__nightly": 2}  # the expired claim is ignored
    assert view["builders"]["rhel8"]["mod"] == 2 and view["builders"]["fc36"]["bpf"] == 3
    assert view["builders"]["rhel8"]["first_kernels"] == [K305_10, K372]
    assert view["builders"]["fc36"]["first_kernels"] == [K305, K305_10, K372]
    assert view["slots"] == 2  # balanced over the backfill pool, not the nightly's 4
    assert view["pod_hours"] > 0 and view["makespan_h"] > 0
    # nothing built, published or claimed; staging gone
    assert not doc["steps"]["unify"]["shards_reported"]
    assert [i.name for i in stores["drivers"].list()] == [f"2.3.0/collector-{K305}.ko.gz"]
    assert set(claims.iter_claims(stores["work"])) == {"scheduled__nightly", "scheduled__died"}
    assert not list(stores["work"].list(layout.STAGING_PREFIX))


def test_the_plan_view_is_in_pre_builds_log_and_drivers_report(env, dry_run):
    airflow, _ = env
    _, doc = dry_run
    logs = list((airflow.home / "logs" / "dag_id=backfill_drivers").glob("**/task_id=pre_build/*"))
    assert logs, f"no pre_build log under {airflow.home}/logs"
    text = "\n".join(p.read_text() for p in logs)
    assert "plan (dry run: nothing is built): 5 driver(s) to build" in text
    assert "held by run scheduled__nightly" in text and "pod-hours" in text
    out = io.StringIO()
    report.print_report(doc["run_id"], out=out)
    printed = out.getvalue()
    assert "(dry run: planned only, nothing built or published)" in printed
    assert f"fc36            0      3       3      1  {K305}, {K305_10}, {K372}" in printed
    assert "claimed: 2 task(s) held by run scheduled__nightly (left to it)" in printed


@pytest.fixture(scope="module")
def api(env, dry_run) -> str:
    """The REST API, with every DAG of dags/ stored as the DAG processor stores them (the
    dry run stored only backfill_drivers)."""
    airflow, _ = env
    airflow.airflow("dags", "reserialize", capture_output=True)
    return f"http://127.0.0.1:{airflow.port}/api/v2"


def call(url: str, method: str = "GET", doc: dict | None = None) -> tuple[int, str]:
    body = json.dumps(doc).encode() if doc is not None else None
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"}, method=method)
    try:
        with OPENER.open(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def run_ids(api: str, dag_id: str) -> set[str]:
    status, body = call(f"{api}/dags/{dag_id}/dagRuns?limit=100")
    assert status == 200, body
    return {r["dag_run_id"] for r in json.loads(body)["dag_runs"]}


@pytest.mark.parametrize("case", TRIGGER_CASES, ids=map(case_id, TRIGGER_CASES))
def test_the_rest_api_judges_a_trigger_conf_before_a_run_exists(api, case):
    """The REST API's trigger (what the UI form and `airflow dags trigger` go through), on
    the DAGs as stored: a malformed conf is refused with 400 naming the param, and no run
    is created; a valid one creates its run (deleted again: nothing runs it here)."""
    dag_id, conf, culprit = case
    before = run_ids(api, dag_id)

    status, body = call(
        f"{api}/dags/{dag_id}/dagRuns", "POST", {"logical_date": None, "conf": conf}
    )

    if culprit is None:
        assert status == 200, body
        run_id = json.loads(body)["dag_run_id"]
        assert run_ids(api, dag_id) == before | {run_id}
        assert call(f"{api}/dags/{dag_id}/dagRuns/{run_id}", "DELETE")[0] == 204
    else:
        assert status == 400 and refusal(culprit) in body, (status, body)
    assert run_ids(api, dag_id) == before


def test_the_embedded_airflow_sizes_both_builder_pools_from_the_config(env):
    airflow, _ = env
    url = f"http://127.0.0.1:{airflow.port}/api/v2/pools?limit=100"
    with OPENER.open(url, timeout=30) as response:
        pools = {p["name"]: p for p in json.load(response)["pools"]}
    assert pools["builders"]["slots"] == 4 and pools["backfill_builders"]["slots"] == 2
    assert pools["backfill_builders"]["include_deferred"] is True
