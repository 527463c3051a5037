"""The planner: which drivers to build, and how to split them into builder shards.

candidates (kernels x driver versions x kinds) - done - claimed (by another run in flight)
- blocked - unroutable - excluded - quarantined = tasks, each candidate decided by
:func:`drivers.domain.decision.decide` (what ``drivers why`` explains too).

A shard is what one builder pod runs. Inside a builder, tasks are grouped by kernel so
each bundle is fetched once per shard; kernel groups are never split. Shard counts are
chosen per builder so the shards, list-scheduled on the builder slots with a start-up
each, finish close to the lower bound ``total cost / slots + one start-up``.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from drivers.domain.blocklist import Blocklist
from drivers.domain.config import MAX_SHARDS, Config
from drivers.domain.decision import (
    BLOCKED,
    BUILD,
    CLAIMED,
    DONE,
    EXCLUDED,
    UNROUTABLE,
    Known,
    Ledger,
    decide,
)
from drivers.domain.kernels import Kernel
from drivers.domain.names import DriverKey, Kind


@dataclass
class KernelGroup:
    """Every task of one kernel on one builder: one bundle fetch."""

    kernel: Kernel
    tasks: list[DriverKey]
    cost: float = 0.0


@dataclass
class Shard:
    builder: str
    index: int
    cost: float = 0.0  # estimated seconds, without the start-up
    groups: list[KernelGroup] = field(default_factory=list)

    @property
    def tasks(self) -> list[DriverKey]:
        return [t for g in self.groups for t in g.tasks]

    def to_json(self) -> dict:
        return {
            "builder": self.builder,
            "index": self.index,
            "cost": round(self.cost, 1),
            "kernels": len(self.groups),
            "tasks": [list(t) for t in self.tasks],
        }


@dataclass
class Plan:
    candidates: int = 0
    done: int = 0
    forced: int = 0  # cached, but rebuilt because of force
    blocked: int = 0
    unroutable: int = 0
    excluded: int = 0  # routed to a builder this run leaves out
    quarantined: int = 0  # failed the same way too often with the same inputs, or withdrawn
    claimed: int = 0  # planned by another run in flight (drivers.store.claims): left to it
    claimed_by: Counter[str] = field(default_factory=Counter)  # run id -> tasks
    blocked_by: Counter[str] = field(default_factory=Counter)  # rule location -> tasks
    unroutable_kernels: list[str] = field(default_factory=list)
    # Every task not built for a reason: (task, "blocked"|"unroutable"|"quarantined", why)
    decisions: list[tuple[DriverKey, str, str]] = field(default_factory=list)
    groups: dict[str, list[KernelGroup]] = field(default_factory=dict)  # builder -> groups
    shards: list[Shard] = field(default_factory=list)
    slots: int = 1
    shard_startup: float = 0.0

    @property
    def to_build(self) -> int:
        return sum(len(g.tasks) for gs in self.groups.values() for g in gs)

    @property
    def makespan(self) -> float:
        return makespan([s.cost for s in self.shards], self.slots, self.shard_startup)

    @property
    def lower_bound(self) -> float:
        total = sum(g.cost for gs in self.groups.values() for g in gs)
        return total / self.slots + self.shard_startup if total else 0.0

    def builder_summary(self, builders: Iterable[str], first: int = 5) -> dict[str, dict]:
        """Per builder: tasks per kind, kernels, shards and its ``first`` kernels in
        version order (what a dry run shows before a backfill)."""
        out = {}
        for name in builders:
            groups = self.groups.get(name, [])
            kinds: Counter[str] = Counter(t.kind for g in groups for t in g.tasks)
            out[name] = {
                "mod": kinds["mod"],
                "bpf": kinds["bpf"],
                "kernels": len(groups),
                "shards": sum(1 for s in self.shards if s.builder == name),
                "first_kernels": [
                    g.kernel.release for g in sorted(groups, key=lambda g: g.kernel.key)[:first]
                ],
            }
        return out

    def to_json(self, builders: Iterable[str]) -> dict:
        return {
            "summary": {
                "candidates": self.candidates,
                "done": self.done,
                "forced": self.forced,
                "blocked": self.blocked,
                "unroutable": self.unroutable,
                "excluded": self.excluded,
                "quarantined": self.quarantined,
                "claimed": self.claimed,
                "to_build": self.to_build,
            },
            "blocked_by": dict(self.blocked_by.most_common()),
            "claimed_by": dict(self.claimed_by.most_common()),
            "unroutable_kernels": self.unroutable_kernels,
            "builders": self.builder_summary(builders),
            "slots": self.slots,
            "shard_startup_s": self.shard_startup,
            "makespan_s": round(self.makespan, 1),
            "lower_bound_s": round(self.lower_bound, 1),
            "pod_seconds": round(sum(s.cost + self.shard_startup for s in self.shards), 1),
            "shards": [s.to_json() for s in self.shards],
        }


def plan(
    kernels: Sequence[Kernel],
    driver_versions: Sequence[str],
    kinds: Sequence[Kind],
    done: set[tuple[str, str, str]],
    config: Config,
    *,
    force: bool = False,
    slots: int | None = None,
    only_builders: set[str] | None = None,
    blocklist: Blocklist | None = None,
    ledger: Ledger | None = None,
    quarantine_release: Blocklist | None = None,
    claimed: Mapping[tuple[str, str, str], str] | None = None,
) -> Plan:
    """Decide every candidate driver (:func:`drivers.domain.decision.decide`), then
    balance the tasks into shards.

    ``blocklist`` replaces the config's (the run-time one); ``ledger`` is what the ledger
    knows of each task and what it would be built from now (for the quarantine, which
    ``quarantine_release`` lines lift); ``claimed`` maps the tasks other runs in flight
    planned to the run holding each (:mod:`drivers.store.claims`): they are left out."""
    slots = slots or config.slots
    result = Plan(slots=slots, shard_startup=config.costs.shard_startup)
    known = Known(
        blocklist=blocklist or config.blocklist,
        force=force,
        only_builders=only_builders,
        claimed=claimed,
        ledger=ledger,
        quarantine_after=config.quarantine_after,
        quarantine_release=quarantine_release,
    )
    groups: dict[str, dict[str, KernelGroup]] = defaultdict(dict)
    unroutable_kernels = set()
    kernels = sorted(kernels, key=lambda k: k.key)
    for kernel in kernels:
        release = kernel.release
        for kind in kinds:
            builder = config.route(kernel, kind)
            for version in driver_versions:
                result.candidates += 1
                task = (release, version, kind)
                is_done = task in done
                decision = decide(task, builder, is_done, known)
                status = decision.status
                if status == DONE:
                    result.done += 1
                    continue
                if status == CLAIMED:
                    result.claimed += 1
                    result.claimed_by[decision.reason] += 1
                    continue
                if is_done:
                    result.forced += 1
                if status == BUILD:
                    group = groups[builder].get(release)
                    if group is None:
                        group = groups[builder][release] = KernelGroup(kernel, [])
                    group.tasks.append(DriverKey(release, version, kind))
                elif status == EXCLUDED:
                    result.excluded += 1
                else:
                    key = DriverKey(release, version, kind)
                    result.decisions.append((key, status, decision.reason))
                    if status == BLOCKED:
                        result.blocked += 1
                        result.blocked_by[decision.rule.where] += 1
                    elif status == UNROUTABLE:
                        result.unroutable += 1
                        unroutable_kernels.add(release)
                    else:
                        result.quarantined += 1
    result.unroutable_kernels = [k.release for k in kernels if k.release in unroutable_kernels]

    fetch = config.costs.bundle_fetch
    for name, by_kernel in groups.items():
        task_cost = config.builders[name].task_costs
        for g in by_kernel.values():
            g.cost = fetch + sum(task_cost[t.kind] for t in g.tasks)
        result.groups[name] = list(by_kernel.values())
    result.shards = balance(result.groups, slots, config.costs.shard_startup, max_shard_s(config))
    return result


def max_shard_s(config: Config) -> float:
    """The estimated cost no shard may exceed: half the builder pod's deadline
    (``active_deadline_seconds``). A shard the deadline cuts is retried and cut again, so
    a large backfill on few slots must become more shards (queued in the pool), not
    longer ones; half, because the costs are estimates and a busy node is slower (the
    8.1.0 module took 22 s on a quiet 2-core machine and 96 s on a busy one). On the
    docker runtime the container's time limit plays the deadline's part."""
    if config.runtime == "docker":
        return config.docker["time_limit_s"] / 2
    return config.kubernetes["active_deadline_seconds"] / 2


def makespan(costs: Iterable[float], slots: int, startup: float) -> float:
    """Finish time of shards list-scheduled largest-first on ``slots`` slots."""
    finish = [0.0] * slots
    for cost in sorted(costs, reverse=True):
        heapq.heapreplace(finish, finish[0] + startup + cost)
    return max(finish)


def fill(builder: str, groups: Sequence[KernelGroup], n: int) -> list[Shard]:
    """Largest-first: each kernel group goes to the currently lightest of n shards."""
    shards = [Shard(builder, i) for i in range(n)]
    heap = [(0.0, i) for i in range(n)]
    for g in sorted(groups, key=lambda g: (-g.cost, g.kernel.key)):
        cost, i = heapq.heappop(heap)
        shards[i].groups.append(g)
        shards[i].cost = cost + g.cost
        heapq.heappush(heap, (shards[i].cost, i))
    for s in shards:  # within a shard, kernels in version order: readable, deterministic
        s.groups.sort(key=lambda g: g.kernel.key)
    return shards


def shard_counts(loads: dict[str, float], sizes: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` shards among builders in proportion to their load (largest
    remainder), at least one each and never more shards than kernel groups."""
    work = sum(loads.values())
    exact = {b: total * w / work for b, w in loads.items()}
    counts = {b: max(1, min(sizes[b], int(x))) for b, x in exact.items()}
    by_remainder = sorted(loads, key=lambda b: exact[b] - int(exact[b]), reverse=True)
    while sum(counts.values()) < total:
        grown = False
        for b in by_remainder:
            if sum(counts.values()) < total and counts[b] < sizes[b]:
                counts[b] += 1
                grown = True
        if not grown:
            break
    return counts


def balance(
    groups: dict[str, list[KernelGroup]],
    slots: int,
    startup: float,
    max_shard_s: float | None = None,
) -> list[Shard]:
    """Choose each builder's shard count and fill its shards.

    Start from counts proportional to each builder's load over ``min(slots, 1024)``
    shards, then move single shards toward the builder holding the longest shard while
    that shortens the makespan. With ``max_shard_s``, each builder gets at least enough
    shards for its load to fit in shards of that cost (more shards than slots, if need
    be: they wait in the pool), up to 1024 in all.
    """
    groups = {b: gs for b, gs in groups.items() if gs}
    if not groups:
        return []
    loads = {b: sum(g.cost for g in gs) for b, gs in groups.items()}
    sizes = {b: len(gs) for b, gs in groups.items()}
    total = min(slots, MAX_SHARDS, sum(sizes.values()))
    counts = shard_counts(loads, sizes, total)
    least = dict.fromkeys(groups, 1)
    if max_shard_s:
        least = {b: min(sizes[b], math.ceil(loads[b] / max_shard_s)) for b in groups}
        while sum(least.values()) > MAX_SHARDS:  # 1024 shards at most: the biggest give
            biggest = max(least, key=lambda b: least[b])
            least[biggest] -= 1
        counts = {b: max(n, least[b]) for b, n in counts.items()}
    filled = {b: fill(b, groups[b], n) for b, n in counts.items()}

    def longest(b: str) -> float:
        return max(s.cost for s in filled[b])

    def span() -> float:
        return makespan([s.cost for ss in filled.values() for s in ss], slots, startup)

    best = span()
    for _ in range(4 * len(groups) + 16):  # a few moves suffice; bounded for safety
        worst = max(filled, key=longest)
        if counts[worst] >= sizes[worst]:
            break
        donors = [b for b in filled if b != worst and counts[b] > least[b]]
        if sum(counts.values()) < min(slots, MAX_SHARDS):
            donors = [None, *donors]  # a free slot: grow without taking from anyone
        improved = False
        for donor in donors:
            trial = dict(counts)
            trial[worst] += 1
            if donor is not None:
                trial[donor] -= 1
            saved = {b: filled[b] for b in (worst, donor) if b is not None}
            for b in saved:
                filled[b] = fill(b, groups[b], trial[b])
            candidate = span()
            if candidate < best:
                best, counts, improved = candidate, trial, True
                break
            filled.update(saved)
        if not improved:
            break
    shards = [s for ss in filled.values() for s in ss]
    return [s for s in shards if s.groups]
