"""The run's steps without Airflow: parameters, shard names, the shrink guard."""

import dataclasses

import pytest

from drivers.domain import layout
from drivers.domain.config import load_config
from drivers.domain.errors import RunInputError
from drivers.domain.kernels import parse_kernel
from drivers.domain.selectors import SelectorError
from drivers.flows import upstream
from drivers.store.storage import Stores, write_json


@pytest.fixture
def config():
    return load_config()


def test_run_params_default_to_the_config(config):
    params = upstream.RunParams.from_params({}, config)
    assert params.driver_versions == ()  # the run-time config's, resolved by pre_build
    assert params.kinds == ("mod", "bpf") and params.max_failures == 0 and not params.force


def test_run_versions_come_from_the_run_time_config(store, config):
    from drivers.store.runtime_config import load_runtime_config

    work = store()
    runtime = load_runtime_config(work, config)  # nothing set: as shipped
    default = upstream.RunParams.from_params({}, config)
    assert upstream.run_versions(default, runtime) == config.driver_versions
    work.put("config/driver-versions", b"2.3.0\n2.5.0\n")  # 8.1.0 retired, 2.5.0 added
    runtime = load_runtime_config(work, config)
    assert upstream.run_versions(default, runtime) == ("2.3.0", "2.5.0")
    typed = upstream.RunParams.from_params({"driver_versions": ["2.5.0"]}, config)
    assert upstream.run_versions(typed, runtime) == ("2.5.0",)
    retired = upstream.RunParams.from_params({"driver_versions": ["8.1.0"]}, config)
    with pytest.raises(RunInputError) as e:
        upstream.run_versions(retired, runtime)
    assert "['8.1.0'] are not in the run-time config" in str(e.value)
    assert "drivers config add driver-versions 8.1.0" in str(e.value)


@pytest.mark.parametrize(
    "given, error, words",
    [
        ({"driver_versions": ["2.3"]}, ValueError, "driver version '2.3'"),
        ({"kinds": ["ko"]}, ValueError, "unknown kind"),
        ({"builders": ["rhel9"]}, RunInputError, "configured are ['rhel7'"),
        ({"select": "4.18.0-372..4.18.0-305"}, SelectorError, "comes after its end"),
        ({"max_failures": -1}, RunInputError, "max_failures"),
    ],
)
def test_bad_run_params_say_what_is_wrong(config, given, error, words):
    with pytest.raises(error) as e:
        upstream.RunParams.from_params(given, config)
    assert words in str(e.value)


def test_shard_object_names_round_trip():
    name = layout.shard_object("manual__2026-11-25T02:00:00+00:00", "fc36", 17)
    assert layout.shard_from_object(f"gs://work/{name}") == ("fc36", 17)


def test_shrink_guard_names_the_missing_kernels(store, config):
    work = store()
    buckets = dataclasses.replace(layout.Buckets.from_env(), work=work.bucket_name)
    stores = Stores(work.client, buckets)
    kernels = [parse_kernel(f"5.4.0-{i}-generic") for i in range(1, 101)]
    assert upstream.check_shrink(stores, kernels, config) == {"reference": None, "missing": 0}
    write_json(
        work, upstream.STATE_OBJECT, {"run_id": "r1", "kernels": [k.release for k in kernels]}
    )
    # 2 % of 100 may go (a kernel retired on purpose); 3 may not
    assert upstream.check_shrink(stores, kernels[2:], config)["missing"] == 2
    with pytest.raises(upstream.ShrinkGuardError) as e:
        upstream.check_shrink(stores, kernels[3:], config)
    message = str(e.value)
    assert "5.4.0-1-generic, 5.4.0-2-generic, 5.4.0-3-generic" in message
    assert "r1" in message and "accept_shrink" in message
