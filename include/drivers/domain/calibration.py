"""The cost model from measurements: ``[costs]`` as the build records say it should be.

The planner balances shards with estimated seconds (``[costs]`` in pipeline.toml:
``shard_startup``, ``bundle_fetch``, and per kind ``mod`` and ``bpf``, which a
``[[builders]]`` entry may override with its own ``costs``). Calibration takes medians
of what real builds took, each with the number of records behind it:

- ``mod``, ``bpf`` (over all builders, and per builder): a built driver's
  ``duration_s`` in the ledger (its sources copy, make, strip and checks: what a task
  costs a builder). Failures are left out: a 2.x driver on 6.12 fails in 3 s and is
  then quarantined or blocklisted, so it says nothing about the next build; so are
  ``.unavail`` markers (no build).
- ``bundle_fetch``: per shard, its ``(fetch_s + extract_s) / kernels`` (the shard
  records in each run's ``build.json``).
- ``shard_startup`` is not in the records: pod scheduling and the image pull happen
  before ``build-shard`` starts. It stays as configured; the records show only
  ``build-shard``'s own overhead (``measured_s`` minus its timed parts), printed beside.

:func:`render` prints the block an engineer pastes into pipeline.toml (TOML: the
builders' lines are comments, each for its own ``[[builders]]`` entry). Pure: the
records come in as dicts (``drivers costs`` reads them, :mod:`drivers.ops.costs`).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from drivers.domain.config import Config
from drivers.domain.names import KINDS

SHARD_PARTS = ("fetch_s", "extract_s", "build_s", "upload_s", "cleanup_s")  # timed parts


@dataclass(frozen=True, slots=True)
class Median:
    seconds: float
    records: int  # how many measurements it is the median of

    @classmethod
    def of(cls, values: list[float]) -> Median | None:
        return cls(statistics.median(values), len(values)) if values else None


@dataclass
class Calibration:
    """Medians of the measurements, by what ``[costs]`` and ``[[builders]]`` hold."""

    runs: int  # how many runs' records were read
    kinds: dict[str, Median] = field(default_factory=dict)  # kind -> over all builders
    builders: dict[str, dict[str, Median]] = field(default_factory=dict)  # builder -> kind ->
    versions: dict[str, dict[str, Median]] = field(default_factory=dict)  # kind -> version ->
    bundle_fetch: Median | None = None
    shard_overhead: Median | None = None  # build-shard's own, not the pod's start-up

    def to_json(self) -> dict[str, Any]:
        def m(median: Median | None) -> dict[str, float | int] | None:
            return None if median is None else {"s": round(median.seconds, 1), "n": median.records}

        return {
            "runs": self.runs,
            "kinds": {k: m(v) for k, v in self.kinds.items()},
            "builders": {b: {k: m(v) for k, v in ks.items()} for b, ks in self.builders.items()},
            "versions": {k: {v: m(x) for v, x in vs.items()} for k, vs in self.versions.items()},
            "bundle_fetch": m(self.bundle_fetch),
            "shard_overhead": m(self.shard_overhead),
        }


def calibrate(
    records: Iterable[Mapping[str, Any]], shards: Iterable[Mapping[str, Any]], runs: int
) -> Calibration:
    """Medians from ledger ``records`` (those of status built with a duration count) and
    shard records (``build.json``'s ``shards``) of ``runs`` runs."""
    by_kind: dict[str, list[float]] = defaultdict(list)
    by_builder: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    by_version: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        took = r.get("duration_s")
        if r.get("status") != "built" or not took or r.get("kind") not in KINDS:
            continue
        by_kind[r["kind"]].append(took)
        by_builder[r.get("builder") or "?"][r["kind"]].append(took)
        by_version[r["kind"]][r["driver_version"]].append(took)
    fetch, overhead = [], []
    for s in shards:
        if s.get("status") != "ok" or not s.get("kernels") or not s.get("measured_s"):
            continue  # a shard that stopped, or built nothing, measured something else
        fetch.append((s.get("fetch_s", 0.0) + s.get("extract_s", 0.0)) / s["kernels"])
        overhead.append(max(0.0, s["measured_s"] - sum(s.get(p, 0.0) for p in SHARD_PARTS)))

    def by_kind_order(values: Mapping[str, list[float]]) -> dict[str, Median]:
        return {k: m for k in KINDS if (m := Median.of(values.get(k, []))) is not None}

    return Calibration(
        runs=runs,
        kinds=by_kind_order(by_kind),
        builders={b: by_kind_order(ks) for b, ks in sorted(by_builder.items())},
        versions={
            k: {v: Median(statistics.median(x), len(x)) for v, x in sorted(vs.items())}
            for k, vs in by_version.items()
        },
        bundle_fetch=Median.of(fetch),
        shard_overhead=Median.of(overhead),
    )


def seconds(value: float) -> str:
    """As pipeline.toml writes a cost: whole seconds, tenths below ten."""
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def render(cal: Calibration, config: Config, source: str) -> str:
    """The ``[costs]`` block and each measured builder's ``costs`` line, as TOML whose
    comments say what each value is the median of and what it replaces."""
    costs = config.costs
    overhead = cal.shard_overhead
    startup = "as configured: pod scheduling and image pull are not in the records" + (
        f"; build-shard's own overhead: {seconds(overhead.seconds)} s "
        f"(median of {overhead.records} shard(s))"
        if overhead
        else ""
    )
    lines = [
        f"# [costs] calibrated by `drivers costs` from {source} ({cal.runs} run(s)):",
        "# paste into pipeline.toml.",
        "[costs]",
        _cost("shard_startup", costs.shard_startup, startup),
        _measured(
            "bundle_fetch",
            cal.bundle_fetch,
            costs.bundle_fetch,
            "shard(s)",
            "fetch + extract, per kernel",
        ),
    ]
    for kind in KINDS:
        spread = "; ".join(
            f"{version}: {seconds(m.seconds)} s of {m.records}"
            for version, m in cal.versions.get(kind, {}).items()
        )
        lines.append(_measured(kind, cal.kinds.get(kind), costs.task[kind], "build(s)", spread))
    if cal.builders:
        lines += ["", "# In each [[builders]] entry, its own costs line (medians of its builds):"]
    for builder, kinds in cal.builders.items():
        unknown = "" if builder in config.builders else "  (not a builder of this config)"
        own = ", ".join(f"{kind} = {seconds(m.seconds)}" for kind, m in kinds.items())
        counts = ", ".join(f"{kind} of {m.records}" for kind, m in kinds.items())
        lines.append(
            f"#   name = {json.dumps(builder)}  ->  costs = {{ {own} }}  ({counts}){unknown}"
        )
    return "\n".join(lines) + "\n"


def _cost(name: str, value: float, comment: str) -> str:
    return f"{f'{name} = {seconds(value)}':<19} # {comment}"


def _measured(name: str, median: Median | None, configured: float, of: str, spread: str) -> str:
    if median is None:
        return _cost(name, configured, f"as configured: no {of} in the records")
    detail = f" ({spread})" if spread else ""
    return _cost(
        name, median.seconds, f"median of {median.records} {of}{detail}; was {seconds(configured)}"
    )
