"""The collector's real driver sources, read from where they are kept (never copied into
the repository): one falcosecurity-libs tarball per driver version (its README.md), and
the prepared ``<driver_version>.tgz`` made from it."""

from __future__ import annotations

import os
from pathlib import Path

from drivers.build.sources import prepare_sources

REPO = Path(__file__).resolve().parents[1]


def _sources_dir() -> Path:
    """``$DRIVERS_REAL_SOURCES``, else ``shared/data/driver-sources`` beside the checkout,
    else the workplace's ``/work/shared`` (a CI clone may live anywhere; as
    scenarios.REAL_DATA)."""
    candidates = [
        os.environ.get("DRIVERS_REAL_SOURCES"),
        REPO.parent / "shared" / "data" / "driver-sources",
        "/work/shared/data/driver-sources",
    ]
    found = [Path(c) for c in candidates if c and (Path(c) / "README.md").is_file()]
    return found[0] if found else Path(candidates[1])


SOURCES_DIR = _sources_dir()
# Driver version -> tarball: the collector's fork for the 2022 versions, upstream for 8.1.0.
TARBALLS = {
    "1.0.0": "stackrox-falcosecurity-libs-1.0.0.tar.gz",
    "2.2.0": "stackrox-falcosecurity-libs-2.2.0.tar.gz",
    "2.3.0": "stackrox-falcosecurity-libs-2.3.0.tar.gz",
    "8.1.0": "falcosecurity-libs-8.1.0+driver.tar.gz",
}


def tarball(version: str) -> Path:
    """The tarball of the tree released as ``version``; a missing one is an error that
    says where it was looked for."""
    path = SOURCES_DIR / TARBALLS[version]
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the real driver sources are read from {SOURCES_DIR} "
            "(set DRIVERS_REAL_SOURCES to the folder holding them)"
        )
    return path


def prepared(version: str, out_dir: Path) -> Path:
    """``<out_dir>/<version>.tgz``, prepared from the version's tarball."""
    return prepare_sources(tarball(version), version, out_dir)
