"""Repeated identical failures, and the blocklist lines that would cover them.

A driver version that cannot compile against a kernel series (2.x drivers on 6.12:
``class_create`` lost its module argument) fails there on every kernel, the same way.
Quarantine stops retrying each kernel after ``quarantine_after`` runs; a blocklist line
says why for the whole series, and holds for its next kernels too. This module finds
such groups in the coverage index and words the line; ``drivers report`` prints it,
an operator applies it (``drivers config add blocklist ...``), nothing applies it by
itself.

Identical means: same driver version, kind and failure class, and the same first error
once what differs from kernel to kernel is taken out (:func:`normalise_error`: the
kernel release, folders, line and column numbers). A group of at least
:data:`MIN_KERNELS` kernels of one series (``major.minor``) gets one line, the series
glob ``6.12.* <version> <kind>`` when that covers no driver that exists (built,
published, unavailable marker) and no failure of another cause; else the alternation of
exactly its kernels.

Pure: it reads coverage entries (:class:`drivers.store.ledger.Coverage` ``entries``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from drivers.domain.blocklist import Blocklist, parse_rules
from drivers.domain.decision import REPEATABLE
from drivers.domain.kernels import KernelParseError, parse_kernel

MIN_KERNELS = 2  # one kernel failing again and again is the quarantine's business
# What exists for an agent: a blocklist line must never cover one of these.
PRESENT = ("built", "published", "unavailable")
FAILING = (*REPEATABLE, "quarantined")  # quarantined: still the failure it was held for

# "path/to/main.c:2070:22: " -> "main.c: "; a header's folder names its kernel.
_LOCATION = re.compile(r"(?:[^\s:'\"‘’`]*/)?([^\s/:'\"‘’`]+):\d+(?::\d+)?:")
_FOLDER = re.compile(r"(?:[^\s:'\"‘’`]*/)+(?=[^\s/'\"‘’`])")

Entries = Mapping[str, Mapping[str, Mapping[str, Any]]]  # kernel -> kind -> entry


def normalise_error(reason: str, kernel: str) -> str:
    """A failure's reason without what differs from kernel to kernel: the kernel
    release, folders, line and column numbers (``compile: build/2.3.0/mod/main.c:2070:22:
    error: ...`` -> ``compile: main.c: error: ...``)."""
    text = reason.replace(kernel, "<kernel>")
    text = _LOCATION.sub(r"\1:", text)
    return " ".join(_FOLDER.sub("", text).split())


def series(kernel: str) -> str | None:
    """``major.minor`` of a kernel release (``6.12``), or None when it is not one."""
    try:
        k = parse_kernel(kernel)
    except KernelParseError:
        return None
    return f"{k.major}.{k.minor}"


@dataclass(frozen=True, slots=True)
class Suggestion:
    """One blocklist line for one group of identical failures."""

    rule: str  # the blocklist line: <kernel> <driver-version> <kind>
    driver_version: str
    kind: str
    failure: str  # the failure class, e.g. compile
    error: str  # the normalised first error they share
    kernels: tuple[str, ...]  # the failing kernels it covers, sorted

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "driver_version": self.driver_version,
            "kind": self.kind,
            "failure": self.failure,
            "error": self.error,
            "kernels": list(self.kernels),
        }


def suggest_blocklist(
    coverage: Mapping[str, Entries], min_kernels: int = MIN_KERNELS
) -> list[Suggestion]:
    """The blocklist lines that would cover repeated identical failures, from each driver
    version's coverage index entries (``coverage``: version -> kernel -> kind -> entry),
    in version, kind, series order."""
    suggestions = []
    for version in sorted(coverage):
        # A series glob covers only kernels of its series: each group is checked there.
        by_series: dict[str, dict[str, Mapping[str, Any]]] = {}
        groups: dict[tuple[str, str, str, str], list[str]] = {}
        for kernel, kinds in coverage[version].items():
            where = series(kernel)
            if where is None:
                continue
            by_series.setdefault(where, {})[kernel] = kinds
            for kind, entry in kinds.items():
                cause = _cause(kernel, entry)
                if cause is not None:
                    groups.setdefault((kind, where, *cause), []).append(kernel)
        for (kind, where, failure, error), kernels in sorted(groups.items()):
            if len(kernels) >= min_kernels:
                failing = tuple(sorted(kernels, key=lambda k: parse_kernel(k).key))
                rule = _rule(where, version, kind, failing, by_series[where])
                suggestions.append(Suggestion(rule, version, kind, failure, error, failing))
    return suggestions


def _cause(kernel: str, entry: Mapping[str, Any]) -> tuple[str, str] | None:
    """(failure class, normalised first error) of a failing entry, else None."""
    if entry.get("status") not in FAILING or not entry.get("last_failure"):
        return None
    reason = entry.get("last_reason") or entry.get("reason") or ""
    failure = entry["last_failure"]
    # A ledger reason is "<failure>: <first error>" (flows.upstream._attempt_record).
    error = normalise_error(reason.removeprefix(f"{failure}: "), kernel)
    return failure, error


def _rule(where: str, version: str, kind: str, failing: tuple[str, ...], entries: Entries) -> str:
    """The series glob, unless it would cover something else of this version and kind
    among the series' ``entries``: then exactly the failing kernels."""
    glob = f"{where}.* {version} {kind}"
    if covers(glob, version, kind, entries) == set(failing):
        return glob
    exact = "|".join(re.escape(k) for k in failing)
    return f"~(?:{exact}) {version} {kind}"


def covers(rule: str, version: str, kind: str, entries: Entries) -> set[str]:
    """The kernels of ``entries`` whose (present or failing) driver of ``version`` and
    ``kind`` the blocklist line ``rule`` would block (parsed as the blocklist parses)."""
    blocklist = Blocklist(parse_rules([rule], "suggestion"))
    return {
        kernel
        for kernel, kinds in entries.items()
        if kind in kinds
        and kinds[kind].get("status") in (*PRESENT, *FAILING)
        and blocklist.match(kernel, version, kind) is not None
    }
