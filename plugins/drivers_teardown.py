"""Tear down a drivers run that failed or was cancelled (marked failed in the UI or the
REST API): its builder pods, found by label, are deleted, its staging is removed and its
claim released (drivers.store.claims: the next run plans what it did not build).

A listener, not a DAG callback: Airflow runs DAG failure callbacks only for runs the
scheduler fails, while this hook also fires in the API server when an operator marks a
run failed. The work is :func:`drivers.airflow.glue.teardown_run`.
"""

from __future__ import annotations

import logging

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin

log = logging.getLogger(__name__)


class RunTeardown:
    @hookimpl
    def on_dag_run_failed(self, dag_run, msg: str) -> None:
        from drivers.airflow.glue import teardown_run

        try:
            teardown_run(dag_run.dag_id, dag_run.run_id)
        except Exception:  # a listener must never break the scheduler or the API
            log.exception("teardown of %s %s failed", dag_run.dag_id, dag_run.run_id)


class DriversTeardownPlugin(AirflowPlugin):
    name = "drivers_teardown"
    listeners = [RunTeardown()]
