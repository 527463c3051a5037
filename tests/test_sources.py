"""Packing prepared driver sources: deterministic archives of a prepared folder and the
build spec they carry. (Preparing the real sources and publishing them:
tests/test_prepare.py; compiling the example ones: tests/test_bundles.py.)"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from drivers.build.sources import package_sources, read_build_spec
from drivers.domain.layout import source_object
from example_sources import EXAMPLE_SOURCES, EXAMPLE_VERSIONS


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    """A copy of the example sources folder, free to change."""
    return Path(shutil.copytree(EXAMPLE_SOURCES, tmp_path / "sources"))


def names(archive: Path) -> list[str]:
    with tarfile.open(archive) as tar:
        return tar.getnames()


def test_example_sources_hold_both_versions_with_a_build_spec() -> None:
    assert sorted(p.name for p in EXAMPLE_SOURCES.iterdir() if p.is_dir()) == list(EXAMPLE_VERSIONS)
    for version in EXAMPLE_VERSIONS:
        spec = read_build_spec(EXAMPLE_SOURCES / version)
        assert spec == {
            "mod": {"dir": "module", "output": "collector.ko"},
            "bpf": {"dir": "bpf", "output": "probe.o"},
        }


def test_package_holds_the_version_folder_contents_at_its_root(tmp_path: Path) -> None:
    archive = package_sources(EXAMPLE_SOURCES / "2.3.0", tmp_path)
    assert archive == tmp_path / source_object("2.3.0")
    assert names(archive) == [
        "bpf",
        "bpf/Makefile",
        "bpf/probe.c",
        "build.json",
        "module",
        "module/Makefile",
        "module/collector.c",
    ]


def test_same_sources_give_the_same_bytes_whatever_times_and_modes(
    sources: Path, tmp_path: Path
) -> None:
    first = package_sources(EXAMPLE_SOURCES / "2.4.0-rc1", tmp_path / "a").read_bytes()
    changed = sources / "2.4.0-rc1"
    for path in changed.rglob("*"):
        os.utime(path, (1_000_000_000, 1_000_000_000))
    (changed / "module" / "collector.c").chmod(0o600)
    # Build leftovers are not sources.
    (changed / "module" / "collector.ko").write_bytes(b"\x7fELF")
    (changed / "module" / ".collector.o.cmd").write_text("cmd")
    assert package_sources(changed, tmp_path / "b").read_bytes() == first

    (changed / "module" / "collector.c").write_text("// changed\n")
    assert package_sources(changed, tmp_path / "c").read_bytes() != first


def test_a_build_spec_may_say_what_the_sources_are(sources: Path) -> None:
    spec = {
        "driver_version": "2.3.0",
        "driver_name": "collector",
        "generation": "2.x",
        "tree": "falcosecurity-libs-2.3.0",
        "mod": {"dir": "module/sub", "output": "collector.ko"},
        "bpf": {"dir": "bpf", "output": "probe.o"},
    }
    (sources / "2.3.0" / "module" / "sub").mkdir()
    (sources / "2.3.0" / "build.json").write_text(json.dumps(spec))
    assert read_build_spec(sources / "2.3.0") == {k: spec[k] for k in ("mod", "bpf")}
    with pytest.raises(ValueError, match="sources of driver version '2.3.0', not '2.2.0'"):
        read_build_spec(sources / "2.3.0", "2.2.0")


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"driver_version": "2.3.0"}, 'expected an object such as {"mod"'),
        ({"mod": {"dir": "module", "output": "collector.ko"}, "tree": ""}, "tree: expected a"),
        ({"mod": {"dir": "module", "output": "collector.ko"}, "compiler": "gcc"}, "unknown key"),
        ({"mod": {"dir": "/etc", "output": "collector.ko"}}, "'/etc' is not a folder inside"),
        ({"mod": {"dir": "../2.4.0-rc1/module", "output": "x.ko"}}, "is not a folder inside"),
        ({"mod": {"dir": "module"}}, 'mod: expected {"dir": "<folder>", "output"'),
    ],
)  # fmt: skip
def test_a_bad_build_spec_is_refused_naming_the_problem(
    sources: Path, spec: dict, problem: str
) -> None:
    (sources / "2.3.0" / "build.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError) as refused:
        read_build_spec(sources / "2.3.0")
    assert str(refused.value).startswith(f"{sources / '2.3.0' / 'build.json'}: ")
    assert problem in str(refused.value)


def test_a_version_without_build_spec_is_refused(sources: Path, tmp_path: Path) -> None:
    (sources / "2.4.0-rc1" / "build.json").unlink()
    with pytest.raises(ValueError, match="2.4.0-rc1/build.json is missing"):
        package_sources(sources / "2.4.0-rc1", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_links_are_not_published(sources: Path, tmp_path: Path) -> None:
    (sources / "2.3.0" / "module" / "extra.h").symlink_to("/etc/hostname")
    with pytest.raises(ValueError, match="extra.h is not a regular file"):
        package_sources(sources / "2.3.0", tmp_path)
