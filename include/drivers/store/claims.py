"""The plan lock and run claims: two runs in flight never plan the same task.

The nightly (``upstream_drivers``) and a backfill (``backfill_drivers``) may overlap: a
backfill of thousands of kernels runs for hours. Without coordination both would plan
the drivers neither has built yet and build them twice, racing to publish.

So every run's ``pre_build`` plans under one lock object in the work bucket
(:data:`drivers.domain.layout.PLAN_LOCK_OBJECT`, created only if absent: ``ifGenerationMatch=0``
makes exactly one creator win, on GCS and on the emulator). Holding it, it reads the live
claims of the other runs (``state/claims/<run_id>.json``: the tasks each planned, and
when that claim expires), leaves their tasks out of its plan (counted as ``claimed``,
naming the run), writes its own claim and releases the lock. The lock is held for
seconds (reading claims and planning), never while building.

A claim is deleted when its run ends (``cleanup_staging``) and by the teardown of a run
that failed or was cancelled; a claim past its expiry (``[claims] ttl_s``, a run that
died untidily) is ignored, and deleted by the next run that holds the lock. A lock older
than ``[claims] lock_stale_s`` (its holder died while planning) is broken. A dry run
reads the claims (its plan shows what they hold) but takes no lock and claims nothing.

No Airflow here: the CLI and tests use this module as the DAG does.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from google.api_core.exceptions import NotFound, PreconditionFailed

from drivers.domain import layout
from drivers.store.storage import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)

Task = tuple[str, str, str]  # (kernel, driver_version, kind), as the planner's DriverKey

BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 5.0


class PlanLockTimeout(RuntimeError):
    """Another run held the plan lock longer than we may wait: transient, retry later."""


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Claim:
    """The tasks one running run planned, valid until ``expires``."""

    run_id: str
    created: datetime
    expires: datetime
    tasks: tuple[Task, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "created": self.created.isoformat(),
            "expires": self.expires.isoformat(),
            "tasks": [list(t) for t in self.tasks],
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Claim:
        return cls(
            run_id=doc["run_id"],
            created=datetime.fromisoformat(doc["created"]),
            expires=datetime.fromisoformat(doc["expires"]),
            tasks=tuple((k, v, kind) for k, v, kind in doc["tasks"]),
        )


# --- the plan lock -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Held:
    """The lock object as found: its generation, creation time and body."""

    generation: int
    created: datetime
    body: dict[str, Any]

    def stale_after(self, stale_s: float) -> datetime:
        try:
            when = datetime.fromisoformat(self.body["stale_after"])
            return when if when.tzinfo else when.replace(tzinfo=UTC)
        except (KeyError, TypeError, ValueError):  # not written by us: by the object's age
            return self.created + timedelta(seconds=stale_s)


class PlanLock:
    """The work bucket's plan lock: create-if-absent, stale after ``stale_s``, waited for
    with exponential backoff (and jitter, so waiting runs do not retry in step) up to
    ``wait_s``, then :class:`PlanLockTimeout`."""

    def __init__(
        self,
        store: ObjectStore,
        run_id: str,
        *,
        stale_s: float,
        wait_s: float,
        now: Callable[[], datetime] = _now,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store, self.run_id = store, run_id
        self.stale_s, self.wait_s = stale_s, wait_s
        self._now, self._sleep = now, sleep
        self.generation: int | None = None
        self.broken: list[str] = []  # stale locks broken on the way: their holders

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait_s
        delay = BACKOFF_FIRST_S
        while True:
            now = self._now()
            body = {
                "run_id": self.run_id,
                "acquired": now.isoformat(),
                "stale_after": (now + timedelta(seconds=self.stale_s)).isoformat(),
            }
            generation = self.store.put_if_generation(
                layout.PLAN_LOCK_OBJECT, json.dumps(body).encode(), 0, "application/json"
            )
            if generation is not None:
                self.generation = generation
                return
            holder = self._holder()  # held: by whom, and since when?
            if holder is not None and holder.body == body:
                # ours: the client retried an upload whose first try had landed
                self.generation = holder.generation
                return
            if time.monotonic() < deadline and (holder is None or self._break_if_stale(holder)):
                continue  # retry at once: the lock went away, or was stale and is gone
            if time.monotonic() + delay > deadline:
                who = holder.body.get("run_id", "?") if holder else "?"
                since = holder.body.get("acquired", "?") if holder else "?"
                raise PlanLockTimeout(
                    f"the plan lock gs://{self.store.bucket_name}/{layout.PLAN_LOCK_OBJECT} "
                    f"is held by run {who} since {since}; waited {self.wait_s:.0f} s. Another "
                    "pre_build is planning: retry later (Airflow retries this task). If that "
                    f"run is gone, the lock is broken after {self.stale_s:.0f} s."
                )
            self._sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, BACKOFF_MAX_S)

    def _holder(self) -> _Held | None:
        """The lock held now; None when it just went away."""
        blob = self.store.client.bucket(self.store.bucket_name).get_blob(layout.PLAN_LOCK_OBJECT)
        if blob is None:
            return None
        try:
            body = json.loads(blob.download_as_bytes(if_generation_match=blob.generation))
        except (NotFound, PreconditionFailed):
            return None  # released (or replaced) while we looked
        except ValueError:
            body = {}  # unreadable: judged by its age alone
        return _Held(blob.generation, blob.time_created, body if isinstance(body, dict) else {})

    def _break_if_stale(self, holder: _Held) -> bool:
        if holder.stale_after(self.stale_s) > self._now():
            return False
        log.warning(
            "breaking the stale plan lock of run %s (acquired %s)",
            holder.body.get("run_id", "?"),
            holder.body.get("acquired", "?"),
        )
        self.broken.append(holder.body.get("run_id", "?"))
        self.store.delete_generation(layout.PLAN_LOCK_OBJECT, holder.generation)
        return True

    def release(self) -> None:
        if self.generation is None:
            return
        if not self.store.delete_generation(layout.PLAN_LOCK_OBJECT, self.generation):
            log.warning(
                "run %s: the plan lock was no longer ours at release (held past %s s and "
                "broken by another run)",
                self.run_id,
                self.stale_s,
            )
        self.generation = None

    def __enter__(self) -> PlanLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# --- claims ------------------------------------------------------------------------------


def read_claims(
    store: ObjectStore, *, exclude: str | None = None, now: datetime | None = None
) -> tuple[list[Claim], list[Claim]]:
    """(live, expired) claims in the work bucket, leaving out run ``exclude`` (the caller's
    own claim: a retried pre_build replans what it claimed). A claim that cannot be read
    is logged and ignored: it must not stop every run."""
    now = now or _now()
    live, expired = [], []
    for info in store.list(layout.CLAIMS_PREFIX):
        run_id = layout.run_from_claim_object(info.name)
        if run_id is None or run_id == exclude:
            continue
        try:
            claim = Claim.from_json(json.loads(store.download(info.name)))
        except ObjectNotFound:
            continue  # released while we listed
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable claim gs://%s/%s: %s", store.bucket_name, info.name, e)
            continue
        (live if claim.expires > now else expired).append(claim)
    return live, expired


def write_claim(
    store: ObjectStore,
    run_id: str,
    tasks: Iterable[Task],
    ttl_s: float,
    now: datetime | None = None,
) -> Claim:
    """Claim ``tasks`` for ``run_id`` (replacing its earlier claim) for ``ttl_s`` seconds."""
    now = now or _now()
    claim = Claim(run_id, now, now + timedelta(seconds=ttl_s), tuple(tuple(t) for t in tasks))
    store.put(
        layout.claim_object(run_id),
        json.dumps(claim.to_json(), separators=(",", ":")).encode(),
        "application/json",
    )
    return claim


def release_claim(store: ObjectStore, run_id: str) -> bool:
    """Delete the run's claim; whether there was one."""
    blob = store.client.bucket(store.bucket_name).blob(layout.claim_object(run_id))
    try:
        blob.delete()
    except NotFound:
        return False
    return True


def held_tasks(claims: Iterable[Claim]) -> dict[Task, str]:
    """Each claimed task and the run holding it (the older claim wins a task claimed
    twice, which only a claim written without the lock could do)."""
    held: dict[Task, str] = {}
    for claim in sorted(claims, key=lambda c: c.created):
        for task in claim.tasks:
            held.setdefault(task, claim.run_id)
    return held


@dataclass
class Planning:
    """One run's planning under the lock (a context manager, what pre_build uses)::

        with Planning(stores.work, run_id, config.claims, not dry_run) as planning:
            result = plan(..., claimed=planning.held)
            planning.claim(task for shard in result.shards for task in shard.tasks)

    On entry: the lock (unless ``claim_tasks`` is false: a dry run), and ``held``, the tasks
    other runs' live claims hold. On a clean exit: this run's claim, then the lock is
    released (always, also when planning raised)."""

    store: ObjectStore
    run_id: str
    settings: dict[str, Any]  # the config's [claims]
    claim_tasks: bool = True
    now: Callable[[], datetime] = _now
    held: dict[Task, str] = field(default_factory=dict)
    live: list[Claim] = field(default_factory=list)
    expired: list[Claim] = field(default_factory=list)
    written: Claim | None = None
    _tasks: list[Task] | None = None
    _lock: PlanLock | None = None

    def __enter__(self) -> Planning:
        if self.claim_tasks:
            self._lock = PlanLock(
                self.store,
                self.run_id,
                stale_s=self.settings["lock_stale_s"],
                wait_s=self.settings["lock_wait_s"],
                now=self.now,
            )
            self._lock.acquire()
        try:
            self.live, self.expired = read_claims(self.store, exclude=self.run_id, now=self.now())
        except BaseException:
            self._release_lock()
            raise
        self.held = held_tasks(self.live)
        return self

    def claim(self, tasks: Iterable[Task]) -> None:
        """The tasks this run planned (written as its claim on a clean exit)."""
        self._tasks = [tuple(t) for t in tasks]

    def __exit__(self, exc_type, *exc: object) -> None:
        try:
            if exc_type is None and self.claim_tasks:
                for claim in self.expired:  # only the lock holder tidies up
                    release_claim(self.store, claim.run_id)
                if self._tasks:
                    self.written = write_claim(
                        self.store, self.run_id, self._tasks, self.settings["ttl_s"], self.now()
                    )
                else:  # nothing to build: nothing to hold (a retry's earlier claim goes)
                    release_claim(self.store, self.run_id)
        finally:
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def summary(self) -> dict[str, Any]:
        """For the plan's inputs: whose claims were honoured, whose had expired."""
        return {
            "live": {c.run_id: c.expires.isoformat() for c in self.live},
            "expired_ignored": sorted(c.run_id for c in self.expired),
            "own_claim_tasks": len(self.written.tasks) if self.written else 0,
        }


def iter_claims(store: ObjectStore) -> Iterator[str]:
    """Run ids with a claim object (live or not), for operators and tests."""
    for info in store.list(layout.CLAIMS_PREFIX):
        run_id = layout.run_from_claim_object(info.name)
        if run_id is not None:
            yield run_id
