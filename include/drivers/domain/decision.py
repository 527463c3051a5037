"""One driver's fate in a run: the order the planner applies and ``drivers why`` explains.

In this order, the first that applies decides:

- **done**: in the driver cache (or its .unavail marker), unless the run forces;
- **claimed**: another run in flight planned it (:mod:`drivers.store.claims`), even forced;
- **blocked**: a blocklist rule matches (named ``file:line``);
- **unroutable**: no builder route takes its kernel and kind;
- **excluded**: its builder is one this run leaves out;
- **quarantined**: it failed the same way ``quarantine_after`` times in a row with the
  inputs it would be built from now, or it was withdrawn and nothing it was built from
  changed; unless a quarantine-release line names it;
- **build**.

Pure: what the ledger knows comes through :class:`Ledger` (the store implements it).
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any, Protocol

from drivers.domain.blocklist import Blocklist, Rule

DONE = "done"
CLAIMED = "claimed"
BLOCKED = "blocked"
UNROUTABLE = "unroutable"
EXCLUDED = "excluded"
QUARANTINED = "quarantined"
BUILD = "build"

# Failures that count toward quarantine: the driver's own fault, the same each time.
REPEATABLE = ("failed", "refused")

Task = tuple[str, str, str]  # (kernel, driver version, kind): a DriverKey or its plain tuple


@dataclass(frozen=True, slots=True)
class Decision:
    status: str  # one of the names above
    # blocked: "file:line: rule"; claimed: the run; quarantined: why; build: why a
    # quarantine no longer holds it (released, or its inputs changed), else empty
    reason: str = ""
    rule: Rule | None = None  # the blocklist rule of a blocked driver


_DONE = Decision(DONE)  # the common outcomes, shared: the planner decides millions
_BUILD = Decision(BUILD)
_EXCLUDED = Decision(EXCLUDED)


class Ledger(Protocol):
    """What the ledger knows of a task, and what the task would be built from now."""

    def entry(self, task: Task) -> Mapping[str, Any] | None:
        """The task's coverage-index entry, or None."""

    def fingerprint(self, task: Task, builder: str) -> str:
        """The inputs (builder environment, sources, bundle) it would be built from now."""


@dataclass(frozen=True, slots=True)
class Known:
    """What a run knows beyond the task itself; the same for all its candidates."""

    blocklist: Blocklist
    force: bool = False
    only_builders: Set[str] | None = None
    claimed: Mapping[Task, str] | None = None  # task -> the run in flight holding it
    ledger: Ledger | None = None
    quarantine_after: int = 0  # 0: never quarantined
    quarantine_release: Blocklist | None = None


def decide(task: Task, builder: str | None, done: bool, known: Known) -> Decision:
    """The decision for one candidate: ``builder`` is its route (None: none takes it),
    ``done`` whether the cache has it."""
    if done and not known.force:
        return _DONE
    if known.claimed and (holder := known.claimed.get(task)) is not None:
        return Decision(CLAIMED, holder)
    kernel, version, kind = task
    rule = known.blocklist.match(kernel, version, kind)
    if rule is not None:
        return Decision(BLOCKED, f"{rule.where}: {rule.text}", rule)
    if builder is None:
        return Decision(UNROUTABLE, f"no route takes {kind}")
    if known.only_builders is not None and builder not in known.only_builders:
        return _EXCLUDED
    if known.ledger is None:
        return _BUILD
    entry = known.ledger.entry(task)
    built_from = entry.get("fingerprint") if entry is not None else None
    if built_from is None:
        return _BUILD
    # Held against the inputs it would be built from now, not those of its last attempt:
    # a new builder image, sources or bundle ends a quarantine.
    now = known.ledger.fingerprint(task, builder)
    why = quarantined(entry, now, known.quarantine_after)
    if why is not None:
        release = known.quarantine_release
        lifted = release.match(kernel, version, kind) if release is not None else None
        if lifted is None:
            return Decision(QUARANTINED, why)
        return Decision(BUILD, f"released by {lifted.where} (held: {why})")
    if now != built_from and (was := quarantined(entry, built_from, known.quarantine_after)):
        return Decision(
            BUILD, f"was held ({was}); its builder environment, sources or bundle changed since"
        )
    return _BUILD


def quarantined(entry: Mapping[str, Any] | None, current: str, threshold: int) -> str | None:
    """Why a task stays quarantined, or None: it failed the same way ``threshold``
    times in a row with the inputs it would be built from now (``current``, a
    :func:`drivers.store.ledger.fingerprint`), or it was withdrawn and nothing it was
    built from changed."""
    if entry is None or entry.get("fingerprint") != current:
        return None
    status = entry["status"]
    if status == "withdrawn":
        return f"withdrawn {entry['time']}: {entry.get('reason', '')}".strip()
    failures = entry.get("failures", 0)
    if status in (*REPEATABLE, "quarantined") and failures >= threshold > 0:
        return (
            f"{failures} failure{'s' * (failures != 1)} in a row ({entry.get('last_failure')}) "
            "with the same builder environment, sources and bundle"
        )
    return None
