"""Support-package benchmark: building one package locally, ours vs the original's method.

Not a test. Input: 10,000 synthetic 200 KB drivers (random bytes, so nothing compresses),
named like the cache (real 2022 kernel list, ``collector-<kernel>.ko.gz`` and
``collector-ebpf-<kernel>.o.gz``), in ``bench/out/packages/kernel-modules/<version>/``
(kept between runs).

- ours: ``build_zip`` (zip + sha256 in one pass) + the ``.sha256`` file + ``index.html``,
  in a child process, timed inside it (interpreter start-up and imports excluded);
  the child's peak RSS comes from ``wait4``.
- original: ``zip -r -0 -q out.zip kernel-modules && sha256sum out.zip > out.zip.sha256``
  (as the original's 04-create-support-packages.sh, but without compression, as ours).

Runs are interleaved (original, ours, original, …) after one untimed warm-up of each, so
the page cache holds the inputs for both; ``sync`` before each run (not timed) so neither
pays for the other's dirty pages.

Usage: .venv/bin/python bench/bench_packages.py [--drivers 10000] [--size 204800] [--runs 5]
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
import time
from pathlib import Path

from machine import describe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from scenarios import KERNEL_LIST  # noqa: E402

OUT = REPO / "bench/out/packages"
VERSION = "2.3.0"


def make_drivers(folder: Path, count: int, size: int) -> None:
    """Create ``count`` files of ``size`` random bytes, unless they are there already."""
    kernels = KERNEL_LIST.read_text().split()
    names = itertools.islice(
        (
            name
            for kernel in kernels
            for name in (f"collector-{kernel}.ko.gz", f"collector-ebpf-{kernel}.o.gz")
        ),
        count,
    )
    names = list(names)
    assert len(names) == count, f"only {len(names)} driver names from {KERNEL_LIST}"
    if folder.is_dir():
        have = {e.name: e.stat().st_size for e in os.scandir(folder)}
        if have == dict.fromkeys(names, size):
            return
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_bytes(os.urandom(size))


def run_ours(folder: Path, out_dir: Path) -> None:
    """Child process: build the package, its .sha256 and the index; print the seconds."""
    from drivers.build import packages

    start = time.perf_counter()
    zip_path = out_dir / "ours.zip"
    info = packages.build_zip(VERSION, packages.iter_driver_files(folder), zip_path)
    (out_dir / "ours.zip.sha256").write_text(packages.sha256_line(info.sha256, zip_path.name))
    entry = packages.IndexEntry(VERSION, zip_path.name, info.size, info.sha256, "20221201100000")
    (out_dir / "index.html").write_text(packages.render_index([entry]))
    print(json.dumps({"seconds": time.perf_counter() - start, "count": info.count}))


def time_ours(out_dir: Path) -> tuple[float, int]:
    """(seconds inside the child, child's peak RSS in KiB)."""
    folder = out_dir / "kernel-modules" / VERSION
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", str(folder), str(out_dir)],
        stdout=subprocess.PIPE,
        text=True,
    )
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise RuntimeError(f"ours failed with exit code {child.returncode}")
    return json.loads(output)["seconds"], usage.ru_maxrss


def time_original(out_dir: Path) -> float:
    (out_dir / "out.zip").unlink(missing_ok=True)  # zip -r would update, not replace
    start = time.perf_counter()
    subprocess.run(
        "zip -r -0 -q out.zip kernel-modules && sha256sum out.zip > out.zip.sha256",
        shell=True,
        check=True,
        cwd=out_dir,
    )
    return time.perf_counter() - start


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        run_ours(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drivers", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=200 * 1024)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if shutil.which("zip") is None:
        sys.exit("zip is not installed: apt-get install -y zip")

    print(f"machine: {describe()}")
    folder = OUT / "kernel-modules" / VERSION
    started = time.perf_counter()
    make_drivers(folder, args.drivers, args.size)
    total = args.drivers * args.size
    print(f"input: {args.drivers:,} drivers x {args.size:,} B = {total / 1e9:.2f} GB in {folder}")
    print(f"  (ready in {time.perf_counter() - started:.1f} s)")

    subprocess.run(["sync"], check=True)
    time_original(OUT)  # warm-up: pulls every input into the page cache
    time_ours(OUT)
    originals, ours, rss = [], [], []
    for run in range(args.runs):
        subprocess.run(["sync"], check=True)
        originals.append(time_original(OUT))
        subprocess.run(["sync"], check=True)
        seconds, peak = time_ours(OUT)
        ours.append(seconds)
        rss.append(peak)
        print(f"run {run + 1}: original {originals[-1]:.2f} s, ours {seconds:.2f} s, "
              f"ours peak RSS {peak / 1024:.0f} MiB")  # fmt: skip

    check = subprocess.run(["unzip", "-tqq", str(OUT / "ours.zip")], capture_output=True)
    sizes = (OUT / "ours.zip").stat().st_size, (OUT / "out.zip").stat().st_size
    original, mine = statistics.median(originals), statistics.median(ours)
    print(f"original (zip -r -0 + sha256sum): median {original:.2f} s  {originals}")
    print(f"ours (build_zip + .sha256 + index.html): median {mine:.2f} s  {ours}")
    print(f"ratio ours / original: {mine / original:.2f}")
    rates = total / mine / 1e6, total / original / 1e6
    print(f"throughput: ours {rates[0]:.0f} MB/s, original {rates[1]:.0f} MB/s")
    print(f"ours peak RSS: max {max(rss) / 1024:.0f} MiB over {len(rss)} runs")
    print(f"zip sizes: ours {sizes[0]:,} B, original {sizes[1]:,} B; "
          f"unzip -t ours: {'ok' if check.returncode == 0 else check.stderr}")  # fmt: skip


if __name__ == "__main__":
    main()
