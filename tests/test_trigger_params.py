"""Trigger parameters: what the form's JSON schema refuses before a run exists (the table
in tests/trigger_cases.py, here through the params' validation; tests/test_backfill_e2e.py
sends it through the REST API), versions picked and typed, and what only the first task
can check, refused before anything is written, with a valid example."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from drivers.domain import layout
from drivers.domain.config import load_config
from drivers.domain.selectors import SelectorError
from drivers.flows import upstream
from drivers.store.storage import Stores, client_from_environment
from pipeline_env import DEBIAN_BUILDERS, pipeline_env
from trigger_cases import TRIGGER_CASES, case_id, refusal

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory) -> list[str | None]:
    """Each case's verdict from the validation Airflow runs before a run exists, on the
    DAGs as the API server loads them from the database (tests/trigger_validate.py)."""
    cases = [[dag_id, conf] for dag_id, conf, _ in TRIGGER_CASES]
    home = tmp_path_factory.mktemp("airflow")
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "trigger_validate.py"), str(REPO / "dags")],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        env=os.environ | {"AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW_HOME": str(home)},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", range(len(TRIGGER_CASES)), ids=map(case_id, TRIGGER_CASES))
def test_the_schema_judges_a_trigger_conf_before_a_run_exists(verdicts, case):
    _, _, culprit = TRIGGER_CASES[case]
    verdict = verdicts[case]
    if culprit is None:
        assert verdict is None
    else:
        assert verdict is not None and refusal(culprit) in verdict


def test_typed_versions_join_the_picked_ones_and_blank_lines_are_dropped():
    params = upstream.RunParams.from_params(
        {"driver_versions": ["2.3.0"], "other_driver_versions": ["2.5.0", "", "2.3.0"]},
        load_config(),
    )
    assert params.driver_versions == ("2.3.0", "2.5.0")
    none = upstream.RunParams.from_params({"driver_versions": None}, load_config())
    assert none.driver_versions == ()  # the run-time config's


# Valid for the schema (a non-blank string), wrong for the selector syntax.
SELECTS_NOTHING = [
    ("4.18.0-372..4.18.0-305", "put the lower bound first: '4.18.0-305..4.18.0-372'"),
    (">=6.0,<5.10", "no kernel release can satisfy both '>=6.0' and '<5.10'"),
    ("el8:5.4.0-62-generic", "belongs to family 'ubuntu', not 'el8'"),
    ("el99:4.18.0-305..", "unknown kernel family 'el99'"),
]


@pytest.mark.parametrize("select, why", SELECTS_NOTHING)
def test_a_selector_the_schema_cannot_judge_is_refused_with_a_valid_example(select, why):
    with pytest.raises(SelectorError) as e:
        upstream.RunParams.from_params({"select": select}, load_config())
    assert why in str(e.value)
    assert "valid selectors look like 'el8:4.18.0-305..4.18.0-372'" in str(e.value)


def test_pre_build_writes_nothing_for_a_selector_that_selects_nothing(gcs, tmp_path):
    config = 'driver_versions = ["2.3.0"]\nblocklists = []\nslots = 2\n' + DEBIAN_BUILDERS
    with pipeline_env(gcs, tmp_path, config, name="badinput") as buckets:
        buckets["bundles"].upload_new(layout.bundle_object("6.1.0-56-amd64"), b"listed only")
        stores = Stores(client_from_environment())
        # as if the form's check were bypassed: pre_build itself refuses it (the other
        # selectors' messages: the test above)
        select, why = SELECTS_NOTHING[0]
        params = upstream.RunParams(driver_versions=("2.3.0",), select=select)
        with pytest.raises(SelectorError, match="valid selectors look like") as e:
            upstream.pre_build(stores, load_config(), "manual__bad-select", params)
        assert why in str(e.value)
        assert [i.name for i in buckets["work"].list()] == []  # no plan, claim, lock, report
