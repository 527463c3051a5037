"""Operators' tools: the `drivers` CLI, `drivers why`, withdraw, reports, notifications,
the embedded Airflow."""
