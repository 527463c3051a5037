"""No-op nightly (issue 3): a whole upstream_drivers run when everything is cached.

Needs the embedded state `make run` leaves (bundles, sources, drivers in .gcs/). Times,
per run: Airflow set-up (db migrate + pool), api-server start, `airflow dags test` as a
whole, and inside it the DAG run itself (Airflow's own run_duration); the rest of
`dags test` is Airflow's fixed start-up (interpreter, imports, DAG parse, executor).
Also the DAG parse time per file with the kubernetes runtime (`airflow dags report`).

Usage: STORAGE_EMULATOR_HOST=http://127.0.0.1:4443 .venv/bin/python bench/bench_nightly.py
"""

from __future__ import annotations

import os
import re
import sqlite3
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from drivers.ops.embedded import EmbeddedAirflow

ROOT = Path(__file__).resolve().parents[1]


def one_run(runs_log: Path) -> dict[str, float]:
    airflow = EmbeddedAirflow(home=ROOT / ".airflow")
    t0 = time.perf_counter()
    airflow.prepare()
    t1 = time.perf_counter()
    airflow.start_api_server()
    t2 = time.perf_counter()
    status = airflow.dags_test("upstream_drivers", log=runs_log)
    t3 = time.perf_counter()
    airflow.stop()
    if status != 0:
        raise SystemExit(f"run failed, see {runs_log}")
    return {
        "total_s": t3 - t0,
        "setup_s": t1 - t0,
        "api_server_s": t2 - t1,
        "dags_test_s": t3 - t2,
        "dag_run_s": last_run_duration(airflow.home / "airflow.db"),
    }


def last_run_duration(db: Path) -> float:
    """The DAG run itself, start to end, as Airflow recorded it."""
    with sqlite3.connect(db) as c:
        start, end = c.execute(
            "select start_date, end_date from dag_run order by id desc limit 1"
        ).fetchone()
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def parse_time(runs: int = 5) -> list[float]:
    env = os.environ | {
        "AIRFLOW_HOME": str(ROOT / ".airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "DRIVERS_RUNTIME": "kubernetes",
    }
    airflow = str(Path(sys.executable).parent / "airflow")
    out = []
    for _ in range(runs):
        text = subprocess.run(
            [airflow, "dags", "report", "-o", "plain"], env=env, capture_output=True, text=True
        ).stdout
        m = re.search(r"upstream_drivers\.py\s+(\d+):(\d+):([\d.]+)", text)
        out.append(int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]))
    return out


def main() -> None:
    log = ROOT / ".airflow" / "bench-nightly.log"
    runs = [one_run(log) for _ in range(int(os.environ.get("RUNS", "3")))]
    for key in runs[0]:
        values = [r[key] for r in runs]
        runs_s = [round(v, 1) for v in values]
        print(f"{key:12} median {statistics.median(values):6.1f} s  runs {runs_s}")
    fixed = [r["dags_test_s"] - r["dag_run_s"] for r in runs]
    print(f"{'fixed':12} median {statistics.median(fixed):6.1f} s  (dags test outside the DAG run)")
    parses = parse_time()
    print(f"DAG parse (kubernetes runtime): median {statistics.median(parses):.2f} s {parses}")


if __name__ == "__main__":
    main()
