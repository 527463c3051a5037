"""Building one driver against an extracted bundle: kbuild, then strip, then the checks.

Both kinds build with kbuild, ``make -C <BUNDLE_BUILD_DIR> M=<dir> modules``, where
``<dir>`` is the folder the sources' ``build.json`` names for the kind inside a fresh copy
of the *whole* prepared tree: the real probe includes the driver's headers and
``../driver_config.h`` from the module's folder, and an 8.x build runs the configure probes
under ``<dir>/configure/``. ``build.json`` also names the output (see
:mod:`drivers.build.prepare`). The module is then stripped of debug info and its vermagic
checked, the probe stripped of DWARF (its BTF stays). A compile failure is data
(:class:`Built` with a failure class and the log's tail); a missing tool is not
(:class:`ToolMissing`: the builder image is incomplete).

Before anything is copied or compiled, the toolchain guard (:class:`BuilderToolchain`,
:mod:`drivers.domain.toolchain`) refuses a kernel built with another compiler major
version than the one kbuild would run here, as ``toolchain_mismatch``.
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
from drivers.domain.toolchain import TOOLCHAIN_MISMATCH, askable, mismatch
from drivers.domain.verify import read_vermagic, verify_driver, vermagic_matches

LOG_LIMIT = 64 * 1024  # a failed task's log keeps the tail of the compile output
# Per make run; a hung compile must not hold a builder forever. Measured on a busy 2-core
# machine: the 2.3.0 module 17 s, its probe 23 s, the 8.1.0 module 96 s (its ~25 feature
# probes are kbuild runs of their own). A builder pod has 1 CPU, which can double that:
# 900 s leaves the slowest real build a factor of ~5 before it is called hung.
BUILD_TIMEOUT_S = 900
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


# zlib's default. Level 9 saved 1-4 % on the real drivers for 10x the time: the 8.1.0
# probe (4.4 MB stripped) 564 KB in 2.0 s against 588 KB in 0.22 s (module 1.1 MB:
# 77 KB in 0.27 s vs 79 KB in 0.03 s), 7 % of a probe build, paid on every build.
GZIP_LEVEL = 6


def gzip_driver(data: bytes) -> bytes:
    """A driver object as published: deterministic gzip (a rebuild gives the same bytes)."""
    return gzip_bytes(data, GZIP_LEVEL)


def make_command(build_dir: Path, src: Path, scratch: Path) -> list[str]:
    """kbuild for an external folder (both kinds). KCFLAGS maps the scratch folder out of
    the module's debug info and __FILE__, so its bytes (build-id included) do not depend on
    where the shard ran; the probe Makefile maps its own paths. A set
    KBUILD_BUILD_TIMESTAMP is kbuild's switch for reproducible builds: without it,
    pahole < 1.27 encodes a module's BTF with threads (-j) and the order of its types
    varies from build to build (6.12 headers)."""
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


class BuilderToolchain:
    """A builder's compilers as kbuild calls them (``gcc-12``, ``x86_64-linux-gnu-gcc-14``:
    the bundle's CC), each asked for its version once (once per shard)."""

    def __init__(self, builder: str) -> None:
        self.builder = builder
        self._versions: dict[str, str | None] = {}

    def version(self, command: str) -> str | None:
        """First line of ``command --version``; None when it is not installed."""
        if command not in self._versions:
            self._versions[command] = tool_version(command)
        return self._versions[command]

    def refuses(self, bundle: Bundle) -> str | None:
        """Why this builder must not build against ``bundle`` (its kernel was built with
        another compiler, or the tree calls a compiler it lacks), or None. Raises
        :class:`ToolMissing` when it has no compiler of the kernel's kind at all (not even
        a plain ``gcc``): then the image is incomplete, not the route wrong."""
        compiler = bundle.compiler
        if compiler is None or not askable(bundle.cc):  # never run a path into the tree
            return None
        have = self.version(bundle.cc)
        default = self.version(compiler.name) if have is None else None
        if have is None and default is None:
            raise _missing_tool(bundle.cc)
        return mismatch(compiler, bundle.cc, have, self.builder, default)


def task_status(built: Built) -> str:
    """A build's status in its task record: built, failed (the driver's: counts toward
    quarantine), infra_failed (its sources cannot say how), toolchain_mismatch (routed to
    the wrong builder)."""
    if built.failure is None:
        return "built"
    return {"sources_missing": "infra_failed", TOOLCHAIN_MISMATCH: TOOLCHAIN_MISMATCH}.get(
        built.failure, "failed"
    )


def build_driver(
    key: DriverKey,
    sources: Path,
    bundle: Bundle,
    scratch: Path,
    toolchain: BuilderToolchain | None = None,
) -> Built:
    """Build one driver from a version's extracted sources (``build.json`` says which
    folder and which output file) against an extracted bundle. ``scratch`` holds both
    and is mapped out of the object's paths. ``toolchain`` is the builder's (default:
    this machine's, asked afresh); a kernel built with another compiler is refused
    before anything is copied or compiled."""
    toolchain = toolchain if toolchain is not None else BuilderToolchain("local")
    refused = toolchain.refuses(bundle)
    if refused is not None:
        return Built(failure=TOOLCHAIN_MISMATCH, message=refused)
    try:
        spec = read_build_spec(sources, key.driver_version).get(key.kind)
    except ValueError as e:
        return Built(failure="sources_missing", message=f"sources of {key.driver_version}: {e}")
    if spec is None:
        return Built(
            failure="sources_missing",
            message=f"sources of {key.driver_version}: build.json has no {key.kind!r} entry",
        )
    # One copy of the whole tree per kind, so the two builds never see each other's
    # objects; kbuild writes next to the sources.
    tree = scratch / "build" / key.driver_version / key.kind
    if tree.exists():
        shutil.rmtree(tree)
    shutil.copytree(sources, tree, symlinks=True)
    src = tree / spec["dir"]
    log_path = scratch / "build" / f"{key.driver_version}-{key.kind}.log"
    log_path.write_bytes(f"# {key.kernel} {key.driver_version} {key.kind}\n".encode())

    status, make_s = _run_make(make_command(bundle.build_dir, src, scratch), log_path)
    if status != 0:
        log = _log_tail(log_path, scratch)
        why = f"timed out after {BUILD_TIMEOUT_S} s" if status is None else f"exit status {status}"
        # Paths in the message as in the sources (driver/main.c), the same on every kernel.
        inside = f"{WORKDIR_IN_LOGS}/{tree.relative_to(scratch).as_posix()}/"
        message = first_error(log, f"make {why}", inside)
        return Built(failure="compile", message=message, log=log, make_s=make_s)
    output = src / spec["output"]
    if not output.is_file():
        msg = f"make succeeded but left no {spec['dir']}/{spec['output']} (build.json's output)"
        return _failed("compile", msg, log_path, scratch, make_s)
    if key.kind == "mod":
        return _finish_module(key, output, log_path, scratch, make_s)
    return _finish_probe(key, output, log_path, scratch, make_s)


# 8.x drivers detect kernel features with configure probes at build time: the module's
# and the probe's Makefile include a Makefile.inc per feature, which prints, prefixed so,
# each failed probe's whole make output into the main log. A feature the kernel lacks is
# expected, so those errors are never the driver's.
CONFIGURE_PREFIXES = ("[configure-kmod]", "[configure-bpf]")
# How a probe's make output begins and ends: build.sh runs a top-level `make -C <probe>`
# (env -i: make level 0, so "make:", where kbuild's nested makes print "make[N]:").
_PROBE_STARTS = "make: Entering directory"
_PROBE_ENDS = ("make: *** ", "make: Leaving directory")


def first_error(log: bytes, fallback: str, tree: str = WORKDIR_IN_LOGS + "/") -> str:
    """The compiler's first error, as a one-line reason, else the first other error line
    (modpost, make), leaving out what the configure probes printed.

    - Compiler diagnostics come first because the driver's Makefiles run shell tests
      whose noise says "error" too (8.1.0's probe Makefile: "expr: syntax error" on
      every Debian kernel).
    - The driver's own sources before the kernel's headers (an error gcc places in a
      header, e.g. a changed ``class_create``, also shows where the driver calls it).
    - First in source order (file, then line and column), not in the log's: make -j
      interleaves the compilers, so which error the log shows first varies from build to
      build, and the reason names the failure in the ledger, where identical failures
      are grouped (drivers.domain.failures).
    - ``tree`` (the copy of the sources, as the log names it) is cut from the paths: the
      message reads the same on every kernel.

    Where the kernel's Kbuild.include defines ``newline`` a probe's output spans many
    lines, only the first prefixed (6.1's has none: it is one line); so the lines after
    a prefixed start of a probe's output belong to it until its make ends."""
    in_probe = False
    located, other = [], None
    for line in log.decode(errors="replace").splitlines():
        text = line.strip()
        if text.startswith(CONFIGURE_PREFIXES):
            output = text.partition("] ")[2]
            in_probe = output.startswith(_PROBE_STARTS) and not any(
                end in output for end in _PROBE_ENDS
            )
            continue
        if in_probe:
            in_probe = not text.startswith(_PROBE_ENDS)
            continue
        shown = _shown(text, tree)
        if where := _LOCATED_ERROR.search(shown):
            outside = tree not in text  # in a kernel header: the driver's own error first
            at = (outside, where["path"], int(where["line"]), int(where["col"] or 0))
            located.append((*at, shown))
        elif other is None and ("error:" in text or "Error:" in text or "ERROR:" in text):
            other = shown
    if located:
        return min(located)[-1]
    return other if other is not None else fallback


def _shown(line: str, tree: str) -> str:
    return line.replace(tree, "").removeprefix(WORKDIR_IN_LOGS + "/")[:300]


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


def tool_version(tool: str) -> str | None:
    """First line of ``tool --version``, None when it is missing."""
    try:
        out = subprocess.run(
            [tool, "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env=_build_env(),
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.splitlines()[0].strip() if out else None


def toolchain_versions() -> dict[str, str | None]:
    """First line of ``--version`` of each tool (None when missing), read once per shard."""
    return {tool: tool_version(tool) for tool in ("gcc", "clang", "make")}
