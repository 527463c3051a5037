"""The pipeline configuration: driver versions, blocklists, builders, routing and costs.

One TOML file (shipped default: ``config/pipeline.toml`` in this package, replaced by
``DRIVERS_CONFIG``). Routing is data: the first route whose kernel selector and kinds
match a task names its builder.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from drivers.domain.blocklist import Blocklist
from drivers.domain.dag_ids import CPAAS_DRIVERS, UPSTREAM_DRIVERS
from drivers.domain.kernels import Kernel
from drivers.domain.names import KINDS, Kind, check_driver_version
from drivers.domain.selectors import Selector, SelectorError, parse_selector

CONFIG_ENV = "DRIVERS_CONFIG"
RUNTIME_ENV = "DRIVERS_RUNTIME"
RUNTIMES = ("local", "kubernetes", "docker")
MAX_SHARDS = 1024  # Airflow's max_map_length


# Builder pods (runtime "kubernetes"); the config's [kubernetes] table overrides these.
POD_DEFAULTS: dict[str, Any] = {
    "connection": "kubernetes_default",
    "namespace": "collector-drivers",
    "service_account": "drivers-builder",
    "active_deadline_seconds": 6 * 3600,  # shards are planned to half of it (planner)
    "resources": {"cpu": "1", "memory": "2Gi"},
    "node_selector": {},
    # Where builder pods may connect (their NetworkPolicy, `drivers deploy network-policy`;
    # DNS always): Google APIs through Private Google Access (private.googleapis.com; the
    # VPC's DNS maps *.googleapis.com there, restricted.googleapis.com is 199.36.153.4/30),
    # and the GKE metadata server that hands out workload identity's tokens.
    "egress": {
        "google_apis": ["199.36.153.8/30"],
        "metadata_server": ["169.254.169.254/32", "169.254.169.252/32"],
        "metadata_ports": [80, 988],
    },
}


# Builder containers (runtime "docker", drivers.build.sandbox); the config's [docker]
# table overrides these. A container always runs without network, read-only, as uid
# 1000, with the builder's cpu and memory (its `resources` over [kubernetes] resources):
# none of that is a setting.
DOCKER_DEFAULTS: dict[str, Any] = {
    "url": "unix:///var/run/docker.sock",  # DOCKER_HOST, when set, wins (as for docker)
    # A shard's container is killed past this (its unfinished tasks recorded, the task
    # retried), as a pod past active_deadline_seconds; the planner cuts shards to half.
    "time_limit_s": POD_DEFAULTS["active_deadline_seconds"],
    "pids_limit": 4096,  # processes in the container (kbuild -jN, the 8.x configure probes)
    "workdir": "",  # where the shards' work folders are made on the worker ("": temp dir)
}


# The cpaas_drivers DAG; the config's [cpaas] table overrides these.
CPAAS_DEFAULTS: dict[str, Any] = {
    # Its trigger form's default: a registry reference (production: the mirror pod copies
    # it with skopeo) or the path of an OCI image layout, folder or tar (embedded default).
    "source_image": "docker://quay.io/stackrox-io/collector-drivers-downstream:latest",
    "architectures": ["amd64", "s390x", "ppc64le"],  # OCI names
    # Production: the mirror pod's image (skopeo + this package) and where it copies to.
    "mirror_image": "quay.io/stackrox-io/collector-drivers-mirror:0.1.0",
    "internal_registry": "us-docker.pkg.dev/collector-drivers/internal/drivers-downstream",
}


# The integration_tests stage's modes (a trigger parameter): hold back what the kernel
# refuses, publish it anyway and report, or test nothing.
VM_TEST_MODES = ("enforce", "warn", "off")

# The integration_tests stage of upstream_drivers (drivers.build.vmtest); the config's
# [vm_tests] table overrides these.
VM_TEST_DEFAULTS: dict[str, Any] = {
    "parallel": 2,  # VMs at a time, per worker (local) or per vm-test pod
    "budget_s": 1800,  # the trigger form's default time budget for the stage
    "memory_mb": 512,
    # Events the consumer (scap-open) must capture through each driver for it to pass.
    "events": 1000,
    # Production (runtime "kubernetes"): the vm-test pod's image (QEMU, busybox-static,
    # the loader, this package), its resources, and whether nodes expose a /dev/kvm
    # that works (then QEMU uses -accel kvm; else software emulation, -accel tcg).
    "image": "quay.io/stackrox-io/collector-drivers-vmtest:0.1.0",
    "resources": {"cpu": "2", "memory": "3Gi"},
    "kvm": False,
    # Modules drivers may depend on (their .modinfo depends=): the bundle tooling keeps
    # them, with their own dependencies, beside each boot image.
    "modules": [],
    # A DAG that runs the agent images' integration suite on the published drivers,
    # triggered after push_drivers; empty: off.
    "external_suite": "",
}


# The backfill_drivers DAG; the config's [backfill] table overrides these. Its builder
# tasks run in their own pool of `slots` (the planner balances a backfill over that many),
# so a large backfill can never take the nightly's builder slots.
BACKFILL_DEFAULTS: dict[str, Any] = {"slots": 20}

# Airflow pools of the builder tasks (created by `make run`, docker-compose, deployment).
BUILDER_POOL = "builders"  # upstream_drivers: `slots`
BACKFILL_POOL = "backfill_builders"  # backfill_drivers: [backfill] slots


def builder_pools(config: Config) -> dict[str, int]:
    """Each builder pool and its size."""
    return {BUILDER_POOL: config.slots, BACKFILL_POOL: config.backfill["slots"]}


# The plan lock and the claims of running runs (drivers.store.claims); the config's [claims]
# table overrides these.
CLAIMS_DEFAULTS: dict[str, Any] = {
    "ttl_s": 24 * 3600,  # a claim older than this is ignored (its run died untidily)
    "lock_stale_s": 300,  # a plan lock older than this is broken (pre_build holds it seconds)
    "lock_wait_s": 600,  # then pre_build gives up (and Airflow retries it)
}


# When each DAG runs by itself (cron, UTC); "" leaves it to triggers by hand.
SCHEDULE_DEFAULTS: dict[str, str] = {UPSTREAM_DRIVERS: "0 2 * * *", CPAAS_DRIVERS: "0 0 * * *"}


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Costs:
    """Estimated seconds used to balance shards."""

    shard_startup: float
    bundle_fetch: float
    task: dict[Kind, float]


@dataclass(frozen=True)
class Builder:
    name: str
    toolchain: str
    task_costs: dict[Kind, float]
    image: str | None = None
    resources: dict[str, str] = field(default_factory=dict)  # cpu, memory overrides


@dataclass(frozen=True)
class Route:
    builder: str
    kernels: Selector
    kinds: tuple[Kind, ...]


@dataclass(frozen=True)
class Config:
    path: Path
    driver_versions: tuple[str, ...]
    blocklist_paths: tuple[Path, ...]
    slots: int
    costs: Costs
    builders: dict[str, Builder]
    routes: tuple[Route, ...]
    runtime: str = "local"
    shrink_tolerance: float = 0.02
    kubernetes: dict[str, Any] = field(default_factory=dict)
    retries: int = 2
    retry_delay_s: float = 120.0
    cpaas: dict[str, Any] = field(default_factory=lambda: dict(CPAAS_DEFAULTS))
    vm_tests: dict[str, Any] = field(default_factory=lambda: dict(VM_TEST_DEFAULTS))
    schedules: dict[str, str] = field(default_factory=lambda: dict(SCHEDULE_DEFAULTS))
    docker: dict[str, Any] = field(default_factory=lambda: dict(DOCKER_DEFAULTS))
    backfill: dict[str, Any] = field(default_factory=lambda: dict(BACKFILL_DEFAULTS))
    claims: dict[str, Any] = field(default_factory=lambda: dict(CLAIMS_DEFAULTS))
    quarantine_after: int = 3  # failures in a row, same inputs: then skipped (0: never)

    def route(self, kernel: Kernel, kind: Kind) -> str | None:
        """The builder for a task, or None when no route takes it."""
        for r in self.routes:
            if kind in r.kinds and r.kernels.matches(kernel):
                return r.builder
        return None

    @cached_property
    def blocklist(self) -> Blocklist:
        return Blocklist.from_files(self.blocklist_paths)


def default_config_path() -> Path:
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return Path(__file__).parents[1] / "config" / "pipeline.toml"


def load_config(path: str | Path | None = None) -> Config:
    path = Path(path) if path is not None else default_config_path()
    data = _read_toml(path)
    try:
        return _parse(path, data)
    except ValueError as e:  # ConfigError, or a bad driver version
        raise ConfigError(f"{path}: {e}") from None


def _read_toml(path: Path, inside: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's settings over those of the file its ``base`` names (relative to
    it), if any: a top-level value or array (``[[builders]]``, ``[[routes]]``) replaces
    the base's, a table (``[costs]``, ``[docker]``...) is merged key by key. Blocklists
    a file names stay relative to that file."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror} (set {CONFIG_ENV})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    if "blocklists" in data and isinstance(data["blocklists"], list):
        data["blocklists"] = [str(path.parent / b) for b in data["blocklists"]]
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base must name a config file, not {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in (*inside, path.resolve()):
        raise ConfigError(f"{path}: base {base!r} leads back to itself")
    merged = _read_toml(base_path, (*inside, path.resolve()))
    for key, value in data.items():
        below = merged.get(key)
        both_tables = isinstance(value, dict) and isinstance(below, dict)
        merged[key] = below | value if both_tables else value
    return merged


def _kinds(value: Any, where: str) -> tuple[Kind, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: kinds must be a non-empty list of mod/bpf")
    unknown = [k for k in value if k not in KINDS]
    if unknown:
        raise ConfigError(f"{where}: unknown kind(s) {unknown}; use mod and/or bpf")
    return tuple(k for k in KINDS if k in value)


def _seconds(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{where} must be a number of seconds >= 0, not {value!r}")
    return float(value)


def _schedules(table: dict[str, Any]) -> dict[str, str]:
    unknown = set(table) - set(SCHEDULE_DEFAULTS)
    if unknown:
        raise ConfigError(
            f"schedules: unknown DAG(s) {sorted(unknown)}; known: {list(SCHEDULE_DEFAULTS)}"
        )
    for dag_id, cron in table.items():
        if not isinstance(cron, str) or (cron and len(cron.split()) != 5):
            raise ConfigError(
                f"schedules.{dag_id} must be a cron expression like '0 2 * * *', or \"\" "
                f"for by hand only, not {cron!r}"
            )
    return SCHEDULE_DEFAULTS | table


def _integer(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where} must be an integer >= {minimum}, not {value!r}")
    return value


def _positive_table(name: str, table: dict[str, Any], defaults: dict[str, int]) -> dict[str, int]:
    """A table of positive integers ([backfill], [claims]) over its defaults."""
    unknown = set(table) - set(defaults)
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {sorted(unknown)}; known: {list(defaults)}")
    merged = defaults | table
    for key in defaults:
        _integer(merged[key], f"{name}.{key}", 1)
    return merged


def _docker(table: dict[str, Any]) -> dict[str, Any]:
    unknown = set(table) - set(DOCKER_DEFAULTS)
    if unknown:
        raise ConfigError(
            f"docker: unknown key(s) {sorted(unknown)}; known: {list(DOCKER_DEFAULTS)} "
            "(a builder container never has network: network_mode is not a setting)"
        )
    merged = DOCKER_DEFAULTS | table
    _integer(merged["time_limit_s"], "docker.time_limit_s", 1)
    _integer(merged["pids_limit"], "docker.pids_limit", 64)
    for key in ("url", "workdir"):
        if not isinstance(merged[key], str):
            raise ConfigError(f"docker.{key} must be a string, not {merged[key]!r}")
    return merged


def _parse(path: Path, data: dict[str, Any]) -> Config:
    versions = data.get("driver_versions", [])
    for v in versions:
        check_driver_version(v)
    if len(set(versions)) != len(versions):
        raise ConfigError(f"driver_versions lists a version twice: {versions}")

    slots = data.get("slots", 90)
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ConfigError(f"slots must be a positive integer, not {slots!r}")

    c = data.get("costs", {})
    costs = Costs(
        shard_startup=_seconds(c.get("shard_startup", 60), "costs.shard_startup"),
        bundle_fetch=_seconds(c.get("bundle_fetch", 15), "costs.bundle_fetch"),
        task={k: _seconds(c.get(k, {"mod": 45, "bpf": 60}[k]), f"costs.{k}") for k in KINDS},
    )

    builders: dict[str, Builder] = {}
    for i, b in enumerate(data.get("builders", [])):
        name = b.get("name")
        if not name or not isinstance(name, str):
            raise ConfigError(f"builders[{i}] has no name")
        if name in builders:
            raise ConfigError(f"builder {name!r} is defined twice")
        own = b.get("costs", {})
        unknown = set(own) - set(KINDS)
        if unknown:
            raise ConfigError(f"builder {name!r}: unknown kind(s) {sorted(unknown)} in costs")
        task_costs = {
            k: _seconds(own.get(k, costs.task[k]), f"builder {name!r} costs.{k}") for k in KINDS
        }
        builders[name] = Builder(
            name, b.get("toolchain", ""), task_costs, b.get("image"), b.get("resources", {})
        )
    if not builders:
        raise ConfigError("no builders defined")

    routes = []
    for i, r in enumerate(data.get("routes", [])):
        where = f"routes[{i}]"
        builder = r.get("builder")
        if builder not in builders:
            raise ConfigError(f"{where}: builder {builder!r} is not one of {list(builders)}")
        expr = r.get("kernels", "")
        if not isinstance(expr, str) or not expr.strip():
            raise ConfigError(f"{where} ({builder}): empty kernel selector")
        try:
            selector = parse_selector(expr)
        except SelectorError as e:
            raise ConfigError(f"{where} ({builder}): {e}") from None
        routes.append(Route(builder, selector, _kinds(r.get("kinds"), f"{where} ({builder})")))
    unused = set(builders) - {r.builder for r in routes}
    if unused:
        raise ConfigError(f"builder(s) {sorted(unused)} have no route: add one or remove them")

    runtime = os.environ.get(RUNTIME_ENV) or data.get("runtime", "local")
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime {runtime!r} is not one of {list(RUNTIMES)} ({RUNTIME_ENV})")
    tolerance = data.get("shrink_tolerance", 0.02)
    if (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, int | float)
        or not 0 <= tolerance < 1
    ):
        raise ConfigError(f"shrink_tolerance must be a fraction in [0, 1), not {tolerance!r}")

    vm_tests = VM_TEST_DEFAULTS | data.get("vm_tests", {})
    for name in ("parallel", "memory_mb", "events"):
        if (
            isinstance(vm_tests[name], bool)
            or not isinstance(vm_tests[name], int)
            or (vm_tests[name] < 1)
        ):
            raise ConfigError(f"vm_tests.{name} must be a positive integer")
    _seconds(vm_tests["budget_s"], "vm_tests.budget_s")

    blocklists = tuple(path.parent / p for p in data.get("blocklists", []))
    return Config(
        path,
        tuple(versions),
        blocklists,
        slots,
        costs,
        builders,
        tuple(routes),
        runtime,
        float(tolerance),
        POD_DEFAULTS | data.get("kubernetes", {}),
        int(data.get("retries", 2)),
        _seconds(data.get("retry_delay_s", 120), "retry_delay_s"),
        CPAAS_DEFAULTS | data.get("cpaas", {}),
        vm_tests,
        _schedules(data.get("schedules", {})),
        _docker(data.get("docker", {})),
        quarantine_after=_integer(data.get("quarantine_after", 3), "quarantine_after", 0),
        backfill=_positive_table("backfill", data.get("backfill", {}), BACKFILL_DEFAULTS),
        claims=_positive_table("claims", data.get("claims", {}), CLAIMS_DEFAULTS),
    )
