"""Preparing the collector's real driver sources (``drivers sources prepare``): the three
generations prepared as the original's CMake did (checked against real cmake), the same
bytes from the same tree, refusals that name the file, and publishing that never changes
a published version. Nothing is compiled here (tests/test_builder.py builds)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from drivers.build.prepare import TreeRefused, configure_file, opened_tree, prepare_tree
from drivers.build.safetar import safe_extract
from drivers.build.sources import prepare_sources, read_build_spec
from drivers.domain.layout import source_object
from drivers.ops.cli import main
from drivers.store.storage import ObjectStore
from real_sources import prepared, tarball
from tarballs import tgz

# One driver version per generation of the sources.
GENERATIONS = {"1.0.0": "1.x", "2.3.0": "2.x", "8.1.0": "8.x"}
ByVersion = dict[str, Path]  # driver version -> its folder or archive


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> ByVersion:
    """Each version's tarball extracted as it is (a folder to prepare, or to break)."""
    root = tmp_path_factory.mktemp("trees")
    out: ByVersion = {}
    for version in GENERATIONS:
        safe_extract(tarball(version), root / version)
        (top,) = (root / version).iterdir()
        out[version] = top
    return out


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> ByVersion:
    """Each version prepared from its tarball: ``<version>.tgz``."""
    out = tmp_path_factory.mktemp("prepared")
    return {version: prepared(version, out) for version in GENERATIONS}


@pytest.fixture(scope="module")
def unpacked(archives: ByVersion, tmp_path_factory: pytest.TempPathFactory) -> ByVersion:
    """Each prepared archive extracted, as a builder sees it."""
    root = tmp_path_factory.mktemp("unpacked")
    for version, archive in archives.items():
        safe_extract(archive, root / version)
    return {version: root / version for version in archives}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def define(header: str, name: str) -> str:
    """The value of ``#define NAME value`` in a header."""
    (value,) = re.findall(rf"^#define {name} (.*)$", header, re.MULTILINE)
    return value


# --- what preparing gives ----------------------------------------------------------------


@pytest.mark.parametrize("version", GENERATIONS)
def test_build_spec_says_what_each_kind_builds(version: str, unpacked: ByVersion) -> None:
    kinds = {
        "mod": {"dir": "driver", "output": "collector.ko"},
        "bpf": {"dir": "driver/bpf", "output": "probe.o"},
    }
    assert read_build_spec(unpacked[version], version) == kinds
    assert json.loads((unpacked[version] / "build.json").read_text()) == kinds | {
        "driver_version": version,
        "driver_name": "collector",
        "generation": GENERATIONS[version],
        "tree": tarball(version).name.removeprefix("stackrox-").removesuffix(".tar.gz"),
    }


@pytest.mark.parametrize("version", GENERATIONS)
def test_module_makefile_builds_collector_ko_with_release_flags(
    version: str, unpacked: ByVersion
) -> None:
    makefile = (unpacked[version] / "driver" / "Makefile").read_text()
    assert re.search(r"^collector-y \+= main\.o ", makefile, re.MULTILINE)
    assert "\nobj-m += collector.o\n" in makefile
    assert "\nccflags-y := \n" in makefile  # KBUILD_FLAGS: debug flags only in Debug builds
    assert "@" not in makefile.replace("$@", "")


def test_1x_driver_config_names_probe_and_device_collector(unpacked: ByVersion) -> None:
    config = (unpacked["1.0.0"] / "driver" / "driver_config.h").read_text()
    assert define(config, "PROBE_VERSION") == '"1.0.0"'
    assert define(config, "PROBE_NAME") == '"collector"'
    assert define(config, "PROBE_DEVICE_NAME") == '"collector"'
    assert "${" not in config


@pytest.mark.parametrize(("version", "api", "schema"), [("2.3.0", "2.0.0", "2.2.0"),
                                                        ("8.1.0", "8.0.3", "3.6.1")])  # fmt: skip
def test_driver_config_has_name_version_and_the_api_and_schema_versions(
    version: str, api: str, schema: str, unpacked: ByVersion, trees: ByVersion
) -> None:
    config = (unpacked[version] / "driver" / "driver_config.h").read_text()
    assert define(config, "DRIVER_NAME") == '"collector"'
    assert define(config, "DRIVER_DEVICE_NAME") == '"collector"'
    assert define(config, "DRIVER_VERSION") == f'"{version}"'
    assert define(config, "DRIVER_COMMIT") == '""'  # no git work tree: what CMake gives
    for part, value in zip(("MAJOR", "MINOR", "PATCH"), api.split("."), strict=True):
        assert define(config, f"PPM_API_CURRENT_VERSION_{part}") == value
    for part, value in zip(("MAJOR", "MINOR", "PATCH"), schema.split("."), strict=True):
        assert define(config, f"PPM_SCHEMA_CURRENT_VERSION_{part}") == value
    # The versions are the tree's own files, not numbers written here.
    assert (trees[version] / "driver" / "API_VERSION").read_text().strip() == api
    assert (trees[version] / "driver" / "SCHEMA_VERSION").read_text().strip() == schema


@pytest.mark.parametrize("folder", ["driver/configure", "driver/bpf/configure"])
def test_8x_each_feature_check_gets_its_makefile_inc(folder: str, unpacked: ByVersion) -> None:
    base = unpacked["8.1.0"] / folder
    features = sorted(p.name for p in base.iterdir() if p.is_dir())
    assert "0__SANITY" in features and len(features) >= 4
    for feature in features:
        inc = (base / feature / "Makefile.inc").read_text()
        assert f"HAS_{feature} := $(shell env -i" in inc
        assert f"-DHAS_{feature}\n" in inc
        assert "@CONFIGURE_MODULE@" not in inc
        for name in ("Makefile", "build.sh"):
            assert (base / feature / name).read_bytes() == (base / name).read_bytes()
        assert os.access(base / feature / "build.sh", os.X_OK)


def test_8x_probe_is_staged_with_the_driver_headers(unpacked: ByVersion, trees: ByVersion) -> None:
    driver, probe = unpacked["8.1.0"] / "driver", unpacked["8.1.0"] / "driver" / "bpf"
    headers = sorted(p.name for p in driver.glob("*.h"))
    assert "driver_config.h" in headers and "ppm_events_public.h" in headers
    for name in headers:
        assert (probe / name).read_bytes() == (driver / name).read_bytes(), name
    # The probe's own files are the tree's, untouched.
    for path in (trees["8.1.0"] / "driver" / "bpf").glob("*.[ch]"):
        assert (probe / path.name).read_bytes() == path.read_bytes()


@pytest.mark.parametrize("version", ["1.0.0", "2.3.0"])
def test_older_probes_include_the_prepared_driver_config_one_level_up(
    version: str, unpacked: ByVersion
) -> None:
    probe = unpacked[version] / "driver" / "bpf"
    assert '#include "../driver_config.h"' in (probe / "probe.c").read_text()
    assert not (probe / "driver_config.h").exists()
    assert (probe.parent / "driver_config.h").is_file()


@pytest.mark.parametrize("version", GENERATIONS)
def test_top_level_cmakelists_leaves_libsinsp_out_and_the_rest_as_it_was(
    version: str, unpacked: ByVersion, trees: ByVersion
) -> None:
    original = (trees[version] / "CMakeLists.txt").read_text().splitlines()
    ours = (unpacked[version] / "CMakeLists.txt").read_text().splitlines()
    changed = [(a, b) for a, b in zip(original, ours, strict=True) if a != b]
    assert [a.strip() for a, _ in changed] == ["include(libsinsp)"]
    assert changed[0][1].lstrip().startswith("# include(libsinsp): left out")
    assert "include(libscap)" in ours


@pytest.mark.parametrize("version", GENERATIONS)
def test_the_rest_of_the_tree_is_kept_as_it_is(
    version: str, unpacked: ByVersion, trees: ByVersion
) -> None:
    kept = 0
    for path in trees[version].rglob("*"):
        rel = path.relative_to(trees[version])
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            if rel.as_posix() != "CMakeLists.txt":
                assert (unpacked[version] / rel).read_bytes() == path.read_bytes(), rel
                kept += 1
    assert kept > 50  # the loop saw the tree
    assert (unpacked[version] / "userspace/libscap/examples/01-open/CMakeLists.txt").is_file()


# --- what CMake does, for comparison ------------------------------------------------------


def cmake() -> str:
    path = shutil.which("cmake")
    if path is None:
        pytest.skip("cmake is not installed (Debian: cmake)")
    return path


@pytest.fixture(scope="module")
def cmake_outputs(trees: ByVersion, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Real CMake configuring each tree's driver/ as the collector's prepare-src did:
    (build folder, the configured copy of the tree). Run side by side."""
    tool = cmake()
    root = tmp_path_factory.mktemp("cmake")
    runs = {}
    for version, tree in trees.items():
        copy = root / version / "tree"  # the bpf CMakeLists writes ../driver_config.h into it
        shutil.copytree(tree / "driver", copy / "driver")
        shutil.copytree(tree / "cmake", copy / "cmake")
        build = root / version / "build"
        variables = {
            "CMAKE_MODULE_PATH": copy / "cmake" / "modules",
            "CMAKE_BUILD_TYPE": "Release",
            # 1.x: what driver_config.h.in names (libscap.cmake, not run here, would
            # default PROBE_DEVICE_NAME to "sysdig": the collector's is "collector").
            "PROBE_NAME": "collector",
            "PROBE_VERSION": version,
            "PROBE_DEVICE_NAME": "collector",
            "DRIVER_NAME": "collector",  # 2.x, 8.x: as prepare-src passed them
            "DRIVER_VERSION": version,
            "DRIVER_DEVICE_NAME": "collector",
            "BUILD_BPF": "ON",
            "ENABLE_DKMS": "OFF",
        }
        argv = [tool, "-S", copy / "driver", "-B", build]
        argv += [f"-D{name}={value}" for name, value in variables.items()]
        runs[version] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for proc in runs.values():
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output.decode(errors="replace")[-3000:]
    return {version: (root / version / "build", root / version / "tree") for version in trees}


def cmake_generated(build: Path, copy: Path) -> dict[str, Path]:
    """What CMake wrote, by the name it has in a prepared tree: driver/src/ is the module's
    folder, bpf/src/ the probe's (8.x), and the bpf CMakeLists configures driver_config.h
    in the source tree. src/dkms.conf is left out: DKMS packaging, which prepare-src did
    not take either (it copied Makefile and driver_config.h)."""
    out = {"driver/driver_config.h": copy / "driver" / "driver_config.h"}
    for folder, prepared_as in ((build / "src", "driver"), (build / "bpf" / "src", "driver/bpf")):
        for path in folder.rglob("*") if folder.is_dir() else ():
            rel = path.relative_to(folder).as_posix()
            if path.is_file() and rel != "dkms.conf":
                out[f"{prepared_as}/{rel}"] = path
    return out


@pytest.mark.parametrize("version", GENERATIONS)
def test_every_file_cmake_generates_or_stages_is_prepared_with_the_same_bytes(
    version: str, cmake_outputs: dict, unpacked: ByVersion, trees: ByVersion
) -> None:
    generated = cmake_generated(*cmake_outputs[version])
    assert {"driver/Makefile", "driver/driver_config.h"} <= generated.keys()
    for name, path in generated.items():
        assert (unpacked[version] / name).read_bytes() == path.read_bytes(), name
    # And the other way round: everything prepare adds is something CMake makes.
    with opened_tree(trees[version]) as tree:
        ours = {m.name for m in prepare_tree(tree, version).files}
    assert ours - generated.keys() == {"CMakeLists.txt"}


# One line per case configure_file handles: variables both ways, #cmakedefine on and off,
# CMake's @ scanning, $ that is not a reference, CRLF, and no newline at the end.
TEMPLATE = (
    "a ${X} @X@ b\n"
    "@@X@@ and @X@X@ and @ alone and a@b.c\n"
    "$$X $(X) $ {X} ${X}${EMPTY}\n"
    "#cmakedefine X\n"
    "  #  cmakedefine X with ${X}\n"
    "#cmakedefine OFFV never ${X}\n"
    "#cmakedefine EMPTY\n"
    "#cmakedefine01 X\n"
    "#cmakedefine01 OFFV\n"
    "crlf ${X}\r\n"
    "\n"
    "last line without newline ${X}"
)
VARIABLES = {"X": "xv", "EMPTY": "", "OFFV": "OFF"}


def test_configure_file_writes_what_cmake_writes(tmp_path: Path) -> None:
    (tmp_path / "t.in").write_bytes(TEMPLATE.encode())
    sets = "".join(f'set({k} "{v}")\n' for k, v in VARIABLES.items())
    (tmp_path / "CMakeLists.txt").write_text(
        f"cmake_minimum_required(VERSION 3.12)\nproject(t NONE)\n{sets}configure_file(t.in t.out)\n"
    )
    subprocess.run([cmake(), "-S", tmp_path, "-B", tmp_path / "b"], check=True, capture_output=True)
    expected = (tmp_path / "b" / "t.out").read_text()
    assert configure_file(TEMPLATE, VARIABLES, "t.in") == expected
    assert "xv" in expected and "#define X 1" in expected  # the cases are not all no-ops


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("${X} ${NEW}\n", "t.in uses NEW, which drivers sources prepare does not know"),
        ("@NEW@\n", "t.in uses NEW,"),
        ("#cmakedefine NEW\n", "t.in uses NEW,"),
        ("a\n$ENV{HOME}\n", "t.in:2: $ENV{...} reads a value from where"),
        ("${X\n", "t.in:1: '${X' is not a variable reference CMake accepts"),
        ("${a:b}\n", "t.in:1: '${a:b}' is not a variable reference"),
    ],
)
def test_configure_file_refuses_what_it_cannot_substitute(template: str, message: str) -> None:
    with pytest.raises(TreeRefused) as refused:
        configure_file(template, {"X": "xv"}, "t.in")
    assert message in str(refused.value)


# --- the same tree, the same bytes ------------------------------------------------------


def test_the_same_tree_gives_the_same_bytes_from_a_folder_or_its_tarball(
    archives: ByVersion, trees: ByVersion, tmp_path: Path
) -> None:
    again = prepare_sources(tarball("8.1.0"), "8.1.0", tmp_path / "again")
    assert sha256(again) == sha256(archives["8.1.0"])
    folder = Path(shutil.copytree(trees["8.1.0"], tmp_path / "tree" / trees["8.1.0"].name))
    for path in folder.rglob("*"):  # other times and modes, same contents
        os.utime(path, (1_000_000_000, 1_000_000_000))
    (folder / "driver" / "main.c").chmod(0o600)
    from_folder = prepare_sources(folder, "8.1.0", tmp_path / "folder")
    assert sha256(from_folder) == sha256(archives["8.1.0"])

    (folder / "driver" / "main.c").write_text("/* changed */\n")
    assert sha256(prepare_sources(folder, "8.1.0", tmp_path / "changed")) != sha256(again)


def test_another_driver_version_of_the_same_tree_is_other_bytes(
    archives: ByVersion, tmp_path: Path
) -> None:
    other = prepare_sources(tarball("2.3.0"), "2.3.1", tmp_path)
    assert other.name == "2.3.1.tgz"
    assert sha256(other) != sha256(archives["2.3.0"])


# --- refusals ----------------------------------------------------------------------------


def edit(rel: str, old: str, new: str) -> Callable[[Path], None]:
    def change(tree: Path) -> None:
        text = (tree / rel).read_text()
        assert old in text
        (tree / rel).write_text(text.replace(old, new))

    return change


def remove(rel: str) -> Callable[[Path], None]:
    return lambda tree: (tree / rel).unlink()


def add(rel: str, text: str) -> Callable[[Path], None]:
    return lambda tree: (tree / rel).write_text(text)


REFUSALS = {
    "no API_VERSION": ("2.3.0", remove("driver/API_VERSION"), "driver/API_VERSION is missing"),
    "no SCHEMA numbers": (
        "2.3.0",
        add("driver/SCHEMA_VERSION", "two\n"),
        "driver/SCHEMA_VERSION: expected MAJOR.MINOR.PATCH, found 'two'",
    ),
    "unknown variable": (
        "2.3.0",
        edit("driver/Makefile.in", "@KBUILD_FLAGS@", "@KBUILD_FLAGS@ @EXTRA_FLAGS@"),
        "driver/Makefile.in uses EXTRA_FLAGS, which drivers sources prepare does not know",
    ),
    "unknown generation": (
        "2.3.0",
        edit("driver/driver_config.h.in", "${DRIVER_NAME}", "${MODULE_NAME}"),
        "driver/driver_config.h.in names neither PROBE_NAME (1.x sources) nor DRIVER_NAME",
    ),
    "no Makefile.in": ("1.0.0", remove("driver/Makefile.in"), "driver/Makefile.in is missing"),
    "no top-level CMakeLists": ("1.0.0", remove("CMakeLists.txt"), "CMakeLists.txt is missing"),
    "no probe check template": (
        "8.1.0",
        remove("driver/bpf/configure/Makefile.inc.in"),
        "driver/bpf/configure/Makefile.inc.in is missing",
    ),
    "a check without test.c": (
        "8.1.0",
        remove("driver/configure/ACCESS_OK_2/test.c"),
        "driver/configure/ACCESS_OK_2/test.c is missing",
    ),
    "no check build.sh": (
        "8.1.0",
        remove("driver/configure/build.sh"),
        "driver/configure/build.sh is missing",
    ),
    "a probe file named as a driver header": (
        "8.1.0",
        add("driver/bpf/ppm_events.h", "/* mine */\n"),
        "driver/bpf/ppm_events.h and ",
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_tree_that_cannot_be_prepared_is_refused_naming_the_file(
    case: str, trees: ByVersion, tmp_path: Path
) -> None:
    version, change, message = REFUSALS[case]
    tree = tmp_path / trees[version].name  # what preparing reads, without userspace/
    shutil.copytree(trees[version] / "driver", tree / "driver")
    shutil.copy(trees[version] / "CMakeLists.txt", tree)
    change(tree)
    with pytest.raises(TreeRefused) as refused:
        prepare_sources(tree, version, tmp_path / "out")
    assert f"{tree}/{message}" in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_a_tarball_refusal_names_the_tarball_and_the_file_in_it(
    trees: ByVersion, tmp_path: Path
) -> None:
    tree = Path(shutil.copytree(trees["1.0.0"], tmp_path / "falcosecurity-libs-1.0.0"))
    (tree / "driver" / "driver_config.h.in").unlink()
    archive = tmp_path / "broken.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname=tree.name)
    with pytest.raises(TreeRefused) as refused:
        prepare_sources(archive, "1.0.0", tmp_path / "out")
    assert str(refused.value).startswith(
        f"{archive}: falcosecurity-libs-1.0.0/driver/driver_config.h.in is missing"
    )


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ((("a/x", "file", "1"), ("b/y", "file", "2")), "one top folder, the tree, found a, b"),
        ((("t/x", "file", "1"), ("README", "file", "2")), "found README, t"),
        ((("t/../../evil", "file", "x"),), "is not a tree to prepare: "),
        ((("t/link", "symlink", "/etc"),), "is not a tree to prepare: "),
    ],
)  # fmt: skip
def test_a_tarball_that_is_not_one_clean_tree_is_refused(
    members: tuple, message: str, tmp_path: Path
) -> None:
    archive = tmp_path / "sources.tar.gz"
    archive.write_bytes(tgz(*members))
    with pytest.raises(TreeRefused) as refused:
        prepare_sources(archive, "2.3.0", tmp_path / "out")
    assert str(refused.value).startswith(f"{archive}")
    assert message in str(refused.value)


# --- the command ---------------------------------------------------------------------------


def test_prepare_writes_the_version_tgz_and_prints_its_path(
    archives: ByVersion, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["sources", "prepare", str(tarball("2.3.0")), "--driver-version", "2.3.0"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{tmp_path / '2.3.0.tgz'}\n"
    assert sha256(tmp_path / "2.3.0.tgz") == sha256(archives["2.3.0"])
    assert "driver version 2.3.0 prepared, 2.3.0.tgz" in err
    assert sha256(archives["2.3.0"]) in err


BAD_INPUT = {
    "not a driver version": ("TREE --driver-version v2 --out OUT", "'v2' is neither semver"),
    "no such tree": ("MISSING --driver-version 2.3.0 --out OUT", "MISSING does not exist"),
    "a bucket prefix": ("TREE --driver-version 2.3.0 --upload gs://b/s", "at the bucket root"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_exits_2_with_the_reason_and_writes_nothing(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, message = BAD_INPUT[case]
    places = {
        "TREE": str(tarball("1.0.0")),
        "MISSING": str(tmp_path / "nt"),
        "OUT": str(tmp_path / "o"),
    }
    assert main(["sources", "prepare", *(places.get(a, a) for a in argv.split())]) == 2
    assert message.replace("MISSING", places["MISSING"]) in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_out_and_upload_are_one_or_the_other(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["sources", "prepare", "t", "--driver-version", "2.3.0", "--out", "d"]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--upload", "gs://b"])
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_upload_twice_is_unchanged_and_changed_sources_are_refused(
    store: Callable[..., ObjectStore],
    archives: ByVersion,
    trees: ByVersion,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bucket = store()
    uri = f"gs://{bucket.bucket_name}"
    argv = ["sources", "prepare", "--driver-version", "1.0.0", "--upload", uri]
    assert main([*argv, str(tarball("1.0.0"))]) == 0
    out, err = capsys.readouterr()
    assert out == f"{uri}/1.0.0.tgz\n" and err.endswith(": uploaded\n")
    published = bucket.download(source_object("1.0.0"))
    assert published == archives["1.0.0"].read_bytes()

    assert main([*argv, str(trees["1.0.0"])]) == 0  # the same tree, from its folder
    assert capsys.readouterr().err.endswith(": unchanged (already there)\n")

    changed = Path(shutil.copytree(trees["1.0.0"], tmp_path / trees["1.0.0"].name))
    with open(changed / "driver" / "main.c", "a") as f:
        f.write("/* a late fix */\n")
    assert main([*argv, str(changed)]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith(f"drivers sources: error: {uri}/1.0.0.tgz is already published")
    assert "give changed sources a new driver version" in error
    assert bucket.download(source_object("1.0.0")) == published
