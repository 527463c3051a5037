"""Kernel bundles from Debian header packages: real apt downloads (cached in the repo's
.cache/debs), real make, gcc and clang against the extracted bundle."""

from __future__ import annotations

import json
import posixpath
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from drivers.build import bundles, debian
from drivers.build.bundles import (
    BundleReport,
    build_debian_bundle,
    make_debian_bundle,
)
from drivers.build.sources import read_build_spec
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
def kernel(deb_cache: Path) -> str:
    """A plain 6.1 amd64 kernel: one whose headers are cached, else apt's newest."""
    pattern = re.compile(r"6\.1\.0-\d+-amd64")
    cached = sorted(
        name
        for p in deb_cache.glob("linux-headers-6.1.0-*-amd64_*.deb")
        if pattern.fullmatch(name := p.name.split("_")[0].removeprefix("linux-headers-"))
    )
    if cached:
        return cached[0]
    available = [u for u in debian.available_unames() if pattern.fullmatch(u)]
    assert available, "apt offers no linux-headers-6.1.0-*-amd64 (is apt-get update done?)"
    return available[-1]


@pytest.fixture(scope="module")
def report(kernel: str, deb_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> BundleReport:
    return build_debian_bundle(kernel, tmp_path_factory.mktemp("bundles"), deb_cache)


@pytest.fixture(scope="module")
def members(report: BundleReport) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(report.path) as tar:
        return {m.name: m for m in tar.getmembers()}


def extract(bundle: Path, dest: Path) -> Path:
    with tarfile.open(bundle) as tar:
        tar.extractall(dest, filter="data")  # refuses absolute and escaping links
    return dest


@pytest.fixture(scope="module")
def build_dir(report: BundleReport, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = extract(report.path, tmp_path_factory.mktemp("bundle"))
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
    report: BundleReport, kernel: str, deb_cache: Path, tmp_path: Path
) -> None:
    again = make_debian_bundle(kernel, tmp_path, deb_cache)
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
    report: BundleReport, tmp_path: Path
) -> None:
    """The README's command (with KCFLAGS prefix maps) in two unrelated folder pairs."""
    outputs = []
    for copy in ("one", "two"):
        root = extract(report.path, tmp_path / copy / "bundle")
        build = root / (root / "BUNDLE_BUILD_DIR").read_text().strip()
        sources = fresh_sources("2.4.0-rc1", tmp_path / copy)
        maps = f"KCFLAGS=-ffile-prefix-map={root}=/bundle -ffile-prefix-map={sources}=/src"
        outputs.append([make_driver(build, sources, k, maps).read_bytes() for k in ("mod", "bpf")])
    assert outputs[0] == outputs[1]


# --- the command --------------------------------------------------------------------------------


def test_unknown_kernel_is_refused_naming_the_available_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bundle", "debian", "6.1.0-999-amd64", "--out", str(tmp_path / "out")]
    assert main([*argv, "--deb-cache", str(tmp_path / "debs")]) == 2
    err = capsys.readouterr().err
    available = debian.available_unames()
    assert "6.1.0-999-amd64" in err and available and all(u in err for u in available)
    assert not (tmp_path / "out").exists()

    assert main(["bundle", "debian", "5.4.0-62-generic", "--out", str(tmp_path)]) == 2
    assert "not a Debian kernel release" in capsys.readouterr().err


def test_upload_never_overwrites(
    report: BundleReport,
    kernel: str,
    deb_cache: Path,
    store: Callable[..., ObjectStore],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = bundle_object(kernel)
    argv = ["bundle", "debian", kernel, "--out", str(tmp_path), "--deb-cache", str(deb_cache)]
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
