"""Sandbox benchmark: a shard in its sandboxed container ÷ the same shard on the host.

Not a test. The same shard file, against the same embedded GCS, run both ways, alternating
(each goes first as often), wall time from start to the results object:

- host: ``python -m drivers build-shard --shard URI``, what the local runtime runs
  (a subprocess of the worker, downloads, builds, uploads);
- sandbox: :func:`drivers.build.sandbox.build_shard_sandboxed`, what the docker runtime's
  task runs: stage the inputs into a work folder, start the builder's container (uid
  1000, no network, read-only root, the folder bind-mounted, CPU/memory limits) through
  podman's Docker API, ``build-shard --offline``, upload, remove the container.

The builder image is bookworm's, the host is bookworm: the same gcc, clang and make, so
the ratio is the sandbox's cost only. Shards: the example driver (both kinds of both
example versions on 6.1.0-47-cloud-amd64), and ``--real``: the collector's 2.3.0 kernel
module on 6.1.0-56-amd64 (prepared from the real sources, tests/real_sources.py).
Target (issue 15): ≤ 1.10.

Usage: .venv/bin/python bench/bench_sandbox.py [--runs 3] [--real] [--image REF] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # podman.py, real_sources.py

from machine import describe  # noqa: E402

from drivers.build.bundles import make_debian_bundle  # noqa: E402
from drivers.build.sandbox import Sandbox, build_shard_sandboxed  # noqa: E402
from drivers.build.shard_run import SANDBOX_ENV  # noqa: E402
from drivers.build.sources import package_sources  # noqa: E402
from drivers.domain import layout  # noqa: E402
from drivers.store.emulator import EmbeddedGCS  # noqa: E402
from drivers.store.storage import ObjectStore, client_from_environment  # noqa: E402
from podman import ensure_builder_image, podman_service  # noqa: E402

GCS_PORT = 4804  # helper D's (issue 15's contract)
EXAMPLES = REPO / "tests/fixtures/example-driver-sources"
EXAMPLE_KERNEL = "6.1.0-47-cloud-amd64"
REAL_KERNEL = "6.1.0-56-amd64"
BUNDLES = REPO / ".cache/bundles"


def bundle(kernel: str) -> Path:
    path = BUNDLES / layout.bundle_object(kernel)
    if not path.exists():
        make_debian_bundle(kernel, BUNDLES, REPO / ".cache/debs")
    return path


def _parts(records: list[dict]) -> dict[str, float]:
    """A shard's split of its time, and each task's build (kind/version)."""
    final = records[-1]
    parts = {k: final.get(k) or 0.0 for k in ("fetch_s", "extract_s", "build_s", "upload_s",
                                               "container_s")}  # fmt: skip
    for r in records[:-1]:
        parts[f"{r['driver_version']} {r['kind']}"] = r["duration_s"]
    return parts


def _medians(parts: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(p[k] for p in parts), 2) for k in parts[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--real", action="store_true", help="also the real 2.3.0 module")
    parser.add_argument("--image", help="builder image (default: tests/podman.py's)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cpus", type=float, default=2.0, help="the container's CPU limit")
    parser.add_argument("--only", help="only this shard (example, real-2.3.0-mod)")
    args = parser.parse_args()

    image = args.image or ensure_builder_image(log=print)
    tmp = Path(tempfile.mkdtemp(prefix="bench-sandbox-"))
    gcs = EmbeddedGCS(tmp / "gcs", port=GCS_PORT)
    gcs.ensure_running()
    try:
        return _bench(args, image, tmp, gcs)
    finally:  # also when interrupted: no server, no folder left behind
        gcs.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _bench(args: argparse.Namespace, image: str, tmp: Path, gcs: EmbeddedGCS) -> int:
    os.environ.update(gcs.env())
    client = client_from_environment()
    names = {role: f"bench-sandbox-{role}-{uuid.uuid4().hex[:8]}" for role in
             ("bundles", "sources", "work")}  # fmt: skip
    gcs.create_buckets(list(names.values()))
    stores = {name: ObjectStore(client, name) for name in names.values()}
    bundles, sources, work = (stores[names[r]] for r in ("bundles", "sources", "work"))

    shards: dict[str, list[tuple[str, str, str]]] = {
        "example": [(EXAMPLE_KERNEL, v, k) for v in ("2.3.0", "2.4.0-rc1") for k in ("mod", "bpf")]
    }
    bundles.upload_new_file(layout.bundle_object(EXAMPLE_KERNEL), bundle(EXAMPLE_KERNEL))
    for version in ("2.3.0", "2.4.0-rc1"):
        tgz = package_sources(EXAMPLES / version, tmp / "example-sources")
        sources.upload_new_file(layout.source_object(version), tgz)
    real_sources = None
    if args.real:
        from real_sources import prepared

        real_sources = ObjectStore(client, f"bench-sandbox-real-{uuid.uuid4().hex[:8]}")
        gcs.create_buckets([real_sources.bucket_name])
        real_sources.upload_new_file(
            layout.source_object("2.3.0"), prepared("2.3.0", tmp / "real-sources")
        )
        stores[real_sources.bucket_name] = real_sources
        bundles.upload_new_file(layout.bundle_object(REAL_KERNEL), bundle(REAL_KERNEL))
        shards["real-2.3.0-mod"] = [(REAL_KERNEL, "2.3.0", "mod")]

    def shard_file(label: str, tasks: list, run_id: str) -> str:
        source_bucket = real_sources.bucket_name if label.startswith("real") else names["sources"]
        doc = {"run_id": run_id, "builder": "bookworm", "index": 0, "cost": 1.0,
               "buckets": {"bundles": names["bundles"], "sources": source_bucket,
                           "work": names["work"]},
               "tasks": [list(t) for t in tasks]}  # fmt: skip
        name = layout.shard_object(run_id, "bookworm", 0)
        work.put(name, json.dumps(doc).encode())
        return f"gs://{names['work']}/{name}"

    results: dict[str, dict] = {}
    with podman_service(tmp) as docker_url:
        sandbox = Sandbox(image=image, docker_url=docker_url, cpus=args.cpus, memory="4g",
                          time_limit_s=3600, labels={"app": "collector-drivers",
                          "bench": "sandbox"}, workdir=tmp / "work")  # fmt: skip
        for label, tasks in shards.items():
            if args.only and label != args.only:
                continue
            host_s, sandbox_s, parts, host_parts = [], [], [], []
            for run in range(args.runs * 2):
                which = ("host", "sandbox")[(run + run // 2) % 2]  # host first every other pair
                uri = shard_file(label, tasks, f"{label}-{which}-{run}")
                started = time.perf_counter()
                if which == "host":
                    env = dict(os.environ, **{SANDBOX_ENV: "none"})
                    command = [sys.executable, "-m", "drivers", "build-shard", "--shard", uri]
                    done = subprocess.run(command, env=env, capture_output=True, text=True)
                    assert done.returncode == 0, done.stderr[-2000:]
                    host_s.append(time.perf_counter() - started)
                    results_name = layout.shard_results_object(
                        f"{label}-{which}-{run}", "bookworm", 0
                    )
                    lines = work.download(results_name).decode().splitlines()
                    records = [json.loads(line) for line in lines]
                    host_parts.append(_parts(records))
                else:
                    with open(os.devnull, "w") as quiet:
                        status, records = build_shard_sandboxed(
                            uri, lambda b: stores[b], sandbox, err=quiet
                        )
                    assert status == 0, records[-1]
                    assert records[-1]["counts"] == {"built": len(tasks)}, records[-1]
                    sandbox_s.append(time.perf_counter() - started)
                    parts.append(_parts(records))
                print(f"{label} {which} run {run // 2 + 1}: {time.perf_counter() - started:.2f} s")
            host, boxed = statistics.median(host_s), statistics.median(sandbox_s)
            results[label] = {
                "tasks": len(tasks),
                "host_s": [round(s, 2) for s in host_s],
                "sandbox_s": [round(s, 2) for s in sandbox_s],
                "host_median_s": round(host, 2),
                "sandbox_median_s": round(boxed, 2),
                "ratio": round(boxed / host, 3),
                "host_parts_median_s": _medians(host_parts),
                "sandbox_parts_median_s": _medians(parts),
            }
            print(f"{label}: host {host:.2f} s, sandbox {boxed:.2f} s, ratio {boxed / host:.3f}")
    out = {"machine": describe(), "image": image, "runs": args.runs, "shards": results}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
