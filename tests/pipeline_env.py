"""A whole pipeline on its own buckets of the embedded GCS, for the tests (and the
benchmarks) that run DAGs: unique bucket names for every role, a config file, and the
environment that points the library, and any Airflow started from here, at them."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import real_sources
from drivers.build import bundles
from drivers.build.sources import package_sources
from drivers.domain import layout
from drivers.store.emulator import EmbeddedGCS
from drivers.store.storage import ObjectStore, client_from_environment
from example_sources import EXAMPLE_SOURCES

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"

# Two builders on the host toolchain, so the multi-builder path runs for real.
DEBIAN_BUILDERS = """
[[builders]]
name = "deb61"
toolchain = "host gcc-12 + clang (Debian 12)"
[[builders]]
name = "deb612"
toolchain = "host gcc-12 + clang (Debian 12)"
[[routes]]
builder = "deb612"
kernels = ">=6.12"
kinds = ["mod", "bpf"]
[[routes]]
builder = "deb61"
kernels = ">=3"
kinds = ["mod", "bpf"]
"""


@contextlib.contextmanager
def pipeline_env(
    gcs: EmbeddedGCS, tmp: Path, config: str, runtime: str = "local", name: str = "e2e"
) -> Iterator[dict[str, ObjectStore]]:
    """Buckets ``<name>-<random>-<role>``, ``config`` as DRIVERS_CONFIG, the runtime;
    yields an ObjectStore per role. The environment is restored afterwards."""
    tag = uuid.uuid4().hex[:8]
    buckets = {role: f"{name}-{tag}-{role.replace('_', '-')}" for role in layout.ROLES}
    gcs.create_buckets(buckets.values())
    (tmp / "pipeline.toml").write_text(config)
    with pytest.MonkeyPatch.context() as mp:
        for variable, bucket in layout.Buckets(**buckets).to_env().items():
            mp.setenv(variable, bucket)
        mp.setenv("DRIVERS_CONFIG", str(tmp / "pipeline.toml"))
        mp.setenv("DRIVERS_RUNTIME", runtime)
        client = client_from_environment()
        yield {role: ObjectStore(client, bucket) for role, bucket in buckets.items()}


def debian_bundle(kernel: str) -> Path:
    """``bundle-<kernel>.tgz`` in .cache/bundles (where `make run` keeps it), made from
    Debian's header packages when missing or older than bundles.py."""
    path = CACHE / "bundles" / layout.bundle_object(kernel)
    if not path.exists() or path.stat().st_mtime < Path(bundles.__file__).stat().st_mtime:
        bundles.make_debian_bundle(kernel, path.parent, CACHE / "debs")
    return path


def publish_bundle(stores: dict[str, ObjectStore], kernel: str) -> None:
    """A real Debian bundle of ``kernel`` (made once into .cache/bundles)."""
    stores["bundles"].upload_new_file(layout.bundle_object(kernel), debian_bundle(kernel))


def publish_sources(stores: dict[str, ObjectStore], version: str, tmp: Path) -> None:
    """The example sources (the test fixture) of ``version``."""
    path = package_sources(EXAMPLE_SOURCES / version, tmp / "sources")
    stores["sources"].upload_new_file(layout.source_object(version), path)


def publish_real_sources(stores: dict[str, ObjectStore], version: str, tmp: Path) -> None:
    """The collector's real sources of ``version``, prepared (``drivers sources prepare``)."""
    path = real_sources.prepared(version, tmp / "real-sources")
    stores["sources"].upload_new_file(layout.source_object(version), path)
