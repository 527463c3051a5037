"""The pipeline's DAG ids, each spelled once: the DAG files, the config's ``[schedules]``,
the Airflow glue, the run reports, ``drivers run``/``drivers report`` and the UI plugin
import them from here.

A DAG's file stem is its dag_id (tests/test_dag_integrity.py checks it), except
``backfill_drivers``, which the factory in ``dags/upstream_drivers.py`` builds beside
the nightly so the two cannot drift apart.
"""

from __future__ import annotations

UPSTREAM_DRIVERS = "upstream_drivers"  # the nightly: everything new, on a schedule
BACKFILL_DRIVERS = "backfill_drivers"  # a kernel range an engineer triggers by hand
CPAAS_DRIVERS = "cpaas_drivers"  # the downstream drivers image into the CPaaS cache

DAG_IDS = (UPSTREAM_DRIVERS, BACKFILL_DRIVERS, CPAAS_DRIVERS)
