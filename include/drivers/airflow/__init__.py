"""The Airflow glue: the only part of the library that imports Airflow (DAG policy,
operators per runtime, teardown, notifications)."""
