import re
from pathlib import Path

import pytest

from drivers.domain.config import ConfigError, load_config
from drivers.domain.kernels import parse_kernel

GOOD = """
driver_versions = ["2.3.0"]
slots = 4
[costs]
mod = 10
[[builders]]
name = "a"
[[builders]]
name = "b"
costs = { bpf = 5 }
[[routes]]
builder = "a"
kernels = ">=5.10"
kinds = ["mod", "bpf"]
[[routes]]
builder = "b"
kernels = "*"
kinds = ["bpf"]
"""


def write(tmp_path, text):
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return path


def test_shipped_config_reproduces_the_routing_table():
    config = load_config()
    assert list(config.builders) == ["rhel7", "rhel8", "fc36"]
    route = lambda release, kind: config.route(parse_kernel(release), kind)  # noqa: E731
    assert route("5.10.0-20-amd64", "mod") == "fc36"
    assert route("6.0.7-301.fc37.x86_64", "bpf") == "fc36"
    assert route("5.4.0-62-generic", "bpf") == "rhel7"
    assert route("5.4.0-62-generic", "mod") == "rhel8"
    assert route("4.18.0-305.el8.x86_64", "mod") == "rhel8"
    assert route("3.10.0-1160.el7.x86_64", "mod") == "rhel7"
    assert route("3.10.0-1160.el7.x86_64", "bpf") == "rhel7"
    assert route("2.6.32-754.el6.x86_64", "mod") is None
    assert config.slots == 90 and config.costs.shard_startup == 60


EMBEDDED = Path(__file__).resolve().parents[1] / "include/drivers/config/embedded.toml"


def test_the_embedded_default_routes_each_debian_release_to_its_own_builder():
    config, production = load_config(EMBEDDED), load_config()
    assert list(config.builders) == ["bullseye", "bookworm", "trixie"]
    route = lambda release: config.route(parse_kernel(release), "mod")  # noqa: E731
    assert route("5.10.0-46-amd64") == route("6.1.0-0.deb11.52-amd64") == "bullseye"
    assert route("6.1.0-56-cloud-amd64") == route("6.12.115+deb12-amd64") == "bookworm"
    assert route("6.12.118+deb13-cloud-amd64") == "trixie"
    assert route("4.19.0-27-amd64") is None and route("4.18.0-305.el8.x86_64") is None
    # What it does not say is the production config's (its base), blocklists included.
    assert (config.runtime, config.slots, config.costs.shard_startup) == ("docker", 4, 5)
    assert config.costs.task == production.costs.task and config.docker["time_limit_s"] == 3600
    assert config.docker["pids_limit"] == production.docker["pids_limit"]
    assert config.kubernetes == production.kubernetes and config.vm_tests == production.vm_tests
    assert config.blocklist_paths == production.blocklist_paths
    assert config.driver_versions == production.driver_versions


def test_a_base_replaces_values_and_arrays_merges_tables_and_never_loops(tmp_path):
    (tmp_path / "BLOCKLIST").write_text("")
    write(tmp_path, 'blocklists = ["BLOCKLIST"]\n' + GOOD)
    child = tmp_path / "child" / "child.toml"
    child.parent.mkdir()
    child.write_text(
        'base = "../pipeline.toml"\nslots = 2\n[costs]\nbpf = 7\n'
        '[[builders]]\nname = "b"\n[[routes]]\nbuilder = "b"\nkernels = "*"\nkinds = ["mod"]\n'
    )
    config = load_config(child)
    assert config.slots == 2 and list(config.builders) == ["b"]
    assert config.costs.task == {"mod": 10.0, "bpf": 7.0}  # [costs] merged
    assert config.blocklist_paths == (tmp_path / "BLOCKLIST",)  # relative to the file naming it
    loop = tmp_path / "loop.toml"
    loop.write_text('base = "loop.toml"\n')
    with pytest.raises(ConfigError, match="leads back to itself"):
        load_config(loop)
    missing = tmp_path / "orphan.toml"
    missing.write_text('base = "nowhere.toml"\n')
    with pytest.raises(ConfigError, match="cannot read config .*nowhere.toml"):
        load_config(missing)


def test_config_is_selected_by_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DRIVERS_CONFIG", str(write(tmp_path, GOOD)))
    config = load_config()
    assert list(config.builders) == ["a", "b"] and config.slots == 4
    assert config.builders["a"].task_costs == {"mod": 10.0, "bpf": 60.0}
    assert config.builders["b"].task_costs == {"mod": 10.0, "bpf": 5.0}
    assert config.route(parse_kernel("4.4.0-1-generic"), "mod") is None


@pytest.mark.parametrize(
    "change, message",
    [
        (('kinds = ["bpf"]', 'kinds = ["ko"]'), r"routes\[1\] \(b\): unknown kind"),
        (('name = "b"', 'name = "a"'), "builder 'a' is defined twice"),
        (('kernels = "*"', 'kernels = " "'), r"routes\[1\] \(b\): empty kernel selector"),
        (('builder = "b"', 'builder = "c"'), r"builder 'c' is not one of \['a', 'b'\]"),
        (('kernels = "*"', 'kernels = "6.0..5.0"'), r"routes\[1\] \(b\)"),
        (('["2.3.0"]', '["2.3"]'), "driver version '2.3'"),
        (("slots = 4", "slots = 0"), "slots must be a positive integer"),
        (("slots = 4", 'slots = 4\nruntime = "podman"'), "runtime 'podman' is not one of"),
        (("slots = 4", "slots = 4\nquarantine_after = -1"), "quarantine_after must be an int"),
        (
            ("slots = 4", "slots = 4\n[backfill]\nslots = 0"),
            r"backfill.slots must be an integer >= 1",
        ),
        (("slots = 4", "slots = 4\n[claims]\nttl = 5"), r"claims: unknown key\(s\) \['ttl'\]"),
        (("mod = 10", "mod = -1"), "costs.mod must be a number"),
        (('builder = "b"\n', 'builder = "a"\n'), r"builder\(s\) \['b'\] have no route"),
    ],
)
def test_invalid_config_names_the_problem(tmp_path, change, message):
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(ConfigError, match=message) as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_unreadable_or_malformed_config_is_named(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config .*missing.toml"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "slots = = 3"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('cpaas_drivers = "0 0 * * *"', 'nightly = "0 2 * * *"'), "unknown DAG(s) ['nightly']"),
        (('upstream_drivers = "0 2 * * *"', 'upstream_drivers = "2am"'), "a cron expression"),
    ],
)
def test_schedules_are_checked(tmp_path, change, message):
    from drivers.domain.config import ConfigError, default_config_path, load_config

    path = tmp_path / "pipeline.toml"
    shipped = default_config_path().read_text()
    path.write_text(shipped.replace(*change))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)
    path.write_text(shipped)
    assert load_config(path).schedules["upstream_drivers"] == "0 2 * * *"
