"""Run-time config: what operators change without a deploy.

Three small objects under ``config/`` in the work bucket (``layout.RUNTIME_CONFIG_PREFIX``)
are read when a run starts; a missing object means "as shipped":

- ``driver-versions``: the driver versions to build, one per line. It REPLACES the
  shipped list, so adding or retiring a version is one edit of one object.
- ``blocklist``: rules in blocklist syntax (:mod:`drivers.domain.blocklist`), applied IN
  ADDITION to the shipped blocklist files; a match names ``gs://<work>/config/blocklist:N``.
- ``quarantine-release``: rules in the same syntax naming tasks released from quarantine.

The DAG's shape (builders, routes, slots, schedules) stays in the shipped config: the DAG
processor reads it at parse time, which must not touch the network.

A malformed object fails the whole load with a :class:`RuntimeConfigError` naming the
object and line: a run never starts with half of an operator's change applied. Writes go
through :func:`write_part`: validated first, then one object put that only lands while
the object is still at the generation that was read.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drivers.domain.blocklist import Blocklist, BlocklistError, Rule, parse_rules
from drivers.domain.config import Config, load_config
from drivers.domain.layout import RUNTIME_CONFIG_PREFIX, Buckets
from drivers.domain.names import check_driver_version

if TYPE_CHECKING:  # google-cloud-storage is imported only when a bucket is read
    from drivers.store.storage import ObjectStore

PARTS = ("driver-versions", "blocklist", "quarantine-release")
SHIPPED = "shipped"
_CONTENT_TYPE = "text/plain; charset=utf-8"


class RuntimeConfigError(ValueError):
    """A part that must not be used (or written): names the object, the line, what to do."""


class RuntimeConfigConflict(RuntimeConfigError):
    """The object changed between our read and our write: nothing was written."""


@dataclass(frozen=True)
class RuntimeConfig:
    driver_versions: tuple[str, ...]
    blocklist: Blocklist  # the shipped files' rules, then the object's
    quarantine_release: Blocklist
    origins: dict[str, str]  # part -> "shipped" or "gs://<work>/config/<part>#<generation>"

    def to_json(self) -> dict[str, Any]:
        def rules(blocklist: Blocklist) -> list[dict[str, str]]:
            return [{"where": r.where, "rule": r.text} for r in blocklist.rules]

        return {
            "driver_versions": list(self.driver_versions),
            "blocklist": rules(self.blocklist),
            "quarantine_release": rules(self.quarantine_release),
            "origins": dict(self.origins),
        }


@dataclass(frozen=True)
class PartObject:
    """One part as stored: its text, or None when the object does not exist (generation
    0 then, which is what "still absent" means to a conditional write)."""

    part: str
    uri: str
    text: str | None
    generation: int

    @property
    def origin(self) -> str:
        return SHIPPED if self.text is None else f"{self.uri}#{self.generation}"


def object_name(part: str) -> str:
    if part not in PARTS:
        raise RuntimeConfigError(f"unknown run-time config part {part!r}; one of {list(PARTS)}")
    return f"{RUNTIME_CONFIG_PREFIX}{part}"


def object_uri(work: ObjectStore, part: str) -> str:
    return f"gs://{work.bucket_name}/{object_name(part)}"


def _fix_hint(part: str) -> str:
    return (
        f"fix it: `drivers config get {part} > FILE`, edit FILE, `drivers config set {part} FILE`"
    )


def _decode(data: bytes, uri: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RuntimeConfigError(
            f"{uri}: not UTF-8 text (byte {e.start}); it must be text, one entry per line"
        ) from None


# --- parsing -----------------------------------------------------------------------------


def parse_driver_versions(text: str, source: str) -> tuple[str, ...]:
    """One driver version per line, ``#`` comments. An empty list is an error: it would
    silently build nothing."""
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if len(line.split()) > 1:
            raise RuntimeConfigError(
                f"{source}:{number}: {line!r} is not one driver version; "
                "write one per line, e.g. 2.3.0"
            )
        try:
            check_driver_version(line)
        except ValueError as e:
            raise RuntimeConfigError(f"{source}:{number}: {e}") from None
        if line in seen:
            raise RuntimeConfigError(
                f"{source}:{number}: driver version {line} is already listed at line "
                f"{seen[line]}; list it once"
            )
        seen[line] = number
    if not seen:
        raise RuntimeConfigError(
            f"{source}: lists no driver version, so runs would build nothing; list at least "
            "one (one per line), or delete the object to use the shipped list"
        )
    return tuple(seen)


def _rules(text: str, source: str) -> list[Rule]:
    try:
        return parse_rules(text.splitlines(), source)
    except BlocklistError as e:  # already "<source>:<line>: what is wrong"
        raise RuntimeConfigError(str(e)) from None


def validate_part(part: str, text: str, source: str) -> tuple[str, ...] | list[Rule]:
    """Parse one part's text as it would be used; raises RuntimeConfigError."""
    if part == "driver-versions":
        return parse_driver_versions(text, source)
    object_name(part)  # an unknown part is refused
    return _rules(text, source)


def shipped_text(part: str, config: Config) -> str:
    """What the object would hold to change nothing: the shipped versions; no rules beyond
    the shipped blocklist files, which always apply; no quarantine release."""
    object_name(part)
    if part == "driver-versions":
        return "".join(f"{v}\n" for v in config.driver_versions)
    return ""


# --- reading -----------------------------------------------------------------------------


def read_part(work: ObjectStore, part: str) -> PartObject:
    """One request. A missing object is "shipped"; a missing bucket is an error (a wrong
    DRIVERS_BUCKET_WORK must not read as "nothing configured")."""
    from drivers.store.storage import ObjectNotFound

    uri = object_uri(work, part)
    try:
        data, generation = work.download_with_generation(object_name(part))
    except ObjectNotFound:
        return PartObject(part, uri, None, 0)
    try:
        text = _decode(data, uri)
    except RuntimeConfigError as e:
        raise RuntimeConfigError(f"{e}; {_fix_hint(part)}") from None
    return PartObject(part, uri, text, generation)


def effective_config(objects: dict[str, PartObject], config: Config) -> RuntimeConfig:
    """The run-time config from the parts as read; every part is parsed before anything is
    returned, so a bad one leaves nothing half-applied."""
    parsed: dict[str, Any] = {}
    for part, obj in objects.items():
        if obj.text is None:
            continue
        try:
            parsed[part] = validate_part(part, obj.text, obj.uri)
        except RuntimeConfigError as e:
            raise RuntimeConfigError(f"{e}; {_fix_hint(part)}") from None
    return RuntimeConfig(
        driver_versions=parsed.get("driver-versions", config.driver_versions),
        blocklist=Blocklist([*config.blocklist.rules, *parsed.get("blocklist", [])]),
        quarantine_release=Blocklist(parsed.get("quarantine-release", [])),
        origins={part: objects[part].origin for part in PARTS},
    )


def load_runtime_config(work: ObjectStore, config: Config) -> RuntimeConfig:
    """Driver versions, blocklist and quarantine releases as a run must use them: three
    small downloads from ``config/`` in the work bucket, over the shipped ``config``."""
    return effective_config({part: read_part(work, part) for part in PARTS}, config)


# --- writing -----------------------------------------------------------------------------


def check_part(part: str, text: str, uri: str) -> None:
    """``validate_part`` for a write: the error says nothing was written."""
    try:
        validate_part(part, text, uri)
    except RuntimeConfigError as e:
        raise RuntimeConfigError(f"{e}; nothing was written to {uri}") from None


def write_part(work: ObjectStore, part: str, text: str, generation: int) -> int:
    """Validate ``text`` fully, then write it as the part's object in one put, only if the
    object is still at ``generation`` (0: still absent). Returns the new generation."""
    uri = object_uri(work, part)
    check_part(part, text, uri)
    written = work.put_if_generation(
        object_name(part), text.encode(), generation, content_type=_CONTENT_TYPE
    )
    if written is None:
        read = f"generation {generation}" if generation else "absent"
        raise RuntimeConfigConflict(
            f"{uri} changed since it was read ({read}): nothing was written; read it again "
            f"(`drivers config get {part}`) and redo the change"
        )
    return written


def add_line(work: ObjectStore, part: str, line: str, config: Config) -> tuple[int, int]:
    """Append one line to the part (to the shipped equivalent when the object is absent,
    so adding a version keeps the shipped ones). Returns (line number, new generation)."""
    line = line.strip()
    if not line or "\n" in line or "\r" in line:
        raise RuntimeConfigError(f"drivers config add {part}: give exactly one non-empty line")
    obj = read_part(work, part)
    text = obj.text if obj.text is not None else shipped_text(part, config)
    if text and not text.endswith("\n"):
        text += "\n"
    text += line + "\n"
    return len(text.splitlines()), write_part(work, part, text, obj.generation)


# --- the `drivers config` verbs ----------------------------------------------------------


def _work() -> ObjectStore:
    from drivers.store.storage import ObjectStore, client_from_environment

    return ObjectStore(client_from_environment(), Buckets.from_env().work)


def _read_input(source: str) -> str:
    if source == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise RuntimeConfigError(f"cannot read {source}: {e.strerror}") from None
    return _decode(data, "standard input" if source == "-" else source)


def _print_rules(rules: list[Rule]) -> None:
    if not rules:
        print("  (no rules)")
    width = max((len(r.where) for r in rules), default=0)
    for r in rules:
        print(f"  {r.where:<{width}}  {r.text}")


def _print_show(rc: RuntimeConfig, config: Config) -> None:
    print(f"driver-versions     {rc.origins['driver-versions']}")
    for v in rc.driver_versions:
        print(f"  {v}")
    files = ", ".join(p.name for p in config.blocklist_paths) or "none"
    extra = rc.origins["blocklist"]
    print(f"blocklist           shipped ({files})" + ("" if extra == SHIPPED else f" + {extra}"))
    _print_rules(rc.blocklist.rules)
    print(f"quarantine-release  {rc.origins['quarantine-release']}")
    _print_rules(rc.quarantine_release.rules)


def cmd_config(args: argparse.Namespace) -> int:
    """drivers config show|get|set|add: the run-time config in the work bucket."""
    config = load_config(args.config)
    work = _work()
    if args.action == "show":
        rc = load_runtime_config(work, config)
        if args.json:
            print(json.dumps(rc.to_json(), indent=2))
        else:
            _print_show(rc, config)
        return 0
    if args.action == "get":
        obj = read_part(work, args.part)
        if obj.text is None:
            print(f"{obj.uri} is not set: the shipped equivalent follows", file=sys.stderr)
            sys.stdout.write(shipped_text(args.part, config))
        else:
            print(f"{obj.origin} (config set --if-generation {obj.generation})", file=sys.stderr)
            sys.stdout.write(obj.text)
        return 0
    if args.action == "set":
        text = _read_input(args.file)
        uri = object_uri(work, args.part)
        check_part(args.part, text, uri)  # before any request: a bad file never gets far
        generation = args.if_generation
        if generation is None:
            generation = read_part(work, args.part).generation
        written = write_part(work, args.part, text, generation)
        print(f"wrote {uri}#{written}", file=sys.stderr)
        return 0
    number, written = add_line(work, args.part, args.line, config)
    print(f"added line {number} to {object_uri(work, args.part)}#{written}", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``drivers config`` on the CLI's subcommands."""
    p = sub.add_parser(
        "config", help="run-time config in the work bucket: driver versions, blocklist lines"
    )
    actions = p.add_subparsers(dest="action", required=True)
    s = actions.add_parser("show", help="the effective run-time config and where each part is")
    s.add_argument("--json", action="store_true", help="as JSON")
    g = actions.add_parser("get", help="print a part's object (or the shipped equivalent)")
    g.add_argument("part", choices=PARTS)
    s = actions.add_parser("set", help="replace a part's object with FILE (- for stdin)")
    s.add_argument("part", choices=PARTS)
    s.add_argument("file", metavar="FILE|-")
    s.add_argument(
        "--if-generation",
        type=int,
        metavar="N",
        help="only if the object is still at generation N (as `config get` printed; 0: "
        "absent); default: the generation read just before writing",
    )
    a = actions.add_parser("add", help="append one line to a part, e.g. a blocklist rule")
    a.add_argument("part", choices=PARTS)
    a.add_argument("line")
    p.set_defaults(func=cmd_config)
