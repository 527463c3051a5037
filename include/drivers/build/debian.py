"""Debian's package archive, through apt and dpkg: package dependencies, fetching .debs
into a local cache, reading their fields and files, and which kernels Debian has headers
for. Used to make bundles (:mod:`drivers.build.bundles`) and boot images
(:mod:`drivers.build.boot_images`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cmp_to_key
from pathlib import Path
from typing import IO

from drivers.domain.kernels import Kernel, parse_kernel

DISTRO = "debian"  # the kernel family (drivers.domain.kernels) of Debian's releases
HEADERS_PREFIX = "linux-headers-"

_DEP_RE = re.compile(
    r"\s*(?P<name>[a-z0-9][a-z0-9+.-]*)(?::[a-z0-9-]+)?"
    r"\s*(?:\(\s*(?P<op><<|<=|=|>=|>>)\s*(?P<version>[^\s)]+)\s*\))?\s*"
)


class DebianError(RuntimeError):
    """apt or dpkg failed, or a package is not what was asked for."""


class UnknownKernel(ValueError):
    """No Debian header package for the kernel(s) asked for."""


@dataclass(frozen=True)
class Dependency:
    name: str
    op: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return f"{self.name} ({self.op} {self.version})" if self.op else self.name


def parse_depends(text: str) -> list[Dependency]:
    """Every package a Depends field names, alternatives (``a | b``) included."""
    deps = []
    for group in text.split(","):
        for alternative in group.split("|"):
            if not alternative.strip():
                continue
            m = _DEP_RE.fullmatch(alternative)
            if m is None:
                raise DebianError(f"cannot read dependency {alternative.strip()!r}")
            deps.append(Dependency(m["name"], m["op"], m["version"]))
    return deps


def run_tool(command: list[str], what: str, cwd: Path | None = None) -> str:
    """Run apt or dpkg; its stdout, or DebianError naming ``what`` with the output's tail."""
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise DebianError(f"{what}: {command[0]} is not installed") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-10:])
        raise DebianError(f"{what} failed (exit {done.returncode}): {' '.join(command)}\n{tail}")
    return done.stdout


def deb_field(deb: Path, name: str) -> str:
    """A control field of a .deb (``Version``, ``Depends``)."""
    return run_tool(["dpkg-deb", "-f", str(deb), name], f"reading {name} of {deb}").strip()


def _version_cmp(a: str, b: str) -> int:
    if a == b:
        return 0
    lower = subprocess.run(["dpkg", "--compare-versions", a, "lt", b], check=False)
    return -1 if lower.returncode == 0 else 1


def _satisfies(version: str, dep: Dependency) -> bool:
    if dep.op is None:
        return True
    op = {"<<": "lt", "<=": "le", "=": "eq", ">=": "ge", ">>": "gt"}[dep.op]
    done = subprocess.run(["dpkg", "--compare-versions", version, op, dep.version], check=False)
    return done.returncode == 0


def available_unames() -> list[str]:
    """Kernels apt can fetch headers for (flavour packages only), in version order."""
    out = run_tool(["apt-cache", "pkgnames", HEADERS_PREFIX], "listing linux-headers packages")
    kernels: list[Kernel] = []
    for name in out.split():
        try:
            kernel = parse_kernel(name.removeprefix(HEADERS_PREFIX))
        except ValueError:
            continue  # meta packages such as linux-headers-6.12-amd64
        if kernel.family == DISTRO:  # -common and -common-rt are not kernels
            kernels.append(kernel)
    return [k.release for k in sorted(kernels)]


def check_uname(uname: str) -> Kernel:
    """The parsed kernel, or ValueError when ``uname`` is not a Debian kernel release."""
    kernel = parse_kernel(uname)
    if kernel.family != DISTRO:
        raise ValueError(
            f"{uname!r} is not a Debian kernel release (family {kernel.family!r}); "
            "Debian ones end in -amd64, -cloud-amd64, -rt-amd64, e.g. 6.1.0-47-amd64"
        )
    return kernel


def check_unames(unames: Iterable[str], deb_cache: Path) -> list[Kernel]:
    """Parse every uname and make sure its headers are cached or known to apt; one error
    names every unknown kernel and lists the available ones."""
    kernels = [check_uname(u) for u in unames]
    missing = [k.release for k in kernels if not cached_debs(HEADERS_PREFIX + k.release, deb_cache)]
    if missing:
        available = available_unames()
        unknown = [u for u in missing if u not in available]
        if unknown:
            raise UnknownKernel(
                f"no Debian package linux-headers-<uname> for {', '.join(unknown)}; "
                f"apt knows {len(available)} kernel(s): {', '.join(available) or '(none)'} "
                "(run apt-get update if that list looks stale)"
            )
    return kernels


def cached_debs(package: str, deb_cache: Path) -> list[Path]:
    """The .debs of ``package`` in the cache, any version."""
    # "_" separates name and version in a .deb's file name and never occurs in names.
    return sorted(deb_cache.glob(f"{package}_*.deb"))


def fetch_deb(dep: Dependency, deb_cache: Path) -> tuple[Path, bool]:
    """The .deb for ``dep`` from the cache, else downloaded into it with ``apt-get
    download``. Returns (path, downloaded)."""
    deb_cache.mkdir(parents=True, exist_ok=True)
    versions = {p: deb_field(p, "Version") for p in cached_debs(dep.name, deb_cache)}
    fitting = [p for p, v in versions.items() if _satisfies(v, dep)]
    if fitting:
        newest = cmp_to_key(lambda a, b: _version_cmp(versions[a], versions[b]))
        return max(fitting, key=newest), False
    spec = f"{dep.name}={dep.version}" if dep.op == "=" else dep.name
    # Into a private folder first: an interrupted download never looks like a cached .deb.
    scratch = Path(tempfile.mkdtemp(dir=deb_cache, prefix=".download-"))
    try:
        run_tool(["apt-get", "download", "-q", spec], f"downloading {spec}", cwd=scratch)
        debs = list(scratch.glob("*.deb"))
        if len(debs) != 1:
            raise DebianError(f"apt-get download {spec} gave {len(debs)} .deb files, not 1")
        version = deb_field(debs[0], "Version")
        if not _satisfies(version, dep):
            raise DebianError(f"apt offers {dep.name} {version}, but {dep} is needed")
        final = deb_cache / debs[0].name
        os.replace(debs[0], final)
        return final, True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def deb_members(deb: Path) -> Iterator[tuple[str, IO[bytes] | None]]:
    """(name, file or None) of each member of a .deb's data tar, streamed (a kernel
    package holds ~400 MB); a file is readable until the next member."""
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as dpkg:
        try:
            with tarfile.open(fileobj=dpkg.stdout, mode="r|") as tar:
                for member in tar:
                    f = tar.extractfile(member) if member.isfile() else None
                    yield member.name, f
        finally:
            dpkg.kill()
