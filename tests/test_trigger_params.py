"""Trigger parameters beyond the form's JSON schema (tests/test_dag_integrity.py checks
what the schema refuses at trigger time): versions picked and typed, and what only the
first task can check, refused before anything is written, with a valid example."""

from __future__ import annotations

import pytest

from drivers.domain import layout
from drivers.domain.config import load_config
from drivers.domain.selectors import SelectorError
from drivers.flows import upstream as pipeline
from drivers.store.storage import Stores, client_from_environment
from pipeline_env import DEBIAN_BUILDERS, pipeline_env


def test_typed_versions_join_the_picked_ones_and_blank_lines_are_dropped():
    params = pipeline.RunParams.from_params(
        {"driver_versions": ["2.3.0"], "other_driver_versions": ["2.5.0", "", "2.3.0"]},
        load_config(),
    )
    assert params.driver_versions == ("2.3.0", "2.5.0")
    none = pipeline.RunParams.from_params({"driver_versions": None}, load_config())
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
        pipeline.RunParams.from_params({"select": select}, load_config())
    assert why in str(e.value)
    assert "valid selectors look like 'el8:4.18.0-305..4.18.0-372'" in str(e.value)


def test_pre_build_writes_nothing_for_a_selector_that_selects_nothing(gcs, tmp_path):
    config = 'driver_versions = ["2.3.0"]\nblocklists = []\nslots = 2\n' + DEBIAN_BUILDERS
    with pipeline_env(gcs, tmp_path, config, name="badinput") as buckets:
        buckets["bundles"].upload_new(layout.bundle_object("6.1.0-56-amd64"), b"listed only")
        stores = Stores(client_from_environment())
        for select, why in SELECTS_NOTHING:
            # as if the form's check were bypassed: pre_build itself refuses it
            params = pipeline.RunParams(driver_versions=("2.3.0",), select=select)
            with pytest.raises(SelectorError, match="valid selectors look like") as e:
                pipeline.pre_build(stores, load_config(), f"manual__{select}", params)
            assert why in str(e.value)
        assert [i.name for i in buckets["work"].list()] == []  # no plan, claim, lock, report
