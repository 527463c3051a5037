"""
### CPaaS drivers

Every day at 00:00 UTC (and by hand): take the downstream build's *drivers image*, fail
loudly on its compile failures, publish its new drivers to the CPaaS cache
`cpaas/<arch>/<version>/` **without ever overwriting**, take from the caches what the
image lacks, and rebuild the CPaaS support packages.

`mirror_image` copies the image into the internal registry (the work bucket's
`images/<digest>/` on the embedded default; a skopeo pod in production); an image whose
digest the last successful run took is *unchanged* and nothing else runs. Then, mapped
per architecture: `extract_drivers` → `push_drivers` → `pull_missing` →
`build_support_packages`. `test_drivers_compilation` fails on any non-empty failure log,
without holding back push and packages. `report`, the run's watcher, gets every step's
summary and fails the run when a task failed or the image is bad (as in
`upstream_drivers`); reports stay under `reports/cpaas/<run_id>/` in the work bucket.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk import TriggerRule, chain, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from drivers.airflow import glue as glue
from drivers.domain.config import load_config
from drivers.domain.dag_ids import CPAAS_DRIVERS

if TYPE_CHECKING:
    from drivers.flows.cpaas import CpaasParams

config = load_config()


def _params() -> CpaasParams:
    from drivers.flows.cpaas import CpaasParams

    return CpaasParams.from_params(get_current_context()["params"], config)


@dag(
    dag_id=CPAAS_DRIVERS,
    schedule=config.schedules[CPAAS_DRIVERS] or None,  # "": by hand only
    params=glue.cpaas_params(config),
    tags=["drivers", "cpaas"],
    doc_md=__doc__,
    **glue.dag_policy(config),
)
def cpaas_drivers():
    if config.runtime == "kubernetes":
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

        mirror = KubernetesPodOperator(**glue.mirror_pod_kwargs(config)).output
    else:

        @task
        def mirror_image() -> list[dict]:
            from drivers.flows import cpaas

            try:
                return cpaas.mirror_image(glue.stores(), glue.run_id(), _params())
            except ValueError as e:  # a bad image or parameter: retrying cannot help
                raise AirflowFailException(str(e)) from None

        mirror = mirror_image()

    @task(multiple_outputs=False)
    def extract_drivers(target: dict) -> dict:
        from drivers.flows import cpaas

        try:
            return cpaas.extract_drivers(glue.stores(), glue.run_id(), target)
        except ValueError as e:
            raise AirflowFailException(str(e)) from None

    @task(multiple_outputs=False)
    def test_drivers_compilation(extracted: list[dict]) -> dict:
        from drivers.flows import cpaas

        found = cpaas.find_compile_failures(glue.stores(), list(extracted))
        if found["failures"]:
            raise AirflowFailException(cpaas.describe_failures(found["failures"]))
        return {"failures": 0, "empty_logs": found["empty_logs"]}

    @task(multiple_outputs=False)
    def push_drivers(extracted: dict) -> dict:
        from drivers.flows import cpaas

        return cpaas.push_drivers(glue.stores(), glue.run_id(), extracted, _params().dry_run)

    @task(multiple_outputs=False)
    def pull_missing(pushed: dict) -> dict:
        from drivers.flows import cpaas

        return cpaas.pull_missing(glue.stores(), glue.run_id(), pushed)

    @task(multiple_outputs=False)
    def build_support_packages(pulled: dict) -> dict:
        from drivers.flows import cpaas

        return cpaas.build_support_packages(glue.stores(), glue.run_id(), pulled)

    @task(trigger_rule=TriggerRule.ALL_DONE)
    def cleanup_staging() -> int:
        from drivers.flows import cpaas

        return cpaas.cleanup_staging(glue.stores(), glue.run_id())

    @task(trigger_rule=TriggerRule.ALL_DONE, retries=0, multiple_outputs=False)
    def report(steps: dict) -> dict:
        from drivers.flows import cpaas

        failed = glue.failed_tasks(get_current_context())
        return glue.watch(cpaas.report(glue.stores(), glue.run_id(), _params(), steps, failed))

    extracted = extract_drivers.expand(target=mirror)
    compiled = test_drivers_compilation(extracted)
    pushed = push_drivers.expand(extracted=extracted)
    pulled = pull_missing.expand(pushed=pushed)
    packages = build_support_packages.expand(pulled=pulled)
    # report is the last task (the run's watcher): it gets every step's summary (the
    # mapped ones: one per architecture), and its verdict is the run's state.
    verdict = report(
        {
            "mirror_image": mirror,
            "extract_drivers": extracted,
            "test_drivers_compilation": compiled,
            "push_drivers": pushed,
            "pull_missing": pulled,
            "build_support_packages": packages,
        }
    )
    chain([compiled, packages], cleanup_staging(), verdict)


cpaas_drivers()
