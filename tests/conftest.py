"""Shared fixtures. The GCS fixtures run the real fake-gcs-server (no mocks). And no
silent skips: under `make test` and CI, a test skipped for a missing host tool fails."""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import real_sources
from drivers.domain.kernels import Kernel, parse_kernel
from drivers.ops.cli import main
from drivers.store.emulator import EmbeddedGCS, free_port
from drivers.store.storage import ObjectStore, client_from_environment
from pipeline_env import debian_bundle
from scenarios import KERNEL_LIST

CACHE = Path(__file__).resolve().parents[1] / ".cache"
REAL_BUILD_KERNEL = "6.1.0-56-amd64"


@dataclass(frozen=True)
class RealBuild:
    """What `drivers build` gave: its exit status, JSON lines, stderr, and its folders."""

    status: int
    lines: list[dict]
    stderr: str
    out: Path
    work: Path
    sources: Path  # the prepared 2.3.0.tgz it built from


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


@pytest.fixture(scope="session")
def debian_6_1_bundle() -> Path:
    """bundle-6.1.0-56-amd64.tgz from Debian's header packages (cached)."""
    return debian_bundle(REAL_BUILD_KERNEL)


@pytest.fixture(scope="session")
def real_build(debian_6_1_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> RealBuild:
    """The one real build the fast tests share (~30 s): `drivers build` of the collector's
    real 2.3.0 kernel module and eBPF probe for 6.1.0-56-amd64 from its prepared sources.
    tests/test_build_one.py checks the command; tests/test_vmtest.py loads its drivers."""
    tmp = tmp_path_factory.mktemp("real-build")
    sources = real_sources.prepared("2.3.0", tmp / "sources")
    stdout, stderr = io.StringIO(), io.StringIO()  # capsys is per test: capture by hand
    argv = ["build", REAL_BUILD_KERNEL, "--driver-version", "2.3.0"]
    argv += ["--bundle", str(debian_6_1_bundle), "--sources", str(sources)]
    argv += ["--out", str(tmp / "out"), "--workdir", str(tmp / "work")]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(argv)
    lines = [json.loads(line) for line in stdout.getvalue().splitlines()]
    return RealBuild(status, lines, stderr.getvalue(), tmp / "out", tmp / "work", sources)


@pytest.fixture
def store(gcs: EmbeddedGCS) -> Callable[..., ObjectStore]:
    """Factory: ``store(**kwargs)`` gives an ObjectStore on a new, empty, uniquely named bucket."""
    client = client_from_environment()

    def make(**kwargs: object) -> ObjectStore:
        bucket = f"test-{uuid.uuid4().hex[:16]}"
        gcs.create_buckets([bucket])
        return ObjectStore(client, bucket, **kwargs)

    return make


# --- no silent skips -------------------------------------------------------------------------
# Every skip in this suite is for a host tool (or service) that is not installed: podman,
# QEMU, chromium, skopeo, docker-compose, modinfo, busybox, unzip, PostgreSQL... `make test`
# sets DRIVERS_REQUIRE_ALL=1 (CI sets CI): there a skip is a failure that names what is
# missing and how to install it, so a green suite means every test ran. Run by hand
# without that setting, the same test is only skipped. tests/test_no_silent_skips.py
# proves it on real tests of the suite.

REQUIRE_ALL = "DRIVERS_REQUIRE_ALL"
INSTALL_HINT = (
    "scripts/host-deps.sh installs the host tools (podman: scripts/podman-setup.sh); "
    f"without {REQUIRE_ALL} and CI the test is skipped instead"
)


def every_test_must_run() -> bool:
    """Whether a skip is a failure here: `make test` (DRIVERS_REQUIRE_ALL=1) or CI."""
    ci = os.environ.get("CI", "").lower() not in ("", "0", "false")
    return os.environ.get(REQUIRE_ALL) == "1" or ci


def _skip_reason(longrepr: object) -> str:
    """A skip report's reason: its longrepr is (path, line, "Skipped: <reason>")."""
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _fail_instead(report: pytest.TestReport | pytest.CollectReport, what: str) -> None:
    reason = _skip_reason(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"{what} may not be skipped ({REQUIRE_ALL}=1 or CI): {reason}; {INSTALL_HINT}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and every_test_must_run():
        _fail_instead(report, item.nodeid)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> pytest.CollectReport:
    report = yield  # a whole module skipped (pytest.skip(allow_module_level=True), importorskip)
    if report.skipped and every_test_must_run():
        _fail_instead(report, collector.nodeid)
    return report
