"""The trigger confs the DAGs' params must accept or refuse, in one table, for the two
checks of it: tests/test_trigger_params.py (fast: the params' own validation, as
Airflow's trigger path runs it) and tests/test_backfill_e2e.py (the real REST API)."""

from __future__ import annotations

import json

TRIGGER_CASES: list[tuple[str, dict, str | None]] = [
    # (dag_id, conf, the param the refusal names, or None: accepted)
    ("upstream_drivers", {}, None),
    ("upstream_drivers", {"select": "el8:4.18.0-305..4.18.0-372"}, None),
    (
        "upstream_drivers",
        {"driver_versions": ["2.3.0"], "other_driver_versions": ["2.5.0", ""]},
        None,
    ),
    ("upstream_drivers", {"driver_versions": ["2.3"]}, "driver_versions"),
    ("upstream_drivers", {"other_driver_versions": ["v2.5"]}, "other_driver_versions"),
    ("upstream_drivers", {"kinds": ["ko"]}, "kinds"),
    ("upstream_drivers", {"kinds": []}, "kinds"),
    ("upstream_drivers", {"builders": ["rhel9"]}, "builders"),
    ("upstream_drivers", {"max_failures": -1}, "max_failures"),
    ("upstream_drivers", {"select": "  "}, "select"),
    ("upstream_drivers", {"vm_tests": "sometimes"}, "vm_tests"),
    ("upstream_drivers", {"vm_tests_budget_s": -5}, "vm_tests_budget_s"),
    ("upstream_drivers", {"force": "yes"}, "force"),
    ("backfill_drivers", {"select": "el8:4.18.0-305..4.18.0-372"}, None),
    ("backfill_drivers", {}, "select"),  # required
    ("backfill_drivers", {"select": None}, "select"),
    ("backfill_drivers", {"select": ""}, "select"),
    ("backfill_drivers", {"select": " \t"}, "select"),
    ("backfill_drivers", {"select": "el8:4.18.0-305..", "kinds": ["ko"]}, "kinds"),
]


def case_id(case: tuple[str, dict, str | None]) -> str:
    """A readable test id: the DAG and the conf."""
    dag_id, conf, _ = case
    return f"{dag_id}:{json.dumps(conf, separators=(',', ':'))}"


def refusal(culprit: str) -> str:
    """What Airflow's refusal of a conf says about the param at fault."""
    return f"Invalid input for param {culprit}:"
