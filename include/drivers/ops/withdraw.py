"""``drivers withdraw``: take a published driver that turned out bad out of the cache.

The only path that ever deletes from a driver cache. It asks for confirmation, keeps a
copy of what it removes (``withdrawn/<version>/<name>@<generation>`` in the work
bucket), deletes exactly the generation it inspected (a driver published again
meanwhile is not touched), records the withdrawal in the ledger (who, why, what it was
built from) and rebuilds that version's support packages. The planner then holds the
driver back like a quarantined one until its builder image, sources or bundle change,
or the run-time config's quarantine-release names it: rebuilding the same inputs would
publish the same bad driver.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from drivers.domain import layout
from drivers.domain.kernels import parse_kernel
from drivers.domain.names import DriverKey, check_driver_version, check_kinds
from drivers.store import ledger

if TYPE_CHECKING:
    from drivers.domain.config import Config
    from drivers.store.storage import Stores

WITHDRAWN_PREFIX = "withdrawn/"  # in the work bucket: what was removed, for the record


class WithdrawError(ValueError):
    pass


def withdraw(
    stores: Stores, config: Config, key: DriverKey, reason: str, who: str
) -> dict[str, Any]:
    from drivers.build.compile import toolchain_versions
    from drivers.flows.cpaas import UPSTREAM_ARCH, publish_cpaas_packages
    from drivers.flows.upstream import update_support_packages
    from drivers.store.storage import ObjectNotFound

    if not reason.strip():
        raise WithdrawError("give the reason (--reason): it is what `drivers why` shows")
    name = key.object_name()
    uri = f"gs://{stores.drivers.bucket_name}/{name}"
    try:
        info = stores.drivers.info(name)
    except ObjectNotFound:
        raise WithdrawError(
            f"{uri} is not published: nothing to withdraw (see drivers why {key.kernel})"
        ) from None
    data = stores.drivers.download(name)
    kept = f"{WITHDRAWN_PREFIX}{name}@{info.generation}"
    stores.work.upload_new(kept, data)
    entry = ledger.read_coverage(stores.work, key.driver_version).entry(key.kernel, key.kind)
    built_from = (entry or {}).get("fingerprint")
    if built_from is None:  # published before the ledger: hold it against today's inputs
        builder = config.route(parse_kernel(key.kernel), key.kind)
        sources = stores.sources.info(layout.source_object(key.driver_version)).md5
        bundle = stores.bundles.info(layout.bundle_object(key.kernel)).md5
        built_from = ledger.fingerprint(
            ledger.builder_environment(config, builder, toolchain_versions), sources, bundle
        )
    if not stores.drivers.delete_generation(name, info.generation):
        raise WithdrawError(f"{uri} changed while being withdrawn: nothing deleted; try again")
    run_id = f"withdraw__{datetime.now(UTC):%Y-%m-%dT%H:%M:%S}__{key.kernel}__{key.kind}"
    done = ledger.record(
        key,
        "withdrawn",
        run_id,
        reason=f"{reason.strip()} (by {who})",
        object=uri,
        sha256=(entry or {}).get("sha256"),
        fingerprint=built_from,
        kept=f"gs://{stores.work.bucket_name}/{kept}",
    )
    written = ledger.append(stores.work, ledger.run_object(run_id), [done])
    ledger.apply_run(stores.work, run_id, [done])
    version = [key.driver_version]
    packages = {"upstream": _repackage(lambda now: update_support_packages(stores, version, now))}
    if any(stores.support.list(layout.cpaas_prefix(UPSTREAM_ARCH, key.driver_version))):
        # the CPaaS x86_64 packages carry upstream drivers too
        packages["cpaas"] = _repackage(
            lambda now: publish_cpaas_packages(stores, UPSTREAM_ARCH, version, now)
        )
    return {"withdrawn": uri, "kept": done["kept"], "ledger": written, "packages": packages}


def _repackage(publish: Callable[[datetime], dict[str, Any]]) -> dict[str, Any]:
    """Package names carry a timestamp to the second: a package published in this same
    second (by a run) would collide; take the next second then."""
    from drivers.build.packages import PackageConflict

    for _ in range(3):
        try:
            return publish(datetime.now(UTC))
        except PackageConflict:
            time.sleep(1.05)
    return publish(datetime.now(UTC))


def _confirm(key: DriverKey, uri: str) -> bool:
    if not sys.stdin.isatty():
        raise WithdrawError(
            "refusing to withdraw without confirmation: run it in a terminal or pass --yes"
        )
    print(
        f"This deletes {uri} from the cache agents download from.\n"
        f"Type the kernel release ({key.kernel}) to confirm: ",
        end="",
        file=sys.stderr,
        flush=True,
    )
    return sys.stdin.readline().strip() == key.kernel


def cmd_withdraw(args: argparse.Namespace) -> int:
    import json

    from drivers.domain.config import load_config
    from drivers.store.storage import Stores, client_from_environment

    kernel = parse_kernel(args.kernel.strip()).release
    key = DriverKey(kernel, check_driver_version(args.driver_version), check_kinds([args.kind])[0])
    stores = Stores(client_from_environment())
    uri = f"gs://{stores.drivers.bucket_name}/{key.object_name()}"
    if not args.yes and not _confirm(key, uri):
        print("drivers withdraw: not confirmed; nothing changed", file=sys.stderr)
        return 1
    result = withdraw(stores, load_config(), key, args.reason, args.by or getpass.getuser())
    print(json.dumps(result, indent=1))
    print(f"withdrew {uri} (a copy: {result['kept']})", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("withdraw", help="remove a bad published driver (asks to confirm)")
    p.add_argument("kernel")
    p.add_argument("--driver-version", required=True)
    p.add_argument("--kind", required=True, choices=("mod", "bpf"))
    p.add_argument("--reason", required=True, help="why: shown by drivers why and the ledger")
    p.add_argument("--by", help="who withdraws it (default: the login name)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_withdraw)
