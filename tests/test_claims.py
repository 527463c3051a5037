"""Two runs in flight never plan the same task: the plan lock and the run claims
(drivers.store.claims), through the real pre_build against the real GCS emulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from drivers.domain import layout
from drivers.domain.config import load_config
from drivers.flows import upstream
from drivers.store import claims
from drivers.store.storage import Stores, client_from_environment
from pipeline_env import DEBIAN_BUILDERS, pipeline_env

CONFIG = (
    """
driver_versions = ["2.3.0"]
blocklists = []
slots = 4
[backfill]
slots = 2
[claims]
ttl_s = 3600
lock_stale_s = 30
lock_wait_s = 30
"""
    + DEBIAN_BUILDERS
)
KERNELS = [f"6.1.0-{n}-cloud-amd64" for n in range(50, 56)]  # all on builder deb61


def tasks_of(*kernels: str) -> set[tuple[str, str, str]]:
    return {(k, "2.3.0", kind) for k in kernels for kind in ("mod", "bpf")}


@pytest.fixture
def env(gcs, tmp_path):
    """Fresh buckets with six (unbuildable: nothing is built here) bundles."""
    with pipeline_env(gcs, tmp_path, CONFIG, name="claims") as stores:
        for kernel in KERNELS:
            stores["bundles"].upload_new(layout.bundle_object(kernel), b"planned, never built")
        yield stores


def pre_build(run_id: str, select: str | None = None, dry_run: bool = False) -> dict:
    """The real pre_build, with its own client (as each run's worker has)."""
    config = load_config()
    stores = Stores(client_from_environment())
    params = upstream.RunParams.from_params({"select": select, "dry_run": dry_run}, config)
    return upstream.pre_build(stores, config, run_id, params)


def planned(work, run_id: str) -> set[tuple[str, str, str]]:
    """What the run's builders would build: the tasks of its shard files."""
    prefix = f"{layout.staging_prefix(run_id)}shards/"
    return {tuple(t) for i in work.list(prefix) for t in json.loads(work.download(i.name))["tasks"]}


def test_two_runs_planning_overlapping_kernels_at_once_get_disjoint_tasks(env):
    work = env["work"]
    barrier = threading.Barrier(2)
    results: dict[str, dict] = {}

    def run(run_id: str, select: str) -> None:
        barrier.wait()
        results[run_id] = pre_build(run_id, select)

    threads = [
        threading.Thread(target=run, args=("scheduled__nightly", "6.1.0-50..6.1.0-53")),
        threading.Thread(target=run, args=("manual__backfill", "6.1.0-52..6.1.0-55")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    nightly, backfill = planned(work, "scheduled__nightly"), planned(work, "manual__backfill")
    assert nightly.isdisjoint(backfill)
    assert nightly | backfill == tasks_of(*KERNELS)
    # whichever planned second left the overlap (2 kernels x 2 kinds) to the first
    second = [r for r, out in results.items() if out["summary"]["claimed"]]
    assert len(second) == 1, results
    first = ({"scheduled__nightly", "manual__backfill"} - set(second)).pop()
    assert results[second[0]]["summary"]["claimed"] == 4
    assert results[second[0]]["plan_view"]["claimed_by"] == {first: 4}
    # each run's claim holds exactly what it planned; the lock is released
    for run_id, tasks in (("scheduled__nightly", nightly), ("manual__backfill", backfill)):
        claim = json.loads(work.download(layout.claim_object(run_id)))
        assert {tuple(t) for t in claim["tasks"]} == tasks
    assert not work.exists(layout.PLAN_LOCK_OBJECT)


def test_a_run_waits_for_the_plan_lock_and_then_leaves_the_holders_tasks(env):
    work = env["work"]
    lock = claims.PlanLock(work, "scheduled__holder", stale_s=30, wait_s=30)
    lock.acquire()
    out: dict = {}
    waiting = threading.Thread(target=lambda: out.update(pre_build("manual__waiting")))
    waiting.start()
    time.sleep(1.5)
    assert waiting.is_alive() and not work.exists(layout.claim_object("manual__waiting"))
    # the holder claims two kernels, then releases: the waiting run plans the rest
    claims.write_claim(work, "scheduled__holder", tasks_of(*KERNELS[:2]), ttl_s=3600)
    lock.release()
    waiting.join(30)
    assert out["summary"]["claimed"] == 4 and out["summary"]["to_build"] == 8
    assert planned(work, "manual__waiting") == tasks_of(*KERNELS[2:])


def test_an_expired_claim_is_ignored_and_removed(env):
    work = env["work"]
    two_days_ago = datetime.now(UTC) - timedelta(days=2)
    claims.write_claim(work, "scheduled__died", tasks_of(*KERNELS), ttl_s=3600, now=two_days_ago)
    out = pre_build("manual__after")
    assert out["summary"]["claimed"] == 0 and out["summary"]["to_build"] == 12
    assert planned(work, "manual__after") == tasks_of(*KERNELS)
    assert not work.exists(layout.claim_object("scheduled__died"))  # tidied under the lock
    plan = json.loads(work.download(out["plan"].removeprefix(f"gs://{work.bucket_name}/")))
    assert plan["inputs"]["claims"]["expired_ignored"] == ["scheduled__died"]


def test_cleanup_staging_releases_the_claim(env):
    work = env["work"]
    pre_build("scheduled__first")
    assert pre_build("manual__blocked")["summary"]["claimed"] == 12
    stores = Stores(client_from_environment())
    upstream.cleanup_staging(stores, "scheduled__first")
    assert not work.exists(layout.claim_object("scheduled__first"))
    assert pre_build("manual__free")["summary"]["claimed"] == 0
    # a run with nothing left to build holds no claim
    assert not work.exists(layout.claim_object("manual__blocked"))


def test_a_dry_run_shows_claims_but_takes_no_lock_and_claims_nothing(env):
    work = env["work"]
    claims.write_claim(work, "scheduled__nightly", tasks_of(KERNELS[0]), ttl_s=3600)
    lock = claims.PlanLock(work, "scheduled__other", stale_s=30, wait_s=30)
    lock.acquire()  # a run planning right now does not delay a dry run
    try:
        started = time.monotonic()
        out = pre_build("manual__dry", "6.1.0-50..6.1.0-51", dry_run=True)
        assert time.monotonic() - started < 10
    finally:
        lock.release()
    view = out["plan_view"]
    assert view["claimed_by"] == {"scheduled__nightly": 2} and view["to_build"] == 2
    assert view["builders"]["deb61"]["first_kernels"] == [KERNELS[1]]
    assert not work.exists(layout.claim_object("manual__dry"))
    assert out["shards"] == {"deb61": [], "deb612": []}


def test_a_stale_lock_is_broken_and_a_live_one_times_out_naming_its_holder(env):
    work = env["work"]
    dead = {"run_id": "scheduled__dead", "acquired": "2026-01-01T00:00:00+00:00"}
    dead["stale_after"] = "2026-01-01T00:05:00+00:00"
    work.put(layout.PLAN_LOCK_OBJECT, json.dumps(dead).encode())
    lock = claims.PlanLock(work, "manual__next", stale_s=30, wait_s=5)
    lock.acquire()
    assert lock.broken == ["scheduled__dead"]
    holder = json.loads(work.download(layout.PLAN_LOCK_OBJECT))
    assert holder["run_id"] == "manual__next"

    waiting = claims.PlanLock(work, "manual__late", stale_s=30, wait_s=1)
    with pytest.raises(claims.PlanLockTimeout, match="held by run manual__next"):
        waiting.acquire()
    lock.release()
    assert not work.exists(layout.PLAN_LOCK_OBJECT)


def test_a_failed_backfills_teardown_releases_its_claim(env, tmp_path):
    """airflow_glue.teardown_run (what the drivers_teardown plugin calls for a failed or
    cancelled run), with the real GCSHook, in a fresh interpreter as a listener runs."""
    work = env["work"]
    claims.write_claim(work, "manual__cancelled", tasks_of(*KERNELS), ttl_s=3600)
    connection = {"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True}}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from drivers.airflow.glue import teardown_run\n"
            "teardown_run('backfill_drivers', 'manual__cancelled')",
        ],
        env=os.environ
        | {
            "AIRFLOW_HOME": str(tmp_path),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": json.dumps(connection),
        },
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert not work.exists(layout.claim_object("manual__cancelled"))
