"""`make test` fails when a test it needs is skipped for a missing host tool
(tests/conftest.py): real tests of this suite, run with every tool hidden from PATH."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# One skip inside its test (pytest.skip), one from a skipif marker (at setup): each
# test and the reason it gives.
NEEDS_A_TOOL = {
    "tests/test_packages.py::test_unzip_accepts_the_package": "unzip is not installed",
    "tests/test_deployment.py::test_it_has_the_official_shape_plus_the_gcs_emulator": (
        "docker-compose is not installed"
    ),
}


def run_without_tools(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Those tests in a fresh pytest with an empty PATH (no host tool can be found), with
    neither CI nor DRIVERS_REQUIRE_ALL set unless given."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "DRIVERS_REQUIRE_ALL")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *NEEDS_A_TOOL],
        cwd=REPO,
        env=base | {"PATH": str(empty)} | env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("setting", [{"DRIVERS_REQUIRE_ALL": "1"}, {"CI": "true"}])
def test_a_skip_for_a_missing_tool_fails_under_make_test_and_ci(tmp_path, setting):
    result = run_without_tools(tmp_path, **setting)

    out = result.stdout
    assert result.returncode == 1, out[-3000:]
    assert "1 failed, 1 error" in out, out[-3000:]  # the marker's skip fails at setup
    for test, reason in NEEDS_A_TOOL.items():
        # each failure names its test, the missing tool and the install command
        assert f"{test} may not be skipped" in out and reason in out, out[-3000:]
    assert "scripts/host-deps.sh installs the host tools" in out


def test_by_hand_without_the_setting_the_same_tests_are_skipped(tmp_path):
    result = run_without_tools(tmp_path)

    out = result.stdout
    assert result.returncode == 0, out[-3000:]
    assert "2 skipped" in out and "may not be skipped" not in out, out[-3000:]
    assert all(reason in out for reason in NEEDS_A_TOOL.values())
