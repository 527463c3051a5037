"""Catalogue benchmark (issue 15): every kernel the Debian releases offer today, real
drivers of two driver versions, each built in its release's builder image (sandboxed
containers, the embedded default's config), VM-tested in its own kernel, published.

One real ``upstream_drivers`` run on its own embedded GCS and Airflow home
(bench/out/catalogue/, never the `make run` state), after the bundles and boot images of
every kernel (`drivers bundle debian --list`, then `drivers bundle debian ALL
--upload … --boot-images …`) and the prepared sources are in its buckets. Reports:

- wall time of the whole run and of its build stage (first shard start to last shard
  end, from the shard records);
- the compile-bound limit: the sum of the bare ``make`` times of every build (the task
  records' ``make_s``) divided by the builder slots; the build stage's ratio to it;
- per builder: kernels, tasks, built / failed by class, make seconds;
- failures by class, the VM-test statuses, what was published.

Usage: make bench-catalogue   (hours the first time: ~100 kernels x 4 real drivers;
       KERNELS=N to take the first N of each release, --kernels-per-release)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from machine import describe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench/out/catalogue"
BIN = REPO / ".venv/bin"
SOURCES = {  # tarball in the driver-sources folder -> driver version (as the Makefile's)
    "stackrox-falcosecurity-libs-2.3.0.tar.gz": "2.3.0",
    "falcosecurity-libs-8.1.0+driver.tar.gz": "8.1.0",
}


def drivers(*args: str, env: dict[str, str], capture: bool = False) -> str:
    done = subprocess.run(
        [str(BIN / "drivers"), *args],
        env=env,
        check=False,
        text=True,
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
    )
    if done.returncode not in (0, 1) or (capture and done.returncode != 0):
        raise SystemExit(f"drivers {' '.join(args[:3])} … failed (exit {done.returncode})")
    return done.stdout or ""


def offered(env: dict[str, str], per_release: int | None) -> dict[str, list[str]]:
    """release -> every flavoured x86_64 kernel it offers (`drivers bundle debian --list`)."""
    releases: dict[str, list[str]] = collections.defaultdict(list)
    for line in drivers("bundle", "debian", "--list", env=env, capture=True).splitlines():
        if line.startswith("  "):
            release, _suites, uname = line.split("\t")
            releases[release.strip()].append(uname)
    return {r: u[:per_release] if per_release else u for r, u in releases.items()}


def sources_dir() -> Path:
    """Beside the checkout, else the workplace's (as the Makefile's DRIVER_SOURCES)."""
    for candidate in (REPO.parent / "shared/data", Path("/work/shared/data")):
        if (candidate / "driver-sources/README.md").is_file():
            return candidate / "driver-sources"
    raise SystemExit("the real driver sources are not beside the checkout nor in /work/shared")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernels-per-release", type=int, default=None)
    parser.add_argument("--port", type=int, default=4943)
    parser.add_argument("--json", type=Path, default=OUT / "results.json")
    args = parser.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    env = os.environ | {
        "DRIVERS_CONFIG": str(REPO / "include/drivers/config/embedded.toml"),
        "DRIVERS_GCS_ROOT": str(OUT / "gcs"),
        "DRIVERS_AIRFLOW_HOME": str(OUT / "airflow"),
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{args.port}",
        "DOCKER_HOST": os.environ.get("DOCKER_HOST", f"unix://{REPO}/.cache/podman/podman.sock"),
    }
    subprocess.run([str(REPO / "scripts/podman-service.sh")], check=True, stdout=subprocess.DEVNULL)
    drivers("gcs", "up", "--port", str(args.port), env=env)
    drivers("images", "build", env=env)

    releases = offered(env, args.kernels_per_release)
    kernels = [k for unames in releases.values() for k in unames]
    print(f"{len(kernels)} kernels: " + ", ".join(f"{r} {len(u)}" for r, u in releases.items()))
    t0 = time.perf_counter()
    drivers("bundle", "debian", *kernels, "--upload", "gs://collector-bundles",
            "--boot-images", "gs://collector-kernel-images", env=env)  # fmt: skip
    bundles_s = time.perf_counter() - t0
    for tarball, version in SOURCES.items():
        drivers("sources", "prepare", str(sources_dir() / tarball), "--driver-version", version,
                "--upload", "gs://collector-sources", env=env)  # fmt: skip
    print(f"bundles and boot images in {bundles_s:.0f} s")

    started = datetime.now().astimezone()
    t0 = time.perf_counter()
    conf = json.dumps({"max_failures": 1_000_000})
    status = subprocess.run(
        [str(BIN / "drivers"), "run-dag", "upstream_drivers", "--conf", conf], env=env, check=False
    ).returncode
    run_s = time.perf_counter() - t0
    results = summarize(env, started, run_s, status, releases)
    results["bundles_s"] = round(bundles_s, 1)
    results["machine"] = describe()
    args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


def summarize(env: dict[str, str], started: datetime, run_s: float, status: int, releases) -> dict:
    os.environ.update(env)
    from drivers.domain import layout
    from drivers.domain.config import load_config
    from drivers.ops.costs import read_build_records
    from drivers.store.storage import ObjectStore, client_from_environment, read_json

    config = load_config()
    work = ObjectStore(client_from_environment(), layout.Buckets.from_env().work)
    records, shards, _ = read_build_records(work, runs=1)
    attempted = ("built", "failed", "toolchain_mismatch")
    tasks = [r for r in records if r["status"] in attempted]
    run_id = tasks[0]["run_id"] if tasks else None
    per_builder: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    make_s: dict[str, float] = collections.defaultdict(float)
    for r in tasks:
        b = per_builder[r.get("builder", "?")]
        b["tasks"] += 1
        b[r["status"] if r["status"] == "built" else f"failed:{r.get('failure')}"] += 1
        make_s[r.get("builder", "?")] += r.get("make_s") or 0.0
    starts = [datetime.fromisoformat(s["started"]) for s in shards if s.get("started")]
    ends = [datetime.fromisoformat(s["finished"]) for s in shards if s.get("finished")]
    build_stage_s = (max(ends) - min(starts)).total_seconds() if starts and ends else None
    limit = sum(make_s.values()) / config.slots
    report = read_json(work, f"{layout.report_prefix(run_id)}report.json") if run_id else {}
    vm = read_json(work, f"{layout.report_prefix(run_id)}vm-tests.json") if run_id else {}
    return {
        "run_id": run_id,
        "exit_status": status,
        "kernels": {r: len(u) for r, u in releases.items()},
        "run_s": round(run_s, 1),
        "build_stage_s": build_stage_s,
        "compile_bound_s": round(limit, 1),
        "ratio": round(build_stage_s / limit, 3) if build_stage_s and limit else None,
        "slots": config.slots,
        "per_builder": {
            b: dict(c) | {"make_s": round(make_s[b], 1)} for b, c in per_builder.items()
        },
        "failures": dict(
            collections.Counter(r.get("failure") for r in tasks if r["status"] != "built")
        ),
        "vm_tests": dict(collections.Counter(r["status"] for r in vm.get("results", []))),
        "median_make_s": {kind: _median(tasks, kind) for kind in ("mod", "bpf")},
        "report_status": report.get("status"),
        "shards": len(shards),
    }


def _median(tasks: list[dict], kind: str) -> float | None:
    times = [r["make_s"] for r in tasks if r["kind"] == kind and r.get("make_s")]
    return round(statistics.median(times), 1) if times else None


if __name__ == "__main__":
    sys.exit(main())
