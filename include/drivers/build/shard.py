"""The shard file: one builder's share of a run's tasks, what ``drivers build-shard`` reads.

Pre-build writes it (JSON) under the run's staging prefix, named by
:func:`drivers.domain.layout.shard_object`::

    {"run_id": "...", "builder": "fc36", "index": 3, "cost": 412.0,
     "buckets": {"bundles": "...", "sources": "...", "work": "..."},
     "tasks": [["6.1.0-47-amd64", "2.3.0", "mod"], ...]}        # grouped by kernel
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from drivers.domain.kernels import KernelParseError, parse_kernel
from drivers.domain.names import KINDS, DriverKey, DriverVersionError, check_driver_version

BUCKET_ROLES = ("bundles", "sources", "work")  # the buckets a builder reads and writes

_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "an integer",
               (int, float): "a number"}  # fmt: skip


class ShardFormatError(ValueError):
    """The shard file is not what pre-build writes; the message names the culprit."""


@dataclasses.dataclass(frozen=True)
class Shard:
    run_id: str
    builder: str
    index: int
    cost: float
    bundles: str  # bucket names
    sources: str
    work: str
    tasks: tuple[DriverKey, ...]

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Shard:
        """Parse and check a shard file; ``where`` (its URI) starts every error message."""
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ShardFormatError(f"{where}: not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ShardFormatError(f"{where}: expected a JSON object, got {type(doc).__name__}")
        buckets = _bucket_names(_field(doc, "buckets", dict, where), where)
        tasks = _tasks(_field(doc, "tasks", list, where), where)
        run_id, builder = _field(doc, "run_id", str, where), _field(doc, "builder", str, where)
        for name, value in (("run_id", run_id), ("builder", builder)):
            if not value or "/" in value:
                raise ShardFormatError(f"{where}: {name} {value!r} must be non-empty, without '/'")
        index = _field(doc, "index", int, where)
        if index < 0:
            raise ShardFormatError(f"{where}: field 'index' must not be negative, got {index}")
        return cls(
            run_id=run_id,
            builder=builder,
            index=index,
            cost=float(_field(doc, "cost", (int, float), where)),
            tasks=tasks,
            **buckets,
        )

    def by_kernel(self) -> list[tuple[str, list[DriverKey]]]:
        """Tasks per kernel, kernels in first-seen order (one bundle download each)."""
        groups: dict[str, list[DriverKey]] = {}
        for key in self.tasks:
            groups.setdefault(key.kernel, []).append(key)
        return list(groups.items())


def _field(within: dict, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = within.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        what = _JSON_TYPES.get(kind, str(kind))
        raise ShardFormatError(f"{where}: field {name!r} must be {what}, got {value!r}")
    return value


def _bucket_names(buckets: dict, where: str) -> dict[str, str]:
    names = {}
    for role in BUCKET_ROLES:
        value = _field(buckets, role, str, where).removeprefix("gs://").rstrip("/")
        if not value or "/" in value:
            raise ShardFormatError(f"{where}: buckets.{role} {value!r} is not a bucket name")
        names[role] = value
    return names


def _tasks(tasks: list, where: str) -> tuple[DriverKey, ...]:
    keys: dict[DriverKey, None] = {}  # a repeated task is built once; order is kept
    for n, task in enumerate(tasks):
        if not (
            isinstance(task, list) and len(task) == 3 and all(isinstance(t, str) for t in task)
        ):
            raise ShardFormatError(
                f"{where}: tasks[{n}] must be [kernel, driver_version, kind], got {task!r}"
            )
        kernel, version, kind = task
        try:
            parse_kernel(kernel)
            check_driver_version(version)
        except (KernelParseError, DriverVersionError) as e:
            raise ShardFormatError(f"{where}: tasks[{n}]: {e}") from None
        if kind not in KINDS:
            raise ShardFormatError(f"{where}: tasks[{n}]: kind {kind!r} is not mod or bpf")
        keys[DriverKey(kernel, version, kind)] = None
    return tuple(keys)
