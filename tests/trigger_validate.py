"""Check trigger confs the way Airflow's trigger path does (run in a fresh interpreter).

Parses dags/ (DagBag), serializes each DAG as the DAG processor stores it, loads it back
as the API server does, and validates each conf with what SerializedDAG.create_dagrun
runs before a run exists (the REST API, the UI form and `airflow dags trigger` all go
through it): ``params.deep_merge(conf).validate()``.

stdin: JSON ``[[dag_id, conf], ...]``; stdout (last line): JSON list, per conf null
(accepted) or the error message.
"""

import json
import sys

from airflow.dag_processing.dagbag import DagBag
from airflow.exceptions import ParamValidationError
from airflow.serialization.serialized_objects import DagSerialization

bag = DagBag(dag_folder=sys.argv[1])
served = {}
verdicts = []
for dag_id, conf in json.load(sys.stdin):
    if dag_id not in served:
        stored = json.dumps(DagSerialization.to_dict(bag.dags[dag_id]))
        served[dag_id] = DagSerialization.from_dict(json.loads(stored))
    try:
        served[dag_id].params.deep_merge(conf).validate()
        verdicts.append(None)
    except ParamValidationError as e:
        verdicts.append(str(e))
print(json.dumps(verdicts))
