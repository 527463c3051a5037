import re

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
