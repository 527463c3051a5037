"""Shared fixtures. The GCS fixtures run the real fake-gcs-server (no mocks)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from drivers.domain.kernels import Kernel, parse_kernel
from drivers.store.emulator import EmbeddedGCS, free_port
from drivers.store.storage import ObjectStore, client_from_environment
from scenarios import KERNEL_LIST


@pytest.fixture(scope="session")
def real_lines() -> list[str]:
    """The real 2022 kernel list, one release per line (read from ../shared/data)."""
    return KERNEL_LIST.read_text().splitlines()


@pytest.fixture(scope="session")
def real_kernels(real_lines: list[str]) -> list[Kernel]:
    return [parse_kernel(line) for line in real_lines]


@pytest.fixture(scope="session")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedGCS]:
    """One embedded GCS for the whole session, with STORAGE_EMULATOR_HOST pointing at it."""
    server = EmbeddedGCS(tmp_path_factory.mktemp("gcs"), port=free_port())
    server.ensure_running()
    try:
        with pytest.MonkeyPatch.context() as env:
            for name, value in server.env().items():
                env.setenv(name, value)
            yield server
    finally:
        server.stop()


@pytest.fixture
def store(gcs: EmbeddedGCS) -> Callable[..., ObjectStore]:
    """Factory: ``store(**kwargs)`` gives an ObjectStore on a new, empty, uniquely named bucket."""
    client = client_from_environment()

    def make(**kwargs: object) -> ObjectStore:
        bucket = f"test-{uuid.uuid4().hex[:16]}"
        gcs.create_buckets([bucket])
        return ObjectStore(client, bucket, **kwargs)

    return make
