"""The library's layers hold (import-linter contracts in pyproject.toml), a crossing breaks
the build, and parsing the DAG files loads neither google-cloud-storage nor the flows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
CONTRACTS = {
    "each layer imports only the layers below it",
    "no flow imports another flow",
    "only the Airflow glue imports Airflow",
    "the domain does no I/O through cloud or HTTP clients",
}


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports over the ``drivers`` package found under ``root``/include."""
    env = os.environ | {"PYTHONPATH": str(root / "include")}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", "--config", str(root / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_library_keeps_its_layers() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    kept = {line.removesuffix(" KEPT") for line in result.stdout.splitlines() if "KEPT" in line}
    assert kept == CONTRACTS


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        (
            "domain/kernels.py",
            "from drivers.ops import notify",
            "each layer imports only the layers below it",
        ),
        (
            "flows/cpaas.py",
            "from drivers.flows import upstream",
            "no flow imports another flow",
        ),
        ("ops/report.py", "import airflow.sdk", "only the Airflow glue imports Airflow"),
        (
            "domain/layout.py",
            "import requests",
            "the domain does no I/O through cloud or HTTP clients",
        ),
    ],
)
def test_a_deliberate_crossing_breaks_its_contract(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    shutil.copytree(
        REPO / "include" / "drivers",
        tmp_path / "include" / "drivers",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    source = tmp_path / "include" / "drivers" / module
    source.write_text(source.read_text() + f"\n{line}  # the crossing under test\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout
    assert f"{contract} BROKEN" in result.stdout
    broken = [c for c in CONTRACTS if f"{c} BROKEN" in result.stdout]
    assert broken == [contract], result.stdout
    assert f"drivers.{module.removesuffix('.py').replace('/', '.')}" in result.stdout


PARSE = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()},
                  "dags": sorted(bag.dags), "modules": sorted(sys.modules)}))
"""


def test_parsing_the_dags_loads_no_storage_client_and_no_flow(tmp_path: Path) -> None:
    env = os.environ | {"AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = subprocess.run(
        [sys.executable, "-c", PARSE, str(REPO / "dags")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    parsed = json.loads(out.splitlines()[-1])
    assert parsed["errors"] == {}
    assert {"upstream_drivers", "backfill_drivers", "cpaas_drivers"} <= set(parsed["dags"])
    modules = set(parsed["modules"])
    assert "google.cloud.storage" not in modules
    heavy = {m for m in modules if m.startswith(("drivers.flows", "drivers.build", "drivers.ops"))}
    assert heavy == set(), "parse time imports " + ", ".join(sorted(heavy))
    assert "drivers.store.storage" not in modules
