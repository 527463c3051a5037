"""Building one driver against an extracted bundle: kbuild, then strip, then the checks.

Both kinds build with kbuild, ``make -C <BUNDLE_BUILD_DIR> M=<dir> modules``, in a fresh
copy of the folder the sources' ``build.json`` names for the kind, which also names the
output (driver_sources/README.md); the module is then stripped of debug info and its
vermagic checked, the probe stripped of DWARF (its BTF stays). A compile failure is data
(:class:`Built` with a failure class and the log's tail); a missing tool is not
(:class:`ToolMissing`: the builder image is incomplete).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from drivers.build.bundle import Bundle
from drivers.build.sources import read_build_spec
from drivers.domain.deterministic import gzip_bytes
from drivers.domain.names import DriverKey
from drivers.domain.verify import read_vermagic, verify_driver, vermagic_matches

LOG_LIMIT = 64 * 1024  # a failed task's log keeps the tail of the compile output
BUILD_TIMEOUT_S = 900  # per make run; a hung compile must not hold a builder forever
WORKDIR_IN_LOGS = "$WORKDIR"
# A compiler diagnostic: "path:line[:column]: [fatal ]error: ..."
_LOCATED_ERROR = re.compile(r"(?P<path>[^\s:]+):(?P<line>\d+):(?:(?P<col>\d+):)? (?:fatal )?error:")


@dataclasses.dataclass
class Built:
    """What building one driver gave: gzip'd bytes, or a failure class and its log."""

    data: bytes | None = None
    failure: str | None = None
    message: str = ""
    log: bytes = b""
    make_s: float = 0.0  # the bare make, for the benchmark's overhead ratio


def gzip_driver(data: bytes) -> bytes:
    """A driver object as published: deterministic gzip (a rebuild gives the same bytes)
    at level 9, the smallest: a driver is built once and downloaded by every agent."""
    return gzip_bytes(data, 9)


def make_command(build_dir: Path, src: Path, scratch: Path) -> list[str]:
    """kbuild for an external folder (what driver_sources/README.md says builds both
    kinds). KCFLAGS maps the scratch folder out of the module's debug info and __FILE__,
    so its bytes (build-id included) do not depend on where the shard ran; the probe
    Makefile maps its own paths. A set KBUILD_BUILD_TIMESTAMP is kbuild's switch for
    reproducible builds: without it, pahole < 1.27 encodes a module's BTF with threads
    (-j) and the order of its types varies from build to build (6.12 headers)."""
    return [
        "make",
        "-C",
        str(build_dir),
        f"M={src}",
        f"-j{len(os.sched_getaffinity(0))}",
        f"KCFLAGS=-ffile-prefix-map={scratch}/=",
        "KBUILD_BUILD_TIMESTAMP=1970-01-01T00:00:00Z",
        "modules",
    ]


def _build_env() -> dict[str, str]:
    env = dict(os.environ, LC_ALL="C")
    for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"):  # e.g. run under make
        env.pop(name, None)
    return env


def _run_tool(cmd: list[str]) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(cmd, capture_output=True, env=_build_env(), check=False)
    except FileNotFoundError:
        raise _missing_tool(cmd[0]) from None


class ToolMissing(Exception):
    """A tool the build needs is not installed: every build would fail the same way, this
    builder image is incomplete."""


def _missing_tool(tool: str) -> ToolMissing:
    return ToolMissing(f"{tool} is not installed in this builder image (see scripts/host-deps.sh)")


def _run_make(cmd: list[str], log_path: Path) -> tuple[int | None, float]:
    """Run make with its output in ``log_path``; (exit status or None on timeout, seconds).
    make runs in its own process group, killed whole on a timeout or SIGTERM: compilers
    left behind would write into a scratch folder being deleted."""
    started = time.perf_counter()
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=_build_env(), start_new_session=True
            )
        except FileNotFoundError:
            raise _missing_tool(cmd[0]) from None
        try:
            status: int | None = proc.wait(timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            status = None
        except BaseException:  # Terminated (SIGTERM) included
            _kill_group(proc)
            raise
    return status, time.perf_counter() - started


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _log_tail(log_path: Path, scratch: Path, extra: str = "") -> bytes:
    with open(log_path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - LOG_LIMIT))
        tail = f.read()
    if size > LOG_LIMIT:
        tail = b"[... %d earlier bytes cut ...]\n" % (size - LOG_LIMIT) + tail.split(b"\n", 1)[-1]
    # The scratch folder is random per attempt: without it, a retry writes the same log.
    return tail.replace(str(scratch).encode(), WORKDIR_IN_LOGS.encode()) + extra.encode()


def build_driver(key: DriverKey, sources: Path, bundle: Bundle, scratch: Path) -> Built:
    """Build one driver from a version's extracted sources (``build.json`` says which
    folder and which output file) against an extracted bundle. ``scratch`` holds both
    and is mapped out of the object's paths."""
    try:
        spec = read_build_spec(sources).get(key.kind)
    except ValueError as e:
        return Built(failure="sources_missing", message=f"sources of {key.driver_version}: {e}")
    if spec is None:
        return Built(
            failure="sources_missing",
            message=f"sources of {key.driver_version}: build.json has no {key.kind!r} entry",
        )
    src = scratch / "build" / key.driver_version / key.kind
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(sources / spec["dir"], src, symlinks=True)  # kbuild writes next to them
    log_path = scratch / "build" / f"{key.driver_version}-{key.kind}.log"
    log_path.write_bytes(f"# {key.kernel} {key.driver_version} {key.kind}\n".encode())

    status, make_s = _run_make(make_command(bundle.build_dir, src, scratch), log_path)
    if status != 0:
        log = _log_tail(log_path, scratch)
        why = f"timed out after {BUILD_TIMEOUT_S} s" if status is None else f"exit status {status}"
        return Built(
            failure="compile", message=first_error(log, f"make {why}"), log=log, make_s=make_s
        )
    output = src / spec["output"]
    if not output.is_file():
        msg = f"make succeeded but left no {spec['dir']}/{spec['output']} (build.json's output)"
        return _failed("compile", msg, log_path, scratch, make_s)
    if key.kind == "mod":
        return _finish_module(key, output, log_path, scratch, make_s)
    return _finish_probe(key, output, log_path, scratch, make_s)


def first_error(log: bytes, fallback: str) -> str:
    """The compiler's first error, as a one-line reason. First in source order (file,
    then line and column), not in the log's: make -j interleaves the compilers, so which
    error the log shows first varies from build to build, and the reason names the
    failure in the ledger, where identical failures are grouped (drivers.domain.failures).
    Without a located compiler error, the log's first error line."""
    located, other = [], []
    for line in log.decode(errors="replace").splitlines():
        if "error:" in line or "Error:" in line or "ERROR:" in line:
            text = line.strip().removeprefix(WORKDIR_IN_LOGS + "/")[:300]
            where = _LOCATED_ERROR.match(text)
            if where is None:
                other.append(text)
            else:
                located.append((where["path"], int(where["line"]), int(where["col"] or 0), text))
    if located:
        return min(located)[3]
    return other[0] if other else fallback


def _failed(failure: str, msg: str, log_path: Path, scratch: Path, make_s: float) -> Built:
    """A build whose make ran: the log ends with why the result was refused."""
    return Built(
        failure=failure,
        message=msg[:300],
        log=_log_tail(log_path, scratch, f"# {failure}: {msg}\n"),
        make_s=make_s,
    )


def _finish_module(
    key: DriverKey, module: Path, log_path: Path, scratch: Path, make_s: float
) -> Built:
    stripped = module.with_name(module.name + ".stripped")
    strip = _run_tool(["strip", "--strip-debug", "-o", str(stripped), str(module)])
    if strip.returncode != 0:
        msg = f"strip --strip-debug failed: {strip.stderr.decode(errors='replace').strip()}"
        return _failed("compile", msg, log_path, scratch, make_s)
    elf = stripped.read_bytes()
    try:
        vermagic = read_vermagic(elf)
    except ValueError as e:
        return _failed("compile", f"{module.name}: {e}", log_path, scratch, make_s)
    if not vermagic_matches(vermagic, key.kernel):
        msg = (
            f"vermagic {vermagic.strip()!r} does not start with {key.kernel!r}"
            if vermagic is not None
            else f"{module.name} has no vermagic in .modinfo"
        )
        return _failed("vermagic", msg, log_path, scratch, make_s)
    return Built(data=gzip_driver(elf), make_s=make_s)


def _finish_probe(
    key: DriverKey, probe: Path, log_path: Path, scratch: Path, make_s: float
) -> Built:
    # -g drops DWARF but keeps .BTF, which libbpf needs for the maps.
    stripped = probe.with_name(probe.name + ".stripped")
    strip = _run_tool(["llvm-strip", "-g", "-o", str(stripped), str(probe)])
    if strip.returncode != 0:
        msg = f"llvm-strip -g failed: {strip.stderr.decode(errors='replace').strip()}"
        return _failed("compile", msg, log_path, scratch, make_s)
    data = gzip_driver(stripped.read_bytes())
    problems = verify_driver(key, data, unavailable=False)
    if problems:
        return _failed("compile", "; ".join(problems), log_path, scratch, make_s)
    return Built(data=data, make_s=make_s)


def toolchain_versions() -> dict[str, str | None]:
    """First line of ``--version`` of each tool (None when missing), read once per shard."""
    versions: dict[str, str | None] = {}
    for tool in ("gcc", "clang", "make"):
        try:
            out = subprocess.run(
                [tool, "--version"], capture_output=True, text=True, timeout=30, check=False
            ).stdout
            versions[tool] = out.splitlines()[0].strip() if out else None
        except (OSError, subprocess.TimeoutExpired):
            versions[tool] = None
    return versions
