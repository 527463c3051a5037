"""Kernel bundles from Debian header packages: real apt downloads through a private apt
per suite (lists in the repo's .cache/apt, .debs in .cache/debs/<release>/), real make,
gcc and clang against the extracted bundle (a bookworm kernel: the host's gcc-12)."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from drivers.build import bundles, debian
from drivers.build.boot_images import debian_boot_image
from drivers.build.bundles import (
    BundleReport,
    build_debian_bundle,
    make_debian_bundle,
)
from drivers.build.debian import DebianArchive, OfferedKernel
from drivers.build.sources import read_build_spec
from drivers.domain.kernels import parse_kernel
from drivers.domain.layout import bundle_object
from drivers.ops.cli import main
from drivers.store.storage import ObjectStore, UploadResult
from example_sources import EXAMPLE_SOURCES

REPO = Path(__file__).resolve().parents[1]
VERSIONS = ("2.3.0", "2.4.0-rc1")
HOST_TOOLS = ("apt-get", "dpkg-deb", "make", "gcc-12", "clang", "modinfo", "readelf")
EM_BPF = 247


@pytest.fixture(scope="session")
def deb_cache() -> Path:
    """The repo's (git-ignored) .deb cache: repeated runs download nothing."""
    missing = [t for t in HOST_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing host tools {missing}: run scripts/host-deps.sh")
    path = REPO / ".cache" / "debs"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def ram(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """Factory of fresh folders in RAM where the machine has it (/dev/shm), else under
    pytest's tmp: unpacking ~15,000 small files per bundle is disk-bound on a busy host
    (a bundle: ~25 s on disk, ~3 s in RAM, measured with two builds sharing 2 cores)."""
    shm = Path("/dev/shm")
    if not os.access(shm, os.W_OK):
        yield tmp_path_factory.mktemp
        return
    with tempfile.TemporaryDirectory(dir=shm, prefix="test-bundles-") as top:
        yield lambda name: Path(tempfile.mkdtemp(dir=top, prefix=f"{name}-"))


@pytest.fixture(scope="session")
def apt_state() -> Path:
    return REPO / ".cache" / "apt"


@pytest.fixture(scope="session")
def archive(apt_state: Path) -> DebianArchive:
    return DebianArchive(apt_state)


@pytest.fixture(scope="session")
def offered(archive: DebianArchive) -> list[OfferedKernel]:
    return archive.kernels()


def newest(offered: list[OfferedKernel], pattern: str) -> str:
    unames = [o.uname for o in offered if re.fullmatch(pattern, o.uname)]
    assert unames, f"no release offers a kernel like {pattern!r}"
    return unames[-1]  # offered is in version order


@pytest.fixture(scope="session")
def kernel(deb_cache: Path, offered: list[OfferedKernel]) -> str:
    """A plain bookworm 6.1 amd64 kernel: one whose headers are cached, else the newest."""
    pattern = re.compile(r"6\.1\.0-\d+-amd64")
    cached = sorted(
        name
        for p in deb_cache.glob("bookworm/linux-headers-6.1.0-*-amd64_*.deb")
        if pattern.fullmatch(name := p.name.split("_")[0].removeprefix("linux-headers-"))
    )
    return cached[0] if cached else newest(offered, pattern.pattern)


@pytest.fixture(scope="module")
def report(kernel: str, deb_cache: Path, ram: Callable[[str], Path]) -> BundleReport:
    return build_debian_bundle(kernel, ram("bundles"), deb_cache)


@pytest.fixture(scope="module")
def members(report: BundleReport) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(report.path) as tar:
        return {m.name: m for m in tar.getmembers()}


def extract(bundle: Path, dest: Path) -> Path:
    with tarfile.open(bundle) as tar:
        tar.extractall(dest, filter="data")  # refuses absolute and escaping links
    return dest


@pytest.fixture(scope="module")
def build_dir(report: BundleReport, ram: Callable[[str], Path]) -> Path:
    root = extract(report.path, ram("bundle"))
    return root / (root / "BUNDLE_BUILD_DIR").read_text().strip()


def make_driver(build_dir: Path, sources: Path, kind: str, *extra: str) -> Path:
    """Build one kind of the example driver with the README's command; the output file."""
    spec = read_build_spec(sources)[kind]
    folder = (sources / spec["dir"]).resolve()
    done = subprocess.run(
        ["make", "-C", str(build_dir), f"M={folder}", "modules", *extra],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, f"make {sources.name} {kind}:\n{done.stdout}{done.stderr}"
    return folder / spec["output"]


def fresh_sources(version: str, dest: Path) -> Path:
    return Path(shutil.copytree(EXAMPLE_SOURCES / version, dest / version))


# --- contents -------------------------------------------------------------------------------


def test_value_files_describe_the_kernel(report: BundleReport, kernel: str) -> None:
    with tarfile.open(report.path) as tar:
        values = {
            name: tar.extractfile(name).read().decode()
            for name in bundles.METADATA_FILES
            if name in tar.getnames()
        }
    assert all(v.endswith("\n") and v.count("\n") == 1 for v in values.values())
    values = {k: v.strip() for k, v in values.items()}
    major, minor, patch = kernel.split("-")[0].split(".")
    assert values == {
        "BUNDLE_UNAME": kernel,
        "BUNDLE_BUILD_DIR": f"usr/src/linux-headers-{kernel}",
        "BUNDLE_DISTRO": "debian",
        "BUNDLE_VERSION": major,
        "BUNDLE_MAJOR": minor,
        "BUNDLE_MINOR": patch,
        "BUNDLE_CHECKSUM": report.checksum,
    }
    assert re.fullmatch(r"[0-9a-f]{64}", report.checksum)
    assert report.path.name == bundle_object(kernel)


def test_bundle_holds_no_link_leaving_the_tree(members: dict[str, tarfile.TarInfo]) -> None:
    problems = []
    for name, m in members.items():
        if name.startswith("/") or name.startswith("lib/") or m.islnk():
            problems.append(f"{name}: absolute, lib/ or hard link")
        if m.issym():
            target = posixpath.normpath(posixpath.join(posixpath.dirname(name), m.linkname))
            if m.linkname.startswith("/") or target not in members:
                problems.append(f"{name} -> {m.linkname}")
    assert problems == []
    # The kbuild tools were copied in where the packages had links into /usr/lib.
    flavour = next(n for n in members if re.fullmatch(r"usr/src/linux-headers-[^/]+-amd64", n))
    for tool in ("scripts/basic/fixdep", "scripts/mod/modpost", "tools/objtool/objtool"):
        assert members[f"{flavour}/{tool}"].isfile() and members[f"{flavour}/{tool}"].mode == 0o755


def test_flavour_makefile_includes_the_common_tree_relatively(build_dir: Path) -> None:
    text = (build_dir / "Makefile").read_text()
    assert "/usr/src" not in text
    include = re.search(r"^include \$\(dir \$\(lastword \$\(MAKEFILE_LIST\)\)\)(\S+)$", text, re.M)
    assert include and (build_dir / include[1]).resolve().is_file()


def test_other_architectures_are_left_out(members: dict[str, tarfile.TarInfo]) -> None:
    arches = {n.split("/")[4] for n in members if re.match(r"usr/src/[^/]+-common/arch/[^/]+", n)}
    assert arches == {"x86"}


def test_same_packages_give_the_same_bytes(
    report: BundleReport, kernel: str, deb_cache: Path, ram: Callable[[str], Path]
) -> None:
    again = make_debian_bundle(kernel, ram("again"), deb_cache)
    assert again.read_bytes() == report.path.read_bytes()
    assert report.sha256 == bundles.sha256_file(again)
    assert report.size == again.stat().st_size


# --- building the example drivers against it --------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_example_module_builds_with_the_kernels_vermagic(
    build_dir: Path, kernel: str, version: str, tmp_path: Path
) -> None:
    ko = make_driver(build_dir, fresh_sources(version, tmp_path), "mod")
    info = {
        field: subprocess.run(
            ["modinfo", "-F", field, str(ko)], capture_output=True, text=True, check=True
        ).stdout.strip()
        for field in ("vermagic", "version", "license")
    }
    assert info["vermagic"].split()[0] == kernel
    assert info["version"] == version
    assert info["license"] == "GPL"


@pytest.mark.parametrize("version", VERSIONS)
def test_example_probe_compiles_for_bpf(build_dir: Path, version: str, tmp_path: Path) -> None:
    probe = make_driver(build_dir, fresh_sources(version, tmp_path), "bpf")
    assert int.from_bytes(probe.read_bytes()[18:20], "little") == EM_BPF
    sections = subprocess.run(
        ["readelf", "-S", "-W", str(probe)], capture_output=True, text=True, check=True
    ).stdout
    assert "tracepoint/sched/sched_switch" in sections
    assert ("tracepoint/sched/sched_process_exec" in sections) == (version == "2.4.0-rc1")
    assert ".BTF" in sections and ".maps" in sections


def test_drivers_have_the_same_bytes_whatever_the_build_folders(
    report: BundleReport, ram: Callable[[str], Path]
) -> None:
    """The README's command (with KCFLAGS prefix maps) in two unrelated folder pairs."""
    tmp_path, outputs = ram("two-builds"), []
    for copy in ("one", "two"):
        root = extract(report.path, tmp_path / copy / "bundle")
        build = root / (root / "BUNDLE_BUILD_DIR").read_text().strip()
        sources = fresh_sources("2.4.0-rc1", tmp_path / copy)
        maps = f"KCFLAGS=-ffile-prefix-map={root}=/bundle -ffile-prefix-map={sources}=/src"
        outputs.append([make_driver(build, sources, k, maps).read_bytes() for k in ("mod", "bpf")])
    assert outputs[0] == outputs[1]


# --- the command --------------------------------------------------------------------------------


def test_an_unknown_kernel_is_refused_naming_the_releases_searched_and_near_matches(
    tmp_path: Path,
    apt_state: Path,
    offered: list[OfferedKernel],
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["bundle", "debian", "6.1.0-999-amd64", "6.12.999+deb13-amd64", "--out", str(tmp_path)]
    assert main([*argv, "--deb-cache", str(tmp_path / "debs"), "--apt-state", str(apt_state)]) == 2
    err = capsys.readouterr().err
    assert "no Debian release offers linux-headers-<uname> for 6.1.0-999-amd64, " in err
    for suite in ("bullseye-security", "bookworm-security", "bookworm-backports", "trixie"):
        assert suite in err
    near = dict(re.findall(r"^  (\S+): nearest (.*)$", err, re.M))
    assert set(near) == {"6.1.0-999-amd64", "6.12.999+deb13-amd64"}
    assert re.search(r"6\.1\.0-\d+-amd64 \(bookworm", near["6.1.0-999-amd64"])
    assert re.search(r"6\.12\.\d+\+deb13-amd64 \(trixie", near["6.12.999+deb13-amd64"])
    assert sum(o.uname in err for o in offered) <= 8  # near ones, not the whole catalogue
    assert not (tmp_path / "debs").exists() and not list(tmp_path.glob("*.tgz"))

    assert main(["bundle", "debian", "5.4.0-62-generic", "--out", str(tmp_path)]) == 2
    assert "not a Debian kernel release" in capsys.readouterr().err


# --- the releases: private apt, --list, bullseye and trixie bundles ---------------------------

HOST_APT = (Path("/etc/apt"), Path("/var/lib/apt"), Path("/var/cache/apt"))


def host_apt_snapshot() -> dict[str, tuple]:
    """Every file and folder of the host's apt: kind, size, mtime, and small files' hash."""
    snapshot = {}
    for top in HOST_APT:
        for folder, dirs, files in os.walk(top):
            for name in [*dirs, *files, ""]:
                path = Path(folder, name)
                st = path.lstat()
                digest = ""
                if path.is_file() and not path.is_symlink() and st.st_size < 1 << 20:
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                snapshot[str(path)] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return snapshot


def test_a_suites_private_apt_never_touches_the_hosts(tmp_path: Path) -> None:
    before = host_apt_snapshot()
    archive = DebianArchive(
        tmp_path / "apt", suites=[debian.Suite("trixie-security", "trixie", "debian-security")]
    )
    (apt,) = archive.ready()  # a real apt-get update, its lists missing
    assert archive.unreachable == {} and apt.packages_files()
    kbuild = next(
        p for n, ps in apt.packages().items() if n.startswith("linux-kbuild-") for p in ps
    )
    deb = apt.download(kbuild, tmp_path)
    assert deb.name.startswith(f"{kbuild.name}_") and deb.stat().st_size == kbuild.size
    dump = subprocess.run(
        ["apt-config", "dump"], env=apt.env(), capture_output=True, text=True, check=True
    ).stdout
    settings = dict(re.findall(r'^(Dir::[A-Za-z:]+) "(.*)";$', dump, re.M))
    for key in ("Dir::State::lists", "Dir::State::status", "Dir::Cache", "Dir::Etc::sourcelist"):
        assert settings[key].startswith(str(apt.dir)), (key, settings[key])
    assert settings["Dir::Etc::sourceparts"] == "-"
    assert "Post-Invoke" not in dump  # the host's apt.conf.d hooks are not read
    # Fresh lists are not fetched again, but --refresh fetches them once.
    assert not apt.update(max_age=3600)
    stamp = apt.stamp.stat().st_mtime_ns
    again = DebianArchive(tmp_path / "apt", refresh=True, suites=archive.suites)
    assert again.ready() and apt.stamp.stat().st_mtime_ns > stamp
    again.ready()
    assert apt.stamp.stat().st_mtime_ns == (stamp := apt.stamp.stat().st_mtime_ns)
    # A suite the mirror does not serve is reported, not fatal.
    missing = DebianArchive(tmp_path / "apt", suites=[debian.Suite("no-such-suite", "trixie")])
    assert missing.ready() == [] and "no-such-suite" in missing.unreachable
    assert "no-such-suite (unreachable)" in missing.searched()
    assert host_apt_snapshot() == before


def test_list_prints_every_release_s_kernels_each_of_its_series(
    apt_state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bundle", "debian", "--list", "--apt-state", str(apt_state)]) == 0
    out = capsys.readouterr().out
    headers = dict(re.findall(r"^(\w+): (\d+) kernel\(s\)$", out, re.M))
    rows = re.findall(r"^  (\w+)\t([\w,-]+)\t(\S+)$", out, re.M)
    assert list(headers) == list(debian.RELEASES) == ["bullseye", "bookworm", "trixie"]
    total = int(re.search(r"^total: (\d+) kernel\(s\) in 3 release\(s\)$", out, re.M)[1])
    assert total == len(rows) == len({u for _, _, u in rows}) == sum(map(int, headers.values()))
    for release, count in headers.items():
        mine = [(suites, u) for r, suites, u in rows if r == release]
        assert len(mine) == int(count) >= 9, release  # three flavours of at least 3 ABIs
        assert {parse_kernel(u).flavour for _, u in mine} == set(debian.X86_64_FLAVOURS)
        for suites, uname in mine:
            assert parse_kernel(uname).series == release  # the domain's rule agrees
            assert all(s.split("-")[0] == release for s in suites.split(","))
    assert any(u.startswith("5.10.0-") for r, _, u in rows if r == "bullseye")
    assert any("+deb12-" in u for r, _, u in rows if r == "bookworm")


@pytest.fixture(scope="module")
def release_bundles(
    offered: list[OfferedKernel], deb_cache: Path, apt_state: Path, ram: Callable[[str], Path]
) -> dict[str, dict]:
    """One bullseye and one trixie bundle, made by the command in one run."""
    unames = [newest(offered, r"5\.10\.0-\d+-amd64"), newest(offered, r"6\.12\.\d+\+deb13-amd64")]
    out = ram("release-bundles")
    argv = ["bundle", "debian", *unames, "--out", str(out), "--deb-cache", str(deb_cache)]
    done = subprocess.run(
        [str(REPO / ".venv/bin/drivers"), *argv, "--apt-state", str(apt_state)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    reports = [json.loads(line) for line in done.stdout.splitlines()]
    return {r["release"]: r for r in reports}


@pytest.mark.parametrize(("release", "gcc"), [("bullseye", "gcc-10"), ("trixie", "gcc-14")])
def test_bullseye_and_trixie_bundles_are_made_from_their_own_release(
    release_bundles: dict[str, dict], deb_cache: Path, release: str, gcc: str
) -> None:
    report = release_bundles[release]
    uname = report["uname"]
    assert parse_kernel(uname).series == release
    assert [p.split("_")[0] for p in report["packages"]][:2] == [
        f"linux-headers-{uname}",
        re.sub(r"-amd64$", "-common", f"linux-headers-{uname}"),
    ]
    assert report["packages"][2].startswith("linux-kbuild-")
    for package in report["packages"]:  # cached under their release, nowhere else
        assert (deb_cache / release / package).is_file()
    with tarfile.open(report["path"]) as tar:
        members = {m.name: m for m in tar.getmembers()}
        read = lambda name: tar.extractfile(members[name]).read().decode()  # noqa: E731
        assert read("BUNDLE_UNAME") == f"{uname}\n"
        build = read("BUNDLE_BUILD_DIR").strip()
        config, makefile = read(f"{build}/.config"), read(f"{build}/Makefile")
    assert re.search(rf'^CONFIG_CC_VERSION_TEXT="(x86_64-linux-gnu-)?{gcc} \(Debian ', config, re.M)
    assert members[f"{build}/scripts/mod/modpost"].isfile()
    include = re.search(
        r"^include \$\(dir \$\(lastword \$\(MAKEFILE_LIST\)\)\)(\S+)$", makefile, re.M
    )
    assert include and posixpath.normpath(f"{build}/{include[1]}") in members


def test_a_boot_image_comes_from_the_kernels_release(
    release_bundles: dict[str, dict], deb_cache: Path, tmp_path: Path
) -> None:
    """trixie's: its package keeps modules in /usr/lib/modules (merged /usr)."""
    uname = release_bundles["trixie"]["uname"]
    image = debian_boot_image(uname, deb_cache, tmp_path, modules=["crc8"])
    assert image is not None and image.read_bytes()[0x202:0x206] == b"HdrS"  # a bzImage
    assert debian.cached_debs(f"linux-image-{uname}", deb_cache, "trixie")
    crc8 = image.parent / "modules" / "lib" / "crc8.ko"
    assert crc8.read_bytes()[:4] == b"\x7fELF"


def test_upload_never_overwrites(
    report: BundleReport,
    kernel: str,
    deb_cache: Path,
    store: Callable[..., ObjectStore],
    ram: Callable[[str], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = bundle_object(kernel)
    out = ram("upload")
    argv = ["bundle", "debian", kernel, "--out", str(out), "--deb-cache", str(deb_cache)]
    fresh, taken = store(), store()
    assert main([*argv, "--upload", f"gs://{fresh.bucket_name}"]) == 0
    assert json.loads(capsys.readouterr().out)["upload"] == "created"
    assert fresh.download(name) == report.path.read_bytes()
    # Bundles are over 8 MiB: the client uploads them resumably, where the emulator does
    # not enforce ifGenerationMatch=0 by itself.
    assert fresh.upload_new_file(name, report.path) is UploadResult.IDENTICAL

    taken.upload_new(name, b"someone else's bundle")
    assert taken.upload_new_file(name, report.path) is UploadResult.DIFFERENT
    # A bundle already published is final: the command neither rebuilds nor replaces it.
    assert main([*argv, "--upload", f"gs://{taken.bucket_name}"]) == 0
    assert "already there" in capsys.readouterr().err
    assert taken.download(name) == b"someone else's bundle"

    assert main([*argv, "--upload", f"gs://{fresh.bucket_name}/some/prefix"]) == 2
