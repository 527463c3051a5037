"""The example driver sources: a 100-line toy module and probe per driver version
(tests/fixtures/example-driver-sources/README.md), what the fast tests build and publish."""

from __future__ import annotations

from pathlib import Path

EXAMPLE_SOURCES = Path(__file__).resolve().parent / "fixtures" / "example-driver-sources"
EXAMPLE_VERSIONS = ("2.3.0", "2.4.0-rc1")
