"""One line describing the machine a benchmark ran on (noted beside every figure)."""

import os
import platform
from pathlib import Path


def describe() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    return (
        f"{os.cpu_count()} cores ({cpu}), load average {os.getloadavg()[0]:.1f} at start, "
        f"Linux {platform.release()}, Python {platform.python_version()}"
    )
