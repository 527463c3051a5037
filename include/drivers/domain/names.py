"""Driver keys and their object names in a driver cache, both directions.

Cache layout (DESIGN.md §2), relative to the cache root:

- ``<driver_version>/collector-<kernel>.ko.gz``            kernel module
- ``<driver_version>/collector-ebpf-<kernel>.o.gz``        eBPF probe
- ``<driver_version>/.collector-ebpf-<kernel>.unavail``    this kernel cannot run eBPF

A driver counts as done when its object or its ``.unavail`` marker exists.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

Kind = Literal["mod", "bpf"]
KINDS: tuple[Kind, ...] = ("mod", "bpf")

# Semver with optional -rcN, or the 64-hex sha256 fingerprint older versions used.
DRIVER_VERSION_RE = re.compile(r"\d+\.\d+\.\d+(?:-rc\d+)?|[0-9a-f]{64}")


class DriverVersionError(ValueError):
    pass


def check_driver_version(version: str) -> str:
    """Return ``version`` unchanged, or raise naming it and the accepted forms."""
    if not DRIVER_VERSION_RE.fullmatch(version):
        raise DriverVersionError(
            f"driver version {version!r} is neither semver (2.3.0, 2.3.0-rc1) "
            "nor a 64-hex sha256 fingerprint"
        )
    return version


def check_kinds(kinds: Iterable[str]) -> tuple[Kind, ...]:
    """Validate a collection of kinds, keeping the canonical order mod, bpf."""
    wanted = set(kinds)
    unknown = wanted - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kind(s) {sorted(unknown)}: use mod and/or bpf")
    if not wanted:
        raise ValueError("no kind given: use mod and/or bpf")
    return tuple(k for k in KINDS if k in wanted)


class DriverKey(NamedTuple):
    """One driver: the unit that is built, cached and published."""

    kernel: str
    driver_version: str
    kind: Kind

    def object_name(self) -> str:
        if self.kind == "mod":
            return f"{self.driver_version}/collector-{self.kernel}.ko.gz"
        return f"{self.driver_version}/collector-ebpf-{self.kernel}.o.gz"

    def unavail_name(self) -> str:
        if self.kind != "bpf":
            raise ValueError(f"only eBPF drivers have .unavail markers, not {self.kind}")
        return f"{self.driver_version}/.collector-ebpf-{self.kernel}.unavail"


class CacheEntry(NamedTuple):
    key: DriverKey
    unavailable: bool


def _split_object_name(name: str) -> tuple[str, str, Kind, bool] | None:
    """(kernel, driver version, kind, unavailable), or None. String methods, not a regex,
    and plain tuples: this runs on every name of a cache listing."""
    version, slash, base = name.partition("/")
    if not slash or not version or "/" in base:
        return None
    if base.startswith("collector-ebpf-") and base.endswith(".o.gz"):
        kernel, kind, unavailable = base[15:-5], "bpf", False
    elif base.startswith(".collector-ebpf-") and base.endswith(".unavail"):
        kernel, kind, unavailable = base[16:-8], "bpf", True
    elif base.startswith("collector-") and base.endswith(".ko.gz"):
        kernel, kind, unavailable = base[10:-6], "mod", False
    else:
        return None
    return (kernel, version, kind, unavailable) if kernel else None


def parse_object_name(name: str) -> CacheEntry | None:
    """The driver an object name stands for, or None when it is not a driver name."""
    parts = _split_object_name(name)
    if parts is None:
        return None
    kernel, version, kind, unavailable = parts
    return CacheEntry(DriverKey(kernel, version, kind), unavailable)


@dataclass
class CacheIndex:
    """What a cache listing says is done, plus what it could not understand."""

    done: set[tuple[str, str, str]] = field(default_factory=set)  # equal to DriverKeys
    unavailable: int = 0
    unknown: Counter[str] = field(default_factory=Counter)  # top-level folder -> count
    unknown_examples: list[str] = field(default_factory=list)

    @property
    def unknown_count(self) -> int:
        return sum(self.unknown.values())

    def add_names(self, names: Iterable[str]) -> CacheIndex:
        for name in names:
            parts = _split_object_name(name)
            if parts is None:
                self.unknown[name.split("/", 1)[0] if "/" in name else "(root)"] += 1
                if len(self.unknown_examples) < 5:
                    self.unknown_examples.append(name)
                continue
            self.done.add(parts[:3])
            self.unavailable += parts[3]
        return self
