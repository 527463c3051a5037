"""Listing benchmark: ``ObjectStore.list()`` over a 100,000-object bucket in the embedded GCS.

Not a test. Populating: empty objects named like the driver cache (real 2022 kernel list x
driver versions x {.ko.gz, .o.gz}), each created through the server's JSON API
(``uploadType=media``, ``ifGenerationMatch=0``) from 8 threads, each on one keep-alive
connection: every object is a real server-side create, without the python client's
per-request overhead (measured: ~2x faster than ``ObjectStore.upload_many`` on 2 cores, whose
rate is reported too, from a 5,000-object sample).

Usage: .venv/bin/python bench/bench_listing.py [--objects 100000] [--runs 5]
       [--root DIR]  (keep the populated server data there; reruns skip populating)
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from machine import describe

from drivers.store.emulator import EmbeddedGCS, free_port
from drivers.store.storage import PAGE_SIZE, ObjectStore, client_from_environment

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from scenarios import KERNEL_LIST  # noqa: E402

DRIVER_VERSIONS = [
    "1.0.0",
    "2.0.1",
    "2.1.0",
    "2.2.0",
    "2.3.0-rc1",
    "2.3.0",
    "2.4.0",
    "2.5.0",
    "2.6.0",
]
BUCKET = "bench-listing"


def object_names(count: int) -> list[str]:
    kernels = KERNEL_LIST.read_text().split()
    names = (
        name
        for version, kernel in itertools.product(DRIVER_VERSIONS, kernels)
        for name in (
            f"{version}/collector-{kernel}.ko.gz",
            f"{version}/collector-ebpf-{kernel}.o.gz",
        )
    )
    chosen = list(itertools.islice(names, count))
    assert len(chosen) == count, f"only {len(chosen)} names; add driver versions"
    return chosen


def populate(gcs: EmbeddedGCS, bucket: str, names: list[str], workers: int = 8) -> float:
    """Create every object (empty); returns objects/s."""

    def create(chunk: list[str]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", gcs.port, timeout=60)
        for name in chunk:
            query = urllib.parse.urlencode(
                {"uploadType": "media", "name": name, "ifGenerationMatch": "0"}
            )
            conn.request("POST", f"/upload/storage/v1/b/{bucket}/o?{query}", body=b"")
            response = conn.getresponse()
            response.read()
            if response.status not in (200, 412):  # 412: created by an earlier, partial run
                raise RuntimeError(f"creating {name}: HTTP {response.status}")
        conn.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(create, [names[i::workers] for i in range(workers)]))
    return len(names) / (time.perf_counter() - start)


def time_listing(store: ObjectStore, expected: int, runs: int) -> tuple[list[float], int]:
    seconds, requests = [], 0
    for _ in range(runs):
        store.requests_made = 0
        start = time.perf_counter()
        count = sum(1 for _ in store.list())
        seconds.append(time.perf_counter() - start)
        requests = store.requests_made
        assert count == expected, f"listed {count}, expected {expected}"
    return seconds, requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--root", type=Path, help="server data dir to keep (default: temporary)")
    parser.add_argument(
        "--page-sizes",
        default=f"{PAGE_SIZE},1000,100000",
        help="comma-separated; the first is timed --runs times, the others once",
    )
    args = parser.parse_args()

    root = args.root or Path(tempfile.mkdtemp(prefix="bench-listing-"))
    gcs = EmbeddedGCS(root, port=free_port()).ensure_running()
    os.environ.update(gcs.env())
    try:
        print(f"machine: {describe()}")
        client = client_from_environment()
        names = object_names(args.objects)
        gcs.create_buckets([BUCKET, "bench-upload-sample", "bench-state"])
        # A marker in another bucket, so a rerun on a kept --root skips populating cheaply.
        populated = ObjectStore(client, "bench-state")
        marker = f"populated-{len(names)}"
        if not populated.exists(marker):
            rate = populate(gcs, BUCKET, names)
            print(f"populated {len(names):,} objects via raw JSON API: {rate:,.0f} objects/s")
            populated.upload_new(marker, b"")
        sample = ObjectStore(client, "bench-upload-sample")
        if not any(True for _ in sample.list()):
            start = time.perf_counter()
            sample.upload_many(((n, b"") for n in names[:5000]), workers=16)
            rate = 5000 / (time.perf_counter() - start)
            print(
                f"ObjectStore.upload_many (16 threads), 5,000-object sample: {rate:,.0f} objects/s"
            )

        for i, page_size in enumerate(int(p) for p in args.page_sizes.split(",")):
            store = ObjectStore(client, BUCKET, page_size=page_size)
            seconds, requests = time_listing(store, len(names), args.runs if i == 0 else 1)
            median = statistics.median(seconds)
            print(
                f"page_size={page_size}: median {median:.2f} s of {len(seconds)} "
                f"({', '.join(f'{s:.2f}' for s in seconds)}), {requests} requests, "
                f"{len(names) / median:,.0f} names/s"
            )
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS of this process: {peak:.0f} MiB")
    finally:
        gcs.stop()
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
