import dataclasses
from collections import Counter

import pytest

from drivers.domain.blocklist import Blocklist, parse_rules
from drivers.domain.config import load_config
from drivers.domain.decision import Known, decide
from drivers.domain.kernels import parse_kernel
from drivers.domain.names import KINDS, CacheIndex, DriverKey
from drivers.domain.planner import KernelGroup, balance, makespan, max_shard_s, plan
from scenarios import BLOCKLISTS, SUPPORTED_2022, fully_built_cache, real_kernels


@pytest.fixture(scope="module")
def kernels():
    return real_kernels()


@pytest.fixture(scope="module")
def config():
    return dataclasses.replace(load_config(), blocklist_paths=())


@pytest.fixture(scope="module")
def config_blocked():
    return dataclasses.replace(load_config(), blocklist_paths=BLOCKLISTS)


def test_full_build_routes_the_real_list_exactly_as_the_original(kernels, config):
    p = plan(kernels, ["2.3.0"], ("mod", "bpf"), set(), config)
    counts = ("mod", "bpf", "kernels", "shards")
    summary = {b: {k: s[k] for k in counts} for b, s in p.builder_summary(config.builders).items()}
    # The 90 slots shared by work (kernels x bundle fetch 15 s + mods x 45 s + probes x 60 s):
    # rhel7 41.8, rhel8 29.5, fc36 18.7 -> 42, 29, 19 (largest remainder).
    assert summary == {
        "rhel7": {"mod": 333, "bpf": 4294, "kernels": 4294, "shards": 43},
        "rhel8": {"mod": 3961, "bpf": 0, "kernels": 3961, "shards": 28},
        "fc36": {"mod": 1259, "bpf": 1259, "kernels": 1259, "shards": 19},
    }
    assert len(p.shards) == config.slots == 90
    assert p.unroutable == 123 + 123 and len(p.unroutable_kernels) == 123
    assert all(k.startswith("2.6.") for k in p.unroutable_kernels)
    assert p.candidates == len(kernels) * 2 and p.done == 0 and p.blocked == 0
    assert p.to_build == 333 + 4294 + 3961 + 1259 * 2


def test_every_task_is_in_exactly_one_shard_and_kernels_are_never_split(kernels, config):
    p = plan(kernels, ["2.3.0", "2.2.0"], ("mod", "bpf"), set(), config)
    tasks = [t for s in p.shards for t in s.tasks]
    assert len(tasks) == len(set(tasks)) == p.to_build
    owner = {}
    for s in p.shards:
        for g in s.groups:
            assert {t.kernel for t in g.tasks} == {g.kernel.release}
            assert (s.builder, g.kernel.release) not in owner
            owner[s.builder, g.kernel.release] = s.index
            for t in g.tasks:
                assert config.route(g.kernel, t.kind) == s.builder
    # 2 versions of the whole list are ~5.4 h a slot: more shards than the 90 slots,
    # each within half the pod deadline (they wait in the pool).
    assert 90 < len(p.shards) <= 1024
    assert max(s.cost for s in p.shards) <= max_shard_s(config) + 1000


def test_done_drivers_and_unavail_markers_are_not_rebuilt(kernels, config):
    cache = CacheIndex().add_names(fully_built_cache(kernels, ["2.2.0"], config))
    p = plan(kernels, ["2.2.0", "2.3.0"], ("mod", "bpf"), cache.done, config)
    assert p.done == len(cache.done) and cache.unavailable > 0
    assert {t.driver_version for s in p.shards for t in s.tasks} == {"2.3.0"}
    forced = plan(kernels, ["2.2.0"], ("mod", "bpf"), cache.done, config, force=True)
    assert forced.done == 0 and forced.forced == len(cache.done)
    assert forced.to_build == len(cache.done)


def test_tasks_claimed_by_another_run_are_left_to_it_even_when_forced(kernels, config):
    el8 = sorted((k for k in kernels if k.family == "el8"), key=lambda k: k.key)[:10]
    cached = {(el8[0].release, "2.3.0", "mod")}
    claimed = {
        (k.release, "2.3.0", kind): "scheduled__nightly" for k in el8[:4] for kind in ("mod", "bpf")
    }
    claimed[(el8[4].release, "2.3.0", "bpf")] = "manual__backfill"
    p = plan(el8, ["2.3.0"], ("mod", "bpf"), cached, config, force=True, claimed=claimed)
    assert p.claimed == 9 and p.claimed_by == {"scheduled__nightly": 8, "manual__backfill": 1}
    assert p.forced == 0  # the cached one is claimed: not rebuilt here
    assert not {t for s in p.shards for t in s.tasks} & set(claimed)
    assert p.candidates == p.claimed + p.blocked + p.unroutable + p.to_build
    summary = p.to_json(config.builders)
    assert summary["summary"]["claimed"] == 9 and summary["claimed_by"]["manual__backfill"] == 1
    # each builder's first kernels, in version order
    first = summary["builders"]["rhel8"]["first_kernels"]
    assert first == [k.release for k in el8[4:9]]
    unforced = plan(el8, ["2.3.0"], ("mod", "bpf"), cached, config, claimed=claimed)
    assert unforced.done == 1 and unforced.claimed == 8  # done is done, whoever claims it


def test_blocked_drivers_are_counted_by_rule(kernels, config_blocked):
    p = plan(kernels, ["2.3.0-rc1"], ("mod", "bpf"), set(), config_blocked)
    assert p.blocked == sum(p.blocked_by.values()) > 0
    el7uek = [k for k in kernels if ".el7uek." in k.release]
    mods_built = {t.kernel for s in p.shards for t in s.tasks if t.kind == "mod"}
    assert el7uek and not mods_built & {k.release for k in el7uek}
    assert p.candidates == p.done + p.blocked + p.unroutable + p.to_build


def test_kinds_and_versions_limit_the_candidates(kernels, config):
    p = plan(kernels, ["2.3.0"], ("bpf",), set(), config)
    assert {t.kind for s in p.shards for t in s.tasks} == {"bpf"}
    assert p.candidates == len(kernels)


def test_plan_is_deterministic(kernels, config):
    a = plan(kernels, SUPPORTED_2022, ("mod", "bpf"), set(), config).to_json(config.builders)
    b = plan(list(reversed(kernels)), SUPPORTED_2022, ("mod", "bpf"), set(), config)
    assert a == b.to_json(config.builders)


def test_real_list_balance_is_within_ten_percent_of_the_lower_bound(kernels, config_blocked):
    cache = CacheIndex().add_names(fully_built_cache(kernels, SUPPORTED_2022[:4], config_blocked))
    p = plan(kernels, SUPPORTED_2022, ("mod", "bpf"), cache.done, config_blocked)
    assert p.to_build > 0 and {t.driver_version for s in p.shards for t in s.tasks} == {"2.3.0-rc1"}
    assert p.makespan <= 1.10 * p.lower_bound
    assert len(p.shards) <= 90


def test_small_plans_use_no_more_shards_than_kernels(config):
    kernels = [parse_kernel("5.10.0-20-amd64"), parse_kernel("4.19.0-22-amd64")]
    p = plan(kernels, ["2.3.0"], ("mod", "bpf"), set(), config)
    assert Counter(s.builder for s in p.shards) == {"fc36": 1, "rhel7": 1, "rhel8": 1}
    assert plan([], ["2.3.0"], ("mod",), set(), config).shards == []


def test_shards_never_exceed_1024():
    groups = {
        "b": [
            KernelGroup(
                parse_kernel(f"5.4.0-{i}-generic"),
                [DriverKey(f"5.4.0-{i}-generic", "1.0.0", "mod")],
                10.0,
            )
            for i in range(3000)
        ]
    }
    shards = balance(groups, slots=5000, startup=60)
    assert len(shards) == 1024


def test_makespan_is_list_scheduling_with_a_startup_per_shard():
    assert makespan([100, 100, 100], slots=2, startup=10) == 220
    assert makespan([50], slots=4, startup=10) == 60


class Ledger:
    """A drivers.domain.decision.Ledger over plain dicts: entries, and the one
    fingerprint every task would be built from now."""

    def __init__(self, entries, now):
        self.entries, self.now = entries, now

    def entry(self, task):
        return self.entries.get(tuple(task))

    def fingerprint(self, task, builder):
        return self.now


def failed_twice(fingerprint):
    return {
        "status": "failed",
        "failures": 2,
        "last_failure": "compile",
        "fingerprint": fingerprint,
    }


def test_decide_takes_the_first_that_applies_in_the_documented_order():
    task = ("5.10.0-20-amd64", "2.3.0", "mod")
    blocklist = Blocklist(parse_rules(["5.10.0-20-amd64 2.3.0 mod"], "BLOCKLIST"))
    release = Blocklist(parse_rules(["5.10.0-20-amd64 * *"], "gs://work/config/quarantine-release"))
    everything = Known(
        blocklist=blocklist,
        force=True,
        only_builders={"rhel8"},
        claimed={task: "scheduled__nightly"},
        ledger=Ledger({task: failed_twice("img|a|b")}, "img|a|b"),
        quarantine_after=2,
    )
    # each step lifts what decided the one before
    steps = [
        ({"force": False}, None, "done", ""),
        ({"force": True}, None, "claimed", "scheduled__nightly"),
        ({"claimed": None}, None, "blocked", "BLOCKLIST:1: 5.10.0-20-amd64 2.3.0 mod"),
        ({"blocklist": Blocklist([])}, None, "unroutable", "no route takes mod"),
        ({}, "fc36", "excluded", ""),
        ({"only_builders": None}, "fc36", "quarantined", "2 failures in a row (compile)"),
        ({"quarantine_release": release}, "fc36", "build", "released by gs://work/config/"),
        (
            {"ledger": Ledger({task: failed_twice("img|a|b")}, "img|a|c")},
            "fc36",
            "build",
            "was held",
        ),
        ({"quarantine_release": None}, "fc36", "build", "was held (2 failures"),
    ]
    known = everything
    for change, builder, status, reason in steps:
        known = dataclasses.replace(known, **change)
        decision = decide(task, builder, True, known)
        assert decision.status == status and decision.reason.startswith(reason), (change, decision)
    assert decide(task, None, False, Known(Blocklist([]))).status == "unroutable"


def test_a_quarantine_holds_only_with_the_inputs_of_its_failures(config):
    kernels = [parse_kernel("5.10.0-20-amd64")]
    failing = DriverKey("5.10.0-20-amd64", "2.3.0", "bpf")
    entries = {failing: failed_twice("img|sources:a|bundle:b")}

    def planned(now="img|sources:a|bundle:b", quarantine_after=2, release=None):
        return plan(
            kernels,
            ["2.3.0"],
            KINDS,
            set(),
            dataclasses.replace(config, quarantine_after=quarantine_after),
            ledger=Ledger(entries, now),
            quarantine_release=release,
        )

    held = planned()
    assert held.quarantined == 1 and held.to_build == 1
    ((key, status, why),) = held.decisions
    assert (key, status) == (failing, "quarantined")
    assert why.startswith("2 failures in a row (compile) with the same")
    changed = planned(now="img|sources:c|bundle:b")
    assert changed.quarantined == 0 and changed.to_build == 2 and changed.decisions == []
    release = Blocklist(parse_rules(["5.10.0-20-amd64 2.3.0 bpf"], "quarantine-release"))
    assert planned(release=release).to_build == 2
    assert planned(quarantine_after=3).to_build == 2


def test_no_shard_is_planned_longer_than_half_the_pod_deadline(kernels, config):
    # The whole real list on 4 slots: ~80 h of estimated builds, which 4 shards would
    # hold for 20 h each, against a 4 h pod deadline (cut, retried, cut again).
    p = plan(kernels, SUPPORTED_2022, KINDS, set(), config, slots=4)
    limit = max_shard_s(config)
    assert limit == config.kubernetes["active_deadline_seconds"] / 2
    biggest_group = max(g.cost for gs in p.groups.values() for g in gs)
    assert len(p.shards) > 4 and max(s.cost for s in p.shards) <= limit + biggest_group
    # Without a deadline to respect, the same plan is 4 shards, one per slot at most.
    lax = dataclasses.replace(
        config, kubernetes=config.kubernetes | {"active_deadline_seconds": 10**9}
    )
    assert len(plan(kernels, SUPPORTED_2022, KINDS, set(), lax, slots=4).shards) <= 4
