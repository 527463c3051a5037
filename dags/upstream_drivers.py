"""
### Upstream drivers

Every night at 02:00 UTC (and by hand): find the kernels in the bundle bucket that lack
drivers, build them on the right toolchain, verify them, publish them to the driver
cache **without ever overwriting** what agents already download, and refresh the
support packages.

`pre_build` plans (candidates − done − claimed by a run in flight − blocked −
unroutable) and writes one shard file per builder pod → one task group per builder,
mapped over its shards → `unify` merges the build records → `verify_drivers` checks
every staged object → `integration_tests` boots each kernel that got new drivers under
QEMU and loads them there (`vm_tests`: enforce holds back what the kernel refuses) →
`push_drivers` promotes what passed → `update_support_packages` → `record_ledger` →
`cleanup_staging` → `report` fails the run when an infrastructure step failed or
failures (compile, refused by the kernel) exceed `max_failures`.
`cleanup_staging` always runs; a run that fails or is marked failed (cancelled) also
has its pods deleted by label and its staging removed (plugins/drivers_teardown.py).
Reports stay in the work bucket under `reports/<run_id>/`.

The DAG's shape (builders, runtime) comes from the shipped config (`DRIVERS_CONFIG`,
`DRIVERS_RUNTIME`), never from trigger parameters. `backfill_drivers` is built by the
same factory below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk import TriggerRule, chain, dag, get_current_context, task, task_group
from airflow.sdk.exceptions import AirflowFailException

from drivers.airflow import glue as glue
from drivers.domain.config import load_config
from drivers.domain.dag_ids import BACKFILL_DRIVERS, UPSTREAM_DRIVERS

if TYPE_CHECKING:
    from drivers.flows.upstream import RunParams

BACKFILL_DOC = """
### Backfill drivers

A kernel-range backfill, by hand only: the same pipeline as `upstream_drivers` (one
factory in `dags/upstream_drivers.py` builds both, so they cannot drift apart) for the
kernels a **required** selector names, e.g. `el8:4.18.0-305..4.18.0-372`. It **dry-runs
by default**: `pre_build`'s log and the run's report show the plan (tasks per builder
and kind, first kernels, estimated pod-hours and makespan) and nothing is built; trigger
again with `dry_run: false` to build. What the cache holds is never rebuilt unless
`force`.

It neither starves nor collides with the nightly: its builder tasks take slots of their
own pool `backfill_builders` (`[backfill] slots`, which its plan is balanced over),
never of `builders`; its tasks weigh less (`priority_weight` 1 against 10, weight rule
absolute) where both DAGs wait for the same executor slots; one backfill runs at a
time; and every run plans under one lock, leaving out the tasks another run in flight
claimed (`drivers.store.claims`), so no driver is planned twice.
"""

config = load_config()  # a local TOML file: cheap, and the DAGs' shape depends on it
# drivers.flows.upstream (and google-cloud-storage) is imported inside tasks: parsing stays cheap.


def _params() -> RunParams:
    from drivers.flows.upstream import RunParams

    return RunParams.from_params(get_current_context()["params"], config)


def drivers_dag(dag_id: str):
    """One DAG of the pipeline: the nightly ``upstream_drivers`` or the by-hand
    ``backfill_drivers`` (no schedule, selector required, dry run by default, its own
    builder pool, a lower priority). Same tasks, same order."""
    backfill = dag_id == BACKFILL_DRIVERS
    policy = glue.dag_policy(config)
    policy["default_args"] |= {
        "priority_weight": glue.PRIORITY_WEIGHTS[dag_id],
        "weight_rule": "absolute",  # the weight above, whatever the DAG's shape
    }
    pool = glue.BUILDER_POOLS[dag_id]
    run_config = glue.run_config(config, dag_id)  # a backfill plans over its pool's slots

    @dag(
        dag_id=dag_id,
        schedule=None if backfill else (config.schedules[dag_id] or None),  # "": by hand
        params=glue.run_params(config, backfill=backfill),
        tags=["drivers", "upstream", "backfill"] if backfill else ["drivers", "upstream"],
        doc_md=BACKFILL_DOC if backfill else __doc__,
        **policy,
    )
    def pipeline():
        @task(multiple_outputs=False)
        def pre_build() -> dict:
            from drivers.domain.planview import format_plan_view
            from drivers.flows import upstream

            try:
                params = _params()
                planned = upstream.pre_build(glue.stores(), run_config, glue.run_id(), params)
            except (upstream.ShrinkGuardError, ValueError) as e:  # bad input: no retry
                raise AirflowFailException(str(e)) from None
            print(format_plan_view(planned["plan_view"], params.dry_run))  # the task log
            return planned

        plan = pre_build()

        builder_groups = []
        for builder in config.builders:

            @task_group(group_id=builder)
            def build(plan: dict, builder: str = builder):
                @task
                def shards(plan: dict, builder: str) -> list[str]:
                    return plan["shards"].get(builder, [])

                shard_uris = shards(plan, builder)
                if config.runtime == "kubernetes":
                    from airflow.providers.cncf.kubernetes.operators.pod import (
                        KubernetesPodOperator,
                    )

                    return KubernetesPodOperator.partial(
                        **glue.builder_pod_kwargs(config, builder, pool)
                    ).expand(arguments=shard_uris.map(glue.builder_arguments))

                # docker: the worker stages the inputs, runs the shard in its sandboxed
                # container (no network) and uploads what it built; local: a subprocess.
                @task(pool=pool)
                def build_shard(shard: str, builder: str = builder) -> None:
                    glue.run_shard(config, builder, shard)

                return build_shard.expand(shard=shard_uris)

            builder_groups.append(build(plan))

        @task(trigger_rule=TriggerRule.ALL_DONE, multiple_outputs=False)
        def unify(plan: dict | None) -> dict:
            from drivers.flows import upstream

            if plan is None:
                raise AirflowFailException("pre_build produced no plan")
            return upstream.unify(glue.stores(), glue.run_id(), plan["shards"])

        @task(multiple_outputs=False)
        def verify_drivers() -> dict:
            from drivers.flows import upstream

            return upstream.verify_drivers(glue.stores(), glue.run_id())

        if config.runtime == "kubernetes":
            from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

            tested = KubernetesPodOperator(**glue.vm_test_pod_kwargs(config)).output
        else:

            @task(multiple_outputs=False)
            def integration_tests() -> dict:
                from drivers.flows import upstream

                return upstream.integration_tests(
                    glue.stores(), glue.run_id(), _params(), config.vm_tests
                )

            tested = integration_tests()

        @task(multiple_outputs=False)
        def push_drivers() -> dict:
            from drivers.flows import upstream

            return upstream.push_drivers(glue.stores(), glue.run_id())

        @task(multiple_outputs=False)
        def update_support_packages(plan: dict) -> dict:
            from drivers.flows import upstream

            if _params().dry_run:  # plan and report only: publish nothing
                return {"dry_run": True}
            # the versions pre_build resolved (an empty choice: the run-time config's)
            return upstream.update_support_packages(glue.stores(), plan["driver_versions"])

        @task(trigger_rule=TriggerRule.ALL_DONE, retries=0, multiple_outputs=False)
        def report(steps: dict) -> dict:
            from drivers.flows import upstream

            failed = glue.failed_tasks(get_current_context())
            verdict = upstream.report(glue.stores(), glue.run_id(), _params(), steps, failed)
            return glue.watch(verdict)

        @task(trigger_rule=TriggerRule.ALL_DONE, multiple_outputs=False)
        def record_ledger() -> dict:
            from drivers.flows import upstream

            return upstream.record_ledger(glue.stores(), glue.run_id())

        @task(trigger_rule=TriggerRule.ALL_DONE)
        def cleanup_staging() -> int:
            from drivers.flows import upstream

            return upstream.cleanup_staging(glue.stores(), glue.run_id())

        unified = unify(plan)
        verified = verify_drivers()
        pushed = push_drivers()
        packages = update_support_packages(plan)
        recorded = record_ledger()
        # report is the last task (the run's watcher): it gets every step's summary, and
        # its verdict is the run's state.
        verdict = report(
            {
                "pre_build": plan,
                "unify": unified,
                "verify_drivers": verified,
                "integration_tests": tested,
                "push_drivers": pushed,
                "update_support_packages": packages,
                "record_ledger": recorded,
            }
        )
        chain(
            plan,
            builder_groups,
            unified,
            verified,
            tested,
            pushed,
            packages,
            recorded,
            cleanup_staging(),
            verdict,
        )
        if config.vm_tests["external_suite"]:  # the agent images' own integration suite
            from airflow.providers.standard.operators.trigger_dagrun import (
                TriggerDagRunOperator,
            )

            trigger_external_suite = TriggerDagRunOperator(
                task_id="trigger_external_suite",
                trigger_dag_id=config.vm_tests["external_suite"],
                conf={"upstream_run_id": "{{ run_id }}", "push": pushed},
            )
            chain(pushed, trigger_external_suite, verdict)

    return pipeline()


upstream_drivers = drivers_dag(UPSTREAM_DRIVERS)
backfill_drivers = drivers_dag(BACKFILL_DRIVERS)
