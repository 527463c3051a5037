"""The consumer the VM tests capture with: libscap's example ``scap-open``, built from the
*same* prepared sources as the drivers it tests (``userspace/libscap/examples/01-open``).

One recipe per generation of the sources (``build.json``'s ``"generation"``), here and
nowhere else: the CMake flags that give scap-open its kernel-module and eBPF engines with
Debian's own libraries (no bundled dependencies, no libsinsp, no driver build), linked
statically so that it runs in the VM's busybox initramfs, and the options and output of
that generation's scap-open.

Patches: :file:`consumer_patches/<driver version>/*.patch` are applied to the consumer's
build copy only, never to the driver. Today one per version: libscap's legacy eBPF engine
maps each CPU's perf ring buffer twice, the second mapping overlapping the first one's
header page, to mirror the ring; since "perf/core: Prevent VMA split of buffer mappings"
(CVE-2025-38563; Debian 6.1.148-1, 5.10.244-1, upstream 6.1.148/6.6.102/6.12.42) the kernel
refuses that split and ``mmap`` fails with ENOMEM ("mmap (3): Cannot allocate memory").
The patch maps once and completes an event that wraps in a slack after the ring, as
falcosecurity/libs did upstream (aebdb96d3, libs 0.22.0).

Cached twice: in the sources bucket beside the sources it was built from
(:func:`drivers.domain.layout.consumer_object`), so any worker finds it, and in a local
folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from drivers.build.safetar import safe_extract
from drivers.domain import layout
from drivers.domain.errors import DriversError
from drivers.store.storage import ObjectNotFound, ObjectStore

PATCHES = Path(__file__).with_name("consumer_patches")
ARCH = "x86_64"
BUILD_TIMEOUT_S = 900.0
GENERATIONS = ("1.x", "2.x", "8.x")


class ConsumerError(DriversError):
    """No consumer for a driver version: says which version, why and what to do."""


@dataclass(frozen=True)
class Recipe:
    """How one generation's scap-open is built and run. Its patterns are POSIX extended
    regular expressions that Python's ``re`` reads the same way: the guest greps with them."""

    names: tuple[str, str]  # the CMake variables of the driver's name and device name
    kmod: tuple[str, ...]  # arguments that open the kernel module
    bpf: str  # the option followed by the probe's path
    num_events: str  # the option followed by how many events to capture
    captured: str  # the line with the number of events it captured (the last group)
    started: str  # the line it prints once it has opened the driver and starts capturing
    open_s: int  # how long opening a driver may take under software emulation (TCG)

    @property
    def summary(self) -> str:
        """The lines the guest always carries, however long the output around them."""
        return f"{self.started}|{self.captured}"


# 1.x's example (test.c) takes no options: it opens the module and runs until SIGINT,
# whose handler prints but never exits; a probe is given through an environment
# variable. It cannot be run to a count of events the way the VM test does.
# Opening: 2.x's legacy probe opened and captured within 15 s. 8.x's loads some 200
# programs, each through the kernel's verifier: 16 s on 6.1.0-56-amd64, 27 s on
# 6.12.115+deb12-amd64 (two VMs on two busy cores), before it captures 1000 events in
# under a second. 8.x prints its stats block (~25 lines) and one line per syscall it saw
# *after* its captured line: hence the summary, never the output's tail.
RECIPES = {
    "2.x": Recipe(
        ("DRIVER_NAME", "DRIVER_DEVICE_NAME"),
        ("--kmod",),
        "--bpf",
        "--num_events",
        # 2.2.0 "events captured: N", 2.3.0 "Events correctly captured (SCAP_SUCCESS): N"
        r"^(events captured|Events correctly captured \(SCAP_SUCCESS\)): ([0-9]+)$",
        r"^\* Live capture in progress\.\.\.$",
        15,
    ),
    "8.x": Recipe(
        ("DRIVER_NAME", "DRIVER_DEVICE_NAME"),
        ("--kmod",),
        "--bpf",
        "--num_events",
        r"^Number of `SCAP_SUCCESS` \(events correctly captured\): ([0-9]+)$",
        r"^\* Live capture in progress\.\.\.$",
        90,
    ),
}

# scap-open with its kmod and legacy eBPF engines and nothing else: gVisor needs
# protobuf and the tests' targets gtest; BUILD_DRIVER off: the drivers are built by the
# builder, not here. MINIMAL_BUILD must stay off, or the eBPF engine is left out.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DUSE_BUNDLED_DEPS=OFF",
    "-DMINIMAL_BUILD=OFF",
    "-DCREATE_TEST_TARGETS=OFF",
    "-DBUILD_DRIVER=OFF",
    "-DBUILD_LIBSCAP_GVISOR=OFF",
    "-DBUILD_LIBSCAP_MODERN_BPF=OFF",
    "-DBUILD_LIBSCAP_EXAMPLES=ON",
    # Static: the guest is busybox and nothing else. CMake would end the link line with
    # -Bdynamic and take libz.so, so both ends of the search are static and zlib's
    # archive is named.
    "-DCMAKE_EXE_LINKER_FLAGS=-static",
    "-DCMAKE_LINK_SEARCH_START_STATIC=ON",
    "-DCMAKE_LINK_SEARCH_END_STATIC=ON",
    "-DUSE_SHARED_LIBELF=OFF",  # 8.x takes libelf.so unless told (2.x takes libelf.a)
)


@dataclass(frozen=True)
class Consumer:
    """A built scap-open and how to run it."""

    driver_version: str
    generation: str
    path: Path

    @property
    def recipe(self) -> Recipe:
        return RECIPES[self.generation]


def patches(driver_version: str) -> list[Path]:
    return sorted((PATCHES / driver_version).glob("*.patch"))


def recipe_id(driver_version: str) -> str:
    """What the consumer of a version is built with (this module and its patches): a
    changed recipe gives a new cached object, never a stale one."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for patch in patches(driver_version):
        digest.update(patch.name.encode() + b"\0" + patch.read_bytes())
    return digest.hexdigest()[:12]


def read_prepared(tree: Path) -> dict:
    """The prepared tree's build.json, with a generation this module has a recipe for."""
    path = tree / "build.json"
    try:
        spec = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise ConsumerError(f"{path}: not a prepared sources tree ({e})") from None
    generation = spec.get("generation") if isinstance(spec, dict) else None
    if generation not in GENERATIONS:
        raise ConsumerError(
            f"{path}: generation {generation!r} is not one of {list(GENERATIONS)}: "
            "prepare the tree again (drivers sources prepare)"
        )
    if generation not in RECIPES:
        raise ConsumerError(
            f"driver version {spec.get('driver_version')}: generation {generation}'s "
            "scap-open cannot be run to a count of events (no options, its SIGINT handler "
            "never exits): there is no consumer to capture with"
        )
    return spec


def _run(command: list[str], what: str, cwd: Path, log: Path) -> None:
    try:
        with log.open("ab") as out:
            out.write(f"$ {' '.join(command)}\n".encode())
            out.flush()
            done = subprocess.run(
                command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S
            )
    except FileNotFoundError:
        raise ConsumerError(
            f"{command[0]} is not installed: scripts/host-deps.sh installs what the consumer "
            "build needs"
        ) from None
    except subprocess.TimeoutExpired:
        raise ConsumerError(f"{what} took over {BUILD_TIMEOUT_S:.0f} s (log: {log})") from None
    if done.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise ConsumerError(f"{what} failed (log: {log}):\n" + "\n".join(tail))


def _static_zlib() -> str:
    done = subprocess.run(
        ["gcc", "-print-file-name=libz.a"], capture_output=True, text=True, check=False
    )
    path = done.stdout.strip()
    if done.returncode != 0 or not Path(path).is_file():
        raise ConsumerError("libz.a is missing: apt-get install zlib1g-dev")
    return path


def build_consumer(tree: Path, out: Path, jobs: int = 2) -> Path:
    """Build scap-open from a prepared sources tree (changed in place: patched, built in
    ``tree/build-consumer``) to the file ``out``, stripped."""
    spec = read_prepared(tree)
    version, recipe = spec["driver_version"], RECIPES[spec["generation"]]
    log = out.with_name(out.name + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")
    for patch in patches(version):
        _run(["patch", "-p1", "-i", str(patch)], f"applying {patch.name}", tree, log)
    name = spec.get("driver_name", "collector")
    build = tree / "build-consumer"
    configure = ["cmake", "-S", str(tree), "-B", str(build), *CMAKE_FLAGS]
    configure += [f"-DZLIB_LIB={_static_zlib()}", f"-DDRIVER_VERSION={version}"]
    configure += [f"-D{recipe.names[0]}={name}", f"-D{recipe.names[1]}={name}"]
    _run(configure, f"configuring scap-open {version}", tree, log)
    _run(
        ["make", "-C", str(build), f"-j{jobs}", "scap-open"],
        f"building scap-open {version}",
        tree,
        log,
    )
    binary = next(build.rglob("examples/01-open/scap-open"), None)
    if binary is None:
        raise ConsumerError(f"the scap-open build of {version} left no scap-open (log: {log})")
    partial = out.with_suffix(f".{os.getpid()}.part")
    shutil.copyfile(binary, partial)
    _run(["strip", str(partial)], f"stripping scap-open {version}", tree, log)
    partial.chmod(0o755)
    partial.replace(out)
    return out


def local_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "collector-drivers" / "consumers"


def consumer_for(sources: ObjectStore, driver_version: str, cache: Path | None = None) -> Consumer:
    """The consumer of ``driver_version``: from the local cache, else from the sources
    bucket, else built from that version's prepared sources there and stored beside them.
    The local cache is keyed by the sources' md5 too: it serves every bucket of this
    machine, and another bucket's sources of the same version are other sources."""
    source = layout.source_object(driver_version)
    try:
        md5 = sources.info(source).md5
    except ObjectNotFound:
        raise ConsumerError(
            f"gs://{sources.bucket_name}/{source} does not exist: prepare the sources of "
            f"{driver_version} (drivers sources prepare)"
        ) from None
    name = layout.consumer_object(driver_version, recipe_id(driver_version), ARCH)
    binary = (cache or local_cache()) / (md5 or "no-md5").replace("/", "_") / name
    spec_file = binary.with_name(binary.name.replace("scap-open-", "build-") + ".json")
    if binary.is_file() and spec_file.is_file():
        return Consumer(driver_version, json.loads(spec_file.read_text())["generation"], binary)
    binary.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="consumer-", dir=binary.parent) as tmp:
        archive, tree = Path(tmp) / "sources.tgz", Path(tmp) / "tree"
        sources.download_to(source, archive)
        safe_extract(archive, tree)
        spec = read_prepared(tree)
        try:
            sources.download_to(name, binary)
        except ObjectNotFound:
            build_consumer(tree, binary)
            sources.upload_new_file(name, binary)
        binary.chmod(0o755)
    spec_file.write_text(json.dumps({"generation": spec["generation"]}))
    return Consumer(driver_version, spec["generation"], binary)


def captured_events(consumer: Consumer, output: str) -> int | None:
    """The number of events the consumer says it captured, None when it says none."""
    pattern = re.compile(consumer.recipe.captured)
    for line in output.splitlines():
        m = pattern.match(line.strip())
        if m:
            return int(m.groups()[-1])
    return None


def capture_started(consumer: Consumer, output: str) -> bool:
    """Whether the consumer says it opened the driver and started capturing."""
    pattern = re.compile(consumer.recipe.started)
    return any(pattern.match(line.strip()) for line in output.splitlines())


__all__ = [
    "Consumer",
    "ConsumerError",
    "build_consumer",
    "capture_started",
    "captured_events",
    "consumer_for",
]
