"""Builder benchmark: what `drivers build-shard` adds around the compiler and GNU tar.

Not a test. Per kernel (Debian 6.1.0-47 and 6.1.0-56 in amd64, cloud-amd64, rt-amd64;
bundles made with drivers.build.bundles.make_debian_bundle):

- fetch: ``ObjectStore.download_to`` of the bundle from the embedded GCS;
- extraction: ``safetar.safe_extract`` vs ``tar xzf`` of the same bundle into an empty
  folder on the same file system (alternating, so both see the same cache state);
- build: ``compile.build_driver`` for the kernel module (fresh copy of the sources, make,
  strip --strip-debug, vermagic check, deterministic gzip) vs the bare
  ``make -C <BUNDLE_BUILD_DIR> M=<fresh copy> modules`` on the same extracted headers;
  the same for the eBPF probe (make, llvm-strip -g, ELF check, gzip), for information.

Then one real ``drivers build-shard`` over every kernel x both example versions x both
kinds, for its fetch/extract/build split.

``--real KERNEL=VERSION,...`` (issue 14): the real collector drivers instead. Per
kernel and kind, ``compile.build_driver`` on the prepared sources (``--sources
VERSION=TGZ``, what ``drivers sources prepare`` writes: a fresh copy of the whole tree,
make, strip, checks, gzip: what a shard does per driver once the bundle is extracted)
vs the bare ``make -C <BUNDLE_BUILD_DIR> M=<fresh copy>/<kind dir> -jN modules`` of the
same prepared tree on the same extracted bundle (the copy not timed; the builder's -j and
LC_ALL=C), alternating; use an even ``--runs`` so each goes first as often.

Usage: .venv/bin/python bench/bench_builder.py [--runs 5] [--bundles DIR] [--kernels K,...]
       [--no-sync] [--extract-only] [--json OUT]
       .venv/bin/python bench/bench_builder.py --real 6.1.0-56-amd64=2.3.0,... \
       --sources 2.3.0=.cache/sources/2.3.0.tgz [--runs 3]
Results and how to read them: bench/results_builder.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from machine import describe  # noqa: E402

from drivers.build.bundle import open_bundle
from drivers.build.bundles import make_debian_bundle
from drivers.build.compile import build_driver, toolchain_versions
from drivers.build.safetar import safe_extract
from drivers.build.shard_run import sources_root
from drivers.build.sources import package_sources, read_build_spec
from drivers.domain import layout
from drivers.domain.names import DriverKey
from drivers.store.emulator import EmbeddedGCS, free_port
from drivers.store.storage import ObjectStore, client_from_environment

REPO = Path(__file__).resolve().parents[1]
SOURCES = REPO / "tests/fixtures/example-driver-sources"  # the toy module and probe
KERNELS = [
    f"6.1.0-{abi}-{flavour}" for abi in (47, 56) for flavour in ("amd64", "cloud-amd64", "rt-amd64")
]


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


SYNC = True  # --no-sync: start extractions right after deleting the previous tree


def fresh(path: Path) -> Path:
    """An empty folder; with SYNC, the previous tree's deletion is written out first, so
    both extractors start from the same, settled state."""
    shutil.rmtree(path, ignore_errors=True)
    if SYNC:
        os.sync()
    path.mkdir(parents=True)
    return path


def bench_kernel(
    kernel: str, bundle: Path, store: ObjectStore, scratch: Path, runs: int, builds: bool = True
) -> dict:
    out: dict = {"kernel": kernel, "bundle_mb": round(bundle.stat().st_size / 1e6, 1)}
    fetch, ours, tar = [], [], []
    for run in range(runs):
        target = scratch / "fetched.tgz"
        fetch.append(timed(store.download_to, layout.bundle_object(kernel), target)[0])
        target.unlink()
        for which in ("ours", "tar") if run % 2 == 0 else ("tar", "ours"):  # alternate
            if which == "ours":
                ours.append(timed(safe_extract, bundle, fresh(scratch / "x-ours"))[0])
            else:
                tar_cmd = ["tar", "xzf", str(bundle), "-C", str(fresh(scratch / "x-tar"))]
                tar.append(timed(subprocess.run, tar_cmd, check=True)[0])
    shutil.rmtree(scratch / "x-tar")
    med = statistics.median
    out.update(
        fetch_s=med(fetch),
        extract_s=med(ours),
        tar_s=med(tar),
        extract_ratio=med(ours) / med(tar),
        runs={"fetch": fetch, "extract": ours, "tar": tar},
    )
    if not builds:
        shutil.rmtree(scratch / "x-ours")
        return out

    # Build on the tree extracted by safe_extract, inside a scratch root like the builder's.
    root = scratch / "x-ours"
    info = open_bundle(root, kernel)
    sources = SOURCES / "2.3.0"
    ours_build = {"mod": [], "bpf": []}
    bare = {"mod": [], "bpf": []}
    make_inside = {"mod": [], "bpf": []}
    for _ in range(runs):
        for kind, folder in (("mod", "module"), ("bpf", "bpf")):
            bare_dir = scratch / "bare"
            shutil.rmtree(bare_dir, ignore_errors=True)
            shutil.copytree(sources / folder, bare_dir)
            make_cmd = ["make", "-C", str(info.build_dir), f"M={bare_dir}", "modules"]
            bare[kind].append(timed(subprocess.run, make_cmd, check=True, capture_output=True)[0])
            key = DriverKey(kernel, "2.3.0", kind)
            seconds, built = timed(build_driver, key, sources, info, scratch)
            assert built.data is not None, built.message
            ours_build[kind].append(seconds)
            make_inside[kind].append(built.make_s)
    shutil.rmtree(root)
    shutil.rmtree(scratch / "build", ignore_errors=True)
    shutil.rmtree(scratch / "bare", ignore_errors=True)

    for kind in ("mod", "bpf"):
        out[kind] = {
            "build_s": med(ours_build[kind]),
            "make_inside_s": med(make_inside[kind]),
            "bare_make_s": med(bare[kind]),
            "ratio": med(ours_build[kind]) / med(bare[kind]),
            "runs": {"build": ours_build[kind], "bare": bare[kind]},
        }
    return out


def bench_real(
    kernel: str, version: str, bundle: Path, sources: Path, scratch: Path, runs: int
) -> dict:
    """build_driver vs bare make of the same prepared tree, per kind, alternating."""
    fresh(scratch)
    safe_extract(bundle, scratch / "bundle")
    info = open_bundle(scratch / "bundle", kernel)
    safe_extract(sources, scratch / "sources")
    tree = sources_root(scratch / "sources")
    spec = read_build_spec(tree, version)
    jobs = f"-j{len(os.sched_getaffinity(0))}"  # what the builder passes
    env = dict(os.environ, LC_ALL="C")
    out: dict = {"kernel": kernel, "driver_version": version}
    med = statistics.median
    for kind in ("mod", "bpf"):
        ours, bare, make_inside = [], [], []
        key = DriverKey(kernel, version, kind)
        for run in range(runs):
            for which in ("ours", "bare") if run % 2 == 0 else ("bare", "ours"):
                if which == "ours":
                    seconds, built = timed(build_driver, key, tree, info, scratch)
                    assert built.data is not None, f"{key}: {built.message}"
                    ours.append(seconds)
                    make_inside.append(built.make_s)
                    shutil.rmtree(scratch / "build")
                else:
                    copy = scratch / "bare"
                    shutil.rmtree(copy, ignore_errors=True)
                    shutil.copytree(tree, copy, symlinks=True)
                    cmd = ["make", "-C", str(info.build_dir), f"M={copy / spec[kind]['dir']}",
                           jobs, "modules"]  # fmt: skip
                    # the builder's locale (its make runs with LC_ALL=C), so that only
                    # what it does around make differs
                    run = {"check": True, "capture_output": True, "env": env}
                    bare.append(timed(subprocess.run, cmd, **run)[0])
        out[kind] = {
            "build_s": med(ours),
            "make_inside_s": med(make_inside),
            "bare_make_s": med(bare),
            "ratio": med(ours) / med(bare),
            "runs": {"build": ours, "bare": bare},
        }
        print(
            f"{kernel:22} {version} {kind}: build_driver {med(ours):.2f}s "
            f"(make {med(make_inside):.2f}s) vs bare make {med(bare):.2f}s "
            f"= {med(ours) / med(bare):.3f}x  {os.getloadavg()[0]:.1f} load",
            flush=True,
        )
    shutil.rmtree(scratch)
    return out


def main_real(args: argparse.Namespace) -> None:
    pairs = [item.split("=", 1) for item in args.real.split(",")]
    sources = dict(item.split("=", 1) for item in args.sources)
    print(f"{describe()}, {tools_line()}")
    bundles = {}
    for kernel, _version in pairs:
        bundles[kernel] = args.bundles / layout.bundle_object(kernel)
        if not bundles[kernel].exists():
            make_debian_bundle(kernel, args.bundles, REPO / ".cache/debs")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-builder-", dir=REPO / ".cache") as tmp:
        for kernel, version in pairs:
            results.append(
                bench_real(
                    kernel,
                    version,
                    bundles[kernel],
                    Path(sources[version]),
                    Path(tmp) / "s",
                    args.runs,
                )  # fmt: skip
            )
    ratios = {k: statistics.median(r[k]["ratio"] for r in results) for k in ("mod", "bpf")}
    summary = {"machine": f"{describe()}, {tools_line()}", "runs": args.runs,
               "kernels": results, "median_ratio": ratios}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1))
    print(f"median ratio over {len(results)} kernels: " + ", ".join(
        f"{k} {v:.3f}" for k, v in ratios.items()))  # fmt: skip
    print(f"written {args.json}")


def tools_line() -> str:
    tools = toolchain_versions()
    return f"{tools['gcc']}, {tools['clang']}, {tools['make']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--bundles", type=Path, default=REPO / ".cache/bundles")
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--json", type=Path, help="default: bench/out/builder[-real].json")
    parser.add_argument("--no-sync", action="store_true", help="no os.sync() before extracting")
    parser.add_argument("--extract-only", action="store_true", help="fetch and extraction only")
    parser.add_argument("--real", help="KERNEL=VERSION,...: the real drivers (issue 14)")
    parser.add_argument("--sources", action="append", default=[], help="VERSION=TGZ (--real)")
    args = parser.parse_args()
    args.json = args.json or REPO / f"bench/out/builder{'-real' if args.real else ''}.json"
    if args.real:
        return main_real(args)
    global SYNC
    SYNC = not args.no_sync
    kernels = args.kernels.split(",")
    print(f"{describe()}, {tools_line()}")

    bundles = {}
    for kernel in kernels:
        bundles[kernel] = args.bundles / layout.bundle_object(kernel)
        if not bundles[kernel].exists():
            print(f"making {bundles[kernel]}")
            make_debian_bundle(kernel, args.bundles, REPO / ".cache/debs")

    with tempfile.TemporaryDirectory(prefix="bench-builder-", dir=REPO / ".cache") as tmp:
        tmp = Path(tmp)
        server = EmbeddedGCS(tmp / "gcs", port=free_port())
        server.ensure_running()
        os.environ.update(server.env())
        try:
            names = {r: f"bench-builder-{r}" for r in ("bundles", "sources", "work")}
            server.create_buckets(names.values())
            client = client_from_environment()
            stores = {r: ObjectStore(client, n) for r, n in names.items()}
            for kernel, path in bundles.items():
                stores["bundles"].upload_new_file(layout.bundle_object(kernel), path)
            for version in ("2.3.0", "2.4.0-rc1"):
                archive = package_sources(SOURCES / version, tmp)
                stores["sources"].upload_new_file(layout.source_object(version), archive)

            results = []
            for kernel in kernels:
                r = bench_kernel(
                    kernel,
                    bundles[kernel],
                    stores["bundles"],
                    tmp / "s",
                    args.runs,
                    builds=not args.extract_only,
                )
                results.append(r)
                print(
                    f"{kernel:22} fetch {r['fetch_s']:.2f}s  extract {r['extract_s']:.2f}s "
                    f"vs tar {r['tar_s']:.2f}s = {r['extract_ratio']:.2f}x  "
                    + "  ".join(
                        f"{k} {r[k]['build_s']:.2f}s (make {r[k]['make_inside_s']:.2f}s) vs "
                        f"bare {r[k]['bare_make_s']:.2f}s = {r[k]['ratio']:.2f}x"
                        for k in ("mod", "bpf")
                        if k in r
                    ),
                    flush=True,
                )

            shard = run_shard(stores, names, kernels, tmp) if not args.extract_only else None
        finally:
            server.stop()

    summary = {
        "machine": f"{describe()}, {tools_line()}",
        "runs": args.runs,
        "sync": SYNC,
        "kernels": results,
        "shard": shard,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1))
    if shard:
        print(json.dumps(shard, indent=1))
    print(f"written {args.json}")


def run_shard(stores: dict, names: dict, kernels: list[str], tmp: Path) -> dict:
    """One real `drivers build-shard`: every kernel x both versions x both kinds."""
    shard = {
        "run_id": "bench",
        "builder": "fc36",
        "index": 0,
        "cost": 0.0,
        "buckets": names,
        "tasks": [
            [k, v, kind] for k in kernels for v in ("2.3.0", "2.4.0-rc1") for kind in ("mod", "bpf")
        ],
    }
    name = layout.shard_object("bench", "fc36", 0)
    stores["work"].put(name, json.dumps(shard).encode())
    started = time.perf_counter()
    command = [str(REPO / ".venv/bin/drivers"), "build-shard", "--shard",
               f"gs://{names['work']}/{name}", "--workdir", str(tmp / "shard")]  # fmt: skip
    status = subprocess.run(command, check=False).returncode
    wall = time.perf_counter() - started
    lines = stores["work"].download(layout.shard_results_object("bench", "fc36", 0))
    records = [json.loads(line) for line in lines.decode().splitlines()]
    per_kind: dict[str, list[float]] = {}
    for r in records[:-1]:
        per_kind.setdefault(r["kind"], []).append(r["duration_s"])
    return {
        "exit_status": status,
        "wall_s": wall,
        "record": records[-1],
        "task_median_s": {k: statistics.median(v) for k, v in per_kind.items()},
    }


if __name__ == "__main__":
    main()
