"""``drivers costs``: the cost model's ``[costs]``, calibrated from real build records.

Reads the newest runs' build records in the work bucket (each run's ledger object,
``ledger/runs/<run_id>.jsonl.gz``: a built driver's ``duration_s``; and its report's
``reports/<run_id>/build.json``: the shard records) and prints the ``[costs]`` block
and each builder's ``costs`` line, medians with the number of records behind them
(:mod:`drivers.domain.calibration`), for an engineer to paste into pipeline.toml.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from drivers.domain.calibration import Calibration, calibrate, render
from drivers.domain.layout import report_prefix
from drivers.store import ledger

if TYPE_CHECKING:
    from drivers.store.storage import ObjectStore

DEFAULT_RUNS = 20


def read_build_records(
    work: ObjectStore, runs: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(ledger records, shard records, runs read) of the newest ``runs`` runs that built
    something (a withdrawal's ledger object is no run)."""
    from drivers.store.storage import ObjectNotFound, read_json

    objects = sorted(work.list(ledger.RUNS_PREFIX), key=lambda i: (i.created, i.name), reverse=True)
    records: list[dict[str, Any]] = []
    shards: list[dict[str, Any]] = []
    read = 0
    for info in objects:
        if read == runs:
            break
        run = list(ledger.decode(work.download(info.name)))
        if not any(r["status"] in ("built", "failed") for r in run):
            continue
        read += 1
        records += run
        run_id = info.name.removeprefix(ledger.RUNS_PREFIX).removesuffix(".jsonl.gz")
        try:
            shards += read_json(work, f"{report_prefix(run_id)}build.json").get("shards", [])
        except ObjectNotFound:  # its report is gone: its builds still count
            pass
    return records, shards, read


def calibrate_from(work: ObjectStore, runs: int = DEFAULT_RUNS) -> Calibration:
    records, shards, read = read_build_records(work, runs)
    return calibrate(records, shards, read)


def cmd_costs(args: argparse.Namespace) -> int:
    """Exit 0 with the block printed, 1 when the work bucket holds no build record."""
    from drivers.domain.config import load_config
    from drivers.domain.layout import Buckets
    from drivers.store.storage import ObjectStore, client_from_environment

    if args.runs < 1:
        print(f"drivers costs: --runs must be >= 1, not {args.runs}", file=sys.stderr)
        return 2
    config = load_config(args.config)
    bucket = Buckets.from_env().work
    work = ObjectStore(client_from_environment(), bucket)
    cal = calibrate_from(work, args.runs)
    if cal.runs == 0:
        print(
            f"drivers costs: no build records in gs://{bucket}/{ledger.RUNS_PREFIX}: "
            "run upstream_drivers first (make run)",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(cal.to_json(), indent=1))
    else:
        source = f"gs://{bucket}/{ledger.RUNS_PREFIX} and reports/<run>/build.json"
        print(render(cal, config, source), end="")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "costs", help="[costs] for pipeline.toml, calibrated from the newest runs' builds"
    )
    p.add_argument(
        "--runs", type=int, default=DEFAULT_RUNS, help=f"newest runs to read ({DEFAULT_RUNS})"
    )
    p.add_argument("--json", action="store_true", help="the medians as JSON")
    p.set_defaults(func=cmd_costs)
