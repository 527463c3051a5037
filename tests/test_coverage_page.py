"""The coverage page (plugins/drivers_coverage.py over drivers.ui.coverage_page).

Its data functions on indexes written through the real ledger API in the embedded GCS;
then the page itself: a real `airflow api-server` with the plugins folder and
SimpleAuthManager with a real user and password (not all-admins), refused without a
session, and driven by Debian's headless chromium (selenium, chromium-driver): the login
page, the navigation link, the grid, the filters, a kernel's `drivers why` answer, a
failure's log. Screenshots go to ``$DRIVERS_TEST_ARTIFACTS/coverage`` (default
``tests/artifacts/coverage``, git-ignored).

The server, seeding and browser helpers here are also what bench/bench_coverage_page.py
uses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from drivers.build.compile import toolchain_versions
from drivers.domain import layout
from drivers.domain.config import load_config
from drivers.domain.layout import Buckets
from drivers.domain.names import DriverKey
from drivers.domain.selectors import SelectorError
from drivers.ops.embedded import EmbeddedAirflow
from drivers.ops.why import explain
from drivers.store import ledger
from drivers.store.storage import Stores, client_from_environment
from drivers.ui import coverage_page
from drivers.ui.coverage_page import percentile

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "plugins" / "drivers_coverage.py"
ARTIFACTS = Path(os.environ.get("DRIVERS_TEST_ARTIFACTS") or REPO / "tests" / "artifacts")
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
USER, PASSWORD = "reader", "coverage-reader-password"  # a viewer, not an admin
OUTSIDER = "outsider"  # a user with no role: authenticated, allowed nothing
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx itself is the answer


NO_REDIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


# --- helpers shared with the benchmark -----------------------------------------------------


class CoverageAirflow(EmbeddedAirflow):
    """A real api-server with the repo's plugins, on the given buckets, with Airflow's
    SimpleAuthManager and one real user (role viewer) whose password is checked."""

    def __init__(self, home: Path, buckets: Buckets) -> None:
        super().__init__(home=home)
        self.buckets = buckets

    def env(self) -> dict[str, str]:
        return (
            super().env()
            | self.buckets.to_env()
            | {
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:viewer,{OUTSIDER}:",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(
                    self.home / "passwords.json"
                ),
                "AIRFLOW__API_AUTH__JWT_SECRET": f"coverage-{uuid.uuid4().hex}",
                "AIRFLOW__API__WORKERS": "1",
            }
        )

    def __enter__(self) -> CoverageAirflow:
        self.home.mkdir(parents=True, exist_ok=True)
        passwords = {USER: PASSWORD, OUTSIDER: f"{OUTSIDER}-password"}
        (self.home / "passwords.json").write_text(json.dumps(passwords))
        super().__enter__()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, user: str = USER, password: str = PASSWORD) -> str:
        """A JWT from Airflow's /auth/token, as API clients get one."""
        request = urllib.request.Request(
            f"{self.url}/auth/token",
            data=json.dumps({"username": user, "password": password}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with OPENER.open(request, timeout=30) as response:
            return json.load(response)["access_token"]

    def get(self, path: str, token: str | None = None, accept: str = "*/*") -> tuple[int, Any]:
        """(status, headers) of one request, redirects not followed."""
        headers = {"Accept": accept}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(f"{self.url}{path}", headers=headers)
        try:
            with NO_REDIRECT.open(request, timeout=60) as response:
                response.read()
                return response.status, response.headers
        except urllib.error.HTTPError as e:
            return e.code, e.headers

    def read(self, path: str, token: str) -> tuple[int, str]:
        """(status, body) of an authenticated GET."""
        request = urllib.request.Request(
            f"{self.url}{path}", headers={"Authorization": f"Bearer {token}"}
        )
        try:
            with OPENER.open(request, timeout=60) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()


def browser_unavailable() -> str | None:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        return "Debian's chromium and chromium-driver are not installed (scripts/host-deps.sh)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (requirements-dev.txt)"
    return None


def chromium(width: int = 1600, height: int = 1000) -> Any:
    """Debian's headless chromium through Debian's chromedriver (nothing downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in CI
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        "--no-proxy-server",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))


def new_buckets(gcs: Any) -> Buckets:
    """One unique bucket per role in the embedded GCS."""
    suffix = uuid.uuid4().hex[:10]
    buckets = Buckets(**{r: f"cov-{r.replace('_', '-')}-{suffix}" for r in layout.ROLES})
    gcs.create_buckets(buckets.all())
    return buckets


# --- the scenario --------------------------------------------------------------------------

T0 = datetime(2026, 11, 1, tzinfo=UTC)
V1, V2 = "2.3.0", "8.1.0"  # the shipped config's versions
UBUNTU = "5.4.0-62-generic"
EL8_305 = "4.18.0-305.el8.x86_64"
EL8_372 = "4.18.0-372.9.1.el8.x86_64"
EL7 = "3.10.0-1160.el7.x86_64"
DEBIAN = "6.1.0-56-amd64"  # bundle arrived, nothing built yet
AWS = "5.15.0-1019-aws"  # ubuntu, in an index only: its bundle is gone
ARRIVED = {UBUNTU: T0, EL8_305: T0 + timedelta(hours=1), EL8_372: T0 + timedelta(hours=2)}
ARRIVED |= {EL7: T0, DEBIAN: T0 + timedelta(hours=3)}
PUBLISHED_AT = T0 + timedelta(hours=5)
UBUNTU_LOG = "error: implicit declaration of function 'bpf_probe_read_kernel'"
EL8_LOG = "fatal error: linux/kconfig.h: No such file or directory"


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


@dataclass
class Seeded:
    stores: Stores
    logs: dict[str, str]  # gs:// URI -> content


def seed(stores: Stores) -> Seeded:
    """The scenario through the real ledger API: bundles, cache objects, a compile
    failure with its log, a quarantine after three such failures, a blocked driver, an
    infrastructure failure, pending kernels, a kernel whose bundle is gone."""
    work = stores.work
    logs = {}
    for kernel in ARRIVED:
        stores.bundles.put(layout.bundle_object(kernel), b"bundle")
    # A failure's inputs as a run records them: what the quarantine (planner and why) holds
    # against the inputs of now.
    now = ledger.Standing(
        {},
        load_config(),
        ledger.source_hashes(stores.sources),
        {k: stores.bundles.info(layout.bundle_object(k)).md5 for k in ARRIVED},
        toolchain_versions,
    )

    def log(run_id: str, name: str, text: str) -> str:
        object_name = f"reports/{run_id}/logs/{name}.log"
        work.put(object_name, text.encode(), "text/plain")
        uri = f"gs://{work.bucket_name}/{object_name}"
        logs[uri] = text
        return uri

    def published(kernel: str, version: str, kind: str, run_id: str) -> dict[str, Any]:
        key = DriverKey(kernel, version, kind)
        stores.drivers.put(key.object_name(), b"driver " + key.object_name().encode())
        return ledger.record(
            key,
            "published",
            run_id,
            time=_iso(PUBLISHED_AT),
            object=f"gs://{stores.drivers.bucket_name}/{key.object_name()}",
            arrived=_iso(ARRIVED[kernel]),
            published=_iso(PUBLISHED_AT),
        )

    def failed(kernel: str, version: str, run_id: str, at: datetime, text: str) -> dict:
        return ledger.record(
            (kernel, version, "mod"),
            "failed",
            run_id,
            time=_iso(at),
            builder="rhel8",
            failure="compile",
            reason=f"compile: {text}",
            fingerprint=now.fingerprint((kernel, version, "mod"), "rhel8"),
            log=log(run_id, f"{kernel}-{version}-mod", f"make[1]: ...\n{text}\n"),
        )

    run = "scheduled__2026-11-01T04:00:00+00:00"
    at = T0 + timedelta(hours=4)
    records = [
        published(UBUNTU, V1, "mod", run),
        published(UBUNTU, V1, "bpf", run),
        published(EL8_305, V1, "mod", run),
        published(EL8_305, V1, "bpf", run),
        published(EL8_372, V1, "bpf", run),
        failed(EL8_372, V1, run, at, EL8_LOG),
        ledger.record(
            (EL7, V1, "mod"), "blocked", run, time=_iso(at), reason="BLOCKLIST:4: 3.10.0-1160*"
        ),
        ledger.record((EL7, V1, "bpf"), "unavailable", run, time=_iso(at)),
        published(UBUNTU, V2, "bpf", run),
        failed(UBUNTU, V2, run, at, UBUNTU_LOG),
    ]
    stores.drivers.put(DriverKey(EL7, V1, "bpf").unavail_name(), b"")
    ledger.apply_run(work, run, records)
    for day in (1, 2):  # the same failure, same inputs, two more nights
        run = f"scheduled__2026-11-0{1 + day}T02:00:00+00:00"
        ledger.apply_run(work, run, [failed(EL8_372, V1, run, T0 + timedelta(days=day), EL8_LOG)])
    run = "scheduled__2026-11-04T02:00:00+00:00"
    ledger.apply_run(
        work,
        run,
        [
            ledger.record(
                (EL8_372, V1, "mod"),
                "quarantined",
                run,
                time=_iso(T0 + timedelta(days=3)),
                reason="3 failures in a row (compile) with the same inputs",
            ),
            ledger.record(
                (DEBIAN, V2, "mod"),
                "infra_failed",
                run,
                time=_iso(T0 + timedelta(days=3, hours=1)),
                reason="pod evicted: node shutdown",
            ),
        ],
    )
    ledger.apply_run(work, "cpaas-1", [], in_cache={V1: {(AWS, "bpf"): False}})
    ledger.write_kernels(work, {k: _iso(t) for k, t in ARRIVED.items()})
    return Seeded(stores, logs)


@pytest.fixture(scope="module")
def seeded(gcs: Any) -> Iterator[Seeded]:
    buckets = new_buckets(gcs)
    with pytest.MonkeyPatch.context() as env:
        for name, value in buckets.to_env().items():
            env.setenv(name, value)
        yield seed(Stores(client_from_environment(), buckets))


# --- the data, without a browser -----------------------------------------------------------


def test_snapshot_lists_arrived_kernels_and_indexed_ones_by_family(seeded: Seeded) -> None:
    snapshot = coverage_page.read_snapshot(seeded.stores.work, (V1, V2))
    assert snapshot.versions == (V1, V2)
    assert [k.release for k in snapshot.kernels] == [UBUNTU, AWS, EL7, EL8_305, EL8_372, DEBIAN]
    assert snapshot.status(UBUNTU, V1, "mod") == "published"
    assert snapshot.status(EL8_372, V1, "mod") == "quarantined"
    assert snapshot.status(EL8_305, V2, "mod") == coverage_page.PENDING
    assert snapshot.status(AWS, V2, "mod") == coverage_page.NO_BUNDLE


def test_snapshot_shows_a_configured_version_without_index_and_a_retired_one(
    seeded: Seeded,
) -> None:
    snapshot = coverage_page.read_snapshot(seeded.stores.work, (V2, "8.2.0"))
    assert snapshot.versions == (V1, V2, "8.2.0")
    assert snapshot.status(UBUNTU, "8.2.0", "bpf") == coverage_page.PENDING
    grid = coverage_page.render_grid(snapshot, range(len(snapshot.kernels)))
    assert f"{V1} (retired)" in grid and "8.2.0 (retired)" not in grid


def test_filters_by_family_and_by_selector_range(seeded: Seeded) -> None:
    snapshot = coverage_page.read_snapshot(seeded.stores.work, (V1, V2))

    def selected(family: str, selector: str = "") -> list[str]:
        rows = coverage_page.select_kernels(snapshot, family, selector)
        return [snapshot.kernels[row].release for row in rows]

    assert selected("el8") == [EL8_305, EL8_372]
    assert selected("", "el8:4.18.0-305..4.18.0-330") == [EL8_305]
    assert selected("", ">=5.10") == [AWS, DEBIAN]
    assert selected("el7", ">=5.10") == []
    with pytest.raises(SelectorError, match="comes after its end"):
        coverage_page.select_kernels(snapshot, "", "4.18.0-372..4.18.0-305")
    with pytest.raises(SelectorError, match="unknown kernel family 'rhel'"):
        coverage_page.select_kernels(snapshot, "rhel")


def test_recent_failures_are_newest_first_with_their_logs(seeded: Seeded) -> None:
    snapshot = coverage_page.read_snapshot(seeded.stores.work, (V1, V2))
    failures = coverage_page.recent_failures(snapshot, range(len(snapshot.kernels)))
    assert [(f.kernel, f.driver_version, f.status) for f in failures] == [
        (DEBIAN, V2, "infra_failed"),
        (EL8_372, V1, "quarantined"),
        (UBUNTU, V2, "failed"),
    ]
    quarantined = failures[1]
    assert quarantined.failures == 3 and quarantined.since == _iso(T0 + timedelta(days=3))
    assert seeded.logs[quarantined.log] == f"make[1]: ...\n{EL8_LOG}\n"  # kept through it
    assert coverage_page.read_log(seeded.stores.work, quarantined.log).endswith(EL8_LOG + "\n")
    only_el8 = coverage_page.select_kernels(snapshot, "el8")
    assert [f.kernel for f in coverage_page.recent_failures(snapshot, only_el8)] == [EL8_372]


def test_freshness_is_median_and_p90_of_arrival_to_publication_and_waiting_ages(
    seeded: Seeded,
) -> None:
    snapshot = coverage_page.read_snapshot(seeded.stores.work, (V1, V2))
    now = T0 + timedelta(days=5)
    by_version = {
        f.driver_version: f
        for f in coverage_page.freshness(snapshot, range(len(snapshot.kernels)), now)
    }
    hour = 3600.0
    v1 = by_version[V1]
    # Ubuntu 5 h x2, el8-305 4 h x2, el8-372 bpf 3 h (the AWS driver has no arrival).
    assert (v1.published, v1.median_s, v1.p90_s) == (5, 4 * hour, 5 * hour)
    assert (v1.waiting, v1.waiting_oldest_s) == (1, (now - ARRIVED[DEBIAN]).total_seconds())
    v2 = by_version[V2]
    assert (v2.published, v2.median_s) == (1, 5 * hour)
    # Nothing yet for el8 x2 and el7; Debian's mod failed on infrastructure (retried).
    assert v2.waiting == 4
    assert v2.waiting_oldest_s == (now - T0).total_seconds()
    assert v2.waiting_median_s == percentile(
        [(now - ARRIVED[k]).total_seconds() for k in (EL7, EL8_305, EL8_372, DEBIAN)], 50
    )


def test_percentile_interpolates_and_handles_nothing() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 90) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(map(float, range(1, 11))), 90) == pytest.approx(9.1)


def test_log_reader_refuses_objects_that_are_not_run_logs(seeded: Seeded) -> None:
    work = seeded.stores.work
    for uri in (
        f"gs://{seeded.stores.drivers.bucket_name}/reports/x.log",
        f"gs://{work.bucket_name}/config/blocklist",
        f"gs://{work.bucket_name}/reports/../config/blocklist",
        "/etc/passwd",
    ):
        with pytest.raises(ValueError):
            coverage_page.read_log(work, uri)
    big = "x" * 100 + "tail\n"
    work.put("reports/big/build.log", big.encode(), "text/plain")
    text = coverage_page.read_log(work, f"gs://{work.bucket_name}/reports/big/build.log", 10)
    assert text == "[first 95 bytes left out]\n" + big[-10:]


def test_grid_has_a_row_per_kernel_and_a_letter_per_driver(seeded: Seeded) -> None:
    snapshot = coverage_page.read_snapshot(seeded.stores.work, (V1, V2))
    page = coverage_page.render_page(snapshot, family="el8")
    # 2.3.0 mod, bpf; 8.1.0 mod, bpf
    assert grid_rows(page) == {EL8_305: ["P", "P", "·", "·"], EL8_372: ["Q", "P", "·", "·"]}
    assert "2 of 6 kernels" in page
    everything = grid_rows(coverage_page.render_page(snapshot))
    assert everything[AWS] == ["", "P", "", ""] and everything[EL7] == ["B", "U", "·", "·"]
    bad = coverage_page.render_page(snapshot, selector="4.18.0-372..4.18.0-305")
    assert "comes after its end" in bad and grid_rows(bad) == {}


def grid_rows(page: str) -> dict[str, list[str]]:
    """kernel -> the letters of its cells, from the page's HTML."""
    rows = re.findall(r"<tr><th>([^<]+)((?:<td class=\w>[^<]*)+)", page)
    return {kernel: re.findall(r"<td class=\w>([^<]*)", cells) for kernel, cells in rows}


def test_why_answer_as_html_carries_every_answer_of_drivers_why(seeded: Seeded) -> None:
    exp = explain(seeded.stores, load_config(), UBUNTU)
    page = coverage_page.render_why(exp)
    statuses = {(a.driver_version, a.kind): a.status for a in exp.answers}
    assert statuses == {(V1, "mod"): "published", (V1, "bpf"): "published"} | {
        (V2, "mod"): "quarantined",  # failed once, same inputs: the shipped quarantine_after
        (V2, "bpf"): "published",
    }
    for a in exp.answers:
        assert coverage_page._e(a.summary) in page
        assert not a.action or coverage_page._e(a.action) in page
    assert "3 of 4 driver(s) available" in page


def test_snapshot_cache_reads_again_only_after_an_index_changed(seeded: Seeded) -> None:
    work = seeded.stores.work
    cache = coverage_page.SnapshotCache()
    first, read = cache.get(work, (V1, V2))
    assert read
    again, read = cache.get(work, (V1, V2))
    assert again is first and not read
    ledger.update_coverage(work, V2, lambda coverage: None)  # a new generation, as a run
    changed, read = cache.get(work, (V1, V2))
    assert read and changed is not first and changed.cells == first.cells


def test_page_escapes_what_it_is_given(seeded: Seeded) -> None:
    snapshot = coverage_page.read_snapshot(seeded.stores.work, (V1, V2))
    page = coverage_page.render_page(snapshot, selector="'><script>alert(1)</script>")
    assert "<script>alert(1)" not in page
    assert "&#x27;&gt;&lt;script&gt;alert(1)" in page  # in the field and in the error


def test_loading_the_plugin_imports_neither_fastapi_nor_the_api(tmp_path: Path) -> None:
    """The scheduler, DAG processor and every task process load plugins too."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('p', {str(PLUGIN)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "assert module.DriversCoveragePlugin.external_views\n"
        "print(sorted(m for m in ('fastapi', 'airflow.api_fastapi.core_api.security',"
        " 'drivers.ui.coverage_page') if m in sys.modules))\n"
    )
    env = os.environ | {"AIRFLOW_HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# --- the page, in a browser, behind Airflow's login ----------------------------------------


@pytest.fixture(scope="module")
def airflow(seeded: Seeded, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoverageAirflow]:
    with CoverageAirflow(tmp_path_factory.mktemp("airflow"), seeded.stores.buckets) as af:
        yield af


def test_unauthenticated_requests_are_refused(airflow: CoverageAirflow) -> None:
    log = urllib.parse.quote("gs://x/reports/a.log")
    for path in (
        "/drivers/coverage",
        "/drivers/why?kernel=5.4.0-62-generic",
        f"/drivers/log?uri={log}",
    ):
        assert airflow.get(path, accept="application/json")[0] == 401, path
        assert airflow.get(path, token="not.a.jwt")[0] == 403, path
    status, headers = airflow.get("/drivers/coverage", accept="text/html")
    assert status == 303 and headers["Location"].startswith("/auth/login?next="), headers
    # Authenticated, but not allowed to read the DAG's runs (here: no role at all).
    outsider = airflow.token(OUTSIDER, f"{OUTSIDER}-password")
    assert airflow.get("/drivers/coverage", token=outsider)[0] == 403
    assert airflow.get("/api/v2/dags", token=outsider)[0] == 403  # as Airflow's own API
    status, headers = airflow.get("/drivers/coverage", token=airflow.token())
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "total;dur=" in headers["Server-Timing"]


def test_log_route_serves_run_logs_only(airflow: CoverageAirflow, seeded: Seeded) -> None:
    token = airflow.token()
    uri = next(iter(seeded.logs))
    status, body = airflow.read(f"/drivers/log?uri={urllib.parse.quote(uri)}", token)
    assert status == 200 and body == seeded.logs[uri]
    work = seeded.stores.work.bucket_name
    for uri, expected in (
        (f"gs://{work}/config/blocklist", 400),
        (f"gs://{seeded.stores.drivers.bucket_name}/reports/x.log", 400),
        (f"gs://{work}/reports/gone.log", 404),
    ):
        assert airflow.read(f"/drivers/log?uri={urllib.parse.quote(uri)}", token)[0] == expected


def test_why_route_explains_a_string_that_is_not_a_kernel(airflow: CoverageAirflow) -> None:
    status, body = airflow.read("/drivers/why?fragment=1&kernel=latest", airflow.token())
    assert status == 200 and body.startswith("<p class=error>") and "latest" in body


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.skipif(browser_unavailable() is not None, reason=str(browser_unavailable()))
def test_coverage_page_in_chromium_behind_the_login(
    airflow: CoverageAirflow, seeded: Seeded
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    shots = ARTIFACTS / "coverage"
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    taken = []
    driver = chromium()
    wait = WebDriverWait(driver, 30)

    def screenshot(name: str) -> None:
        driver.switch_to.default_content()  # the whole UI: navigation and the page's frame
        path = shots / f"{len(taken) + 1}-{name}.png"
        assert driver.save_screenshot(str(path)), path
        taken.append(path)
        driver.switch_to.frame(frame)

    def page_loaded(after: Any = None) -> None:
        """The page in the frame has its grid built and painted (after a navigation)."""
        if after is not None:
            wait.until(ready.staleness_of(after))
        wait.until(
            lambda d: d.execute_script("return document.documentElement.dataset.grid") == "painted"
        )

    def rows() -> dict[str, list[str]]:
        """kernel -> the letters of its cells, as the browser has them."""
        cells = driver.execute_script(
            "return Array.from(document.querySelectorAll('#grid .chunk tr'),"
            " tr => Array.from(tr.cells, c => c.textContent))"
        )
        return {kernel: letters for kernel, *letters in cells}

    def submit(button_id: str) -> None:
        old = driver.find_element(By.TAG_NAME, "html")
        driver.find_element(By.ID, button_id).click()
        page_loaded(after=old)

    try:
        # Airflow's own login page, with the real user's password.
        driver.get(f"{airflow.url}/")
        wait.until(ready.presence_of_element_located((By.NAME, "username"))).send_keys(USER)
        driver.find_element(By.NAME, "password").send_keys(PASSWORD)
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        # The navigation link to the page, then the page inside the UI.
        link = wait.until(
            ready.element_to_be_clickable((By.CSS_SELECTOR, "a[href$='/plugin/driver-coverage']"))
        )
        assert link.text == "Drivers"
        link.click()
        frame = wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "iframe")))
        driver.switch_to.frame(frame)
        page_loaded()
        snapshot = coverage_page.read_snapshot(seeded.stores.work, (V1, V2))
        everything = {k.release for k in snapshot.kernels}
        grid = rows()
        assert set(grid) == everything
        assert grid[UBUNTU] == ["P", "P", "F", "P"] and grid[EL8_372] == ["Q", "P", "·", "·"]
        assert grid[DEBIAN] == ["·", "·", "I", "·"]
        assert "6 kernels × 2 driver versions" in driver.find_element(By.ID, "summary").text
        freshness = driver.find_element(By.ID, "freshness-table").text
        assert f"{V1} 5 4.0 h 5.0 h 1" in freshness, freshness
        screenshot("grid")

        # Filter by family, then by a range within it; a reversed range is explained.
        Select(driver.find_element(By.ID, "family")).select_by_value("el8")
        submit("apply")
        assert set(rows()) == {EL8_305, EL8_372}
        screenshot("family-el8")
        driver.find_element(By.ID, "select").send_keys("4.18.0-305..4.18.0-330")
        submit("apply")
        assert set(rows()) == {EL8_305}
        assert "1 of 6 kernels" in driver.find_element(By.ID, "summary").text
        screenshot("range")
        field = driver.find_element(By.ID, "select")
        field.clear()
        field.send_keys("4.18.0-372..4.18.0-305")
        submit("apply")
        assert rows() == {}
        assert "comes after its end" in driver.find_element(By.ID, "filter-error").text
        old = driver.find_element(By.TAG_NAME, "html")
        driver.find_element(By.LINK_TEXT, "all kernels").click()
        page_loaded(after=old)
        assert set(rows()) == everything

        # A kernel's answer: the same as `drivers why`.
        driver.find_element(By.ID, "kernel").send_keys(UBUNTU)
        driver.find_element(By.ID, "ask").click()
        answer = wait.until(
            ready.presence_of_element_located(
                (By.CSS_SELECTOR, f"#why-result[data-kernel='{UBUNTU}']")
            )
        ).text
        answers = explain(seeded.stores, load_config(), UBUNTU).answers
        assert len(answers) == 4  # 2 versions x 2 kinds, each shown
        for a in answers:
            assert a.summary in answer and (a.action or "") in answer, a
        assert "3 of 4 driver(s) available" in answer
        screenshot("why")
        # Clicking a kernel in the grid asks the same question about it.
        driver.find_element(
            By.XPATH, f"//div[@id='grid']//div[@class='chunk']//th[text()='{EL8_372}']"
        ).click()
        answer = wait.until(
            ready.presence_of_element_located(
                (By.CSS_SELECTOR, f"#why-result[data-kernel='{EL8_372}']")
            )
        ).text
        assert "quarantined: 3 failures in a row (compile)" in answer

        # A failure's log, read from the work bucket when asked for.
        failures = driver.find_element(By.ID, "failures-table")
        assert [r.text.split()[1] for r in failures.find_elements(By.TAG_NAME, "tr")[1:]] == [
            DEBIAN,
            EL8_372,
            UBUNTU,
        ]
        button = failures.find_elements(By.CSS_SELECTOR, "button[data-log]")[-1]
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
        button.click()
        view = driver.find_element(By.ID, "log-view")
        wait.until(lambda d: UBUNTU_LOG in view.text)
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", view)
        screenshot("failure-log")
    except Exception:
        driver.switch_to.default_content()
        driver.save_screenshot(str(shots / "failed.png"))
        raise
    finally:
        driver.quit()

    assert [p.name for p in taken] == [
        "1-grid.png",
        "2-family-el8.png",
        "3-range.png",
        "4-why.png",
        "5-failure-log.png",
    ]
    for path in taken:
        width, height = png_size(path)
        assert width >= 1200 and height >= 700, (path, width, height)
        assert path.stat().st_size > 30_000, f"{path} looks blank"
    assert len({p.read_bytes() for p in taken}) == len(taken)  # each shows something else
