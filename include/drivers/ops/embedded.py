"""The embedded default's Airflow: run a DAG for real on one machine.

`airflow dags test --use-executor` runs the DAG with the LocalExecutor (shards really run
in parallel) on SQLite; its tasks talk to an `airflow api-server` started here. Everything
lives under one AIRFLOW_HOME (default `.airflow/`, git-ignored). The buckets are the
embedded GCS (:mod:`drivers.store.emulator`), reached through an anonymous
`google_cloud_platform` connection given by environment variable.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from drivers.domain.config import builder_pools, load_config
from drivers.domain.errors import DriversError
from drivers.store.emulator import free_port

REPO = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent  # the venv's bin: airflow and drivers
READY_TIMEOUT = 90.0
EXIT_GRACE = 20.0  # seconds `dags test` may take to exit after its run ended
POLL_S = 2.0
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class RunTimeout(DriversError):
    pass


FINAL_TASK_STATES = ("success", "failed", "upstream_failed", "skipped", "removed")


class _TaskWatcher:
    """Says each task instance once, when it reaches a final state."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.seen: set[tuple[str, int]] = set()

    def poll(self, task_instances: list[dict]) -> None:
        done = [t for t in task_instances if t.get("state") in FINAL_TASK_STATES]
        for t in sorted(done, key=lambda t: t.get("end_date") or ""):
            key = (t["task_id"], t.get("map_index", -1))
            if key in self.seen:
                continue
            self.seen.add(key)
            name = t["task_id"] + (f"[{key[1]}]" if key[1] >= 0 else "")
            took = f" in {t['duration']:.0f} s" if t.get("duration") else ""
            self.say(f"  {name}: {t['state']}{took}")


class EmbeddedAirflow:
    def __init__(
        self,
        home: Path | str | None = None,
        dags_folder: Path | None = None,
        parallelism: int = 4,
        port: int | None = None,
    ) -> None:
        self.home = Path(home or os.environ.get("DRIVERS_AIRFLOW_HOME", REPO / ".airflow"))
        self.home = self.home.absolute()
        self.dags_folder = dags_folder or REPO / "dags"
        self.parallelism = parallelism
        self.port = port or free_port()
        self._api: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env |= {
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.port}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": env.get(
                "AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING"
            ),
            "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": json.dumps(
                {"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True}}
            ),
            "PATH": f"{BIN}:{env.get('PATH', '')}",  # tasks run `python -m drivers`
        }
        return env

    def airflow(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        command = [str(BIN / "airflow"), *args]
        result = subprocess.run(command, env=self.env(), check=False, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {result.returncode}")
        return result

    def prepare(self) -> None:
        """Metadata database and the builder pools (``builders`` sized from the config's
        slots, ``backfill_builders`` from [backfill] slots); skipped (7 s) when this home
        was already prepared by the same Airflow for the same pools."""
        from importlib.metadata import version

        self.home.mkdir(parents=True, exist_ok=True)
        pools = builder_pools(load_config())
        stamp = self.home / ".prepared"
        sizes = " ".join(f"{name} {size}" for name, size in pools.items())
        wanted = f"airflow {version('apache-airflow')} pools {sizes}\n"
        if (self.home / "airflow.db").exists() and stamp.exists() and stamp.read_text() == wanted:
            return
        log = open(self.home / "setup.log", "ab")
        self.airflow("db", "migrate", stdout=log, stderr=log)
        for name, size in pools.items():
            self.airflow(
                "pools",
                "set",
                name,
                str(size),
                "builder pods/processes (config: slots, [backfill] slots)",
                "--include-deferred",
                stdout=log,
                stderr=log,
            )
        stamp.write_text(wanted)

    def start_api_server(self) -> None:
        log = open(self.home / "api-server.log", "ab")
        self._api = subprocess.Popen(
            [str(BIN / "airflow"), "api-server", "--port", str(self.port)],
            env=self.env(),
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self._api.poll() is not None:
                raise RuntimeError(f"airflow api-server exited; see {self.home}/api-server.log")
            try:
                _OPENER.open(f"http://127.0.0.1:{self.port}/api/v2/version", timeout=2).close()
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"airflow api-server not ready after {READY_TIMEOUT:.0f} s")

    def api_alive(self) -> bool:
        return self._api is not None and self._api.poll() is None

    def stop(self) -> None:
        if self._api and self._api.poll() is None:
            os.killpg(self._api.pid, signal.SIGTERM)
            try:
                self._api.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self._api.pid, signal.SIGKILL)
                self._api.wait()
        self._api = None

    def dags_test(
        self,
        dag_id: str,
        conf: dict | None = None,
        log: Path | None = None,
        timeout: float | None = None,
        use_executor: bool = True,
        progress: Callable[[str], None] | None = None,
    ) -> int:
        """Run one DAG run to its end; the exit status says whether it succeeded.
        ``use_executor=False`` runs its tasks one at a time inside `dags test` (what
        ``dag.test()`` does), without LocalExecutor workers.

        `airflow dags test --use-executor` sometimes never exits: a LocalExecutor worker
        misses its shutdown message and ``LocalExecutor.end()`` joins it forever, after
        the run has ended. So the run's state is also watched through the API server;
        once it is final and the process has had ``EXIT_GRACE`` seconds to exit, the
        process group is killed and the state decides. After ``timeout`` seconds the run
        is killed and :class:`RunTimeout` raised. ``progress`` gets one line per task
        (or mapped task instance: a builder shard) as it finishes."""
        args = ["dags", "test", dag_id, *(["--use-executor"] if use_executor else [])]
        if conf:
            args += ["--conf", json.dumps(conf)]
        out = open(log, "ab") if log else None
        started = datetime.now(UTC)
        process = subprocess.Popen(
            [str(BIN / "airflow"), *args],
            env=self.env(),
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
        deadline = None if timeout is None else time.monotonic() + timeout
        ended: float | None = None
        watcher = _TaskWatcher(progress) if progress else None
        try:
            while (status := process.poll()) is None:
                now = time.monotonic()
                if deadline is not None and now > deadline:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    raise RunTimeout(
                        f"{dag_id}: `airflow dags test` did not finish in {timeout:.0f} s "
                        f"and was killed; see {log or 'its output'}"
                    )
                run = self._newest_run(dag_id, started)
                state = run and run["state"]
                if watcher and run:
                    watcher.poll(self._task_instances(dag_id, run["dag_run_id"]))
                if state in ("success", "failed"):
                    ended = ended or now
                    if now - ended > EXIT_GRACE:
                        os.killpg(process.pid, signal.SIGKILL)
                        process.wait()
                        if out:
                            note = f"\n[drivers] run {state}; `dags test` hung after it: killed\n"
                            out.write(note.encode())
                        return 0 if state == "success" else 1
                time.sleep(POLL_S)
            if watcher and (run := self._newest_run(dag_id, started)):
                watcher.poll(self._task_instances(dag_id, run["dag_run_id"]))
            return status
        finally:
            if out:
                out.close()

    def _get(self, path: str) -> dict:
        """One API answer ({} when the api-server did not answer: the next poll asks again)."""
        try:
            with _OPENER.open(f"http://127.0.0.1:{self.port}/api/v2/{path}", timeout=5) as r:
                return json.load(r)
        except (OSError, ValueError):
            return {}

    def _newest_run(self, dag_id: str, since: datetime) -> dict | None:
        runs = self._get(f"dags/{dag_id}/dagRuns?order_by=-start_date&limit=1").get("dag_runs")
        if not runs or not runs[0].get("start_date"):
            return None
        start = datetime.fromisoformat(runs[0]["start_date"].replace("Z", "+00:00"))
        return runs[0] if start >= since else None

    def _task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        path = f"dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id)}/taskInstances?limit=1000"
        return self._get(path).get("task_instances") or []

    def __enter__(self) -> EmbeddedAirflow:
        self.prepare()
        self.start_api_server()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
