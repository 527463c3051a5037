"""Real data from the system we replace, and scenarios built on it (tests and benchmarks).

The data stays in ../shared/data; nothing is copied into the repo.
"""

from __future__ import annotations

import os
from pathlib import Path

from drivers.domain.config import Config
from drivers.domain.kernels import Kernel, ebpf_supported, read_kernel_list
from drivers.domain.names import KINDS, DriverKey


def _real_data() -> Path:
    """``$DRIVERS_REAL_DATA``, else ``shared/data`` beside the checkout, else the
    workplace's ``/work/shared`` (a CI clone may live anywhere)."""
    candidates = [
        os.environ.get("DRIVERS_REAL_DATA"),
        Path(__file__).resolve().parents[2] / "shared" / "data" / "collector-2022-12",
        "/work/shared/data/collector-2022-12",
    ]
    for candidate in filter(None, candidates):
        if (Path(candidate) / "KERNEL_VERSIONS").is_file():
            return Path(candidate)
    raise FileNotFoundError(
        f"the real 2022 data (KERNEL_VERSIONS, BLOCKLIST...) is in none of {candidates}: "
        "set DRIVERS_REAL_DATA to its folder"
    )


REAL_DATA = _real_data()
KERNEL_LIST = REAL_DATA / "KERNEL_VERSIONS"
BLOCKLISTS = (REAL_DATA / "BLOCKLIST", REAL_DATA / "BLOCKLIST.osci")
SUPPORTED_2022 = ("1.0.0", "2.0.1", "2.1.0", "2.2.0", "2.3.0-rc1")


def real_kernels() -> list[Kernel]:
    kernels, problems = read_kernel_list(KERNEL_LIST.read_text().splitlines(), "KERNEL_VERSIONS")
    assert not problems, problems[:3]
    return kernels


def fully_built_cache(kernels: list[Kernel], versions, config: Config) -> list[str]:
    """Object names of a cache where every routable, unblocked driver of ``versions``
    is present, with ``.unavail`` markers where the kernel cannot run eBPF."""
    names = []
    blocklist = config.blocklist
    for kernel in kernels:
        for kind in KINDS:
            if config.route(kernel, kind) is None:
                continue
            for version in versions:
                if blocklist.match(kernel.release, version, kind):
                    continue
                key = DriverKey(kernel.release, version, kind)
                if kind == "bpf" and not ebpf_supported(kernel):
                    names.append(key.unavail_name())
                else:
                    names.append(key.object_name())
    return names
