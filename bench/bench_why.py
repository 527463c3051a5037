"""`drivers why` over a ledger of 1,000,000 records: process wall time, embedded GCS.

Not a test. The ledger: 10,000 kernels (the real 2022 list of 5,676 plus generated
Ubuntu ones) x 5 driver versions x 2 kinds, 1,000,000 records in 200 run objects
(attempts, failures, blocklist and quarantine decisions, publications), written to a
fresh embedded GCS; the coverage index of each version is their fold (what
record_ledger keeps up to date run by run). Then `drivers why KERNEL` runs as its own
process (`.venv/bin/drivers`, as an engineer types it) for a published kernel, a
quarantined one and one never seen, several times each; medians. Also timed: folding
one more run of 5,000 records into the indexes (record_ledger's refresh), and, for
scale, finding the kernel's records by reading the whole ledger instead of the index.

Usage: .venv/bin/python bench/bench_why.py [--runs 7] [--records 1000000]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DRIVERS_REAL_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO / "include"))
from drivers.domain import layout  # noqa: E402
from drivers.store import ledger  # noqa: E402
from drivers.store.emulator import EmbeddedGCS, free_port  # noqa: E402
from drivers.store.storage import ObjectStore, client_from_environment  # noqa: E402

VERSIONS = ("2.0.1", "2.1.0", "2.2.0", "2.3.0", "2.4.0")
RUNS_IN_LEDGER = 200
STATUSES = ["built", "published", "failed", "infra_failed", "blocked", "quarantined"]
WEIGHTS = [30, 30, 20, 8, 8, 4]


def kernels() -> list[str]:
    real = (DATA / "collector-2022-12" / "KERNEL_VERSIONS").read_text().split()
    made = [f"5.{m}.0-{n}-generic" for m in range(30, 60) for n in range(1, 200)]
    return (real + made)[:10_000]


def make_ledger(work: ObjectStore, names: list[str], total: int) -> float:
    """Write ``total`` records in RUNS_IN_LEDGER run objects and the folded indexes."""
    rng = random.Random(7)
    coverage = {v: ledger.Coverage(v, {}, []) for v in VERSIONS}
    per_run = total // RUNS_IN_LEDGER
    started = time.perf_counter()
    for n in range(RUNS_IN_LEDGER):
        run_id = f"scheduled__2026-{1 + n // 28:02d}-{1 + n % 28:02d}T02:00:00+00:00"
        records = []
        for _ in range(per_run):
            key = (rng.choice(names), rng.choice(VERSIONS), rng.choice(("mod", "bpf")))
            status = rng.choices(STATUSES, WEIGHTS)[0]
            fields = {"builder": "fc36", "fingerprint": f"img|sources:{key[1]}|bundle:x"}
            if status == "failed":
                fields |= {"failure": "compile", "reason": "compile: error: x", "log": "gs://l"}
            if status == "blocked":
                fields = {"reason": "BLOCKLIST:12: 4.18.0-305.* * bpf"}
            records.append(ledger.record(key, status, run_id, time=f"{run_id[11:30]}", **fields))
        ledger.append(work, ledger.run_object(run_id), records)
        for r in records:
            coverage[r["driver_version"]].apply(r)
    for v, c in coverage.items():
        c.applied_runs = [f"r{n}" for n in range(RUNS_IN_LEDGER)]
        ledger.update_coverage(work, v, lambda current, c=c: current.entries.update(c.entries))
    ledger.write_kernels(work, dict.fromkeys(names, "2026-01-01T00:00:00+00:00"))
    return time.perf_counter() - started


def why_wall(kernel: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "drivers"),
            *(["why", kernel] if kernel != "--help" else [kernel]),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise RuntimeError(done.stderr)
    return wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--records", type=int, default=1_000_000)
    args = parser.parse_args()
    print(describe())
    names = kernels()
    with tempfile.TemporaryDirectory() as tmp:
        gcs = EmbeddedGCS(Path(tmp) / "gcs", port=free_port())
        gcs.ensure_running()
        try:
            env = os.environ | gcs.env() | {"DRIVERS_CONFIG": str(Path(tmp) / "pipeline.toml")}
            config = (REPO / "include/drivers/config/pipeline.toml").read_text()
            config = config.replace(
                'driver_versions = ["2.3.0", "2.4.0-rc1"]',
                "driver_versions = " + str(list(VERSIONS)).replace("'", '"'),
            )
            config = config.replace('blocklists = ["BLOCKLIST"]', "blocklists = []")
            (Path(tmp) / "pipeline.toml").write_text(config)
            os.environ.update(env)
            buckets = layout.Buckets.from_env()
            gcs.create_buckets(buckets.all())
            work = ObjectStore(client_from_environment(), buckets.work)
            seconds = make_ledger(work, names, args.records)
            objects = list(work.list(ledger.RUNS_PREFIX))
            records = sum(1 for o in objects for _ in ledger.decode(work.download(o.name)))
            index_sizes = [work.info(ledger.coverage_object(v)).size for v in VERSIONS]
            print(
                f"ledger: {records:,} records in {len(objects)} run objects "
                f"({sum(o.size for o in objects) / 1e6:.1f} MB gz), indexes "
                f"{min(index_sizes) / 1e3:.0f}-{max(index_sizes) / 1e3:.0f} KB gz each; "
                f"written in {seconds:.0f} s"
            )
            cases = {"seen": names[100], "generated": names[-1], "never seen": "6.99.0-1-amd64"}
            for label, kernel in cases.items():
                walls = [why_wall(kernel, env) for _ in range(args.runs)]
                print(
                    f"drivers why {kernel} ({label}): median {statistics.median(walls):.2f} s, "
                    f"min {min(walls):.2f} s, max {max(walls):.2f} s over {args.runs} runs"
                )
            kernel = cases["seen"]
            scans = []
            for _ in range(3):  # the naive way, for scale: read the whole ledger
                started = time.perf_counter()
                found = sum(1 for _ in ledger.history(work, lambda r: r["kernel"] == kernel))
                scans.append(time.perf_counter() - started)
            print(
                f"scanning the whole ledger for {kernel} instead ({found} records), in process: "
                f"median {statistics.median(scans):.2f} s"
            )
            startup = [why_wall("--help", env) for _ in range(args.runs)]
            print(f"for scale, `drivers --help`: median {statistics.median(startup):.2f} s")
            refresh = []
            for n in range(3):
                run = [
                    ledger.record(
                        (random.choice(names), random.choice(VERSIONS), "mod"), "published", f"x{n}"
                    )
                    for _ in range(5000)
                ]
                started = time.perf_counter()
                ledger.apply_run(work, f"x{n}", run)
                refresh.append(time.perf_counter() - started)
            print(
                f"index refresh with a 5,000-record run: median {statistics.median(refresh):.2f} s"
            )
        finally:
            gcs.stop()


if __name__ == "__main__":
    main()
