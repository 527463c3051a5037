"""Run-time config (driver versions, blocklist lines, quarantine releases) read from the
work bucket, against the real fake-gcs-server."""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from drivers.domain.config import Config, load_config
from drivers.ops import cli
from drivers.store.runtime_config import (
    PARTS,
    RuntimeConfigConflict,
    RuntimeConfigError,
    add_line,
    load_runtime_config,
    object_name,
    read_part,
    write_part,
)
from drivers.store.storage import BucketNotFound, ObjectStore

ObjectStoreFactory = Callable[..., ObjectStore]


@pytest.fixture
def work(store: ObjectStoreFactory) -> ObjectStore:
    return store()


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """The shipped config with one shipped blocklist rule, to see both sources at once."""
    shipped = tmp_path / "BLOCKLIST"
    shipped.write_text("# shipped\n*dockerdesktop* * bpf\n")
    return dataclasses.replace(load_config(), blocklist_paths=(shipped,))


@pytest.fixture
def env(work: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> ObjectStore:
    """The CLI's environment: the work bucket is the test's bucket."""
    monkeypatch.setenv("DRIVERS_BUCKET_WORK", work.bucket_name)
    return work


def put(work: ObjectStore, part: str, text: str) -> None:
    work.put(object_name(part), text.encode())


def uri(work: ObjectStore, part: str) -> str:
    return f"gs://{work.bucket_name}/config/{part}"


# --- loading -----------------------------------------------------------------------------


def test_nothing_set_means_the_shipped_config(work, config):
    rc = load_runtime_config(work, config)
    assert rc.driver_versions == config.driver_versions == ("2.3.0", "8.1.0")
    assert [r.where for r in rc.blocklist.rules] == ["BLOCKLIST:2"]
    assert rc.quarantine_release.rules == []
    assert rc.origins == dict.fromkeys(PARTS, "shipped")


def test_a_version_added_and_one_retired(work, config):
    put(work, "driver-versions", "# what we build\n2.4.0-rc1\n2.5.0  # new\n")
    rc = load_runtime_config(work, config)
    assert rc.driver_versions == ("2.4.0-rc1", "2.5.0")
    generation = work.info("config/driver-versions").generation
    assert rc.origins["driver-versions"] == f"{uri(work, 'driver-versions')}#{generation}"
    assert rc.origins["blocklist"] == "shipped"


def test_a_blocklist_line_added_matches_with_its_object_and_line(work, config):
    put(work, "blocklist", "# added by ops\n\n5.4.0-1*-aws 2.3.0 mod\n")
    rc = load_runtime_config(work, config)
    rule = rc.blocklist.match("5.4.0-1045-aws", "2.3.0", "mod")
    assert rule is not None and rule.where == f"{uri(work, 'blocklist')}:3"
    assert rc.blocklist.match("5.4.0-1045-aws", "2.3.0", "bpf") is None
    shipped = rc.blocklist.match("6.1.0-dockerdesktop", "2.3.0", "bpf")
    assert shipped is not None and shipped.where == "BLOCKLIST:2"  # shipped rules still apply


def test_quarantine_release_rules_name_released_tasks(work, config):
    put(work, "quarantine-release", "6.1.0-56-amd64 2.3.0 mod\n")
    rc = load_runtime_config(work, config)
    assert rc.quarantine_release.match("6.1.0-56-amd64", "2.3.0", "mod").line == 1
    assert rc.quarantine_release.match("6.1.0-56-amd64", "2.3.0", "bpf") is None
    assert rc.blocklist.match("6.1.0-56-amd64", "2.3.0", "mod") is None


@pytest.mark.parametrize(
    ("part", "text", "line", "what"),
    [
        ("driver-versions", "2.3.0\nv2.5\n", 2, "neither semver"),
        ("driver-versions", "2.3.0 2.5.0\n", 1, "one per line"),
        ("driver-versions", "2.3.0\n2.3.0\n", 2, "already listed at line 1"),
        ("blocklist", "# ok\n5.4.0-1* 2.3.0 mod extra\n", 2, "4 fields"),
        ("quarantine-release", "6.1.0-56-amd64 2.3.0 ko\n", 1, "matches neither mod nor bpf"),
    ],
)
def test_a_malformed_object_fails_the_load_naming_object_and_line(
    work, config, part, text, line, what
):
    put(work, "blocklist", "5.4.0-1* 2.3.0 mod\n")  # a good part beside it changes nothing
    put(work, part, text)
    with pytest.raises(RuntimeConfigError) as e:
        load_runtime_config(work, config)
    message = str(e.value)
    assert f"{uri(work, part)}:{line}: " in message and what in message
    assert f"drivers config set {part} FILE" in message  # what to do


def test_an_empty_versions_object_is_an_error_not_an_empty_build(work, config):
    put(work, "driver-versions", "# everything retired by mistake\n\n")
    with pytest.raises(RuntimeConfigError, match="lists no driver version"):
        load_runtime_config(work, config)


def test_a_missing_work_bucket_is_an_error_not_the_shipped_config(work, config):
    gone = ObjectStore(work.client, work.bucket_name + "-missing")
    with pytest.raises(BucketNotFound):
        load_runtime_config(gone, config)


# --- writing -----------------------------------------------------------------------------


def test_a_write_checks_the_generation_it_read(work, config):
    before = read_part(work, "blocklist")
    assert before.text is None and before.generation == 0
    first = write_part(work, "blocklist", "a-kernel\n", before.generation)
    with pytest.raises(RuntimeConfigConflict, match="changed since it was read"):
        write_part(work, "blocklist", "b-kernel\n", before.generation)  # absent no more
    second = write_part(work, "blocklist", "a-kernel\nc-kernel\n", first)
    with pytest.raises(RuntimeConfigConflict, match=f"generation {first}"):
        write_part(work, "blocklist", "d-kernel\n", first)
    assert read_part(work, "blocklist").text == "a-kernel\nc-kernel\n"
    assert read_part(work, "blocklist").generation == second


def test_add_starts_from_the_shipped_versions(work, config):
    number, _ = add_line(work, "driver-versions", "2.5.0", config)
    assert number == 3
    assert load_runtime_config(work, config).driver_versions == ("2.3.0", "8.1.0", "2.5.0")


def test_add_refuses_a_concurrent_change(work, config, monkeypatch):
    put(work, "blocklist", "a-kernel\n")
    real_put = ObjectStore.put_if_generation

    def someone_else_writes_first(self, name, data, generation, content_type=None):
        self.put(name, b"a-kernel\nb-kernel\n")  # between our read and our write
        return real_put(self, name, data, generation, content_type)

    monkeypatch.setattr(ObjectStore, "put_if_generation", someone_else_writes_first)
    with pytest.raises(RuntimeConfigConflict, match="nothing was written"):
        add_line(work, "blocklist", "c-kernel", config)
    assert work.download("config/blocklist") == b"a-kernel\nb-kernel\n"


# --- the CLI -----------------------------------------------------------------------------


def test_cli_show_get_set_add(env, tmp_path, capsys, monkeypatch):
    work = env
    assert cli.main(["config", "get", "driver-versions"]) == 0
    out, err = capsys.readouterr()
    assert out == "2.3.0\n8.1.0\n" and "is not set" in err

    versions = tmp_path / "versions"
    versions.write_text("2.4.0-rc1\n2.5.0\n")
    assert cli.main(["config", "set", "driver-versions", str(versions)]) == 0
    assert work.download("config/driver-versions") == b"2.4.0-rc1\n2.5.0\n"

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"5.4.0-1* 2.3.0 mod\n")))
    assert cli.main(["config", "set", "blocklist", "-"]) == 0
    assert cli.main(["config", "add", "blocklist", "*-rt-amd64 * bpf"]) == 0
    capsys.readouterr()

    assert cli.main(["config", "get", "blocklist"]) == 0
    out, err = capsys.readouterr()
    generation = work.info("config/blocklist").generation
    assert out == "5.4.0-1* 2.3.0 mod\n*-rt-amd64 * bpf\n"
    assert f"{uri(work, 'blocklist')}#{generation}" in err

    assert cli.main(["config", "show"]) == 0
    out, _ = capsys.readouterr()
    assert f"driver-versions     {uri(work, 'driver-versions')}#" in out
    assert f"{uri(work, 'blocklist')}:2  *-rt-amd64 * bpf" in out
    assert "quarantine-release  shipped" in out

    assert cli.main(["config", "show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["driver_versions"] == ["2.4.0-rc1", "2.5.0"]
    assert shown["origins"]["blocklist"] == f"{uri(work, 'blocklist')}#{generation}"
    assert shown["blocklist"][-1] == {
        "where": f"{uri(work, 'blocklist')}:2",
        "rule": "*-rt-amd64 * bpf",
    }


@pytest.mark.parametrize(
    ("part", "text", "where"),
    [
        ("driver-versions", "2.3.0\n2.x\n", "config/driver-versions:2"),
        ("driver-versions", "# nothing\n", "config/driver-versions: lists no driver version"),
        ("blocklist", "a b c d\n", "config/blocklist:1: 4 fields"),
    ],
)
def test_cli_set_refuses_a_bad_file_and_writes_nothing(env, tmp_path, capsys, part, text, where):
    work = env
    bad = tmp_path / "bad"
    bad.write_text(text)
    assert cli.main(["config", "set", part, str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"gs://{work.bucket_name}/{where}" in err and "nothing was written" in err
    assert not work.exists(object_name(part))


def test_cli_add_refuses_a_bad_line_and_keeps_the_object(env, capsys):
    work = env
    put(work, "blocklist", "a-kernel\n")
    assert cli.main(["config", "add", "blocklist", "k 2.3.0 mod extra"]) == 2
    assert f"{uri(work, 'blocklist')}:2: 4 fields" in capsys.readouterr().err
    assert work.download("config/blocklist") == b"a-kernel\n"


def test_cli_set_with_a_stale_generation_is_refused(env, tmp_path, capsys):
    work = env
    put(work, "blocklist", "a-kernel\n")
    seen = work.info("config/blocklist").generation
    put(work, "blocklist", "a-kernel\nb-kernel\n")  # someone else, after our `config get`
    mine = tmp_path / "mine"
    mine.write_text("a-kernel\nc-kernel\n")
    assert cli.main(["config", "set", "blocklist", str(mine), "--if-generation", str(seen)]) == 2
    assert "changed since it was read" in capsys.readouterr().err
    assert work.download("config/blocklist") == b"a-kernel\nb-kernel\n"
