"""Load-test a driver in its own kernel, booted under QEMU.

A driver that compiles can still be refused where it matters: symbol versions, vermagic,
missing dependencies. ``vm_test`` boots the driver's kernel (software emulation, ``-accel
tcg``: KVM is not usable everywhere) with a tiny initramfs (static busybox, the module, a
script), loads the module, makes a little activity, reads back the events the module
counted, unloads it and powers off. Only the markers the guest prints on its serial
console decide; QEMU's exit status says nothing, and the whole run is under a timeout.

Results: ``loaded``; ``load_failed`` (with the kernel's own messages); ``no_boot_image``
(no bootable kernel for that release: never a pass); ``boot_failed`` (the guest never
reached or finished its script: infrastructure, retryable). eBPF probes report
``not_tested`` until the attaching loader exists.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from drivers import layout
from drivers.errors import DriversError
from drivers.names import DriverKey, parse_object_name
from drivers.storage import ObjectNotFound, ObjectStore
from drivers.verify import gunzip

MARK = "VMTEST:"
BUSYBOX = Path("/usr/bin/busybox")  # Debian's busybox-static
QEMU = "qemu-system-x86_64"
DEFAULT_TIMEOUT_S = 90.0
MODULE_NAME = "collector"

# The guest's /init. Every line it prints that matters starts with the marker.
INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo {MARK}BOOTED $(uname -r)
if insmod /driver.ko 2>/tmp/err; then
  echo {MARK}LOADED
  for i in 1 2 3 4 5 6 7 8; do ls / >/dev/null; sleep 0.05; done
  echo {MARK}EVENTS $(cat /sys/module/{MODULE_NAME}/parameters/sched_switches 2>/dev/null)
  if rmmod {MODULE_NAME} 2>/tmp/err; then echo {MARK}UNLOADED; else
    echo "{MARK}UNLOAD_FAILED $(cat /tmp/err)"; fi
else
  echo "{MARK}LOAD_FAILED $(cat /tmp/err)"
  dmesg | grep -i -e {MODULE_NAME} -e module | tail -n 5 | sed 's/^/{MARK}KMSG /'
fi
echo {MARK}DONE
poweroff -f
"""


class VmTestError(DriversError):
    """The vm-test cannot run here (no QEMU, no busybox): says what to install."""


@dataclass
class VmResult:
    kernel: str
    driver_version: str
    kind: str
    status: str  # loaded | load_failed | no_boot_image | boot_failed | not_tested
    messages: list[str] = field(default_factory=list)
    events: int | None = None
    seconds: float = 0.0

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


def initramfs(module: bytes, busybox: Path = BUSYBOX) -> bytes:
    """A gzip'd newc cpio: busybox, /init and the (uncompressed) module."""
    entries = [
        ("bin", b"", 0o040755),
        ("dev", b"", 0o040755),
        ("proc", b"", 0o040755),
        ("sys", b"", 0o040755),
        ("tmp", b"", 0o041777),
        ("bin/busybox", busybox.read_bytes(), 0o100755),
        ("init", INIT.encode(), 0o100755),
        ("driver.ko", module, 0o100644),
    ]
    archive = b"".join(_newc(n, d, m, i + 1) for i, (n, d, m) in enumerate(entries))
    archive += _newc("TRAILER!!!", b"", 0, 0)
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=1) as gz:
        gz.write(archive)
    return out.getvalue()


# --- boot images -------------------------------------------------------------------------


def debian_boot_image(uname: str, deb_cache: Path, out_dir: Path) -> Path | None:
    """``vmlinuz`` of Debian's ``linux-image-<uname>`` (from the .deb cache, else apt),
    extracted to ``out_dir/<uname>/vmlinuz``; None when Debian has no such package."""
    from drivers.bundles import BundleError, Dependency, fetch_deb

    target = out_dir / uname / "vmlinuz"
    if target.is_file():
        return target
    try:
        deb, _ = fetch_deb(Dependency(f"linux-image-{uname}"), deb_cache)
    except BundleError:
        return None
    member = f"./boot/vmlinuz-{uname}"
    # Streamed: the package also holds ~400 MB of modules that are not needed here.
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as dpkg:
        kernel = None
        with tarfile.open(fileobj=dpkg.stdout, mode="r|") as tar:
            for m in tar:
                if m.name == member and m.isfile():
                    f = tar.extractfile(m)
                    kernel = f.read() if f else None
                    break
        dpkg.kill()
    if not kernel:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    tmp.write_bytes(kernel)
    tmp.replace(target)
    return target


def publish_boot_image(store: ObjectStore, uname: str, deb_cache: Path, out_dir: Path) -> str:
    """Put Debian's kernel image for ``uname`` in the kernel-images bucket (never
    overwriting); returns what happened: created, identical, different or absent."""
    image = debian_boot_image(uname, deb_cache, out_dir)
    if image is None:
        return "absent"
    return store.upload_new_file(layout.boot_image_object(uname), image).value


def fetch_boot_image(store: ObjectStore, uname: str, out_dir: Path) -> Path | None:
    """The kernel image of ``uname`` from the kernel-images bucket (None: there is none,
    so its drivers are untested, never passed)."""
    target = out_dir / uname / "vmlinuz"
    try:
        return store.download_to(layout.boot_image_object(uname), target)
    except ObjectNotFound:
        return None


# --- the test ----------------------------------------------------------------------------


def _require_tools() -> None:
    if shutil.which(QEMU) is None:
        raise VmTestError(f"{QEMU} is not installed: apt-get install qemu-system-x86")
    if not BUSYBOX.is_file():
        raise VmTestError(f"{BUSYBOX} is missing: apt-get install busybox-static")


def read_markers(serial: str) -> dict[str, list[str]]:
    """Marker name -> the text after it, for every marker line of the serial log."""
    found: dict[str, list[str]] = {}
    for line in serial.splitlines():
        at = line.find(MARK)
        if at < 0:
            continue
        name, _, rest = line[at + len(MARK) :].partition(" ")
        found.setdefault(name.strip(), []).append(rest.strip())
    return found


def judge(key: DriverKey, markers: dict[str, list[str]], seconds: float) -> VmResult:
    result = VmResult(key.kernel, key.driver_version, key.kind, "boot_failed", seconds=seconds)
    if "BOOTED" not in markers:
        result.messages = ["the guest never ran its script (no BOOTED marker)"]
        return result
    booted = markers["BOOTED"][0]
    if booted != key.kernel:
        result.messages = [f"booted kernel {booted!r}, not {key.kernel!r}"]
        return result
    if "LOAD_FAILED" in markers:
        result.status = "load_failed"
        result.messages = markers["LOAD_FAILED"] + markers.get("KMSG", [])
        return result
    if "DONE" not in markers:
        result.messages = ["the guest stopped before the end of its script (no DONE marker)"]
        return result
    events = (markers.get("EVENTS") or [""])[0]
    result.events = int(events) if events.isdigit() else None
    if "LOADED" in markers and result.events and "UNLOADED" in markers:
        result.status = "loaded"
    else:
        result.status = "load_failed"
        result.messages = [
            "loaded but counted no events" if not result.events else "could not be unloaded",
            *markers.get("UNLOAD_FAILED", []),
        ]
    return result


def vm_test(
    key: DriverKey,
    driver: bytes,
    boot_image: Path | None,
    timeout: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = 512,
) -> VmResult:
    """Boot ``boot_image`` (the kernel of ``key``) and load ``driver`` (the gzip'd
    object as published) in it."""
    if key.kind != "mod":
        return VmResult(
            key.kernel,
            key.driver_version,
            key.kind,
            "not_tested",
            ["eBPF probes are not load-tested yet (the attaching loader is to come)"],
        )
    if boot_image is None:
        return VmResult(
            key.kernel,
            key.driver_version,
            key.kind,
            "no_boot_image",
            [f"no bootable kernel image for {key.kernel}: untested, not passed"],
        )
    _require_tools()
    with tempfile.TemporaryDirectory(prefix="vm-test-") as tmp:
        initrd = Path(tmp) / "initrd.gz"
        initrd.write_bytes(initramfs(gunzip(driver)))
        serial = Path(tmp) / "serial.log"
        command = [
            QEMU,
            "-accel", "tcg",
            "-m", str(memory_mb),
            "-smp", "1",
            "-kernel", str(boot_image),
            "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet loglevel=3",
            "-nographic", "-no-reboot", "-monitor", "none", "-nic", "none",
            "-serial", f"file:{serial}",
        ]  # fmt: skip
        started = time.monotonic()
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
            pass  # judged by the markers below: no DONE means boot_failed
        seconds = round(time.monotonic() - started, 2)
        text = serial.read_text(errors="replace") if serial.exists() else ""
    result = judge(key, read_markers(text), seconds)
    if result.status == "boot_failed" and seconds >= timeout:
        result.messages.append(f"timed out after {timeout:.0f} s")
    return result


# --- CLI -----------------------------------------------------------------------------------


def cmd_vm_test(args: argparse.Namespace) -> int:
    """``drivers vm-test DRIVER.gz [--boot-image VMLINUZ]``: JSON result on stdout; exit
    0 when loaded, 1 when the driver failed, 75 when the VM did not boot."""
    path = Path(args.driver)
    entry = parse_object_name(f"{args.driver_version}/{path.name}")
    if entry is None or entry.unavailable:
        raise VmTestError(f"{path.name}: not a driver file name (collector-<kernel>.ko.gz, ...)")
    key = entry.key
    image, cache = args.boot_image, Path(args.cache)
    if image is None and args.boot_images:
        from drivers.storage import client_from_environment, parse_gs_uri

        store = ObjectStore(client_from_environment(), parse_gs_uri(args.boot_images)[0])
        image = fetch_boot_image(store, key.kernel, cache / "kernel-images")
    elif image is None:
        image = debian_boot_image(key.kernel, cache / "debs", cache / "kernel-images")
    result = vm_test(key, path.read_bytes(), image, timeout=args.timeout)
    print(json.dumps(result.to_json()))
    return {"loaded": 0, "boot_failed": 75}.get(result.status, 1)


__all__ = ["VmResult", "debian_boot_image", "initramfs", "judge", "read_markers", "vm_test"]
