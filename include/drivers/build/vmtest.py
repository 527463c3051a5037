"""Load-test drivers in their own kernel, booted under QEMU.

A driver that compiles can still be refused where it matters: symbol versions, vermagic,
missing dependencies, the eBPF verifier of that kernel, or it loads and captures nothing.
``vm_test`` boots a kernel (software emulation, ``-accel tcg``: KVM is not usable
everywhere) with a tiny initramfs (static busybox, the drivers, each driver version's
consumer, a script) and tests each of that kernel's drivers in turn, while the guest
keeps busy with file and process work in the background:

- a module is inserted (the modules it depends on first), the consumer captures events
  through it (``scap-open --kmod``), and it is removed;
- a probe is opened by the consumer (``scap-open --bpf PATH``: the kernel's verifier
  decides, then it attaches and captures events through it).

The consumer is libscap's ``scap-open`` built from the same prepared sources as the
driver (:mod:`drivers.build.consumer`); it must capture the ``events`` asked for. Only the
markers the guest prints on its serial console decide (the consumer's output is carried
in them); QEMU's exit status says nothing, and the whole boot is under a timeout.
Results per driver: ``loaded`` (the events were captured through it); ``load_failed``
(with the kernel's own messages or the consumer's); ``verifier_rejected`` (with the
verifier's log); ``too_few_events`` (it loads, the consumer attached, but fewer events
than asked for came through it); ``consumer_cannot_attach`` (it loads, but the consumer
could not capture through it: its output says why); ``no_boot_image`` (no bootable
kernel for that release: never a pass); ``boot_failed`` (the guest never reached or
finished its script: infrastructure, retryable); ``not_tested`` (the stage's time budget
was spent, the tests are off, its version has no consumer, or a module it needs is not
kept beside the boot image).

``test_kernels`` runs many kernels, a few VMs at a time, within a time budget: what the
``integration_tests`` stage of upstream_drivers does
(:func:`drivers.flows.upstream.integration_tests`).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from drivers.build.boot_images import debian_boot_image, fetch_boot_image
from drivers.build.consumer import (
    Consumer,
    ConsumerError,
    capture_started,
    captured_events,
    consumer_for,
)
from drivers.domain.deterministic import gzip_bytes
from drivers.domain.errors import DriversError
from drivers.domain.exit_codes import EX_TEMPFAIL
from drivers.domain.names import DriverKey, parse_object_name
from drivers.domain.verify import ElfError, gunzip, read_modinfo
from drivers.store.storage import ObjectStore

MARK = "VMTEST:"
BUSYBOX = Path("/usr/bin/busybox")  # Debian's busybox-static
QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT_S = 60.0  # boot and power-off; each driver adds driver_timeout_s
# The guest stops a consumer (SIGINT: it prints its stats) after its recipe's time to open
# a driver and this time to capture.
CAPTURE_TIMEOUT_S = 15
DEFAULT_EVENTS = 1000  # the config's [vm_tests] events
DEFAULT_MODULE_NAME = "collector"
OUTPUT_LINES = 60  # of the consumer's output, kept in the serial log (a verifier log is long)
STATUSES = (
    "loaded",
    "load_failed",
    "verifier_rejected",
    "too_few_events",
    "consumer_cannot_attach",
    "no_boot_image",
    "boot_failed",
    "not_tested",
)
PASSED, RETRYABLE = "loaded", "boot_failed"
# Not shown to capture events in its kernel: held back (enforce).
REFUSED = ("load_failed", "verifier_rejected", "too_few_events", "consumer_cannot_attach")
# What the consumer says when it cannot open a probe file: the probe's fault, not its own.
PROBE_FILE_ERRORS = (
    "can't open BPF probe",
    "invalid ELF version",
    "can't read ELF",
    "BPF probe is compiled for",
    "BPF probe license",
    "missing api_version section",
    "missing schema_version section",
    "missing SHT_SYMTAB section",
)
# A kernel with "perf/core: Prevent VMA split of buffer mappings" refusing libscap's
# mirrored perf-buffer mapping (drivers.build.consumer explains; its patches fix it).
SPLIT_REFUSED = re.compile(r"mmap \(3\)[^\n]*(Cannot allocate memory|Invalid argument)")

# The guest's /init: functions, then one block per driver (see init_script).
INIT_HEAD = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
echo {MARK}BOOTED $(uname -r)
# Activity for the drivers to see: file and process work, all the time.
(while :; do ls -R /sys/module >/dev/null 2>&1; cat /proc/self/status >/dev/null; done) &
capture() {{  # seconds, summary pattern, the consumer's command: its exit status and output
  seconds=$1
  summary=$2
  shift 2
  timeout -s INT $seconds "$@" >/tmp/out 2>&1
  echo {MARK}CONSUMER_EXIT $?
  grep -v '^ *$' /tmp/out | tail -n {OUTPUT_LINES} | sed 's/^/{MARK}OUT /'
  grep -E "$summary" /tmp/out | sed 's/^/{MARK}SUMMARY /'
}}
test_module() {{  # index, module name, the modules it depends on, then capture's arguments
  dmesg -c >/dev/null
  for m in $3; do
    modprobe $m 2>/tmp/err || {{ echo "{MARK}LOAD_FAILED modprobe $m: $(cat /tmp/err)"; return; }}
  done
  if insmod /drivers/$1.ko 2>/tmp/err; then
    echo {MARK}LOADED
    name=$2
    shift 3
    capture "$@"
    if rmmod $name 2>/tmp/err; then echo {MARK}UNLOADED; else
      echo "{MARK}UNLOAD_FAILED $(cat /tmp/err)"; fi
  else
    echo "{MARK}LOAD_FAILED $(cat /tmp/err)"
    dmesg | tail -n 5 | sed 's/^/{MARK}KMSG /'
  fi
}}
"""
INIT_TAIL = f"""echo {MARK}DONE
poweroff -f
"""


class VmTestError(DriversError):
    """The vm-test cannot run here (no QEMU, no busybox, no compiler): says what to install."""


@dataclass
class VmResult:
    kernel: str
    driver_version: str
    kind: str
    status: str  # one of STATUSES
    messages: list[str] = field(default_factory=list)
    events: int | None = None
    seconds: float = 0.0  # the whole boot this driver was tested in

    @classmethod
    def of(cls, key: DriverKey, status: str, *messages: str) -> VmResult:
        return cls(key.kernel, key.driver_version, key.kind, status, list(messages))

    @property
    def key(self) -> DriverKey:
        return DriverKey(self.kernel, self.driver_version, self.kind)

    def to_json(self) -> dict:
        return asdict(self)


# --- initramfs ---------------------------------------------------------------------------


def _newc(name: str, data: bytes, mode: int, ino: int) -> bytes:
    """One entry of a "newc" cpio archive (what the kernel unpacks as an initramfs)."""
    encoded = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    pad_name = -(len(header) + len(encoded)) % 4
    return header + encoded + b"\0" * pad_name + data + b"\0" * (-len(data) % 4)


def module_name(elf: bytes) -> str:
    """The name a module registers under (``rmmod`` and ``/sys/module`` use it)."""
    try:
        name = read_modinfo(elf).get("name", "")
    except ElfError:
        name = ""  # insmod will say what is wrong with it
    return name if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name) else DEFAULT_MODULE_NAME


def module_depends(elf: bytes) -> list[str]:
    """The modules a module needs loaded first (its ``.modinfo`` depends=)."""
    try:
        return [d for d in read_modinfo(elf).get("depends", "").split(",") if d]
    except ElfError:
        return []


GUEST_CONSUMER = "/bin/scap-open-{}"  # one per driver version in the boot


def consumer_command(consumer: Consumer, kind: str, index: int, events: int) -> list[str]:
    """The guest's ``capture`` arguments that capture ``events`` through driver ``index``:
    how long it may run, what of its output is always kept, its command."""
    recipe = consumer.recipe
    if "'" in recipe.summary:
        raise ValueError(f"{consumer.generation}'s summary pattern cannot be quoted for the guest")
    opens = list(recipe.kmod) if kind == "mod" else [recipe.bpf, f"/drivers/{index}.o"]
    return [
        str(recipe.open_s + CAPTURE_TIMEOUT_S),
        f"'{recipe.summary}'",
        GUEST_CONSUMER.format(consumer.driver_version),
        *opens,
        recipe.num_events,
        str(events),
    ]


def driver_timeout_s(consumer: Consumer) -> float:
    """How long the guest may spend on one driver tested through ``consumer``."""
    return consumer.recipe.open_s + CAPTURE_TIMEOUT_S + 10.0


GuestDriver = tuple[str, bytes, list[str]]  # kind, uncompressed bytes, consumer's command


def init_script(drivers: Sequence[GuestDriver]) -> str:
    """/init for drivers numbered from 1."""
    body = []
    for i, (kind, elf, command) in enumerate(drivers, 1):
        if kind == "mod":
            test = f'test_module {i} {module_name(elf)} "{" ".join(module_depends(elf))}" '
        else:
            test = "capture "
        body.append(f"echo {MARK}BEGIN {i}\n{test}{' '.join(command)}\necho {MARK}END {i}\n")
    return INIT_HEAD + "".join(body) + INIT_TAIL


Entry = tuple[str, bytes, int]  # initramfs path, contents, mode


def module_tree(kernel: str, modules: Path) -> list[Entry]:
    """Initramfs entries for the kernel's stored modules (a folder laid out like its
    ``kernel/`` module tree): ``lib/modules/<kernel>/`` with the ``modules.dep`` that
    ``depmod`` makes for them, which the guest's ``modprobe`` follows."""
    with tempfile.TemporaryDirectory(prefix="vm-modules-") as tmp:
        shutil.copytree(modules, Path(tmp) / "lib" / "modules" / kernel / "kernel")
        try:
            depmod = subprocess.run(
                ["depmod", "-b", tmp, kernel], capture_output=True, text=True, check=False
            )
        except FileNotFoundError:
            raise VmTestError("depmod is not installed: apt-get install kmod") from None
        if depmod.returncode != 0:
            raise VmTestError(f"depmod failed for {kernel}: {depmod.stderr.strip()[-300:]}")
        return [
            (str(p.relative_to(tmp)), b"", 0o040755)
            if p.is_dir()
            else (str(p.relative_to(tmp)), p.read_bytes(), 0o100644)
            for p in sorted(Path(tmp).rglob("*"))  # parents before children
        ]


def initramfs(
    drivers: Sequence[GuestDriver],
    consumers: Sequence[Consumer] = (),
    modules: Sequence[Entry] = (),
    busybox: Path = BUSYBOX,
) -> bytes:
    """A gzip'd newc cpio: busybox, /init, the consumers, the kernel's modules
    (:func:`module_tree`) and the drivers, as /drivers/<n>.ko or .o."""
    entries = [
        ("bin", b"", 0o040755),
        ("dev", b"", 0o040755),
        ("drivers", b"", 0o040755),
        ("proc", b"", 0o040755),
        ("sys", b"", 0o040755),
        ("tmp", b"", 0o041777),
        ("bin/busybox", busybox.read_bytes(), 0o100755),
        ("init", init_script(drivers).encode(), 0o100755),
    ]
    for consumer in consumers:
        guest = GUEST_CONSUMER.format(consumer.driver_version).lstrip("/")
        entries.append((guest, consumer.path.read_bytes(), 0o100755))
    entries += modules
    for i, (kind, elf, _) in enumerate(drivers, 1):
        entries.append((f"drivers/{i}.{'ko' if kind == 'mod' else 'o'}", elf, 0o100644))
    archive = b"".join(_newc(n, d, m, i + 1) for i, (n, d, m) in enumerate(entries))
    archive += _newc("TRAILER!!!", b"", 0, 0)
    return gzip_bytes(archive, 1)


# --- the test ----------------------------------------------------------------------------


def _require_tools() -> None:
    if shutil.which(QEMU) is None:
        raise VmTestError(f"{QEMU} is not installed: apt-get install qemu-system-x86")
    if not BUSYBOX.is_file():
        raise VmTestError(f"{BUSYBOX} is missing: apt-get install busybox-static")


Markers = dict[str, list[str]]


def read_markers(serial: str) -> tuple[Markers, dict[int, Markers], list[str]]:
    """The serial log's markers: those of the boot itself, those of each driver's block
    (BEGIN n .. END n; END itself is kept) and the last console lines that are not markers
    (what a dying kernel printed)."""
    boot: Markers = {}
    blocks: dict[int, Markers] = {}
    other: list[str] = []
    current = boot
    for line in serial.splitlines():
        at = line.find(MARK)
        if at < 0:
            if line.strip():
                other = [*other[-9:], line.strip()]
            continue
        name, _, rest = line[at + len(MARK) :].partition(" ")
        name, rest = name.strip(), rest.strip()
        if name == "BEGIN" and rest.isdigit():
            current = blocks.setdefault(int(rest), {})
            continue
        current.setdefault(name, []).append(rest)
        if name == "END":
            current = boot
    return boot, blocks, other


def _capture(result: VmResult, m: Markers, consumer: Consumer, events: int) -> bool:
    """Judge the consumer's capture through the driver; True when it captured enough."""
    output = m.get("OUT", [])
    summary = "\n".join(m.get("SUMMARY", []) + output)  # SUMMARY: a guest that greps it
    exit_status = (m.get("CONSUMER_EXIT") or ["?"])[0]
    result.events = captured_events(consumer, summary)
    tail = [f"consumer exit status {exit_status}", *output[-20:]]
    if result.events is not None and "SUMMARY" in m and not capture_started(consumer, summary):
        result.events = None  # stopped while opening the driver: its stats count nothing
        result.status = "consumer_cannot_attach"
        result.messages = [
            "the consumer was still opening the driver when it was stopped after "
            f"{consumer.recipe.open_s + CAPTURE_TIMEOUT_S} s: it never started capturing "
            f"(the {consumer.generation} recipe's open_s in drivers/build/consumer.py)",
            *tail,
        ]
        return False
    if result.events is None:  # it never got to capturing: it says why
        result.status = "consumer_cannot_attach"
        result.messages = ["the consumer could not capture through it", *tail]
        if SPLIT_REFUSED.search("\n".join(output)):
            result.messages.insert(
                1,
                "this kernel refuses the consumer's mirrored mapping of its perf buffers "
                '("perf/core: Prevent VMA split of buffer mappings", CVE-2025-38563): the '
                f"consumer of {consumer.driver_version} needs the one-mapping patch "
                "(drivers/build/consumer_patches)",
            )
        return False
    if result.events < events:
        result.status = "too_few_events"
        result.messages = [
            f"captured {result.events} of the {events} events asked for within "
            f"{consumer.recipe.open_s + CAPTURE_TIMEOUT_S} s (opening the driver included)",
            *tail,
        ]
        return False
    return True


def _judge_module(result: VmResult, m: Markers, consumer: Consumer, events: int) -> None:
    if "LOAD_FAILED" in m:
        result.status, result.messages = "load_failed", m["LOAD_FAILED"] + m.get("KMSG", [])
        return
    if not _capture(result, m, consumer, events):
        return
    if "UNLOADED" in m:
        result.status = "loaded"
        return
    result.status = "load_failed"
    result.messages = ["captured its events but could not be unloaded", *m.get("UNLOAD_FAILED", [])]


def _judge_probe(result: VmResult, m: Markers, consumer: Consumer, events: int) -> None:
    output = m.get("OUT", [])
    if "-- BEGIN PROG LOAD LOG --" in output:
        log = output[output.index("-- BEGIN PROG LOAD LOG --") + 1 :]
        log = (
            log[: log.index("-- END PROG LOAD LOG --")] if "-- END PROG LOAD LOG --" in log else log
        )
        # The verifier's own reason is the line before its "processed N insns" summary.
        ends = [i for i, line in enumerate(log) if line.startswith("processed ")]
        reason = log[ends[0] - 1] if ends and ends[0] > 0 else (log or ["(no log)"])[-1]
        result.status = "verifier_rejected"
        result.messages = [f"verifier: {reason}", *log[-30:]]
        return
    refused = next((line for line in output if line.startswith(PROBE_FILE_ERRORS)), None)
    if refused is not None:
        result.status = "load_failed"
        result.messages = [f"not a loadable probe: {refused}", *output[-10:]]
        return
    if _capture(result, m, consumer, events):
        result.status = "loaded"


def judge(
    keys: Sequence[DriverKey],
    serial: str,
    seconds: float,
    consumers: Mapping[str, Consumer],
    events: int = DEFAULT_EVENTS,
    timed_out: bool = False,
) -> list[VmResult]:
    """The result of each driver (tested in this order, each through the consumer of its
    driver version, asked for ``events``) from the guest's serial log."""
    boot, blocks, console = read_markers(serial)
    results = [VmResult.of(key, "boot_failed") for key in keys]
    for r in results:
        r.seconds = seconds
    ending = [f"timed out after {seconds:.0f} s"] if timed_out else []
    booted = (boot.get("BOOTED") or [None])[0]
    if booted is None or (keys and booted != keys[0].kernel):
        why = (
            "the guest never ran its script (no BOOTED marker)"
            if booted is None
            else f"booted kernel {booted!r}, not {keys[0].kernel!r}"
        )
        for r in results:
            r.messages = [why, *ending]
        return results
    for i, (key, result) in enumerate(zip(keys, results, strict=True), 1):
        m = blocks.get(i)
        if m is None:  # the guest never got to it: untested, retryable
            result.messages = ["the guest stopped before testing this driver", *ending]
        elif "END" not in m:  # it died or hung while testing this one: the driver's doing
            died = "hung" if timed_out else "stopped"
            result.status = "load_failed"
            result.messages = [f"the kernel {died} while testing this driver", *console[-5:]]
        elif key.kind == "mod":
            _judge_module(result, m, consumers[key.driver_version], events)
        else:
            _judge_probe(result, m, consumers[key.driver_version], events)
    return results


Consumers = Mapping[str, Consumer | str]  # driver version -> its consumer, or why it has none


def vm_test(
    kernel: str,
    drivers: Sequence[tuple[DriverKey, bytes]],
    boot_image: Path | None,
    consumers: Consumers,
    events: int = DEFAULT_EVENTS,
    timeout: float | None = None,
    memory_mb: int = 512,
    accel: str = "tcg",
) -> list[VmResult]:
    """Boot ``boot_image`` (the kernel ``kernel``) once and test each driver, given as
    (key, gzip'd object as published), in it: the consumer of its driver version must
    capture ``events`` through it. One result per driver, in order."""
    keys = [key for key, _ in drivers]
    strangers = [k for k in keys if k.kernel != kernel]
    if strangers:
        raise VmTestError(f"{strangers[0]} is not a driver for {kernel}: test it in its own kernel")
    if boot_image is None:
        why = f"no bootable kernel image for {kernel}: untested, not passed"
        return [VmResult.of(key, "no_boot_image", why) for key in keys]
    if not keys:
        return []
    _require_tools()
    elves = []
    for key, data in drivers:
        try:
            elves.append((key.kind, gunzip(data)))
        except ValueError as e:  # goes in as is: the guest refuses it like any bad file
            elves.append((key.kind, f"corrupt: {e}".encode()))
    modules = boot_image.parent / "modules"
    stored = {_norm(module_name(p.read_bytes())) for p in modules.rglob("*.ko")}
    results: dict[int, VmResult] = {}
    for i, (kind, elf) in enumerate(elves):
        consumer = consumers.get(keys[i].driver_version, "no consumer was looked for")
        missing = (
            [d for d in module_depends(elf) if _norm(d) not in stored] if kind == "mod" else []
        )
        if not isinstance(consumer, Consumer):
            results[i] = VmResult.of(
                keys[i], "not_tested", f"no consumer for {keys[i].driver_version}: {consumer}"
            )
        elif missing:
            results[i] = VmResult.of(
                keys[i],
                "not_tested",
                f"needs module(s) {', '.join(missing)}, which the kernel-images bucket does not "
                f"keep for {kernel}: list them in [vm_tests] modules and publish its boot "
                "image again (drivers bundle debian ... --boot-images)",
            )
    booted = [i for i in range(len(keys)) if i not in results]
    if booted:
        ready = {v: c for v, c in consumers.items() if isinstance(c, Consumer)}
        guest = [
            (
                elves[i][0],
                elves[i][1],
                consumer_command(ready[keys[i].driver_version], elves[i][0], n, events),
            )
            for n, i in enumerate(booted, 1)
        ]
        used = sorted({keys[i].driver_version for i in booted})
        archive = initramfs(
            guest, [ready[v] for v in used], module_tree(kernel, modules) if stored else []
        )
        boot = _boot(
            kernel,
            [keys[i] for i in booted],
            archive,
            boot_image,
            timeout
            or BOOT_TIMEOUT_S
            + sum(driver_timeout_s(ready[keys[i].driver_version]) for i in booted),
            memory_mb,
            accel,
        )
        results.update(zip(booted, judge_boot(boot, ready, events), strict=True))
    return [results[i] for i in range(len(keys))]


def _depends_of(data: bytes) -> list[str]:
    try:
        return module_depends(gunzip(data))
    except ValueError:
        return []


def _norm(module: str) -> str:
    return module.replace("-", "_")


@dataclass
class Boot:
    """What one boot left: the serial log, how long it took, whether it was cut short."""

    keys: list[DriverKey]
    serial: str
    seconds: float
    timed_out: bool


def judge_boot(boot: Boot, consumers: Mapping[str, Consumer], events: int) -> list[VmResult]:
    return judge(boot.keys, boot.serial, boot.seconds, consumers, events, boot.timed_out)


def _boot(
    kernel: str,
    keys: list[DriverKey],
    archive: bytes,
    boot_image: Path,
    timeout: float,
    memory_mb: int,
    accel: str,
) -> Boot:
    with tempfile.TemporaryDirectory(prefix="vm-test-") as tmp:
        initrd = Path(tmp) / "initrd.gz"
        initrd.write_bytes(archive)
        serial = Path(tmp) / "serial.log"
        command = [
            QEMU,
            "-accel", accel,
            "-m", str(memory_mb),
            "-smp", "1",
            "-kernel", str(boot_image),
            "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet loglevel=3",
            "-nographic", "-no-reboot", "-monitor", "none", "-nic", "none",
            "-serial", f"file:{serial}",
        ]  # fmt: skip
        started = time.monotonic()
        timed_out = False
        try:
            subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            timed_out = True  # judged by the markers: what never ended did not pass
        seconds = round(time.monotonic() - started, 2)
        text = serial.read_text(errors="replace") if serial.exists() else ""
    return Boot(keys, text, seconds, timed_out)


def test_kernels(
    kernels: dict[str, list[DriverKey]],
    fetch_image: Callable[[str, Path], Path | None],
    load_drivers: Callable[[str], list[tuple[DriverKey, bytes]]],
    consumer: Callable[[str], Consumer],
    events: int = DEFAULT_EVENTS,
    parallel: int = 2,
    budget_s: float = float("inf"),
    accel: str = "tcg",
    memory_mb: int = 512,
) -> list[VmResult]:
    """Test each kernel's drivers in its own boot, ``parallel`` VMs at a time. A kernel
    whose turn comes after ``budget_s`` is not tested; a boot that failed is retried
    once (infrastructure). ``fetch_image(kernel, folder)`` puts the boot image in a
    scratch folder (None: there is none), removed after that kernel; ``load_drivers``
    reads a kernel's drivers only when its turn comes, so memory stays bounded;
    ``consumer(driver_version)`` gives a version's consumer (once per version; a
    :class:`ConsumerError` leaves its drivers untested, saying why)."""
    deadline = time.monotonic() + budget_s
    consumers: dict[str, Consumer | str] = {}
    lock = threading.Lock()  # one build per version, however many VMs wait for it

    def consumers_of(keys: list[DriverKey]) -> dict[str, Consumer | str]:
        with lock:
            for version in sorted({k.driver_version for k in keys} - set(consumers)):
                try:
                    consumers[version] = consumer(version)
                except ConsumerError as e:
                    consumers[version] = str(e)
            return {k.driver_version: consumers[k.driver_version] for k in keys}

    def one(kernel: str) -> list[VmResult]:
        keys = kernels[kernel]
        if time.monotonic() >= deadline:
            why = f"the stage's time budget of {budget_s:.0f} s was spent before its turn"
            return [VmResult.of(key, "not_tested", why) for key in keys]
        with tempfile.TemporaryDirectory(prefix="vm-image-") as scratch:
            image = fetch_image(kernel, Path(scratch))
            drivers = load_drivers(kernel) if image is not None else [(k, b"") for k in keys]
            ready = consumers_of(keys) if image is not None else {}
            options = {"events": events, "memory_mb": memory_mb, "accel": accel}
            results = vm_test(kernel, drivers, image, ready, **options)
            again = [d for d, r in zip(drivers, results, strict=True) if r.status == RETRYABLE]
            if again and time.monotonic() < deadline:
                retried = iter(vm_test(kernel, again, image, ready, **options))
                results = [next(retried) if r.status == RETRYABLE else r for r in results]
        return results

    with ThreadPoolExecutor(max(1, parallel), thread_name_prefix="vm-test") as pool:
        return [r for results in pool.map(one, sorted(kernels)) for r in results]


# --- CLI -----------------------------------------------------------------------------------


def cmd_vm_test(args: argparse.Namespace) -> int:
    """``drivers vm-test DRIVER.gz... --driver-version V [--boot-image VMLINUZ]
    [--sources gs://BUCKET]``: the consumer of V comes from (or is built from and cached
    beside) V's prepared sources in the sources bucket; one JSON result per driver on
    stdout, with the events captured through it; exit 0 when all loaded, 75 when the VM
    did not boot (retry), 1 when a driver failed or has no boot image."""
    from drivers.domain.config import load_config
    from drivers.domain.layout import Buckets
    from drivers.store.storage import client_from_environment, parse_gs_uri

    keys = []
    for path in map(Path, args.drivers):
        entry = parse_object_name(f"{args.driver_version}/{path.name}")
        if entry is None or entry.unavailable:
            raise VmTestError(
                f"{path.name}: not a driver file name (collector-<kernel>.ko.gz or .o.gz)"
            )
        keys.append(entry.key)
    kernels = sorted({k.kernel for k in keys})
    if len(kernels) != 1:
        raise VmTestError(f"drivers of {len(kernels)} kernels {kernels}: give one kernel's")
    kernel, cache = kernels[0], Path(args.cache)
    drivers = [(key, Path(p).read_bytes()) for key, p in zip(keys, args.drivers, strict=True)]
    image = args.boot_image
    if image is None and args.boot_images:
        store = ObjectStore(client_from_environment(), parse_gs_uri(args.boot_images)[0])
        image = fetch_boot_image(store, kernel, cache / "kernel-images")
    elif image is None:  # Debian's package, with the modules these drivers need
        needs = {d for key, data in drivers if key.kind == "mod" for d in _depends_of(data)}
        image = debian_boot_image(kernel, cache / "debs", cache / "kernel-images", sorted(needs))
    bucket = parse_gs_uri(args.sources)[0] if args.sources else Buckets.from_env().sources
    sources = ObjectStore(client_from_environment(), bucket)
    consumers: dict[str, Consumer | str] = {}
    if image is not None:
        try:
            consumers[args.driver_version] = consumer_for(sources, args.driver_version)
        except ConsumerError as e:
            consumers[args.driver_version] = str(e)
    events = load_config().vm_tests["events"]
    results = vm_test(
        kernel, drivers, image, consumers, events, timeout=args.timeout, accel=args.accel
    )
    for result in results:
        print(json.dumps(result.to_json()))
    statuses = {r.status for r in results}
    if statuses == {PASSED}:
        return 0
    return EX_TEMPFAIL if statuses <= {PASSED, RETRYABLE} else 1


__all__ = [
    "VmResult",
    "initramfs",
    "judge",
    "read_markers",
    "test_kernels",
    "vm_test",
]
