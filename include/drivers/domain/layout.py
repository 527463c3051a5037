"""Buckets and prefixes: the one place that knows where every kind of object lives.

Bucket names come from the environment (``DRIVERS_BUCKET_<ROLE>``) so production and
the embedded default run the same code; the defaults are the embedded ones.
Object *names* inside the driver cache are owned by :mod:`drivers.domain.names`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from drivers.domain.kernels import Kernel, parse_kernel

ROLES = ("bundles", "kernel_images", "sources", "drivers", "cpaas_drivers", "work", "support")

DEFAULT_BUCKETS = {
    "bundles": "collector-bundles",
    "kernel_images": "collector-kernel-images",
    "sources": "collector-sources",
    "drivers": "collector-drivers",
    "cpaas_drivers": "collector-cpaas-drivers",
    "work": "collector-work",
    "support": "collector-support-packages",
}

BUNDLE_PREFIX = "bundle-"
BUNDLE_SUFFIX = ".tgz"
STAGING_PREFIX = "staging/"
REPORTS_PREFIX = "reports/"  # every run's reports: reports/<run_id>/ (work bucket)


def report_prefix(run_id: str) -> str:
    return f"{REPORTS_PREFIX}{run_id}/"


def run_state_object(dag_id: str) -> str:
    """What the last successful run of ``dag_id`` leaves for the next one (JSON, work
    bucket): the upstream shrink guard's kernel listing, the CPaaS image digest."""
    return f"state/{dag_id}/last_success.json"


LEDGER_PREFIX = "ledger/"
IMAGES_PREFIX = "images/"
# Run-time config in the work bucket (drivers.store.runtime_config): driver versions, blocklist
# lines and quarantine releases operators change without a deploy.
RUNTIME_CONFIG_PREFIX = "config/"


def bucket_env_var(role: str) -> str:
    return f"DRIVERS_BUCKET_{role.upper()}"


@dataclass(frozen=True)
class Buckets:
    bundles: str
    kernel_images: str
    sources: str
    drivers: str
    cpaas_drivers: str
    work: str
    support: str

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Buckets:
        env = os.environ if env is None else env
        return cls(**{r: env.get(bucket_env_var(r), DEFAULT_BUCKETS[r]) for r in ROLES})

    def to_env(self) -> dict[str, str]:
        """The environment that names these buckets (what pods and containers get)."""
        return {bucket_env_var(r): getattr(self, r) for r in ROLES}

    def all(self) -> list[str]:
        return [getattr(self, r) for r in ROLES]


def bundle_object(kernel: str) -> str:
    return f"{BUNDLE_PREFIX}{kernel}{BUNDLE_SUFFIX}"


def kernel_from_bundle_object(name: str) -> str | None:
    """The kernel a bundle object is for, or None when the name is not a bundle."""
    if name.startswith(BUNDLE_PREFIX) and name.endswith(BUNDLE_SUFFIX) and "/" not in name:
        kernel = name[len(BUNDLE_PREFIX) : -len(BUNDLE_SUFFIX)]
        return kernel or None
    return None


def kernels_from_bundles(names: Iterable[str], where: str) -> tuple[list[Kernel], list[str]]:
    """The kernels of a bundle bucket listing. A bundle name that is not a kernel release
    is reported, not fatal: one stray object must not stop a nightly."""
    kernels, problems = [], []
    for name in names:
        release = kernel_from_bundle_object(name)
        if release is None:
            continue
        try:
            kernels.append(parse_kernel(release))
        except ValueError as e:
            problems.append(f"{where}/{name}: {e}")
    return kernels, problems


def source_object(driver_version: str) -> str:
    """Prepared driver sources of one version, in the sources bucket."""
    return f"{driver_version}.tgz"


CONSUMERS_PREFIX = "consumers/"


def consumer_object(driver_version: str, recipe: str, arch: str) -> str:
    """Beside them, the consumer the VM tests capture with (drivers.build.consumer),
    built from them by one recipe: under a prefix, so that a listing of the sources
    bucket's ``<V>.tgz`` (drivers.store.ledger.source_hashes) never takes it for sources."""
    return f"{CONSUMERS_PREFIX}{driver_version}/scap-open-{recipe}-{arch}"


# Run-scoped staging in the work bucket: builders write here; verify, the VM tests and
# push read from here; push promotes into the cache; the prefix is removed at run end.
def staging_prefix(run_id: str) -> str:
    return f"{STAGING_PREFIX}{run_id}/"


def shard_object(run_id: str, builder: str, index: int) -> str:
    """The task list of one shard (JSON), what `drivers build-shard` reads."""
    return f"{staging_prefix(run_id)}shards/{builder}-{index:04d}.json"


_SHARD_OBJECT_RE = re.compile(
    re.escape(STAGING_PREFIX) + r"(?P<run_id>[^/]+)/shards/(?P<builder>[^/]+)-(?P<index>\d+)\.json$"
)


def parse_shard_object(name: str) -> tuple[str, str, int] | None:
    """(run_id, builder, index) of a shard object name or gs:// URI (inverse of
    shard_object); None when ``name`` is not one."""
    m = _SHARD_OBJECT_RE.search(name)
    return (m["run_id"], m["builder"], int(m["index"])) if m else None


def shard_from_object(name: str) -> tuple[str, int]:
    """(builder, index) of a shard object name or gs:// URI (inverse of shard_object)."""
    parsed = parse_shard_object(name)
    if parsed is None:
        raise ValueError(f"{name!r} is not a shard object ({shard_object('<run>', '<b>', 0)})")
    return parsed[1], parsed[2]


def shard_results_object(run_id: str, builder: str, index: int) -> str:
    """One JSON record per task plus a final shard record (JSON lines)."""
    return f"{staging_prefix(run_id)}results/{builder}-{index:04d}.jsonl"


def staged_drivers_prefix(run_id: str) -> str:
    """Built drivers, named inside it exactly as in the cache (drivers.domain.names)."""
    return f"{staging_prefix(run_id)}drivers/"


def staged_log_object(run_id: str, kernel: str, driver_version: str, kind: str) -> str:
    return f"{staging_prefix(run_id)}logs/{kernel}/{driver_version}/{kind}.log"


# Runs in flight never plan the same task twice (drivers.store.claims): in the work bucket, one
# plan lock (held for seconds by a planning pre_build) and one claim per running run.
PLAN_LOCK_OBJECT = "state/plan.lock"
CLAIMS_PREFIX = "state/claims/"
CLAIM_SUFFIX = ".json"


def claim_object(run_id: str) -> str:
    """The tasks a running run planned, with the claim's expiry (JSON)."""
    return f"{CLAIMS_PREFIX}{run_id}{CLAIM_SUFFIX}"


def run_from_claim_object(name: str) -> str | None:
    """The run id of a claim object name, or None when the name is not a claim."""
    if name.startswith(CLAIMS_PREFIX) and name.endswith(CLAIM_SUFFIX):
        return name[len(CLAIMS_PREFIX) : -len(CLAIM_SUFFIX)] or None
    return None


def boot_image_object(kernel: str) -> str:
    """The kernel-images bucket: a bootable kernel per release, for the VM load tests."""
    return f"{kernel}/vmlinuz"


def boot_module_object(kernel: str, path: str) -> str:
    """Beside it, a module drivers may depend on, by its path under the kernel's module
    tree (``lib/crc8.ko``); ``path=""`` gives the prefix."""
    return f"{kernel}/modules/{path}"


def cpaas_prefix(arch: str, driver_version: str = "") -> str:
    """An architecture's CPaaS cache (arch as the cache names it: x86_64, s390x, ppc64le),
    or one driver version in it; also the CPaaS support packages' root in their bucket."""
    return f"cpaas/{arch}/{driver_version}/" if driver_version else f"cpaas/{arch}/"


def cpaas_run(run_id: str) -> str:
    """The key of a cpaas_drivers run under staging/ and reports/ (upstream: the run id)."""
    return f"cpaas/{run_id}"


def mirrored_image_prefix(digest: str) -> str:
    """The work bucket's "internal registry": one OCI image layout per image digest."""
    return f"{IMAGES_PREFIX}{digest.replace(':', '-')}/"


# The one mapping between OCI architecture names and the CPaaS cache's (DESIGN.md §2).
ARCH_TO_CACHE = {"amd64": "x86_64", "s390x": "s390x", "ppc64le": "ppc64le"}


class UnknownArchitecture(ValueError):
    pass


def cache_arch(oci_arch: str) -> str:
    """The CPaaS cache's name for an OCI architecture (amd64 -> x86_64)."""
    try:
        return ARCH_TO_CACHE[oci_arch]
    except KeyError:
        known = ", ".join(sorted(ARCH_TO_CACHE))
        raise UnknownArchitecture(
            f"architecture {oci_arch!r} has no CPaaS cache: known are {known} "
            "(add it to drivers.domain.layout.ARCH_TO_CACHE if the cache gains one)"
        ) from None
