"""Publishing drivers into a cache: new objects only, never an overwrite.

The one push of the project: upstream promotes verified drivers from a run's staging
into the driver cache, CPaaS promotes a drivers image's drivers into
``cpaas/<arch>/``. The cache is listed once per driver version, so drivers already
published cost no request and no read; each new one is loaded (downloaded from staging,
read from an image layer) and created with ``if_generation_match=0``. A published object
whose bytes differ from ours stays as it is: agents may have downloaded it, so it is
reported, never replaced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from drivers.store.storage import ObjectStore, UploadResult

Loader = Callable[[], bytes]


@dataclass(frozen=True)
class Candidate:
    size: int
    md5: str  # base64, as GCS listings report it


@dataclass
class PushResult:
    created: list[str] = field(default_factory=list)
    identical: list[str] = field(default_factory=list)  # published already, same bytes
    different: list[str] = field(default_factory=list)  # published with other bytes: kept
    new: list[str] = field(default_factory=list)  # not published before this push

    def changed_versions(self) -> list[str]:
        return sorted({name.split("/", 1)[0] for name in self.created})

    def to_json(self) -> dict[str, object]:
        return {
            "counts": {
                k: len(v)
                for k, v in (
                    ("created", self.created),
                    ("identical", self.identical),
                    ("different", self.different),
                )
                if v
            },
            "different": sorted(self.different),
            "versions": self.changed_versions(),
        }


def published(dest: ObjectStore, prefix: str, versions: Iterable[str]) -> dict[str, Candidate]:
    """What the cache under ``prefix`` holds for ``versions``: name -> size and md5."""
    found = {}
    for version in sorted(set(versions)):
        for info in dest.list(f"{prefix}{version}/"):
            found[info.name[len(prefix) :]] = Candidate(info.size, info.md5)
    return found


def push_new(
    dest: ObjectStore,
    prefix: str,
    candidates: dict[str, Candidate],
    load: Callable[[list[str]], Iterable[tuple[str, Loader]]],
    *,
    dry_run: bool = False,
    workers: int = 16,
) -> PushResult:
    """Publish ``candidates`` (cache-relative names ``<version>/<basename>``) under
    ``prefix`` in ``dest``. ``load(names)`` yields ``(name, loader)`` for the new ones;
    loaders run on the upload threads, at most ``2 * workers`` at a time, so big sets
    stream through without filling memory. ``dry_run`` only sorts the candidates."""
    have = published(dest, prefix, (n.split("/", 1)[0] for n in candidates))
    result = PushResult()
    for name in sorted(candidates):
        known = have.get(name)
        if known is None:
            result.new.append(name)
        elif known == candidates[name]:
            result.identical.append(name)
        else:
            result.different.append(name)
    if dry_run or not result.new:
        return result

    outcomes = {
        UploadResult.CREATED: result.created,
        # Another writer won the race since the listing: judged like a listed object.
        UploadResult.IDENTICAL: result.identical,
        UploadResult.DIFFERENT: result.different,
    }

    def upload(name: str, loader: Loader) -> tuple[str, UploadResult]:
        return name, dest.upload_new(prefix + name, loader())

    def collect(done: Iterable[Future]) -> None:
        for future in done:
            name, outcome = future.result()
            outcomes[outcome].append(name)

    dest.widen_connection_pool(workers)
    with ThreadPoolExecutor(workers, thread_name_prefix="push") as pool:
        pending: set[Future] = set()
        for name, loader in load(result.new):
            if len(pending) >= 2 * workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                collect(done)
            pending.add(pool.submit(upload, name, loader))
        collect(wait(pending).done)
    return result
