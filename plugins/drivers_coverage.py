"""The driver coverage page in the Airflow UI: driver versions x kernels, filters, the
``drivers why`` answer for a kernel, recent failures with their logs, freshness.

A FastAPI app the api-server mounts under ``/drivers`` (``fastapi_apps``) and a
navigation entry, "Drivers" (``external_views``, destination ``nav``), that shows the
page inside the UI in an iframe. The page's data and HTML are :mod:`drivers.ui.coverage_page`;
this file is the wiring and the authentication.

**Authentication.** The api-server does not protect plugin apps: every route here depends
on ``readable``, which takes the caller's identity exactly as Airflow's own REST API does
(``airflow.api_fastapi.core_api.security.get_user``: the ``Authorization: Bearer`` JWT,
else the ``_token`` cookie the UI sets at login, validated by the configured auth
manager), then asks the auth manager whether that user may read the runs of the
``upstream_drivers`` DAG, whose output the page shows. No or expired credentials: 401 (a
browser asking for a page is sent to the login page instead, and back after); a bad token
or a user without that right: 403.

The app is built when the api-server asks for it (a property), so the scheduler, the DAG
processor and task processes, which load plugins too, never import FastAPI or the API's
security module for it. (No ``from __future__ import annotations``: FastAPI reads the
annotations of the routes defined inside :func:`create_app`, whose types are local.)
"""

import threading
import time
from typing import Any

from airflow.plugins_manager import AirflowPlugin

from drivers.domain.dag_ids import UPSTREAM_DRIVERS

URL_PREFIX = "/drivers"
DAG_ID = UPSTREAM_DRIVERS  # who may read its runs may read their coverage
STORES_TTL_S = 300.0  # the storage client is reused this long (the connection may change)

_app: Any = None
_app_lock = threading.Lock()
_cached_stores: tuple[float, Any] | None = None


def _stores() -> Any:
    """The buckets over the Airflow connection's client (GCSHook), reused a while."""
    global _cached_stores
    from drivers.airflow.glue import stores

    now = time.monotonic()
    if _cached_stores is None or now - _cached_stores[0] > STORES_TTL_S:
        _cached_stores = (now, stores())
    return _cached_stores[1]


def _configs(stores: Any) -> tuple[Any, Any, list[str]]:
    """The shipped config, the run-time config (None when an operator's object is
    malformed: the page still shows, with the reason) and notes for the page."""
    from drivers.domain.config import load_config
    from drivers.store.runtime_config import RuntimeConfigError, load_runtime_config

    config = load_config()
    try:
        return config, load_runtime_config(stores.work, config), []
    except RuntimeConfigError as e:
        return config, None, [f"run-time config not used: {e}"]


def create_app() -> Any:
    from typing import Annotated

    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
    from airflow.api_fastapi.auth.managers.models.resource_details import (
        DagAccessEntity,
        DagDetails,
    )
    from airflow.api_fastapi.core_api.security import get_user
    from fastapi import Depends, FastAPI, HTTPException, Request, status
    from fastapi.exception_handlers import http_exception_handler
    from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse
    from starlette.middleware.gzip import GZipMiddleware

    from drivers.ops.why import explain
    from drivers.store.storage import ObjectNotFound
    from drivers.ui import coverage_page

    def readable(user: Annotated[BaseUser, Depends(get_user)]) -> BaseUser:
        """The authenticated user, if allowed to read the upstream DAG's runs."""
        allowed = get_auth_manager().is_authorized_dag(
            method="GET",
            access_entity=DagAccessEntity.RUN,
            details=DagDetails(id=DAG_ID),
            user=user,
        )
        if not allowed:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, f"reading the runs of {DAG_ID} is not allowed to you"
            )
        return user

    app = FastAPI(
        title="Driver coverage",
        dependencies=[Depends(readable)],
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_middleware(GZipMiddleware, minimum_size=2048)  # the grid: 1.6 MB -> 70 kB
    snapshots = coverage_page.SnapshotCache()  # the indexes, read again when one changed

    @app.exception_handler(HTTPException)
    async def refused(request: Request, exc: HTTPException) -> Any:
        # A person without a session who opens the page gets the login page, then the
        # page again; scripts and API clients get the status.
        if exc.status_code == 401 and "text/html" in request.headers.get("accept", ""):
            login = get_auth_manager().get_url_login(next_url=str(request.url))
            return RedirectResponse(login, status_code=303)
        return await http_exception_handler(request, exc)

    def answer(kernel: str) -> str:
        stores = _stores()
        config, runtime, _ = _configs(stores)
        try:
            return coverage_page.render_why(explain(stores, config, kernel, runtime=runtime))
        except ValueError as e:  # not a kernel release: the message says why
            return coverage_page.render_message(str(e))

    @app.get("/", include_in_schema=False)
    def index(request: Request) -> RedirectResponse:
        return RedirectResponse(request.url_for("coverage"), status_code=307)

    @app.get("/coverage", response_class=HTMLResponse, name="coverage")
    def coverage(family: str = "", select: str = "", kernel: str = "") -> HTMLResponse:
        marks = [time.perf_counter()]
        stores = _stores()
        config, runtime, notes = _configs(stores)
        configured = runtime.driver_versions if runtime else config.driver_versions
        marks.append(time.perf_counter())
        snapshot, read = snapshots.get(stores.work, configured)
        marks.append(time.perf_counter())
        why = answer(kernel) if kernel.strip() else ""
        page = coverage_page.render_page(snapshot, family, select, kernel, why, notes=notes)
        marks.append(time.perf_counter())
        # For the benchmark and for people: where a view's server time goes.
        spans = zip(("config", "indexes", "render"), marks[:-1], marks[1:], strict=True)
        timing = [f"{name};dur={(end - start) * 1000:.0f}" for name, start, end in spans]
        timing[1] += ';desc="read"' if read else ';desc="unchanged"'
        timing.append(f"total;dur={(marks[-1] - marks[0]) * 1000:.0f}")
        headers = {"Server-Timing": ", ".join(timing), "Cache-Control": "no-store"}
        return HTMLResponse(page, headers=headers)

    @app.get("/why", response_class=HTMLResponse)
    def why(kernel: str, fragment: bool = False) -> HTMLResponse:
        body = answer(kernel)
        return HTMLResponse(body if fragment else coverage_page.render_why_page(body, kernel))

    @app.get("/log", response_class=PlainTextResponse)
    def log(uri: str) -> PlainTextResponse:
        try:
            return PlainTextResponse(coverage_page.read_log(_stores().work, uri))
        except ValueError as e:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(e)) from None
        except ObjectNotFound as e:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(e)) from None

    return app


def app() -> Any:
    """The app, built once per process."""
    global _app
    with _app_lock:
        if _app is None:
            _app = create_app()
    return _app


class DriversCoveragePlugin(AirflowPlugin):
    name = "drivers_coverage"
    external_views = [
        {
            "name": "Drivers",  # the navigation bar has room for about 8 characters
            # Relative (no leading slash): resolved against the UI's base URL.
            "href": f"{URL_PREFIX.lstrip('/')}/coverage",
            "url_route": "driver-coverage",  # shown inside the UI, at /plugin/driver-coverage
            "destination": "nav",
            "nav_top_level": True,
        }
    ]

    @property
    def fastapi_apps(self) -> list[dict[str, Any]]:
        return [{"app": app(), "url_prefix": URL_PREFIX, "name": "drivers_coverage"}]
