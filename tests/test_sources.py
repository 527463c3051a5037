"""Publishing prepared driver sources: deterministic archives, never changing a published
version, only driver-version folder names. (Compiling them: tests/test_bundles.py.)"""

from __future__ import annotations

import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from drivers.build.sources import (
    package_sources,
    read_build_spec,
    shipped_sources_dir,
    version_dirs,
)
from drivers.domain.layout import source_object
from drivers.ops.cli import main
from drivers.store.storage import ObjectStore

SHIPPED = ("2.3.0", "2.4.0-rc1")


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    """A copy of the shipped sources folder, free to change."""
    return Path(shutil.copytree(shipped_sources_dir(), tmp_path / "sources"))


def names(archive: Path) -> list[str]:
    with tarfile.open(archive) as tar:
        return tar.getnames()


def test_shipped_sources_hold_both_versions_with_a_build_spec() -> None:
    assert [d.name for d in version_dirs(shipped_sources_dir())] == list(SHIPPED)
    for version in SHIPPED:
        spec = read_build_spec(shipped_sources_dir() / version)
        assert spec == {
            "mod": {"dir": "module", "output": "collector.ko"},
            "bpf": {"dir": "bpf", "output": "probe.o"},
        }


def test_package_holds_the_version_folder_contents_at_its_root(tmp_path: Path) -> None:
    archive = package_sources(shipped_sources_dir() / "2.3.0", tmp_path)
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
    first = package_sources(shipped_sources_dir() / "2.4.0-rc1", tmp_path / "a").read_bytes()
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


def test_publish_writes_one_archive_per_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sources", "publish", "--out", str(tmp_path)]) == 0
    written = capsys.readouterr().out.split()
    assert written == [str(tmp_path / source_object(v)) for v in SHIPPED]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2.3.0.tgz", "2.4.0-rc1.tgz"]


def test_changed_sources_of_a_published_version_are_refused(
    sources: Path,
    store: Callable[..., ObjectStore],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bucket = store()
    argv = ["sources", "publish", "--dir", str(sources), "--upload", f"gs://{bucket.bucket_name}"]
    assert main([*argv, "--out", str(tmp_path / "first")]) == 0
    published = bucket.download(source_object("2.3.0"))
    assert published == (tmp_path / "first" / "2.3.0.tgz").read_bytes()

    assert main([*argv, "--out", str(tmp_path / "again")]) == 0  # identical: fine
    assert "IDENTICAL" in capsys.readouterr().err

    with open(sources / "2.3.0" / "module" / "collector.c", "a") as f:
        f.write("/* a late fix */\n")
    assert main([*argv, "--out", str(tmp_path / "changed")]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("drivers sources: error: driver version(s) 2.3.0 are already published")
    assert bucket.download(source_object("2.3.0")) == published


@pytest.mark.parametrize("folder", ["latest", "2.3", "v2.3.0", "2.3.0-beta"])
def test_folders_not_named_after_a_driver_version_are_refused(
    sources: Path, folder: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (sources / folder).mkdir()
    out = tmp_path / "out"
    assert main(["sources", "publish", "--dir", str(sources), "--out", str(out)]) == 2
    assert f"{sources / folder}" in capsys.readouterr().err
    assert not out.exists()  # nothing is written when one folder is wrong


def test_a_version_without_build_spec_is_refused(
    sources: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (sources / "2.4.0-rc1" / "build.json").unlink()
    out = tmp_path / "out"
    assert main(["sources", "publish", "--dir", str(sources), "--out", str(out)]) == 2
    assert "2.4.0-rc1/build.json is missing" in capsys.readouterr().err
    assert not out.exists()


def test_links_are_not_published(sources: Path, tmp_path: Path) -> None:
    (sources / "2.3.0" / "module" / "extra.h").symlink_to("/etc/hostname")
    with pytest.raises(ValueError, match="extra.h is not a regular file"):
        package_sources(sources / "2.3.0", tmp_path)
