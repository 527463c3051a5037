"""Debian's package archive, through apt and dpkg: which kernels each release offers, the
package dependencies of a kernel, fetching .debs into a local cache, reading their fields
and files. Used to make bundles (:mod:`drivers.build.bundles`) and boot images
(:mod:`drivers.build.boot_images`).

Every release this machine's mirror carries is reachable, whatever the host runs: each
suite of :data:`SUITES` gets its own **private apt configuration** under
``<state>/<suite>/`` (``.cache/apt/`` by default: beside the .deb cache ``.cache/debs``),
never the host's sources, lists, cache or dpkg status:

==========================  ==============================================================
``apt.conf``                the configuration, passed as ``APT_CONFIG``; it points
                            ``Dir::Etc::parts`` at an empty folder, so the host's
                            ``apt.conf.d`` (its update hooks included) is not read; only
                            the host's proxy settings are copied in
``sources.list``            one line: the suite, ``signed-by`` Debian's archive keyring
                            (:data:`KEYRING`, which holds bullseye's to trixie's keys)
``lists/``                  ``apt-get update``'s package lists, refreshed when older than
                            :data:`REFRESH_AGE` (or on ``--refresh``)
``cache/``, ``status``      apt's binary cache; an empty dpkg status (nothing installed)
``kernel-packages.json``    the suite's ``linux-headers-*``/``linux-image-*``/
                            ``linux-kbuild-*`` stanzas, read once from the lists
==========================  ==============================================================

The mirror is the host's, found as ``scripts/debian-base-image.sh`` finds it
(:func:`host_mirrors`). A suite the mirror does not serve (bullseye-backports moved to
archive.debian.org) is reported as unreachable and searched no further.

Downloaded .debs are cached per release (``<deb cache>/<release>/``): releases share
package names (``linux-kbuild-6.1`` is in bullseye-security and in bookworm) whose
binaries are built against different C libraries, so a bundle takes its packages from
its own release only.
"""

from __future__ import annotations

import difflib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache, cmp_to_key
from pathlib import Path
from typing import IO

from drivers.domain.kernels import Kernel, parse_kernel

DISTRO = "debian"  # the kernel family (drivers.domain.kernels) of Debian's releases
HEADERS_PREFIX = "linux-headers-"
IMAGE_PREFIX = "linux-image-"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# Security suites change daily; a day-old list may miss a kernel published this morning.
REFRESH_AGE = 6 * 3600
# x86_64 kernels only: the flavours a builder here can use.
X86_64_FLAVOURS = ("amd64", "cloud-amd64", "rt-amd64")
SOURCES_FILES = ("/etc/apt/sources.list", "/etc/apt/sources.list.d")

_DEP_RE = re.compile(
    r"\s*(?P<name>[a-z0-9][a-z0-9+.-]*)(?::[a-z0-9-]+)?"
    r"\s*(?:\(\s*(?P<op><<|<=|=|>=|>>)\s*(?P<version>[^\s)]+)\s*\))?\s*"
)
_KERNEL_STANZA_RE = re.compile(
    rb"^Package: linux-(?:headers|image|kbuild)-[^\n]*\n(?:[^\n]+\n?)*", re.MULTILINE
)
_PROXY_RE = re.compile(r'^Acquire::(?:https?|ftp)::Proxy(?:::[^ ]+)? "[^"]*";$', re.MULTILINE)


class DebianError(RuntimeError):
    """apt or dpkg failed, or a package is not what was asked for."""


class UnknownKernel(ValueError):
    """No Debian release offers header packages for the kernel(s) asked for."""


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


def run_tool(
    command: list[str], what: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> str:
    """Run apt or dpkg; its stdout, or DebianError naming ``what`` with the output's tail."""
    try:
        done = subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise DebianError(f"{what}: {command[0]} is not installed") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-10:])
        raise DebianError(f"{what} failed (exit {done.returncode}): {' '.join(command)}\n{tail}")
    return done.stdout


def deb_field(deb: Path, name: str) -> str:
    """A control field of a .deb (``Version``, ``Depends``)."""
    return run_tool(["dpkg-deb", "-f", str(deb), name], f"reading {name} of {deb}").strip()


def version_cmp(a: str, b: str) -> int:
    """Debian version order (dpkg's), as a cmp function."""
    if a == b:
        return 0
    lower = subprocess.run(["dpkg", "--compare-versions", a, "lt", b], check=False)
    return -1 if lower.returncode == 0 else 1


def satisfies(version: str, dep: Dependency) -> bool:
    if dep.op is None:
        return True
    op = {"<<": "lt", "<=": "le", "=": "eq", ">=": "ge", ">>": "gt"}[dep.op]
    done = subprocess.run(["dpkg", "--compare-versions", version, op, dep.version], check=False)
    return done.returncode == 0


# --- releases, suites and the mirror ---------------------------------------------------


@dataclass(frozen=True)
class Suite:
    """One suite of the Debian archive, e.g. bookworm-security of release bookworm."""

    name: str
    release: str
    archive: str = "debian"  # or "debian-security": which mirror serves it


SUITES: tuple[Suite, ...] = (
    Suite("bullseye", "bullseye"),
    Suite("bullseye-security", "bullseye", "debian-security"),
    Suite("bullseye-backports", "bullseye"),
    Suite("bookworm", "bookworm"),
    Suite("bookworm-security", "bookworm", "debian-security"),
    Suite("bookworm-backports", "bookworm"),
    Suite("trixie", "trixie"),
    Suite("trixie-security", "trixie", "debian-security"),
)
"""The suites searched for kernels, in order of preference within a release (each
release's names are :attr:`drivers.domain.kernels.Kernel.series` values)."""
RELEASES: tuple[str, ...] = tuple(dict.fromkeys(s.release for s in SUITES))
DEFAULT_MIRRORS = {
    "debian": "http://deb.debian.org/debian",
    "debian-security": "http://deb.debian.org/debian-security",
}


def _source_uris(paths: Iterable[str]) -> Iterator[str]:
    for top in paths:
        base = Path(top)
        files = sorted(base.iterdir()) if base.is_dir() else [base]
        for f in files:
            if not f.is_file() or f.suffix not in (".list", ".sources"):
                continue
            for line in f.read_text(errors="replace").splitlines():
                words = line.split("#", 1)[0].split()
                if f.suffix == ".sources" and words and words[0].lower() == "uris:":
                    yield from words[1:]
                elif f.suffix == ".list" and words and words[0] == "deb":
                    # deb [options] URI suite ...: options may span words ("[a=b c=d]").
                    rest, in_options = [], False
                    for w in words[1:]:
                        if w.startswith("[") or in_options:
                            in_options = not w.endswith("]")
                            continue
                        rest.append(w)
                    yield from rest[:1]


def host_mirrors(paths: Iterable[str] = SOURCES_FILES) -> dict[str, str]:
    """The Debian and Debian security mirrors of the host's apt sources (the first URI
    ending in ``/debian`` and ``/debian-security``), Debian's own where none is
    configured: the same rule as scripts/debian-base-image.sh."""
    mirrors = dict(DEFAULT_MIRRORS)
    found: dict[str, str] = {}
    for uri in _source_uris(paths):
        uri = uri.rstrip("/")
        for archive in mirrors:
            if uri.endswith("/" + archive):
                found.setdefault(archive, uri)
    mirrors.update(found)
    return mirrors


@cache
def _host_proxy_settings() -> str:
    """The host's apt proxy lines (the only host setting a private configuration keeps)."""
    try:
        dump = subprocess.run(
            ["apt-config", "dump"], capture_output=True, text=True, check=False
        ).stdout
    except FileNotFoundError:
        return ""
    return "".join(m + "\n" for m in _PROXY_RE.findall(dump))


# --- one suite's private apt ---------------------------------------------------------


@dataclass(frozen=True)
class Package:
    """One package version a suite offers (from its Packages list)."""

    name: str
    version: str
    depends: str
    size: int
    suite: Suite


class AptSuite:
    """apt for one suite only, with its own configuration and state (module docstring)."""

    INDEX = "kernel-packages.json"

    def __init__(self, suite: Suite, uri: str, state_root: Path) -> None:
        self.suite = suite
        self.uri = uri
        self.dir = (state_root / suite.name).absolute()
        self.lists = self.dir / "lists"
        self.config = self.dir / "apt.conf"
        self.stamp = self.dir / "updated"
        self._packages: dict[str, list[Package]] | None = None

    def _write_config(self) -> None:
        for sub in ("lists/partial", "cache/archives/partial", "empty"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "status").touch()
        sources = f"deb [signed-by={KEYRING}] {self.uri} {self.suite.name} main\n"
        d = self.dir
        config = (
            f'Dir::Etc::parts "{d}/empty";\n'
            'Dir::Etc::main "/dev/null";\n'
            f'Dir::Etc::sourcelist "{d}/sources.list";\n'
            'Dir::Etc::sourceparts "-";\n'
            'Dir::Etc::preferences "/dev/null";\n'
            f'Dir::Etc::preferencesparts "{d}/empty";\n'
            'Dir::Etc::trusted "/dev/null";\n'
            f'Dir::Etc::trustedparts "{d}/empty";\n'
            f'Dir::State "{d}";\n'
            f'Dir::State::Lists "{self.lists}";\n'
            f'Dir::State::status "{d}/status";\n'
            f'Dir::State::extended_states "{d}/extended_states";\n'
            f'Dir::Cache "{d}/cache";\n'
            f'Dir::Log "{d}/log";\n'
            'APT::Architecture "amd64";\n'
            'APT::Architectures { "amd64"; };\n'
            'APT::Get::List-Cleanup "0";\n'
            'Acquire::Languages "none";\n' + _host_proxy_settings()
        )
        for name, text in (("sources.list", sources), ("apt.conf", config)):
            path = d / name
            if not path.is_file() or path.read_text() != text:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(text)
                tmp.replace(path)

    def env(self) -> dict[str, str]:
        return {**os.environ, "APT_CONFIG": str(self.config), "LC_ALL": "C"}

    def packages_files(self) -> list[Path]:
        return sorted(self.lists.glob("*_binary-amd64_Packages"))

    def age(self) -> float | None:
        """Seconds since the last successful update; None when it has no lists."""
        if not self.stamp.is_file() or not self.packages_files():
            return None
        return time.time() - self.stamp.stat().st_mtime

    def update(self, max_age: float, since: float | None = None) -> bool:
        """Run ``apt-get update`` for this suite when its lists are missing or older than
        ``max_age`` seconds (``since``: unless updated after that time, for --refresh).
        Returns whether it ran. One process at a time per suite."""
        self._write_config()
        with open(self.dir / "update.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            age = self.age()  # again: another process may have just updated
            if age is not None and age < max_age:
                if since is None or self.stamp.stat().st_mtime >= since:
                    return False
            run_tool(
                ["apt-get", "update", "-q"], f"apt-get update for {self.suite.name}", env=self.env()
            )
            if not self.packages_files():
                raise DebianError(f"apt-get update for {self.suite.name} left no package list")
            self._write_index()
            self.stamp.write_text(f"{self.uri} {self.suite.name}\n")
        self._packages = None
        return True

    def _write_index(self) -> None:
        stanzas = []
        for f in self.packages_files():
            data = f.read_bytes()
            stanzas += [m.group().decode() for m in _KERNEL_STANZA_RE.finditer(data)]
        records = []
        for text in stanzas:
            fields: dict[str, str] = {}
            for line in text.splitlines():
                if line and not line[0].isspace() and ":" in line:
                    key, _, value = line.partition(":")
                    fields[key] = value.strip()
            records.append(
                [fields["Package"], fields["Version"], fields.get("Depends", ""),
                 int(fields.get("Size", 0))]
            )  # fmt: skip
        tmp = self.dir / (self.INDEX + ".tmp")
        tmp.write_text(json.dumps(records))
        tmp.replace(self.dir / self.INDEX)

    def packages(self) -> dict[str, list[Package]]:
        """The suite's kernel packages by name (lists must be there: see :meth:`update`)."""
        if self._packages is None:
            index = self.dir / self.INDEX
            if not index.is_file() or index.stat().st_mtime < max(
                f.stat().st_mtime for f in self.packages_files()
            ):
                self._write_index()
            out: dict[str, list[Package]] = {}
            for name, version, depends, size in json.loads(index.read_text()):
                out.setdefault(name, []).append(Package(name, version, depends, size, self.suite))
            self._packages = out
        return self._packages

    def download(self, package: Package, dest: Path) -> Path:
        """``apt-get download`` one package version into ``dest``; the .deb's path."""
        spec = f"{package.name}={package.version}"
        run_tool(
            ["apt-get", "download", "-q", spec],
            f"downloading {spec} from {self.suite.name}",
            cwd=dest,
            env=self.env(),
        )
        debs = list(dest.glob("*.deb"))
        if len(debs) != 1:
            raise DebianError(f"apt-get download {spec} gave {len(debs)} .deb files, not 1")
        return debs[0]


# --- the archive: every suite -----------------------------------------------------------


@dataclass(frozen=True)
class OfferedKernel:
    """A flavoured x86_64 kernel a release offers headers for, and the suites holding it."""

    kernel: Kernel
    release: str
    suites: tuple[str, ...]

    @property
    def uname(self) -> str:
        return self.kernel.release


@dataclass
class DebianArchive:
    """Every suite of :data:`SUITES` through its private apt (module docstring).

    ``state`` holds the per-suite folders; lists are updated on first use when missing or
    older than ``max_age`` seconds, or once per archive object when ``refresh``.
    """

    state: Path
    refresh: bool = False
    max_age: float = REFRESH_AGE
    mirrors: dict[str, str] = field(default_factory=host_mirrors)
    suites: Sequence[Suite] = SUITES
    unreachable: dict[str, str] = field(default_factory=dict, init=False)
    _apts: dict[str, AptSuite] = field(default_factory=dict, init=False, repr=False)
    _ready: set[str] = field(default_factory=set, init=False, repr=False)
    _created: float = field(default_factory=time.time, init=False, repr=False)

    def apt(self, suite: Suite) -> AptSuite:
        if suite.name not in self._apts:
            self._apts[suite.name] = AptSuite(suite, self.mirrors[suite.archive], self.state)
        return self._apts[suite.name]

    def _say(self, text: str) -> None:
        print(text, file=sys.stderr)

    def ready(self, release: str | None = None) -> list[AptSuite]:
        """The suites (of ``release``, or all) whose lists are usable, updated as needed;
        the others are recorded in :attr:`unreachable` with the reason."""
        out = []
        for suite in self.suites:
            if release is not None and suite.release != release:
                continue
            apt = self.apt(suite)
            if suite.name not in self._ready and suite.name not in self.unreachable:
                try:
                    started = time.monotonic()
                    since = self._created if self.refresh else None
                    if apt.update(self.max_age, since):
                        took = time.monotonic() - started
                        self._say(f"apt-get update {suite.name} ({apt.uri}): {took:.1f}s")
                    self._ready.add(suite.name)
                except DebianError as e:
                    if apt.age() is not None:  # stale lists beat none
                        when = time.strftime("%FT%TZ", time.gmtime(apt.stamp.stat().st_mtime))
                        self._say(f"warning: {e}; using the lists of {when}")
                        self._ready.add(suite.name)
                    else:
                        self.unreachable[suite.name] = str(e).splitlines()[-1]
            if suite.name in self._ready:
                out.append(apt)
        return out

    def find(self, dep: Dependency, release: str | None = None) -> Package | None:
        """The newest version satisfying ``dep`` in the suites (of ``release``); on a
        tie the earlier suite of :data:`SUITES` (the release itself before its updates)."""
        best: Package | None = None
        for apt in self.ready(release):
            for package in apt.packages().get(dep.name, []):
                if not satisfies(package.version, dep):
                    continue
                if best is None or version_cmp(package.version, best.version) > 0:
                    best = package
        return best

    def kernels(self) -> list[OfferedKernel]:
        """Every flavoured x86_64 kernel with headers, per release in version order."""
        found: dict[tuple[str, str], list[str]] = {}
        for apt in self.ready():
            for name in apt.packages():
                if not name.startswith(HEADERS_PREFIX):
                    continue
                uname = name.removeprefix(HEADERS_PREFIX)
                try:
                    kernel = parse_kernel(uname)
                except ValueError:
                    continue  # meta packages such as linux-headers-6.12-amd64
                if kernel.family == DISTRO and kernel.flavour in X86_64_FLAVOURS:
                    found.setdefault((apt.suite.release, uname), []).append(apt.suite.name)
        order = {r: i for i, r in enumerate(RELEASES)}
        offered = [OfferedKernel(parse_kernel(u), r, tuple(s)) for (r, u), s in found.items()]
        return sorted(offered, key=lambda o: (order[o.release], o.kernel.key))

    def searched(self) -> str:
        """The suites searched, per release, for messages."""
        parts = []
        for release in RELEASES:
            names = [
                s.name + (" (unreachable)" if s.name in self.unreachable else "")
                for s in self.suites
                if s.release == release
            ]
            parts.append(f"{release} ({', '.join(names)})")
        return "; ".join(parts)


def default_archive(deb_cache: Path, **options) -> DebianArchive:
    """The archive whose apt state sits beside ``deb_cache`` (``.cache/debs`` →
    ``.cache/apt``)."""
    return DebianArchive(Path(deb_cache).absolute().parent / "apt", **options)


def check_uname(uname: str) -> Kernel:
    """The parsed kernel, or ValueError when ``uname`` is not a Debian kernel release."""
    kernel = parse_kernel(uname)
    if kernel.family != DISTRO:
        raise ValueError(
            f"{uname!r} is not a Debian kernel release (family {kernel.family!r}); "
            "Debian ones end in -amd64, -cloud-amd64, -rt-amd64, e.g. 6.1.0-47-amd64"
        )
    return kernel


def check_unames(
    unames: Iterable[str], deb_cache: Path, archive: DebianArchive | None = None
) -> list[Kernel]:
    """Parse every uname and make sure its headers are cached or offered by a release; one
    error names every unknown kernel, the releases searched and the nearest offered."""
    kernels = [check_uname(u) for u in unames]
    missing = [k.release for k in kernels if not cached_debs(HEADERS_PREFIX + k.release, deb_cache)]
    if missing:
        archive = archive or default_archive(deb_cache)
        offered = {o.uname: o for o in archive.kernels()}
        unknown = [u for u in missing if u not in offered]
        if unknown:
            lines = []
            for uname in unknown:
                near = difflib.get_close_matches(uname, list(offered), n=4, cutoff=0.75)
                near_text = ", ".join(f"{n} ({'/'.join(offered[n].suites)})" for n in near)
                lines.append(f"{uname}: nearest {near_text or '(none)'}")
            raise UnknownKernel(
                f"no Debian release offers linux-headers-<uname> for {', '.join(unknown)}; "
                f"searched {archive.searched()}: {len(offered)} kernel(s) in all.\n  "
                + "\n  ".join(lines)
                + "\n(drivers bundle debian --list shows them all; --refresh updates the lists)"
            )
    return kernels


# --- the .deb cache ------------------------------------------------------------------------


def cached_debs(package: str, deb_cache: Path, release: str | None = None) -> list[Path]:
    """The .debs of ``package`` in the cache (of ``release``, or any), any version."""
    # "_" separates name and version in a .deb's file name and never occurs in names.
    return sorted(Path(deb_cache).glob(f"{release or '*'}/{package}_*.deb"))


def cached_release(package: str, deb_cache: Path) -> str | None:
    """The release whose cache holds ``package``, if one does."""
    debs = cached_debs(package, deb_cache)
    return debs[-1].parent.name if debs else None


def fetch_deb(
    dep: Dependency,
    deb_cache: Path,
    archive: DebianArchive | None = None,
    release: str | None = None,
) -> tuple[Path, bool]:
    """The .deb for ``dep`` (of ``release``, else of whichever release offers it) from the
    cache, else downloaded into ``<deb_cache>/<release>/`` through that suite's apt.
    Returns (path, downloaded)."""
    versions = {p: deb_field(p, "Version") for p in cached_debs(dep.name, deb_cache, release)}
    fitting = [p for p, v in versions.items() if satisfies(v, dep)]
    if fitting:
        newest = cmp_to_key(lambda a, b: version_cmp(versions[a], versions[b]))
        return max(fitting, key=newest), False
    archive = archive or default_archive(deb_cache)
    package = archive.find(dep, release)
    if package is None:
        where = f"release {release}" if release else "any release"
        raise DebianError(f"no suite of {where} offers {dep}; searched {archive.searched()}")
    folder = Path(deb_cache) / package.suite.release
    folder.mkdir(parents=True, exist_ok=True)
    # Into a private folder first: an interrupted download never looks like a cached .deb.
    scratch = Path(tempfile.mkdtemp(dir=folder, prefix=".download-"))
    try:
        deb = archive.apt(package.suite).download(package, scratch)
        version = deb_field(deb, "Version")
        if version != package.version:
            raise DebianError(f"apt gave {dep.name} {version}, not {package.version}")
        final = folder / deb.name
        os.replace(deb, final)
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
