"""The coverage page of the Airflow UI: its data and its HTML (the ``drivers_coverage``
plugin serves it; no Airflow here).

Driver versions x kernels, one compact cell per kind (a status letter and colour), for
the kernels whose bundle arrived (:func:`drivers.store.ledger.read_kernels`) and those the
coverage indexes know; filtered by family and by a kernel selector
(:func:`drivers.domain.selectors.parse_selector`); the ``drivers why`` answer for one kernel
(:func:`drivers.ops.why.explain`) as HTML; the recent failures, newest first, with their logs
read from the work bucket on demand; and freshness: how long after a bundle's arrival its
drivers were published (median and p90 per version) and how long the kernels still
waiting have waited.

Speed (10,000 kernels x 5 versions in under 3 s in a browser; bench/RESULTS.md): the
indexes are one object per version, read in parallel and folded once into a compact
:class:`Snapshot` that :class:`SnapshotCache` keeps until an index changes (a view costs
one listing); the grid is server-rendered in one response, a letter per cell and no
per-cell request, cut into a heading per family and blocks of :data:`CHUNK_ROWS` rows
that the browser lays out only when they are scrolled to (``content-visibility: auto``).
Laid out as one table, the same 100,000 cells took 4-9 s to first paint.
"""

from __future__ import annotations

import gzip
import html
import math
import threading
import time
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from drivers.domain import layout
from drivers.domain.kernels import FAMILIES, Kernel, KernelParseError, parse_kernel, version_tokens
from drivers.domain.names import KINDS
from drivers.domain.selectors import SelectorError, parse_selector
from drivers.domain.toolchain import TOOLCHAIN_MISMATCH
from drivers.store import ledger

if TYPE_CHECKING:
    from drivers.ops.why import Explanation
    from drivers.store.storage import ObjectStore

# What a cell shows for each state of a driver: (CSS class, letter, meaning). The ledger's
# statuses, plus the two a kernel without a record is in.
PENDING, NO_BUNDLE = "pending", "no_bundle"
CELLS: dict[str, tuple[str, str, str]] = {
    "published": ("P", "P", "published in the driver cache"),
    "unavailable": ("U", "U", "unavailable: the kernel cannot run it (marker published)"),
    "built": ("S", "S", "built, not published (yet)"),
    "failed": ("F", "F", "compile failure"),
    "refused": ("R", "R", "refused by its kernel in the VM test"),
    "infra_failed": ("I", "I", "infrastructure failure (retried)"),
    TOOLCHAIN_MISMATCH: ("M", "M", "routed to a builder with another compiler: fix the route"),
    "quarantined": ("Q", "Q", "quarantined: failed the same way too often"),
    "blocked": ("B", "B", "blocklisted"),
    "unroutable": ("N", "N", "no builder route takes it"),
    "withdrawn": ("W", "W", "withdrawn from the cache"),
    PENDING: ("d", "·", "bundle arrived, not built yet"),
    NO_BUNDLE: ("x", "", "no bundle, no record"),
}
UNKNOWN = "u"  # a status this page does not know yet (a newer ledger)
# Recent failures: what went wrong with a driver, newest first.
FAILURES = ("failed", "quarantined", "refused", "infra_failed", TOOLCHAIN_MISMATCH)
# A kernel still waits for a driver while that driver has no record or is on its way.
WAITING = (None, "built", "infra_failed")
CHUNK_ROWS = 400  # grid rows per lazily laid-out block
ROW_PX = 18  # a grid row's height (CSS): the size a block has before it is laid out
FAILURES_SHOWN = 200
LOG_LIMIT = 512 * 1024  # bytes of a log shown: its tail
LOG_PREFIX = layout.REPORTS_PREFIX  # where runs keep failure logs in the work bucket
INDEX_SUFFIX = ".json.gz"


# --- the data ------------------------------------------------------------------------------


@dataclass
class Failure:
    kernel: str
    driver_version: str
    kind: str
    status: str
    time: str
    since: str | None
    run_id: str
    reason: str | None
    failure: str | None
    failures: int
    log: str | None


@dataclass
class Snapshot:
    """What the page shows of every index, kept compact: a letter per driver, the failing
    drivers, the publication delays and the kernels still waiting (the indexes themselves
    are dropped once read)."""

    versions: tuple[str, ...]  # columns, oldest first: indexed or configured
    configured: tuple[str, ...]  # what the run-time config builds (others are retired)
    kernels: list[Kernel]  # every kernel listed, by family then version
    cells: list[str]  # per kernel: a CELLS class per (version, kind), versions x KINDS
    arrived: list[float | None]  # per kernel: its bundle's arrival (epoch seconds)
    failures: list[Failure]  # every driver whose state is a failure, newest first
    delays: dict[str, list[tuple[int, float]]]  # version -> (kernel, arrival -> published s)
    waiting: dict[str, list[int]]  # version -> kernels that still wait for a driver of it
    updated: str | None = None  # the newest index's update time
    unparsable: list[str] = field(default_factory=list)  # names in an index, not releases
    read_s: float = 0.0

    def status(self, kernel: str, version: str, kind: str) -> str:
        row = next(i for i, k in enumerate(self.kernels) if k.release == kernel)
        column = self.versions.index(version) * len(KINDS) + KINDS.index(kind)
        return _STATUS_OF_CLASS[self.cells[row][column]]


_STATUS_OF_CLASS = {css: status for status, (css, _, _) in CELLS.items()} | {UNKNOWN: "unknown"}


def index_versions(listing: Iterable[str]) -> list[str]:
    """The driver versions that have a coverage index, from the names under
    ``ledger.COVERAGE_PREFIX``."""
    versions = []
    for full in listing:
        name = full[len(ledger.COVERAGE_PREFIX) :]
        if name.endswith(INDEX_SUFFIX) and "/" not in name and not name.startswith("_"):
            versions.append(name[: -len(INDEX_SUFFIX)])
    return versions


def read_snapshot(
    work: ObjectStore, configured: Iterable[str] = (), listing: Iterable[str] | None = None
) -> Snapshot:
    """Read every index and the kernel list, in parallel (one object each)."""
    started = time.perf_counter()
    configured = tuple(configured)
    if listing is None:
        listing = [info.name for info in work.list(ledger.COVERAGE_PREFIX)]
    versions = tuple(sorted(set(index_versions(listing)) | set(configured), key=version_tokens))
    with ThreadPoolExecutor(8) as pool:
        arrived = pool.submit(ledger.read_kernels, work)
        coverage = dict(
            zip(versions, pool.map(lambda v: ledger.read_coverage(work, v), versions), strict=True)
        )
        snapshot = make_snapshot(versions, configured, coverage, arrived.result())
    snapshot.read_s = time.perf_counter() - started
    return snapshot


class SnapshotCache:
    """The last snapshot, reused while no index changed: a view costs one listing, and
    reads the indexes again only after a run (or a withdrawal) wrote one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: Any = None
        self._snapshot: Snapshot | None = None

    def get(self, work: ObjectStore, configured: Iterable[str] = ()) -> tuple[Snapshot, bool]:
        """(snapshot, whether it was read now)."""
        listing = {i.name: i.generation for i in work.list(ledger.COVERAGE_PREFIX)}
        configured = tuple(configured)
        key = (work.bucket_name, tuple(sorted(listing.items())), configured)
        with self._lock:
            if key == self._key and self._snapshot is not None:
                return self._snapshot, False
        # Written meanwhile? Then this snapshot is newer than its key, and the next view
        # reads again: never older than what was listed.
        snapshot = read_snapshot(work, configured, listing)
        with self._lock:
            self._key, self._snapshot = key, snapshot
        return snapshot, True


def make_snapshot(
    versions: Sequence[str],
    configured: Sequence[str],
    coverage: dict[str, ledger.Coverage],
    arrived: dict[str, str],
) -> Snapshot:
    """Fold the indexes into what the page shows, in one pass over every driver."""
    names = set(arrived)
    for c in coverage.values():
        names.update(c.entries)
    kernels, unparsable = [], []
    for name in names:
        try:
            kernels.append(parse_kernel(name))
        except KernelParseError:
            unparsable.append(name)
    order = {family: i for i, family in enumerate(FAMILIES)}
    kernels.sort(key=lambda k: (order.get(k.family, len(order)), k.key))
    entries = [(v, (coverage.get(v) or ledger.Coverage(v, {}, [])).entries) for v in versions]
    css = {status: c for status, (c, _, _) in CELLS.items()}
    cells, arrivals, failures = [], [], []
    delays: dict[str, list[tuple[int, float]]] = {v: [] for v in versions}
    waiting: dict[str, list[int]] = {v: [] for v in versions}
    for row, kernel in enumerate(kernels):
        release = kernel.release
        came = arrived.get(release)
        arrivals.append(_seconds(came) if came else None)
        absent = css[PENDING] if came else css[NO_BUNDLE]
        letters = []
        for version, version_entries in entries:
            kinds = version_entries.get(release) or {}
            waits = False
            for kind in KINDS:
                e = kinds.get(kind)
                if e is None:
                    letters.append(absent)
                    waits = True
                    continue
                status = e["status"]
                letters.append(css.get(status, UNKNOWN))
                if status in WAITING:
                    waits = True
                elif status == "published" and e.get("arrived") and e.get("published"):
                    delay = _seconds(e["published"]) - _seconds(e["arrived"])
                    delays[version].append((row, max(0.0, delay)))
                if status in FAILURES:
                    failures.append(_failure(release, version, kind, e))
            if waits and came:
                waiting[version].append(row)
        cells.append("".join(letters))
    failures.sort(key=lambda f: (_seconds(f.time), f.kernel, f.driver_version, f.kind))
    failures.reverse()
    updated = max((c.updated for c in coverage.values() if c.updated), default=None)
    return Snapshot(
        tuple(versions),
        tuple(configured),
        kernels,
        cells,
        arrivals,
        failures,
        delays,
        waiting,
        updated,
        sorted(unparsable),
    )


def _failure(kernel: str, version: str, kind: str, e: dict[str, Any]) -> Failure:
    return Failure(
        kernel,
        version,
        kind,
        e["status"],
        e["time"],
        e.get("since"),
        e["run_id"],
        e.get("reason"),
        e.get("failure") or e.get("last_failure"),
        e.get("failures", 0),
        e.get("log"),
    )


def select_kernels(snapshot: Snapshot, family: str = "", selector: str = "") -> list[int]:
    """The rows (positions in ``snapshot.kernels``) of the kernels of ``family`` (empty:
    all) that ``selector`` selects (empty: all). Raises SelectorError for an unknown
    family or a bad selector (its message shows a valid one)."""
    if family and family not in FAMILIES:
        raise SelectorError(
            f"unknown kernel family {family!r}; known families: {', '.join(FAMILIES)}"
        )
    chosen = parse_selector(selector) if selector.strip() else None
    return [
        row
        for row, k in enumerate(snapshot.kernels)
        if (not family or k.family == family) and (chosen is None or chosen.matches(k))
    ]


def recent_failures(snapshot: Snapshot, rows: Collection[int]) -> list[Failure]:
    """The failing drivers of the kernels in ``rows``, newest first."""
    if len(rows) == len(snapshot.kernels):
        return snapshot.failures
    names = {snapshot.kernels[row].release for row in rows}
    return [f for f in snapshot.failures if f.kernel in names]


@dataclass
class Freshness:
    """Bundle arrival -> drivers published, for one driver version."""

    driver_version: str
    published: int  # drivers whose arrival and publication the index knows
    median_s: float | None
    p90_s: float | None
    waiting: int  # kernels whose bundle arrived that still wait for a driver of it
    waiting_median_s: float | None
    waiting_oldest_s: float | None


def freshness(
    snapshot: Snapshot, rows: Collection[int], now: datetime | None = None
) -> list[Freshness]:
    """Per version: the delay from a bundle's arrival to each of its drivers being
    published (median, p90), and the age of the kernels still waiting (bundle arrived,
    and a kind without a record, built and not published yet, or to be retried after
    an infrastructure failure)."""
    now_s = (now or datetime.now(UTC)).timestamp()
    everything = len(rows) == len(snapshot.kernels)
    chosen = set() if everything else set(rows)
    arrived = snapshot.arrived  # known for every waiting kernel
    out = []
    for version in snapshot.versions:
        delays = [d for row, d in snapshot.delays[version] if everything or row in chosen]
        ages = [
            max(0.0, now_s - (arrived[row] or now_s))
            for row in snapshot.waiting[version]
            if everything or row in chosen
        ]
        out.append(
            Freshness(
                version,
                len(delays),
                percentile(delays, 50),
                percentile(delays, 90),
                len(ages),
                percentile(ages, 50),
                max(ages, default=None),
            )
        )
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile, linearly interpolated (the median for 50); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@lru_cache(maxsize=65_536)
def _seconds(text: str) -> float:
    """An ISO time of the ledger as epoch seconds (naive ones are taken as UTC). Cached:
    a run stamps all its records with a few times."""
    when = datetime.fromisoformat(text)
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def read_log(work: ObjectStore, uri: str, limit: int = LOG_LIMIT) -> str:
    """A failure log from the work bucket (its tail past ``limit`` bytes). Only logs the
    runs keep (``gs://<work>/reports/...``): the page never reads other objects. Raises
    ValueError for any other URI, ObjectNotFound when it is gone."""
    from drivers.store.storage import parse_gs_uri

    bucket, name = parse_gs_uri(uri)
    if bucket != work.bucket_name or not name.startswith(LOG_PREFIX) or ".." in name.split("/"):
        raise ValueError(
            f"{uri}: only logs under gs://{work.bucket_name}/{LOG_PREFIX} are shown here"
        )
    data = work.download(name)
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) <= limit:
        return data.decode(errors="replace")
    cut = len(data) - limit
    return f"[first {cut} bytes left out]\n" + data[cut:].decode(errors="replace")


# --- the HTML ------------------------------------------------------------------------------

CSS = """
body{font:14px system-ui,sans-serif;margin:12px 16px;color:#1a1a1a}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:18px 0 6px}
.meta{color:#555}.error{color:#b00020;font-weight:600}
form{display:inline-flex;gap:8px;align-items:center;margin:6px 16px 6px 0}
input[type=text]{width:22em}
table.list{border-collapse:collapse;font-size:13px}
table.list td,table.list th{border-bottom:1px solid #ddd;padding:2px 8px;text-align:left;
vertical-align:top}
.scroll{max-height:320px;overflow:auto;border:1px solid #ddd}
pre{background:#f6f6f6;border:1px solid #ddd;padding:8px;max-height:420px;overflow:auto;
white-space:pre-wrap}
#grid{font:12px ui-monospace,monospace}
#grid table{border-collapse:collapse;table-layout:fixed;
width:calc(34em + var(--columns) * 2.4em)}
#grid col.k{width:34em}#grid col.c{width:2.4em}
#grid td,#grid th{border:1px solid #e3e3e3;padding:0 2px;height:18px;white-space:nowrap;
overflow:hidden;text-overflow:ellipsis;text-align:center;box-sizing:border-box}
#grid .chunk th{text-align:left;font-weight:400;cursor:pointer}
#grid .chunk th:hover{text-decoration:underline}
#grid .head{position:sticky;top:0;z-index:1}
#grid .head th{background:#f0f0f0;white-space:normal;overflow-wrap:anywhere;height:auto}
#grid h3{font-size:12px;margin:0;padding:2px 4px;background:#e8eef7;
width:calc(34em + var(--columns) * 2.4em);box-sizing:border-box}
.chunk{content-visibility:auto}
.P{background:#2e7d32;color:#fff}.U{background:#a5d6a7}.S{background:#c8e6c9}
.F{background:#c62828;color:#fff}.R{background:#ad1457;color:#fff}
.I{background:#ef6c00;color:#fff}.Q{background:#4a148c;color:#fff}.M{background:#f9a825}
.B{background:#9e9e9e;color:#fff}.N{background:#bdbdbd}.W{background:#795548;color:#fff}
.d{background:#fff8e1;color:#8d6e00}.x{background:#fafafa}.u{background:#fff}
.legend span{display:inline-block;padding:0 6px;margin:2px;border-radius:3px}
.status{padding:0 6px;border-radius:3px;white-space:nowrap}
"""

SCRIPT = """
(function(){
  var why=document.getElementById('why-answer'),form=document.getElementById('why-form');
  function askWhy(kernel){
    form.kernel.value=kernel;why.innerHTML='<p class=meta>asking\\u2026</p>';
    fetch('why?fragment=1&kernel='+encodeURIComponent(kernel),{credentials:'same-origin'})
      .then(function(r){return r.text()}).then(function(t){why.innerHTML=t;
        why.scrollIntoView({block:'nearest'})});
  }
  form.addEventListener('submit',function(e){e.preventDefault();askWhy(form.kernel.value)});
  document.getElementById('grid').addEventListener('click',function(e){
    var th=e.target.closest('.chunk th');if(th)askWhy(th.textContent)});
  var view=document.getElementById('log-view'),title=document.getElementById('log-title');
  document.getElementById('failures').addEventListener('click',function(e){
    var b=e.target.closest('button[data-log]');if(!b)return;
    title.textContent=b.dataset.log;title.hidden=false;view.hidden=false;
    view.textContent='loading\\u2026';
    fetch('log?uri='+encodeURIComponent(b.dataset.log),{credentials:'same-origin'})
      .then(function(r){return r.text().then(function(t){
        view.textContent=r.ok?t:('HTTP '+r.status+': '+t)})});
  });
})();
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def duration(seconds: float | None) -> str:
    """A person's duration: 45 s, 12 min, 5.2 h, 3.1 d."""
    if seconds is None:
        return "–"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def status_badge(status: str) -> str:
    css = CELLS.get(status, ("x", "", ""))[0]
    return f'<span class="status {css}">{_e(status)}</span>'


def render_grid(snapshot: Snapshot, rows: Sequence[int]) -> str:
    """A row per kernel, a column per (version, kind), a letter per cell. Cut into a
    heading per family and blocks of CHUNK_ROWS rows, each its own fixed-layout table
    (the columns line up) that the browser lays out and paints only when it is scrolled
    to (``content-visibility: auto``; it cannot apply to a table's own row groups)."""
    versions, kernels, cells = snapshot.versions, snapshot.kernels, snapshot.cells
    columns = len(versions) * len(KINDS)
    colgroup = f"<colgroup><col class=k><col class=c span={columns}></colgroup>"
    td = {css: f"<td class={css}>{letter}" for css, letter, _ in CELLS.values()}
    td[UNKNOWN] = f"<td class={UNKNOWN}>?"
    parts = [f"<div id=grid style='--columns:{columns}'><table class=head>{colgroup}"]
    parts.append("<tr><th rowspan=2>kernel")
    for v in versions:
        retired = v not in snapshot.configured
        title = f"{v}: not in the run-time config" if retired else v
        parts.append(
            f"<th colspan={len(KINDS)} title='{_e(title)}'>{_e(v)}{' (retired)' if retired else ''}"
        )
    parts.append("<tr>" + f"<th>{'<th>'.join(KINDS)}" * len(versions) + "</table>")
    families: dict[str, list[int]] = {}
    for row in rows:
        families.setdefault(kernels[row].family, []).append(row)
    for family, members in families.items():
        plural = "s" if len(members) != 1 else ""
        parts.append(
            f"<h3 id='family-{_e(family)}'>{_e(family)} · {len(members)} kernel{plural}</h3>"
        )
        for start in range(0, len(members), CHUNK_ROWS):
            chunk = members[start : start + CHUNK_ROWS]
            height = f"contain-intrinsic-size:auto {len(chunk) * ROW_PX}px"
            parts.append(f"<div class=chunk style='{height}'><table>{colgroup}")
            parts.extend(
                f"<tr><th>{_e(kernels[row].release)}" + "".join(td[c] for c in cells[row])
                for row in chunk
            )
            parts.append("</table></div>")
    parts.append("</div>")
    return "".join(parts)


def render_freshness(rows: Sequence[Freshness]) -> str:
    out = [
        "<table class=list id=freshness-table><tr><th>driver version<th>published"
        "<th>arrival → published, median<th>p90<th>kernels waiting<th>waiting, median"
        "<th>oldest"
    ]
    for r in rows:
        out.append(
            f"<tr><td>{_e(r.driver_version)}<td>{r.published}<td>{duration(r.median_s)}"
            f"<td>{duration(r.p90_s)}<td>{r.waiting}<td>{duration(r.waiting_median_s)}"
            f"<td>{duration(r.waiting_oldest_s)}"
        )
    out.append("</table>")
    return "".join(out)


def render_failures(failures: Sequence[Failure], shown: int = FAILURES_SHOWN) -> str:
    if not failures:
        return "<p class=meta id=no-failures>No driver is failing.</p>"
    out = [
        f"<p class=meta>{len(failures)} failing driver(s)"
        + (f", the newest {shown} shown" if len(failures) > shown else "")
        + "</p><div class=scroll><table class=list id=failures-table><tr><th>time<th>kernel"
        "<th>version<th>kind<th>status<th>reason<th>log"
    ]
    for f in failures[:shown]:
        log = f"<button type=button data-log='{_e(f.log)}'>log</button>" if f.log else ""
        # (a quarantine's reason already says how many)
        times = f" ({f.failures} in a row)" if f.failures > 1 and f.status != "quarantined" else ""
        out.append(
            f"<tr><td>{_e(f.time)}<td>{_e(f.kernel)}<td>{_e(f.driver_version)}<td>{_e(f.kind)}"
            f"<td>{status_badge(f.status)}<td>{_e(f.reason or f.failure or '')}{times}"
            f"<br><span class=meta>run {_e(f.run_id)}</span><td>{log}"
        )
    out.append("</table></div>")
    return "".join(out)


def render_why(exp: Explanation) -> str:
    """The ``drivers why`` answer (:func:`drivers.ops.why.render`) as HTML."""
    bundle = f"bundle {_e(exp.bundle)} (arrived {_e(exp.arrived)})" if exp.bundle else "no bundle"
    out = [
        f"<div id=why-result data-kernel='{_e(exp.kernel)}'><p><b>{_e(exp.kernel)}</b> "
        f"({_e(exp.family)}): {bundle}</p><table class=list><tr><th>version<th>kind"
        "<th>status<th>answer"
    ]
    for a in exp.answers:
        details = "".join(f"<br><span class=meta>{_e(d)}</span>" for d in a.details)
        action = f"<br>→ {_e(a.action)}" if a.action else ""
        out.append(
            f"<tr><td>{_e(a.driver_version)}<td>{_e(a.kind)}<td>{status_badge(a.status)}"
            f"<td>{_e(a.summary)}{details}{action}"
        )
    present = sum(a.present for a in exp.answers)
    out.append(
        f"</table><p class=meta>{present} of {len(exp.answers)} driver(s) available to agents "
        "on this kernel</p></div>"
    )
    return "".join(out)


def render_message(text: str, css: str = "error") -> str:
    return f"<p class={css}>{_e(text)}</p>"


def _options(selected: str) -> str:
    out = ['<option value="">all families</option>']
    for family in FAMILIES:
        mark = " selected" if family == selected else ""
        out.append(f'<option value="{_e(family)}"{mark}>{_e(family)}</option>')
    return "".join(out)


def render_page(
    snapshot: Snapshot,
    family: str = "",
    selector: str = "",
    kernel: str = "",
    why: str = "",
    now: datetime | None = None,
    notes: Sequence[str] = (),
) -> str:
    """The whole page; ``why`` is an answer already rendered (:func:`render_why`)."""
    error = ""
    try:
        rows = select_kernels(snapshot, family, selector)
    except SelectorError as e:
        rows, error = [], str(e)
    failures = recent_failures(snapshot, rows)
    fresh = freshness(snapshot, rows, now)
    legend = "".join(
        f"<span class={css}>{letter or '&nbsp;'} {_e(meaning)}</span>"
        for css, letter, meaning in CELLS.values()
    )
    filtered = len(rows) != len(snapshot.kernels) or error
    shown = f"{len(rows)} of {len(snapshot.kernels)}" if filtered else f"{len(rows)}"
    updated = f"; indexes updated {_e(snapshot.updated)}" if snapshot.updated else ""
    extra = "".join(render_message(n, "meta") for n in notes)
    if snapshot.unparsable:
        extra += render_message(
            f"{len(snapshot.unparsable)} name(s) in the indexes are not kernel releases and "
            f"are left out: {', '.join(snapshot.unparsable[:5])}",
            "meta",
        )
    return "".join(
        [
            "<!doctype html><html lang=en><head><meta charset=utf-8>",
            "<meta name=viewport content='width=device-width'>",
            f"<title>Driver coverage</title><style>{CSS}</style></head><body>",
            "<h1>Driver coverage</h1>",
            f"<p class=meta id=summary>{shown} kernels × {len(snapshot.versions)} driver "
            f"versions × {len(KINDS)} kinds{updated}</p>{extra}",
            "<form id=filter method=get action=coverage>",
            f"<label>Family <select name=family id=family>{_options(family)}</select></label>",
            "<label>Kernels <input type=text name=select id=select "
            f"value='{_e(selector)}' placeholder='el8:4.18.0-305..4.18.0-372 or >=5.10'>"
            "</label><button type=submit id=apply>Filter</button>"
            "<a href=coverage>all kernels</a></form>",
            "<form id=why-form method=get action=why>",
            f"<label>Why is my kernel missing? <input type=text name=kernel id=kernel "
            f"value='{_e(kernel)}' placeholder='5.4.0-62-generic'></label>",
            "<button type=submit id=ask>Explain</button></form>",
            f"<div id=filter-error>{render_message(error) if error else ''}</div>",
            f"<section id=why-answer>{why}</section>",
            "<h2>Freshness</h2><section id=freshness>",
            render_freshness(fresh),
            "</section><h2>Recent failures</h2><section id=failures>",
            render_failures(failures),
            "<p class=meta id=log-title hidden></p><pre id=log-view hidden></pre></section>",
            f"<h2>Coverage</h2><div class=legend>{legend}</div>",
            "<p class=meta>Click a kernel for its <code>drivers why</code> answer.</p>",
            render_grid(snapshot, rows),
            # The grid is in the document: what the browser tests and the benchmark wait
            # for (a mark, then the next frame painted).
            "<script>performance.mark('coverage-grid');"
            "document.documentElement.dataset.grid='built';"
            "requestAnimationFrame(function(){setTimeout(function(){"
            "performance.mark('coverage-painted');"
            "document.documentElement.dataset.grid='painted'})});</script>",
            f"<script>{SCRIPT}</script></body></html>",
        ]
    )


def render_why_page(answer: str, kernel: str) -> str:
    """The answer alone, when the page's script did not ask for it (no JavaScript)."""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Why: "
        f"{_e(kernel)}</title><style>{CSS}</style></head><body><h1>Why is my kernel missing?"
        f"</h1>{answer}<p><a href=coverage>coverage</a></p></body></html>"
    )
