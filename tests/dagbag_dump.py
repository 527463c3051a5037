"""Print, as JSON, what a DAG processor would see in dags/ (run in a fresh interpreter)."""

import json
import sys

from airflow.dag_processing.dagbag import DagBag


def describe(dag) -> dict:
    return {
        "file": dag.fileloc,
        "tags": sorted(dag.tags),
        "doc": bool(dag.doc_md),
        "schedule": str(getattr(dag.timetable, "_expression", dag.schedule)),
        "catchup": dag.catchup,
        "max_active_runs": dag.max_active_runs,
        "params": sorted(dag.params),
        "tasks": {
            t.task_id: {
                "owner": t.owner,
                "retries": t.retries,
                "type": type(t).__name__,
                "trigger_rule": getattr(t.trigger_rule, "value", t.trigger_rule),
                "pool": t.pool,
                "downstream": sorted(t.downstream_task_ids),
            }
            for t in dag.tasks
        },
    }


bag = DagBag(dag_folder=sys.argv[1])
errors = {k: str(v) for k, v in bag.import_errors.items()}
print(json.dumps({"errors": errors, "dags": {i: describe(d) for i, d in bag.dags.items()}}))
