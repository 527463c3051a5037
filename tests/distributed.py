"""Airflow as deployed, on one machine: PostgreSQL (Debian's) as the metadata database
and the real `airflow scheduler`, `dag-processor`, `api-server` and `triggerer`
processes (LocalExecutor), driven through the REST API with token auth. For
tests/test_distributed.py and bench/bench_scheduler.py; not a test module."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from drivers.ops.embedded import BIN, EmbeddedAirflow
from drivers.store.emulator import free_port
from pipeline_env import DEBIAN_BUILDERS

PG_BIN = Path("/usr/lib/postgresql/15/bin")
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
PASSWORD = "distributed-test"
# The pipeline it runs: two host-toolchain builders, one driver version, no schedule (only
# the runs it triggers), retries for the tasks a killed scheduler leaves behind.
CONFIG = (
    """
driver_versions = ["2.3.0"]
blocklists = []
slots = 4
retries = 2
retry_delay_s = 5
[schedules]
upstream_drivers = ""
"""
    + DEBIAN_BUILDERS
)


def unavailable_reason() -> str | None:
    """Why the distributed run cannot happen here (None: it can)."""
    if not (PG_BIN / "initdb").exists():
        return "PostgreSQL 15 is not installed (scripts/host-deps.sh installs postgresql)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no postgres user (Debian's postgresql package creates it)"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (requirements.txt)"
    return None


class Postgres:
    """A private PostgreSQL cluster in a temporary folder, run as the postgres user."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="drivers-pg-"))
        self.port = free_port()

    def _as_postgres(self, *args: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=120,
        )

    def start(self) -> str:
        """Start the cluster; returns the SQLAlchemy URL of its `airflow` database."""
        os.chmod(self.root, 0o755)
        shutil.chown(self.root, "postgres", "postgres")
        data = self.root / "data"
        self._as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = self.root / "postgres.log"
        self._as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "start"
        )
        self._as_postgres(
            str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "airflow"
        )
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/airflow"

    def stop(self) -> None:
        data = self.root / "data"
        if (data / "postmaster.pid").exists():
            self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


class DistributedAirflow(EmbeddedAirflow):
    """The scheduler, DAG processor, API server and triggerer as separate processes over
    PostgreSQL; runs are triggered and watched through ``/api/v2`` with a JWT token."""

    COMPONENTS = ("scheduler", "dag-processor", "triggerer")

    def __init__(self, home: Path, heartbeat_timeout_s: int = 30, parallelism: int = 2) -> None:
        super().__init__(home=home, parallelism=parallelism)
        self.postgres = Postgres()
        self.sql_url: str | None = None
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._token: str | None = None

    def env(self) -> dict[str, str]:
        passwords = self.home / "passwords.json"
        return super().env() | {
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.sql_url or "",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__API_AUTH__JWT_SECRET": "distributed-test-secret",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(self.heartbeat_timeout_s),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            # A restarted scheduler takes over the dead one's tasks once that one's job has
            # missed its heartbeat (scheduler_health_check_threshold, 30 s) at the next
            # orphan check (default every 300 s).
            "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "10",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        }

    # --- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> DistributedAirflow:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "passwords.json").write_text(json.dumps({"admin": PASSWORD}))
        self.sql_url = self.postgres.start()
        try:
            self.prepare()
            self.start_api_server()
            for name in self.COMPONENTS:
                self.start(name)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for name in list(self.processes):
            self.kill(name, signal.SIGTERM)
        self.stop()
        self.postgres.stop()

    def start(self, component: str) -> None:
        log = open(self.home / f"{component}.log", "ab")
        self.processes[component] = subprocess.Popen(
            [str(BIN / "airflow"), component],
            env=self.env(),
            stdout=log,
            stderr=log,
            start_new_session=True,  # its own process group: it and its workers die together
        )

    def kill(self, component: str, sig: int = signal.SIGKILL) -> None:
        """Signal a component's whole process group (SIGKILL: a crash, nothing cleaned)."""
        process = self.processes.pop(component)
        if process.poll() is None:
            os.killpg(process.pid, sig)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    # --- REST API ----------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict | None = None, auth: bool = True):
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=None if body is None else json.dumps(body).encode(),
            headers=headers,
            method=method,
        )
        with OPENER.open(request, timeout=30) as response:
            return json.load(response)

    def token(self) -> str:
        if self._token is None:
            self._token = self._request(
                "POST", "/auth/token", {"username": "admin", "password": PASSWORD}, auth=False
            )["access_token"]
        return self._token

    def api(self, method: str, path: str, body: dict | None = None):
        return self._request(method, f"/api/v2{path}", body)

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> None:
        """Until the DAG processor has parsed it into the database."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.api("GET", f"/dags/{dag_id}")
                return
            except urllib.error.HTTPError as e:
                if e.code != 404 or time.monotonic() > deadline:
                    raise
            time.sleep(2)

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        self.api("PATCH", f"/dags/{dag_id}", {"is_paused": False})
        run = self.api(
            "POST", f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}}
        )
        return run["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        quoted = urllib.request.quote(run_id, safe="")
        return self.api("GET", f"/dags/{dag_id}/dagRuns/{quoted}")["state"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        quoted = urllib.request.quote(run_id, safe="")
        return self.api("GET", f"/dags/{dag_id}/dagRuns/{quoted}/taskInstances?limit=1000")[
            "task_instances"
        ]

    def wait_for_run(
        self, dag_id: str, run_id: str, timeout: float = 900, poll_s: float = 2.0
    ) -> str:
        deadline = time.monotonic() + timeout
        while (state := self.run_state(dag_id, run_id)) not in ("success", "failed"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{dag_id} {run_id} still {state} after {timeout:.0f} s")
            time.sleep(poll_s)
        return state
