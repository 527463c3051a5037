"""EmbeddedGCS lifecycle, each test with its own server and root (not the session one)."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from drivers.store.emulator import EmbeddedGCS, EmulatorError, free_port


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedGCS]:
    gcs = EmbeddedGCS(tmp_path / "gcs", port=free_port())
    try:
        yield gcs
    finally:
        gcs.stop()


def client_for(gcs: EmbeddedGCS) -> storage.Client:
    return storage.Client(
        credentials=AnonymousCredentials(),
        project="embedded",
        client_options={"api_endpoint": gcs.url},
    )


def recorded_pid(gcs: EmbeddedGCS) -> int:
    return int((gcs.root / "server.pid").read_text())


def accepts_connections(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_default_root_comes_from_drivers_gcs_root(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("DRIVERS_GCS_ROOT", str(tmp_path / "elsewhere"))
    assert EmbeddedGCS().root == tmp_path / "elsewhere"
    monkeypatch.delenv("DRIVERS_GCS_ROOT")
    monkeypatch.chdir(tmp_path)
    assert EmbeddedGCS().root == tmp_path / ".gcs"


def test_ensure_running_twice_reuses_the_same_server(server: EmbeddedGCS):
    server.ensure_running()
    pid = recorded_pid(server)

    server.ensure_running()
    # Another process or object on the same root adopts the server and its port.
    other = EmbeddedGCS(server.root, port=free_port()).ensure_running()

    assert recorded_pid(server) == pid
    assert other.port == server.port and other.url == server.url
    assert other.is_running() and server.is_running()
    assert server.env() == {"STORAGE_EMULATOR_HOST": server.url}


def test_server_outlives_the_command_that_started_it(server: EmbeddedGCS):
    # A shell that starts the server, then is interrupted like a Ctrl-C'd terminal command:
    # the signal goes to its whole process group, which must not include the server.
    start = (
        "from drivers.store.emulator import EmbeddedGCS;"
        f"EmbeddedGCS({str(server.root)!r}, port={server.port}).ensure_running()"
    )
    command = f"{shlex.quote(sys.executable)} -c {shlex.quote(start)} && touch started && sleep 60"
    shell = subprocess.Popen(["sh", "-c", command], cwd=server.root.parent, start_new_session=True)
    deadline = time.monotonic() + 30
    while not (server.root.parent / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(shell.pid, signal.SIGINT)
    os.killpg(shell.pid, signal.SIGTERM)
    shell.wait(timeout=10)

    assert server.is_running()
    server.create_buckets(["outlived"])
    assert [b.name for b in client_for(server).list_buckets()] == ["outlived"]


def test_data_persists_across_stop_and_start(server: EmbeddedGCS):
    server.ensure_running()
    server.create_buckets(["persisted"])
    client_for(server).bucket("persisted").blob("2.3.0/a.ko.gz").upload_from_string(b"kept")

    server.stop()
    assert not server.is_running()
    server.port = free_port()  # a different port on purpose: the data is in the root
    server.ensure_running()

    blob = client_for(server).bucket("persisted").get_blob("2.3.0/a.ko.gz")
    assert blob is not None and blob.download_as_bytes() == b"kept"


def test_create_buckets_is_idempotent(server: EmbeddedGCS):
    server.ensure_running()
    server.create_buckets(["one", "two"])
    server.create_buckets(["two", "three"])
    assert sorted(b.name for b in client_for(server).list_buckets()) == ["one", "three", "two"]


def test_stop_leaves_no_process_and_no_listener(server: EmbeddedGCS):
    server.ensure_running()
    pid = recorded_pid(server)
    assert accepts_connections(server.port)

    server.stop()

    assert not Path(f"/proc/{pid}").exists()
    assert not accepts_connections(server.port)
    assert not server.is_running()
    assert not (server.root / "server.pid").exists()
    server.stop()  # stopping a stopped server is a no-op


def test_a_stale_pid_file_naming_another_process_is_not_adopted(server: EmbeddedGCS):
    server.root.mkdir(parents=True)
    (server.root / "server.pid").write_text(f"{os.getpid()}\n")  # alive, but not a server
    (server.root / "server.port").write_text("1\n")

    assert not server.is_running()
    server.ensure_running()

    assert recorded_pid(server) != os.getpid()
    assert accepts_connections(server.port)


def test_start_failure_quotes_the_server_log(server: EmbeddedGCS):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", server.port))
        squatter.listen()
        with pytest.raises(EmulatorError, match=r"(?s)exited during start-up.*server\.log.*in use"):
            server.ensure_running()
    assert not server.is_running()
