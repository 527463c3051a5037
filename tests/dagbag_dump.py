"""Print, as JSON, what a DAG processor would see in dags/ (run in a fresh interpreter)."""

import json
import sys

from airflow.dag_processing.dagbag import DagBag


def _default(params, key: str) -> dict:
    """``has_default`` and the ``default`` (a param without one is required)."""
    from airflow.sdk.definitions._internal.types import NOTSET

    value = params.get_param(key).value
    return {"has_default": False} if value is NOTSET else {"has_default": True, "default": value}


def describe(dag) -> dict:
    return {
        "file": dag.fileloc,
        "tags": sorted(dag.tags),
        "doc": bool(dag.doc_md),
        "schedule": str(getattr(dag.timetable, "_expression", dag.schedule)),
        "catchup": dag.catchup,
        "max_active_runs": dag.max_active_runs,
        "params": sorted(dag.params),
        # each param's JSON schema and whether it has a default (no default: required)
        "param_schemas": {
            k: dag.params.get_param(k).schema
            | {"description": dag.params.get_param(k).description}
            | _default(dag.params, k)
            for k in dag.params
        },
        "tasks": {
            t.task_id: {
                "owner": t.owner,
                "retries": t.retries,
                "backoff": bool(t.retry_exponential_backoff),
                "retry_delay_s": t.retry_delay.total_seconds(),
                "max_retry_delay_s": t.max_retry_delay and t.max_retry_delay.total_seconds(),
                "type": type(t).__name__,
                "trigger_rule": getattr(t.trigger_rule, "value", t.trigger_rule),
                "pool": t.pool,
                "priority_weight": t.priority_weight,
                "weight_rule": str(getattr(t.weight_rule, "value", t.weight_rule)),
                "downstream": sorted(t.downstream_task_ids),
            }
            for t in dag.tasks
        },
    }


bag = DagBag(dag_folder=sys.argv[1])
errors = {k: str(v) for k, v in bag.import_errors.items()}
print(json.dumps({"errors": errors, "dags": {i: describe(d) for i, d in bag.dags.items()}}))
