"""Planner benchmarks (issue 2, targets a-c). Not part of `make test`.

(a) real list x 5 driver versions, both blocklists, a cache in which 1.0.0-2.2.0 are
    fully built: the `drivers plan` process, start to exit, <= 0.5 s; peak RSS.
(b) 50,000 kernels x 10 versions x 2 kinds against a 700,000-name cache listing:
    <= 10 s and <= 2 GiB peak RSS.
(c) balance on (a) with 90 slots: makespan <= 1.10 x lower bound, beside the original's
    fixed fan-out (fc36 10, rhel8 40, rhel7 40 shards of equal kernel count).

Usage: .venv/bin/python bench/bench_plan.py [--runs 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from machine import describe  # noqa: E402

from drivers.domain.config import load_config  # noqa: E402
from drivers.domain.kernels import parse_kernel  # noqa: E402
from drivers.domain.names import CacheIndex  # noqa: E402
from drivers.domain.planner import makespan, plan  # noqa: E402
from scenarios import (  # noqa: E402
    BLOCKLISTS,
    KERNEL_LIST,
    SUPPORTED_2022,
    fully_built_cache,
    real_kernels,
)

OUT = ROOT / "bench" / "out"
DRIVERS = str(Path(sys.executable).parent / "drivers")


def timed_process(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one process, start to exit."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv} failed:\n{proc.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024


def measure(argv: list[str], runs: int) -> dict:
    timed_process(argv)  # warm the page cache
    samples = [timed_process(argv) for _ in range(runs)]
    walls = [w for w, _ in samples]
    return {
        "median_s": statistics.median(walls),
        "min_s": min(walls),
        "max_s": max(walls),
        "peak_rss_mib": max(r for _, r in samples),
    }


def scenario_a() -> tuple[Path, Path]:
    config = dataclasses.replace(load_config(), blocklist_paths=BLOCKLISTS)
    names = fully_built_cache(real_kernels(), SUPPORTED_2022[:4], config)
    cache = OUT / "cache-a.txt"
    cache.write_text("".join(f"gs://collector-drivers/{n}\n" for n in names))
    return KERNEL_LIST, cache


def scenario_b() -> tuple[Path, Path, list[str]]:
    """50,000 distinct, realistic kernel strings: the real list's shapes with other
    build numbers; 10 versions; 700,000 cache names for the first 7 versions."""
    rng = random.Random(2022)
    real = KERNEL_LIST.read_text().split()
    kernels: set[str] = set(real)
    while len(kernels) < 50_000:
        template = rng.choice(real)
        parts = template.split("-", 1)
        if len(parts) == 2 and parts[1][:1].isdigit():
            number = parts[1].split(".", 1)[0].split("-", 1)[0]
            candidate = f"{parts[0]}-{rng.randint(1, 99999)}{parts[1][len(number) :]}"
        else:
            candidate = f"{parts[0]}.{rng.randint(1, 9999)}" + (
                f"-{parts[1]}" if len(parts) > 1 else ""
            )
        kernels.add(candidate)
    kernel_file = OUT / "kernels-b.txt"
    ordered = sorted(kernels)
    kernel_file.write_text("\n".join(ordered) + "\n")
    versions = [f"2.{i}.0" for i in range(9)] + ["3.0.0-rc1"]
    lines = []
    for v in versions[:7]:
        for k in ordered:
            lines.append(f"{v}/collector-{k}.ko.gz\n")
            lines.append(f"{v}/collector-ebpf-{k}.o.gz\n")
    cache = OUT / "cache-b.txt"
    cache.write_text("".join(lines))
    return kernel_file, cache, versions


def original_fanout(plan_result, counts: dict[str, int]) -> list[float]:
    """The original's fixed fan-out: each builder's kernels (sorted) cut into
    ``counts[builder]`` contiguous chunks of equal kernel count."""
    costs = []
    for builder, groups in plan_result.groups.items():
        groups = sorted(groups, key=lambda g: g.kernel.key)
        n = counts[builder]
        for i in range(n):
            chunk = groups[i * len(groups) // n : (i + 1) * len(groups) // n]
            costs.append(sum(g.cost for g in chunk))
    return costs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"machine: {describe()}")

    kernels_a, cache_a = scenario_a()
    versions = [a for v in SUPPORTED_2022 for a in ("--driver-version", v)]
    blocklists = [a for b in BLOCKLISTS for a in ("--blocklist", str(b))]
    argv_a = [
        DRIVERS,
        "plan",
        "--kernels",
        str(kernels_a),
        *versions,
        *blocklists,
        "--cache",
        str(cache_a),
        "--slots",
        "90",
        "--output",
        str(OUT / "plan-a.json"),
    ]
    a = measure(argv_a, args.runs)
    summary = json.loads((OUT / "plan-a.json").read_text())["summary"]
    print(
        f"(a) real list x 5 versions: median {a['median_s']:.3f} s "
        f"(min {a['min_s']:.3f}, max {a['max_s']:.3f}), peak RSS {a['peak_rss_mib']:.0f} MiB, "
        f"{args.runs} runs; summary {summary}; target <= 0.5 s; baseline 88 s (quoted)"
    )

    kernels_b, cache_b, versions_b = scenario_b()
    argv_b = [
        DRIVERS,
        "plan",
        "--kernels",
        str(kernels_b),
        *[a for v in versions_b for a in ("--driver-version", v)],
        *blocklists,
        "--cache",
        str(cache_b),
        "--output",
        str(OUT / "plan-b.json"),
    ]
    b = measure(argv_b, max(3, args.runs // 2))
    summary = json.loads((OUT / "plan-b.json").read_text())["summary"]
    print(
        f"(b) 50,000 kernels x 10 versions x 2 kinds, 700,000 cache names: median "
        f"{b['median_s']:.2f} s (min {b['min_s']:.2f}, max {b['max_s']:.2f}), peak RSS "
        f"{b['peak_rss_mib']:.0f} MiB; summary {summary}; targets <= 10 s, <= 2048 MiB"
    )

    config = dataclasses.replace(load_config(), blocklist_paths=BLOCKLISTS)
    done = (
        CacheIndex()
        .add_names(line.split("/", 3)[3] for line in cache_a.read_text().splitlines())
        .done
    )
    p = plan(
        [parse_kernel(k) for k in kernels_a.read_text().split()],
        SUPPORTED_2022,
        ("mod", "bpf"),
        done,
        config,
        slots=90,
    )
    fixed = original_fanout(p, {"fc36": 10, "rhel8": 40, "rhel7": 40})
    fixed_span = makespan(fixed, 90, config.costs.shard_startup)
    print(
        f"(c) 90 slots, lower bound {p.lower_bound:.0f} s: planner makespan "
        f"{p.makespan:.0f} s = {p.makespan / p.lower_bound:.3f} x bound "
        f"({len(p.shards)} shards: {p.builder_summary(config.builders)}); original fixed "
        f"fan-out (fc36 10, rhel8 40, rhel7 40) {fixed_span:.0f} s = "
        f"{fixed_span / p.lower_bound:.3f} x bound; target <= 1.10"
    )


if __name__ == "__main__":
    main()
