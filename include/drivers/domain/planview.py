"""The plan view: what a run is about to build, in one screen.

What an engineer reads before letting a backfill build (a dry run shows it and builds
nothing): tasks per builder and kind, each builder's first kernels and the compilers its
kernels were built with (as far as the ledger knows them: a builder reads a kernel's
from its bundle; ``?`` until one has; a builder refuses another major version, see
:mod:`drivers.domain.toolchain`), what other runs in flight hold (claims), and the
estimated pod-hours and makespan. Made from the plan JSON
(:meth:`drivers.domain.planner.Plan.to_json`); printed in pre_build's task log, kept in the
run's report and printed by ``drivers report``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from drivers.domain.toolchain import UNKNOWN, label

FIRST_KERNELS = 5


def plan_view(
    plan_json: dict[str, Any], kernel_compilers: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The small, XCom-sized summary of a plan; ``kernel_compilers`` (kernel -> the
    compiler its bundle records) gives each builder's ``compilers``: how many of its
    kernels each compiler built, e.g. ``{"gcc 12": 3, "?": 1}``."""
    summary = plan_json["summary"]
    routed: dict[str, set[str]] = {}
    for shard in plan_json.get("shards", []):
        routed.setdefault(shard["builder"], set()).update(t[0] for t in shard["tasks"])
    builders = {
        name: {
            "mod": b["mod"],
            "bpf": b["bpf"],
            "kernels": b["kernels"],
            "shards": b["shards"],
            "first_kernels": b.get("first_kernels", [])[:FIRST_KERNELS],
            "compilers": compilers(routed.get(name, set()), kernel_compilers or {}),
        }
        for name, b in plan_json["builders"].items()
        if b["mod"] or b["bpf"]
    }
    return {
        "to_build": summary["to_build"],
        "done": summary["done"],
        "forced": summary.get("forced", 0),
        "blocked": summary["blocked"],
        "unroutable": summary["unroutable"],
        "claimed": summary.get("claimed", 0),
        "claimed_by": plan_json.get("claimed_by", {}),
        "builders": builders,
        "slots": plan_json["slots"],
        "pod_hours": round(plan_json["pod_seconds"] / 3600, 2),
        "makespan_h": round(plan_json["makespan_s"] / 3600, 2),
        "lower_bound_h": round(plan_json["lower_bound_s"] / 3600, 2),
    }


def compilers(kernels: set[str], kernel_compilers: Mapping[str, str]) -> dict[str, int]:
    """How many of ``kernels`` each compiler built (``gcc 12``), most first, unknown last."""
    counts = Counter(label(kernel_compilers.get(k)) for k in kernels)
    return dict(sorted(counts.items(), key=lambda c: (c[0] == UNKNOWN, -c[1], c[0])))


def format_plan_view(view: dict[str, Any], dry_run: bool = False) -> str:
    """The view as text (the task log, ``drivers report``)."""
    head = "plan (dry run: nothing is built)" if dry_run else "plan"
    lines = [
        f"{head}: {view['to_build']} driver(s) to build; done {view['done']}, "
        f"blocked {view['blocked']}, unroutable {view['unroutable']}, "
        f"claimed by other runs {view['claimed']}"
        + (f", forced {view['forced']}" if view.get("forced") else "")
    ]
    if view["builders"]:
        lines.append(f"  {'builder':10} {'mod':>6} {'bpf':>6} {'kernels':>7} {'shards':>6}  first")
    for name, b in view["builders"].items():
        first = ", ".join(b["first_kernels"])
        more = b["kernels"] - len(b["first_kernels"])
        if more > 0:
            first += f", ... (+{more})"
        lines.append(
            f"  {name:10} {b['mod']:6} {b['bpf']:6} {b['kernels']:7} {b['shards']:6}  {first}"
        )
        if b.get("compilers"):
            built = ", ".join(f"{cc} ({n})" for cc, n in b["compilers"].items())
            lines.append(f"  {'':10} kernels built with: {built}")
    for run_id, n in view["claimed_by"].items():
        lines.append(f"  claimed: {n} task(s) held by run {run_id} (left to it)")
    if view["to_build"]:
        lines.append(
            f"  estimated {view['pod_hours']:.2f} pod-hours, makespan {view['makespan_h']:.2f} h "
            f"on {view['slots']} slots (lower bound {view['lower_bound_h']:.2f} h)"
        )
    return "\n".join(lines)
