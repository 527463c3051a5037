"""vm-test benchmark: one boot per kernel testing its module and its eBPF probe (load,
attach, count, unload) under QEMU (software emulation), and 6 kernels with 2 VMs at a
time against 6 in a row.

Not a test. Kernels: the embedded default's 6 Debian kernels (6.1.0-56 and 6.12.115 ×
amd64, cloud-amd64, rt-amd64). Drivers: the example 2.3.0 module and probe built by the
builder against each kernel's bundle (``.cache/bundles``, made if missing). Boot images: Debian's
``linux-image-<uname>`` (``.cache/kernel-images``). Each vm-test is timed from QEMU's
start to its exit (the initramfs is built before); every result must be ``loaded``.

Usage: .venv/bin/python bench/bench_vmtest.py [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from machine import describe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from drivers.build import boot_images, vmtest  # noqa: E402
from drivers.domain.names import DriverKey  # noqa: E402
from test_vmtest import build_driver_for  # noqa: E402

CACHE = REPO / ".cache"
KERNELS = [
    f"{release}-{flavour}"
    for release in ("6.1.0-56", "6.12.115+deb12")
    for flavour in ("amd64", "cloud-amd64", "rt-amd64")
]


def one(kernel: str, drivers: list[tuple[DriverKey, bytes]], image: Path) -> float:
    results = vmtest.vm_test(kernel, drivers, image)
    if {r.status for r in results} != {"loaded"}:
        raise RuntimeError(f"{kernel}: {results}")
    return results[0].seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    machine = describe()
    modules, images = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for kernel in KERNELS:
            modules[kernel] = [
                (DriverKey(kernel, "2.3.0", kind), build_driver_for(kernel, Path(tmp), kind))
                for kind in ("mod", "bpf")
            ]
            images[kernel] = boot_images.debian_boot_image(
                kernel, CACHE / "debs", CACHE / "kernel-images"
            )
    per_kernel: dict[str, list[float]] = {k: [] for k in KERNELS}
    serial, parallel = [], []
    for _ in range(args.runs):
        started = time.perf_counter()
        for kernel in KERNELS:
            per_kernel[kernel].append(one(kernel, modules[kernel], images[kernel]))
        serial.append(time.perf_counter() - started)
        started = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda k: one(k, modules[k], images[k]), KERNELS))
        parallel.append(time.perf_counter() - started)

    print(f"\n{machine}\n{args.runs} runs, medians (min-max)")
    print("| kernel | boot + module and probe load, count, unload, s |")
    print("|---|---|")
    for kernel, times in per_kernel.items():
        print(f"| {kernel} | {statistics.median(times):.1f} ({min(times):.1f}-{max(times):.1f}) |")
    s, p = statistics.median(serial), statistics.median(parallel)
    print(f"6 kernels in a row: {s:.1f} s ({min(serial):.1f}-{max(serial):.1f})")
    print(f"6 kernels, 2 VMs at a time: {p:.1f} s ({min(parallel):.1f}-{max(parallel):.1f})")
    print(f"parallel / serial: {p / s:.2f}")


if __name__ == "__main__":
    main()
