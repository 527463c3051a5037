"""CPaaS sync benchmark: extract a drivers image with 20,000 drivers and sync it into a
CPaaS cache that already holds half of them, ours vs the original's method.

Not a test. Input (made once, kept in ``bench/out/cpaas/``): 20,000 synthetic 200 KB
drivers (:mod:`drivers.build.synthetic`: real ELF headers and vermagic so verification
passes, incompressible filler), 2,000 kernels of the real 2022 list × 5 driver versions
× (module, probe), as an OCI image layout with one layer per driver version (gzip'd, as
image builders write them). Buckets: the embedded GCS (fake-gcs-server, filesystem
backend) started for the benchmark.

- ours, as the DAG does it: the image mirrored into the work bucket (timed separately,
  once), then ``cpaas.extract_drivers`` (stream the layers from the bucket, hash and
  verify every driver) and ``cpaas.push_drivers`` (one listing per version, then only the
  new drivers, streamed from the layers again, created with ``if_generation_match=0``).
- ours-local: the same extraction and push with the image read from the local layout,
  as the original reads it.
- original: extract ``/kernel-modules`` from the local layout to disk (layers in order,
  as ``docker cp`` would give), then ``gsutil -m cp -n``: for every file a metadata
  request, and an upload when the object is absent (16 threads, as ours).

Each method runs in a child process (peak RSS: its VmHWM); storage requests are
counted on the client's HTTP session. Between runs the objects the run created are
deleted again, so every run starts from the same half-full cache. Runs are interleaved.

Usage: .venv/bin/python bench/bench_cpaas.py [--kernels 2000] [--size 204800] [--runs 3]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from machine import describe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from drivers.build import oci  # noqa: E402
from drivers.build.synthetic import driver  # noqa: E402
from drivers.domain import layout  # noqa: E402
from drivers.domain.names import DriverKey  # noqa: E402
from drivers.flows import cpaas  # noqa: E402
from drivers.store.emulator import EmbeddedGCS, free_port  # noqa: E402
from drivers.store.storage import (  # noqa: E402
    Stores,  # noqa: E402
    client_from_environment,  # noqa: E402
)
from scenarios import KERNEL_LIST  # noqa: E402

OUT = REPO / "bench/out/cpaas"
VERSIONS = ("2.0.0", "2.1.0", "2.2.0", "2.3.0", "2.4.0")
ARCH = "x86_64"
PREFIX = layout.cpaas_prefix(ARCH)
BUCKETS = layout.Buckets(**{r: f"bench-{r.replace('_', '-')}" for r in layout.ROLES})
WORKERS = 16


def keys(kernels: int) -> list[DriverKey]:
    names = [line.strip() for line in KERNEL_LIST.read_text().splitlines() if line.strip()]
    chosen = sorted(set(names))[:kernels]
    return [DriverKey(k, v, kind) for v in VERSIONS for k in chosen for kind in ("mod", "bpf")]


def _write(args: tuple[DriverKey, Path, int]) -> None:
    key, root, size = args
    path = root / key.driver_version / "kernel-modules" / key.object_name()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(driver(key, ARCH, size=size))


def make_image(all_keys: list[DriverKey], size: int) -> Path:
    image = OUT / f"image-{len(all_keys)}-{size}"
    if image.exists():
        return image
    trees = OUT / "trees"
    shutil.rmtree(trees, ignore_errors=True)
    from multiprocessing import Pool

    print(f"writing {len(all_keys)} synthetic drivers ...", file=sys.stderr)
    with Pool(os.cpu_count()) as pool:
        pool.map(_write, [(k, trees, size) for k in all_keys], chunksize=200)
    print("building the image (one layer per version) ...", file=sys.stderr)
    layers = [trees / v for v in VERSIONS]
    oci.build_image({"amd64": layers[0]}, image, layers={"amd64": layers[1:]})
    shutil.rmtree(trees)
    return image


# --- the methods (each in a child process) --------------------------------------------------


def count_requests(client) -> list[int]:
    counter, lock = [0], threading.Lock()
    session = client._http
    original = session.request

    def request(*args, **kwargs):
        with lock:
            counter[0] += 1
        return original(*args, **kwargs)

    session.request = request
    return counter


def run_ours(image: Path, source: str) -> dict:
    client = client_from_environment()
    requests = count_requests(client)
    stores = Stores(client, BUCKETS)
    with oci.open_image(image) as opened:
        digest = opened.digest
    target = {"image": layout.mirrored_image_prefix(digest), "digest": digest, "oci_arch": "amd64"}
    run_id = f"bench-{time.time_ns()}"
    started = time.perf_counter()
    if source == "bucket":
        extracted = cpaas.extract_drivers(stores, run_id, target)
        extract_s = time.perf_counter() - started
        pushed = cpaas.push_drivers(stores, run_id, extracted, dry_run=False)
    else:  # the same steps over the local layout
        from drivers.store.push import Candidate, push_new

        with oci.open_image(image) as opened:
            result = oci.extract_drivers(opened, "amd64")
            extract_s = time.perf_counter() - started
            refs = result.verified()

            def load(names):
                wanted = {n: refs[n] for n in names}
                for name, data in oci.read_files(opened, "amd64", wanted):
                    yield name, lambda data=data: data

            candidates = {n: Candidate(r.size, r.md5) for n, r in refs.items()}
            outcome = push_new(stores.cpaas_drivers, PREFIX, candidates, load)
        pushed = {"created": len(outcome.created), "identical": len(outcome.identical)}
    total = time.perf_counter() - started
    stores.work.delete_prefix(cpaas.staging(run_id))
    stores.work.delete_prefix(cpaas.reports(run_id))
    return {
        "seconds": total,
        "extract_s": extract_s,
        "requests": requests[0],
        "created": pushed["created"],
        "skipped": pushed["identical"],
    }


def run_original(image: Path) -> dict:
    """docker cp + gsutil -m cp -n, as the original CI job did it."""
    client = client_from_environment()
    requests = count_requests(client)
    bucket = client.bucket(BUCKETS.cpaas_drivers)
    work = OUT / "original-extract"
    shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    with oci.open_image(image) as opened:
        for desc in opened.manifests["amd64"].layers:
            with opened._blobs.open(oci._blob_name(desc["digest"])) as raw:
                with tarfile.open(fileobj=raw, mode="r|gz") as tar:
                    tar.extractall(work, filter="data")
    extract_s = time.perf_counter() - started
    root = work / "kernel-modules"
    files = sorted(p for p in root.rglob("*") if p.is_file())
    created = skipped = 0
    lock = threading.Lock()

    def copy(path: Path) -> None:
        nonlocal created, skipped
        blob = bucket.blob(PREFIX + path.relative_to(root).as_posix())
        if blob.exists():  # -n: ask first, skip what exists
            with lock:
                skipped += 1
            return
        blob.upload_from_filename(str(path))
        with lock:
            created += 1

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(copy, files))
    total = time.perf_counter() - started
    shutil.rmtree(work)
    return {
        "seconds": total,
        "extract_s": extract_s,
        "requests": requests[0],
        "created": created,
        "skipped": skipped,
    }


def child(method: str, image: Path) -> None:
    result = (
        run_original(image) if method == "original" else run_ours(image, method[5:] or "bucket")
    )
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report
    # its parent's peak if that was higher.
    status = Path("/proc/self/status").read_text()
    hwm = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    result["peak_rss_mb"] = int(hwm.split()[1]) / 1024
    print(json.dumps(result))


# --- the parent ------------------------------------------------------------------------------


def reset(stores: Stores, new: list[str]) -> None:
    bucket = stores.client.bucket(BUCKETS.cpaas_drivers)

    def delete(name: str) -> None:
        bucket.blob(PREFIX + name).delete()

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(delete, new))


def spawn(method: str, image: Path, env: dict) -> dict:
    command = [sys.executable, __file__, "--child", method, "--image", str(image)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernels", type=int, default=2000)
    parser.add_argument("--size", type=int, default=200 * 1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child")
    parser.add_argument("--image", type=Path)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.image)

    machine = describe()
    all_keys = keys(args.kernels)
    image = make_image(all_keys, args.size)
    names = [k.object_name() for k in all_keys]
    half, new = names[::2], names[1::2]
    server = EmbeddedGCS(OUT / "gcs", port=free_port())
    shutil.rmtree(OUT / "gcs", ignore_errors=True)
    server.ensure_running()
    try:
        env = os.environ | server.env()
        os.environ.update(server.env())
        server.create_buckets(BUCKETS.all())
        stores = Stores(client_from_environment(), BUCKETS)
        print("preloading half of the drivers into the cache ...", file=sys.stderr)
        by_name = {k.object_name(): k for k in all_keys}
        with ThreadPoolExecutor(WORKERS) as pool:
            list(
                pool.map(
                    lambda n: stores.cpaas_drivers.upload_new(
                        PREFIX + n, driver(by_name[n], ARCH, size=args.size)
                    ),
                    half,
                )
            )
        print("mirroring the image into the work bucket ...", file=sys.stderr)
        started = time.perf_counter()
        with oci.open_image(image) as opened:
            mirrored = oci.mirror_image(
                opened, stores.work, layout.mirrored_image_prefix(opened.digest)
            )
        mirror_s = time.perf_counter() - started
        image_bytes = sum(p.stat().st_size for p in image.rglob("*") if p.is_file())
        results: dict[str, list[dict]] = {"original": [], "ours": [], "ours-local": []}
        for _, method in itertools.product(range(args.runs), results):
            result = spawn(method, image, env)
            assert result["created"] == len(new) and result["skipped"] == len(half), result
            results[method].append(result)
            print(method, json.dumps(result), file=sys.stderr)
            reset(stores, new)
    finally:
        server.stop()
        shutil.rmtree(OUT / "gcs", ignore_errors=True)

    def median(method: str, key: str) -> float:
        return statistics.median(r[key] for r in results[method])

    print(f"\n{machine}")
    print(
        f"image: {len(names)} drivers x {args.size // 1024} KB, {len(VERSIONS)} layers, "
        f"{image_bytes / 2**30:.2f} GiB; cache already holds {len(half)}; "
        f"{args.runs} runs each, medians"
    )
    print(f"mirror into the work bucket (ours, once): {mirror_s:.1f} s, {mirrored}")
    print("| method | wall s (min-max) | of which extract s | storage requests | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for method, runs in results.items():
        walls = [r["seconds"] for r in runs]
        print(
            f"| {method} | {median(method, 'seconds'):.1f} ({min(walls):.1f}-{max(walls):.1f}) "
            f"| {median(method, 'extract_s'):.1f} | {median(method, 'requests'):.0f} "
            f"| {median(method, 'peak_rss_mb'):.0f} |"
        )
    base = median("original", "seconds")
    for method in ("ours", "ours-local"):
        print(f"{method} / original wall time: {median(method, 'seconds') / base:.2f}")


if __name__ == "__main__":
    main()
