"""vm-test benchmark: one boot per kernel in which the real 2.3.0 collector module and eBPF
probe each capture the configured number of events through the real consumer
(``scap-open --kmod``, then ``scap-open --bpf``), under QEMU (software emulation).

Not a test. Kernels: Debian's 6.1.0-56-amd64 and 6.1.0-56-cloud-amd64 (the real 2.3.0
drivers do not compile on 6.12). Drivers: built with kbuild from the 2.3.0 tree prepared
as the tests prepare it (tests/test_vmtest.py), against each kernel's bundle
(``.cache/bundles``, made if missing). Consumer: built once from the same prepared sources
(drivers.build.consumer, its patches applied). Boot images: Debian's ``linux-image-<uname>``
(``.cache/kernel-images``). Each vm-test is timed from QEMU's start to its exit (the
initramfs is built before); every result must be ``loaded`` with its events.

Usage: .venv/bin/python bench/bench_vmtest.py [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import describe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from drivers.build import boot_images, vmtest  # noqa: E402
from drivers.build.consumer import Consumer, build_consumer  # noqa: E402
from drivers.domain.config import load_config  # noqa: E402
from drivers.domain.names import DriverKey  # noqa: E402
from test_vmtest import REAL_SOURCES, build_real_by_hand, prepare_by_hand  # noqa: E402

CACHE = REPO / ".cache"
KERNELS = ["6.1.0-56-amd64", "6.1.0-56-cloud-amd64"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    machine = describe()
    events = load_config().vm_tests["events"]
    drivers, images = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        prepared = prepare_by_hand(REAL_SOURCES / "stackrox-falcosecurity-libs-2.3.0.tar.gz", tmp)
        tree = tmp / "consumer-tree"
        shutil.copytree(prepared, tree)
        started = time.perf_counter()
        binary = build_consumer(tree, tmp / "scap-open")
        consumer_s = time.perf_counter() - started
        consumers = {"2.3.0": Consumer("2.3.0", "2.x", binary)}
        for kernel in KERNELS:
            built = build_real_by_hand(kernel, prepared, tmp)
            drivers[kernel] = [(DriverKey(kernel, "2.3.0", k), built[k]) for k in ("mod", "bpf")]
            images[kernel] = boot_images.debian_boot_image(
                kernel, CACHE / "debs", CACHE / "kernel-images"
            )
        per_kernel: dict[str, list[float]] = {k: [] for k in KERNELS}
        captured: dict[str, list[int]] = {k: [] for k in KERNELS}
        for _ in range(args.runs):
            for kernel in KERNELS:
                results = vmtest.vm_test(kernel, drivers[kernel], images[kernel], consumers, events)
                if {r.status for r in results} != {"loaded"}:
                    raise RuntimeError(f"{kernel}: {results}")
                per_kernel[kernel].append(results[0].seconds)
                captured[kernel] += [r.events or 0 for r in results]

    print(f"\n{machine}\n{args.runs} runs, medians (min-max); {events} events asked for per driver")
    print(f"consumer build (scap-open 2.3.0, once per driver version): {consumer_s:.1f} s")
    print("| kernel | boot + module capture + probe capture, s | events per driver (min) |")
    print("|---|---|---|")
    for kernel, times in per_kernel.items():
        spread = f"{min(times):.1f}-{max(times):.1f}"
        print(f"| {kernel} | {statistics.median(times):.1f} ({spread}) | {min(captured[kernel])} |")


if __name__ == "__main__":
    main()
