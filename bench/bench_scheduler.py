"""The same no-op upstream_drivers run through the real scheduler and through
`airflow dags test`, side by side, and the scheduler's delay between a task ending and
the next one starting (issue 5).

Not a test. Its own state, all in a temporary folder: an embedded GCS on a free port with
unique buckets, a two-builder config (deb61, deb612; driver 2.3.0; no schedule), bundles of
2 Debian kernels (6.1.0-56-cloud-amd64, 6.12.115+deb12-cloud-amd64; ``.cache/bundles``,
made if missing) and the 2.3.0 sources. Two Airflows on the same buckets:

- the real scheduler: ``DistributedAirflow`` (tests/distributed.py: PostgreSQL, `airflow
  scheduler`, `dag-processor`, `triggerer`, `api-server`, LocalExecutor), one for all its
  runs (its start-up is reported once, not in the runs); a run is ``trigger()`` through
  the REST API then ``wait_for_run()`` polling every 0.2 s;
- `airflow dags test --use-executor` on SQLite (``EmbeddedAirflow.dags_test``, its own
  AIRFLOW_HOME and api-server, also started once), timed as a process.

First one building run through the scheduler (4 drivers: the cache is then full), then
``--runs`` no-op runs (``to_build=0``) through each path, interleaved. Per run: wall time
from trigger to final state, the DAG run's own start -> end, the gaps between a task's end
and the next task's start along pre_build -> shards -> build_shard -> unify -> ... ->
report (the task each step waited for), queued -> start of each task, how long each
task's LocalExecutor worker stayed busy after the task ended (from the supervisors'
"Workload finished" lines; both paths log at INFO), and the CPU seconds the path used.
Both paths get the same ``--parallelism`` (LocalExecutor workers; 4, as `make run`), so
only what drives the run differs. Everything started is stopped at the end, on error too.

Usage: .venv/bin/python bench/bench_scheduler.py [--runs 5] [--parallelism 4] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

from machine import describe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from distributed import CONFIG, DistributedAirflow, unavailable_reason  # noqa: E402
from drivers.domain.layout import report_prefix  # noqa: E402
from drivers.ops import embedded  # noqa: E402
from drivers.ops.embedded import EmbeddedAirflow  # noqa: E402
from drivers.store.emulator import EmbeddedGCS, free_port  # noqa: E402
from drivers.store.storage import ObjectStore  # noqa: E402
from pipeline_env import pipeline_env, publish_bundle, publish_sources  # noqa: E402

DAG = "upstream_drivers"
KERNELS = ("6.1.0-56-cloud-amd64", "6.12.115+deb12-cloud-amd64")
BUILDERS = ("deb61", "deb612")
# The DAG's chain, stage by stage (tasks of a stage run side by side).
STAGES = (
    ("pre_build", ("pre_build",)),
    ("shards", tuple(f"{b}.shards" for b in BUILDERS)),
    ("build_shard", tuple(f"{b}.build_shard" for b in BUILDERS)),
    ("unify", ("unify",)),
    ("verify_drivers", ("verify_drivers",)),
    ("integration_tests", ("integration_tests",)),
    ("push_drivers", ("push_drivers",)),
    ("update_support_packages", ("update_support_packages",)),
    ("record_ledger", ("record_ledger",)),
    ("cleanup_staging", ("cleanup_staging",)),
    ("report", ("report",)),
)
POLL_S = 0.2
WORKLOAD_FINISHED = re.compile(r"Workload finished .*duration=([\d.]+).*workload_id=([0-9a-f-]+)")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- time stamps and task instances ------------------------------------------------------


def when(value: str | None) -> datetime | None:
    """An API (ISO, ``Z``) or SQLite (naive UTC) time stamp, as an aware datetime."""
    if not value:
        return None
    stamp = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def seconds(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else (end - start).total_seconds()


def critical_path(tis: list[dict]) -> tuple[dict[str, float], dict[str, float]]:
    """Along the chain, stage by stage, the task that ended last (the one the next stage
    waited for): the gap from the previous stage's last end to its start, and its own run
    time. Stages whose tasks never ran (skipped, no start) are passed over. Run start ->
    first task + gaps + run times + last task -> run end is the whole DAG run."""
    gaps, runs, previous, previous_end = {}, {}, None, None
    for name, task_ids in STAGES:
        timed = [t for t in tis if t["task_id"] in task_ids and t["start"] and t["end"]]
        if not timed:
            continue
        last = max(timed, key=lambda t: t["end"])
        if previous_end is not None:
            gaps[f"{previous} → {name}"] = seconds(previous_end, last["start"])
        runs[name] = seconds(last["start"], last["end"])
        previous, previous_end = name, last["end"]
    return gaps, runs


def shard_gaps(tis: list[dict]) -> list[float]:
    """Each builder shard's end to unify's start, smallest (the last shard) first."""
    unify = next((t["start"] for t in tis if t["task_id"] == "unify"), None)
    return sorted(
        seconds(t["end"], unify)
        for t in tis
        if t["task_id"].endswith(".build_shard") and t["map_index"] >= 0 and t["end"] and unify
    )


def queued_to_start(tis: list[dict]) -> list[float]:
    return [seconds(t["queued"], t["start"]) for t in tis if t["queued"] and t["start"]]


def lingering(log: Path, tis: list[dict]) -> list[float]:
    """Per task: how long its LocalExecutor worker stayed busy after the task ended (the
    supervisor's "Workload finished" duration minus the task's start -> end; INFO logs)."""
    durations = {}
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            if m := WORKLOAD_FINISHED.search(line):
                durations[m[2].replace("-", "")] = float(m[1])
    return [
        durations[t["id"]] - seconds(t["start"], t["end"])
        for t in tis
        if t["id"] in durations and t["start"] and t["end"]
    ]


def api_tis(airflow: DistributedAirflow, run_id: str) -> list[dict]:
    return [
        {
            "id": t["id"].replace("-", ""),
            "task_id": t["task_id"],
            "map_index": t["map_index"],
            "state": t["state"],
            "queued": when(t.get("queued_when")),
            "start": when(t.get("start_date")),
            "end": when(t.get("end_date")),
        }
        for t in airflow.task_instances(DAG, run_id)
    ]


def sqlite_run(db: Path) -> tuple[dict, list[dict]]:
    """The newest DAG run in an EmbeddedAirflow's SQLite database and its task instances."""
    with sqlite3.connect(db) as c:
        run_id, state, queued, start, end = c.execute(
            "select run_id, state, queued_at, start_date, end_date from dag_run "
            "where dag_id = ? order by id desc limit 1",
            (DAG,),
        ).fetchone()
        rows = c.execute(
            "select task_id, map_index, state, queued_dttm, start_date, end_date, id "
            "from task_instance where dag_id = ? and run_id = ?",
            (DAG, run_id),
        ).fetchall()
    run = {"run_id": run_id, "state": state, "queued_at": when(queued)}
    run |= {"start_date": when(start), "end_date": when(end)}
    tis = [
        {"task_id": r[0], "map_index": r[1], "state": r[2], "id": r[6].replace("-", "")}
        | {"queued": when(r[3]), "start": when(r[4]), "end": when(r[5])}
        for r in rows
    ]
    return run, tis


# --- CPU ---------------------------------------------------------------------------------


def tree_cpu(roots: list[int]) -> float:
    """CPU seconds of these processes and all their descendants, live or reaped."""
    parent, ticks = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on
        parent[int(entry)] = int(fields[1])
        ticks[int(entry)] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    children = defaultdict(list)
    for pid, ppid in parent.items():
        children[ppid].append(pid)
    total, todo, seen = 0, [p for p in roots if p in ticks], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += ticks[pid]
        todo += children[pid]
    return total / CLOCK_TICKS


def deployment_roots(airflow: DistributedAirflow) -> list[int]:
    roots = [p.pid for p in airflow.processes.values()]
    if airflow._api is not None:
        roots.append(airflow._api.pid)
    pidfile = airflow.postgres.root / "data" / "postmaster.pid"
    if pidfile.exists():
        roots.append(int(pidfile.read_text().split()[0]))
    return roots


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- one run through each path -----------------------------------------------------------


def to_build(stores: dict[str, ObjectStore], run_id: str) -> int:
    doc = json.loads(stores["work"].download(f"{report_prefix(run_id)}report.json"))
    return doc["plan"]["summary"]["to_build"]


def measure(
    run: dict, tis: list[dict], span: tuple[datetime, datetime], cpu: float, log: Path
) -> dict:
    """``span``: when this process started the run (trigger, or `dags test` started) and
    when it saw the run's end (final state, or `dags test` exited)."""
    gaps, runs = critical_path(tis)
    queued = queued_to_start(tis)
    linger = lingering(log, tis)
    starts = [t["start"] for t in tis if t["start"]]
    ends = [t["end"] for t in tis if t["end"]]
    return {
        "run_id": run["run_id"],
        "wall": seconds(*span),
        "before": seconds(span[0], run["start_date"]),
        "dag_run": seconds(run["start_date"], run["end_date"]),
        "after": seconds(run["end_date"], span[1]),
        "run_queued": seconds(run["queued_at"], run["start_date"]),
        "lead": seconds(run["start_date"], min(starts)),
        "tail": seconds(max(ends), run["end_date"]),
        "gaps": gaps,
        "runs": runs,
        "gap_median": statistics.median(gaps.values()) if gaps else None,
        "gap_sum": sum(gaps.values()),
        "task_sum": sum(runs.values()),
        "queued_to_start": statistics.median(queued) if queued else None,
        "shard_gaps": shard_gaps(tis),
        "linger_median": statistics.median(linger) if linger else None,
        "lingered": sum(x > 2 for x in linger),
        "tasks": len(linger),
        "cpu": cpu,
        "states": sorted({(t["task_id"], t["state"]) for t in tis}),
    }


def through_scheduler(airflow: DistributedAirflow) -> dict:
    roots = deployment_roots(airflow)
    cpu = tree_cpu(roots)
    began = datetime.now(UTC)
    run_id = airflow.trigger(DAG)
    state = airflow.wait_for_run(DAG, run_id, timeout=1200, poll_s=POLL_S)
    span = (began, datetime.now(UTC))
    cpu = tree_cpu(roots) - cpu
    if state != "success":
        raise RuntimeError(f"scheduler run {run_id} {state}; logs in {airflow.home}")
    quoted = urllib.request.quote(run_id, safe="")
    run = airflow.api("GET", f"/dags/{DAG}/dagRuns/{quoted}")
    run = {"run_id": run_id} | {
        k: when(run.get(k)) for k in ("queued_at", "start_date", "end_date")
    }
    return measure(run, api_tis(airflow, run_id), span, cpu, airflow.home / "scheduler.log")


def through_dags_test(airflow: EmbeddedAirflow, background: DistributedAirflow) -> dict:
    log = airflow.home / "dags-test.log"
    log_size = log.stat().st_size if log.exists() else 0
    roots = [airflow._api.pid]
    cpu, deployment = children_cpu() + tree_cpu(roots), tree_cpu(deployment_roots(background))
    began = datetime.now(UTC)
    status = airflow.dags_test(DAG, log=log, timeout=1200, use_executor=True)
    span = (began, datetime.now(UTC))
    cpu = children_cpu() + tree_cpu(roots) - cpu
    deployment = tree_cpu(deployment_roots(background)) - deployment
    if status != 0:
        raise RuntimeError(f"`airflow dags test` exited {status}; see {log}")
    run, tis = sqlite_run(airflow.home / "airflow.db")
    result = measure(run, tis, span, cpu, log)
    with open(log, "rb") as f:
        f.seek(log_size)
        result["hung"] = b"hung after it: killed" in f.read()
    result["background_cpu"] = deployment
    return result


# --- set-up ------------------------------------------------------------------------------


def publish_inputs(stores: dict, root: Path) -> None:
    for kernel in KERNELS:
        publish_bundle(stores, kernel)
    publish_sources(stores, "2.3.0", root)


# --- output ------------------------------------------------------------------------------


def spread(values: list[float | None], digits: int = 1) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    m = statistics.median(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def ratio(a: list[float | None], b: list[float | None]) -> str:
    a, b = [v for v in a if v is not None], [v for v in b if v is not None]
    if not a or not b or statistics.median(b) == 0:
        return "–"
    return f"{statistics.median(a) / statistics.median(b):.2f}"


def print_results(
    machine: str,
    parallelism: int,
    startup: dict,
    building: dict,
    tests: list[dict],
    scheds: list[dict],
) -> None:
    n = len(tests)
    print(f"\n{machine}; parallelism {parallelism} (LocalExecutor workers) on both paths")
    print(
        f"start-up (once, not in the runs): real scheduler {startup['distributed']:.1f} s "
        f"(PostgreSQL, db migrate, api-server, components) + {startup['dag_parsed']:.1f} s "
        f"until the DAG was parsed; dags test's SQLite home + api-server "
        f"{startup['embedded']:.1f} s"
    )
    b = building
    print(
        f"\nbuilding run (4 drivers) through the scheduler: wall {b['wall']:.1f} s, DAG run "
        f"{b['dag_run']:.1f} s, run queued → running {b['run_queued']:.2f} s; each shard's "
        f"end → unify's start {', '.join(f'{g:.2f}' for g in b['shard_gaps'])} s; gaps "
        f"along the chain {', '.join(f'{k} {v:.2f}' for k, v in b['gaps'].items())} "
        f"(sum {b['gap_sum']:.1f} s, median {b['gap_median']:.2f} s); task queued → started "
        f"median {b['queued_to_start']:.2f} s; workers lingering > 2 s after a task: "
        f"{b['lingered']} of {b['tasks']}"
    )
    print(f"\nno-op runs (to_build=0), medians (min–max) of {n}, interleaved")
    print("| per run | `airflow dags test` | real scheduler | scheduler ÷ dags test |")
    print("|---|---|---|---|")
    rows = (
        ("trigger → final state, wall s", "wall", 1),
        ("… before the DAG run (trigger or process start → run start), s", "before", 1),
        ("… DAG run start → end (Airflow's record), s", "dag_run", 1),
        ("… after the DAG run (run end → end seen or process exit), s", "after", 1),
        ("DAG run: start → first task start, s", "lead", 2),
        ("DAG run: gaps task end → next task start, sum, s", "gap_sum", 1),
        ("DAG run: tasks' own run time along the chain, sum, s", "task_sum", 1),
        ("DAG run: last task end → run end, s", "tail", 2),
        ("gap task end → next task start, median per run, s", "gap_median", 2),
        ("run queued → running, s", "run_queued", 2),
        ("task queued → started, median per run, s", "queued_to_start", 2),
        ("worker busy after its task ended, median per run, s", "linger_median", 2),
        ("tasks whose worker stayed busy > 2 s after them", "lingered", 0),
        ("CPU seconds of the path's processes", "cpu", 1),
    )
    for label, key, digits in rows:
        a, c = [r[key] for r in tests], [r[key] for r in scheds]
        print(f"| {label} | {spread(a, digits)} | {spread(c, digits)} | {ratio(c, a)} |")
    print("\nalong the chain (the task each step waited for), medians, s")
    print("| step | gap: dags test | gap: scheduler | task run: dags test | task run: scheduler |")
    print("|---|---|---|---|---|")
    for name, _ in STAGES:
        edge = next((k for r in scheds + tests for k in r["gaps"] if k.endswith(f"→ {name}")), "")
        ga, gc = [r["gaps"].get(edge) for r in tests], [r["gaps"].get(edge) for r in scheds]
        ra, rc = [r["runs"].get(name) for r in tests], [r["runs"].get(name) for r in scheds]
        if any(v is not None for v in ga + gc + ra + rc):
            cells = (spread(v, 2) for v in (ga, gc, ra, rc))
            print(f"| {edge or name} | {' | '.join(cells)} |")
    background = [100 * r["background_cpu"] / r["wall"] for r in tests]
    print(
        f"\nthe idle deployment (scheduler, dag-processor, triggerer, api-server, PostgreSQL) "
        f"used {spread(background, 0)} % of one core during the dags test runs; `dags test` "
        f"hung after its run and was killed: {sum(r['hung'] for r in tests)} of {n}"
    )
    print("task states, last no-op run through the scheduler:", scheds[-1]["states"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--parallelism", type=int, default=4, help="LocalExecutor workers, both paths"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    if reason := unavailable_reason():
        raise SystemExit(f"the real scheduler cannot run here: {reason}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on kill too
    machine = describe()
    began = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="bench-scheduler-"))
    embedded.POLL_S = POLL_S  # dags_test's wait loop: as fine as wait_for_run's
    # INFO, as DistributedAirflow has it: the supervisors' "Workload finished" lines.
    os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "INFO"
    with ExitStack() as stack:
        if args.keep:
            print(f"keeping {root}")
        else:
            stack.callback(shutil.rmtree, root, ignore_errors=True)
        gcs = EmbeddedGCS(root / "gcs", port=free_port())
        stack.callback(gcs.stop)
        gcs.ensure_running()
        os.environ.update(gcs.env())
        stores = stack.enter_context(pipeline_env(gcs, root, CONFIG, name="bench"))
        publish_inputs(stores, root)

        started = time.perf_counter()
        scheduler = stack.enter_context(
            DistributedAirflow(home=root / "distributed", parallelism=args.parallelism)
        )
        startup = {"distributed": time.perf_counter() - started}
        started = time.perf_counter()
        scheduler.wait_for_dag(DAG)
        startup["dag_parsed"] = time.perf_counter() - started

        started = time.perf_counter()
        dags_test = EmbeddedAirflow(home=root / "embedded", parallelism=args.parallelism)
        stack.callback(dags_test.stop)
        dags_test.prepare()
        dags_test.start_api_server()
        startup["embedded"] = time.perf_counter() - started
        print(f"start-up: {startup}", flush=True)

        building = through_scheduler(scheduler)
        built = to_build(stores, building["run_id"])
        if built != 2 * len(KERNELS):
            raise RuntimeError(f"the building run planned {built} drivers, not {2 * len(KERNELS)}")
        print(f"building run: {building['wall']:.1f} s", flush=True)

        tests, scheds = [], []
        for i in range(args.runs):
            for path, results, run in (
                ("dags test", tests, lambda: through_dags_test(dags_test, scheduler)),
                ("scheduler", scheds, lambda: through_scheduler(scheduler)),
            ):
                result = run()
                if (n := to_build(stores, result["run_id"])) != 0:
                    raise RuntimeError(f"{path} run {result['run_id']} planned {n} builds")
                results.append(result)
                print(
                    f"run {i + 1} {path}: wall {result['wall']:.1f} s, DAG run "
                    f"{result['dag_run']:.1f} s, gaps {result['gap_sum']:.1f} s",
                    flush=True,
                )
    print_results(machine, args.parallelism, startup, building, tests, scheds)
    print(f"\nbenchmark total: {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
