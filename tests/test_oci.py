"""OCI drivers images: real layouts built on disk, opened and read back (no mocks)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from argparse import Namespace
from pathlib import Path

import pytest

from drivers.build.oci import (
    CorruptBlob,
    Failure,
    ImageError,
    build_image,
    cmd_image,
    extract_drivers,
    open_image,
    read_files,
)
from drivers.domain.layout import ARCH_TO_CACHE, UnknownArchitecture, cache_arch

KERNEL = "5.4.0-62-generic"


def extract(image, arch: str):
    """extract_drivers with the drivers' bytes read back (the second, streaming pass)."""
    result = extract_drivers(image, arch)
    result.drivers = dict(read_files(image, arch, result.drivers))
    return result


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def drivers_tree(root: Path, arch: str) -> Path:
    """A drivers image tree plus some base-image noise that must be skipped."""
    return make_tree(
        root,
        {
            f"kernel-modules/2.3.0/collector-{KERNEL}.ko.gz": f"mod {arch}".encode(),
            f"kernel-modules/2.3.0/collector-ebpf-{KERNEL}.o.gz": f"bpf {arch}".encode(),
            "kernel-modules/2.2.0/.collector-ebpf-3.10.0-957.el7.x86_64.unavail": b"",
            f"FAILURES/{KERNEL}/2.3.0/mod.log": b"error: implicit declaration\nline 2\n",
            f"FAILURES/{KERNEL}/2.2.0/bpf.log": b"",
            "kernel-modules/MODULE_VERSION": b"2.3.0\n",
            "etc/os-release": b"ID=rhel\n",
        },
    )


def raw_tar(members: list[tuple[str, bytes, str]]) -> bytes:
    """An uncompressed tar of hand-made members: (name, type, data or link target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload.encode()))
            else:
                info.linkname = payload
                tar.addfile(info)
    return buffer.getvalue()


def test_cache_arch_maps_amd64_and_refuses_unknown() -> None:
    assert cache_arch("amd64") == "x86_64"
    assert set(ARCH_TO_CACHE.values()) == {"x86_64", "s390x", "ppc64le"}
    with pytest.raises(UnknownArchitecture, match="'arm64' has no CPaaS cache"):
        cache_arch("arm64")


def test_single_arch_round_trip_gives_the_trees_drivers_and_failures(tmp_path: Path) -> None:
    tree = drivers_tree(tmp_path / "tree", "amd64")
    digest = build_image({"amd64": tree}, tmp_path / "image")
    index = json.loads((tmp_path / "image" / "index.json").read_text())
    assert index["manifests"][0]["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert (tmp_path / "image" / "oci-layout").is_file()

    with open_image(tmp_path / "image") as image:
        assert image.digest == digest
        assert image.architectures() == ["amd64"]
        result = extract(image, "amd64")
    assert result.drivers == {
        f"2.3.0/collector-{KERNEL}.ko.gz": b"mod amd64",
        f"2.3.0/collector-ebpf-{KERNEL}.o.gz": b"bpf amd64",
        "2.2.0/.collector-ebpf-3.10.0-957.el7.x86_64.unavail": b"",
    }
    # The empty log is returned too: deciding that it is no failure is the DAG's job.
    assert result.failures == [
        Failure(KERNEL, "2.2.0", "bpf", b""),
        Failure(KERNEL, "2.3.0", "mod", b"error: implicit declaration\nline 2\n"),
    ]
    assert result.ignored == ["/kernel-modules/MODULE_VERSION"]


def test_multi_arch_tar_round_trip_keeps_each_architecture_apart(tmp_path: Path) -> None:
    trees = {a: drivers_tree(tmp_path / a, a) for a in ("amd64", "s390x", "ppc64le")}
    make_tree(trees["s390x"], {"kernel-modules/2.3.0/collector-6.1.0-s390x.ko.gz": b"extra"})
    digest = build_image(trees, tmp_path / "image.tar", tar=True)

    with open_image(tmp_path / "image.tar") as image:
        assert image.digest == digest
        assert image.architectures() == ["amd64", "ppc64le", "s390x"]
        results = {a: extract(image, a) for a in image.architectures()}
    assert results["amd64"].drivers[f"2.3.0/collector-{KERNEL}.ko.gz"] == b"mod amd64"
    assert results["ppc64le"].drivers[f"2.3.0/collector-{KERNEL}.ko.gz"] == b"mod ppc64le"
    assert "2.3.0/collector-6.1.0-s390x.ko.gz" in results["s390x"].drivers
    assert "2.3.0/collector-6.1.0-s390x.ko.gz" not in results["amd64"].drivers
    assert all(len(r.failures) == 2 for r in results.values())


def test_index_of_a_multi_arch_image_carries_platforms(tmp_path: Path) -> None:
    trees = {a: drivers_tree(tmp_path / a, a) for a in ("amd64", "s390x")}
    digest = build_image(trees, tmp_path / "image")
    blob = tmp_path / "image" / "blobs" / "sha256" / digest.removeprefix("sha256:")
    index = json.loads(blob.read_text())
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert [m["platform"] for m in index["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "s390x", "os": "linux"},
    ]


def test_same_input_gives_the_same_digest(tmp_path: Path) -> None:
    trees = {a: drivers_tree(tmp_path / a, a) for a in ("amd64", "s390x")}
    first = build_image(trees, tmp_path / "one.tar", tar=True)
    os.utime(trees["amd64"] / "etc" / "os-release", (12345, 12345))  # mtimes do not count
    second = build_image(trees, tmp_path / "two.tar", tar=True)
    assert first == second
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()
    assert build_image(trees, tmp_path / "dir") == first


def test_a_changed_driver_changes_the_digest(tmp_path: Path) -> None:
    tree = drivers_tree(tmp_path / "tree", "amd64")
    first = build_image({"amd64": tree}, tmp_path / "one")
    (tree / f"kernel-modules/2.3.0/collector-{KERNEL}.ko.gz").write_bytes(b"rebuilt")
    assert build_image({"amd64": tree}, tmp_path / "two") != first


def test_a_later_layer_whiteout_deletes_a_driver(tmp_path: Path) -> None:
    tree = drivers_tree(tmp_path / "tree", "amd64")
    upper = make_tree(
        tmp_path / "upper",
        {
            f"kernel-modules/2.3.0/.wh.collector-{KERNEL}.ko.gz": b"",
            "kernel-modules/2.3.0/collector-6.1.0-1.ko.gz": b"new",
        },
    )
    build_image({"amd64": tree}, tmp_path / "image", layers={"amd64": [upper]})
    with open_image(tmp_path / "image") as image:
        drivers = extract(image, "amd64").drivers
    assert f"2.3.0/collector-{KERNEL}.ko.gz" not in drivers
    assert drivers["2.3.0/collector-6.1.0-1.ko.gz"] == b"new"
    assert f"2.3.0/collector-ebpf-{KERNEL}.o.gz" in drivers


def test_an_opaque_whiteout_hides_the_lower_folder_but_not_its_own_layer(tmp_path: Path) -> None:
    tree = drivers_tree(tmp_path / "tree", "amd64")
    upper = make_tree(
        tmp_path / "upper",
        {
            "kernel-modules/2.3.0/.wh..wh..opq": b"",
            "kernel-modules/2.3.0/collector-6.1.0-1.ko.gz": b"new",
            "FAILURES/.wh..wh..opq": b"",
        },
    )
    build_image({"amd64": tree}, tmp_path / "image", layers={"amd64": [upper]})
    with open_image(tmp_path / "image") as image:
        result = extract(image, "amd64")
    assert result.drivers == {
        "2.3.0/collector-6.1.0-1.ko.gz": b"new",
        "2.2.0/.collector-ebpf-3.10.0-957.el7.x86_64.unavail": b"",
    }
    assert result.failures == []


def test_a_whiteout_of_the_whole_tree_leaves_no_kernel_modules(tmp_path: Path) -> None:
    tree = drivers_tree(tmp_path / "tree", "amd64")
    upper = make_tree(tmp_path / "upper", {".wh.kernel-modules": b""})
    build_image({"amd64": tree}, tmp_path / "image", layers={"amd64": [upper]})
    with open_image(tmp_path / "image") as image, pytest.raises(ImageError, match="no /kernel"):
        extract(image, "amd64")


def test_relative_links_inside_the_tree_give_the_targets_bytes(tmp_path: Path) -> None:
    tree = drivers_tree(tmp_path / "tree", "amd64")
    link = tree / "kernel-modules/2.3.0/collector-5.4.0-62-alias.ko.gz"
    link.symlink_to(f"collector-{KERNEL}.ko.gz")
    build_image({"amd64": tree}, tmp_path / "image")
    with open_image(tmp_path / "image") as image:
        drivers = extract(image, "amd64").drivers
    assert drivers["2.3.0/collector-5.4.0-62-alias.ko.gz"] == b"mod amd64"


def test_a_corrupt_layer_blob_is_named(tmp_path: Path) -> None:
    tree = drivers_tree(tmp_path / "tree", "amd64")
    build_image({"amd64": tree}, tmp_path / "image")
    blobs = tmp_path / "image" / "blobs" / "sha256"
    layer = max(blobs.iterdir(), key=lambda p: p.stat().st_size)  # the layer is the biggest
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    layer.write_bytes(bytes(data))
    with open_image(tmp_path / "image") as image:
        with pytest.raises(CorruptBlob, match=f"layer blob sha256:{layer.name} is corrupt"):
            extract(image, "amd64")


def test_a_truncated_layer_blob_is_refused_when_opening(tmp_path: Path) -> None:
    tree = drivers_tree(tmp_path / "tree", "amd64")
    build_image({"amd64": tree}, tmp_path / "image")
    blobs = tmp_path / "image" / "blobs" / "sha256"
    layer = max(blobs.iterdir(), key=lambda p: p.stat().st_size)
    layer.write_bytes(layer.read_bytes()[:-10])
    with pytest.raises(CorruptBlob, match=f"sha256:{layer.name} is corrupt: .* bytes"):
        open_image(tmp_path / "image")


def test_a_corrupt_manifest_blob_is_named(tmp_path: Path) -> None:
    digest = build_image({"amd64": drivers_tree(tmp_path / "tree", "amd64")}, tmp_path / "image")
    blob = tmp_path / "image" / "blobs" / "sha256" / digest.removeprefix("sha256:")
    blob.write_bytes(blob.read_bytes().replace(b"layers", b"LAYERS"))
    with pytest.raises(CorruptBlob, match=f"manifest blob {digest} is corrupt"):
        open_image(tmp_path / "image")


def test_an_image_without_kernel_modules_is_refused(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", {"FAILURES/k/2.3.0/mod.log": b"x", "etc/x": b""})
    build_image({"amd64": tree}, tmp_path / "image")
    with open_image(tmp_path / "image") as image:
        with pytest.raises(ImageError, match=r"has no /kernel-modules: is it a drivers image"):
            extract(image, "amd64")


def test_an_unknown_architecture_is_refused(tmp_path: Path) -> None:
    build_image({"arm64": drivers_tree(tmp_path / "tree", "arm64")}, tmp_path / "image")
    with open_image(tmp_path / "image") as image:
        assert image.architectures() == ["arm64"]
        with pytest.raises(ImageError, match="'arm64' has no CPaaS cache"):
            extract(image, "arm64")


def test_an_architecture_the_image_lacks_is_refused(tmp_path: Path) -> None:
    build_image({"amd64": drivers_tree(tmp_path / "tree", "amd64")}, tmp_path / "image")
    with open_image(tmp_path / "image") as image:
        with pytest.raises(ImageError, match=r"has no s390x image \(it has amd64\)"):
            extract(image, "s390x")


def test_malformed_driver_names_are_all_listed(tmp_path: Path) -> None:
    tree = drivers_tree(tmp_path / "tree", "amd64")
    make_tree(
        tree,
        {
            "kernel-modules/2.3.0/probe.o": b"",
            "kernel-modules/not-a-version/collector-5.4.0.ko.gz": b"",
            "kernel-modules/2.3.0/deeper/collector-5.4.0.ko.gz": b"",
            "FAILURES/5.4.0/2.3.0/gcc.log": b"",
        },
    )
    build_image({"amd64": tree}, tmp_path / "image")
    with open_image(tmp_path / "image") as image:
        with pytest.raises(ImageError, match="4 bad file") as caught:
            extract(image, "amd64")
    message = str(caught.value)
    for culprit in ("2.3.0/probe.o", "not-a-version", "deeper", "gcc.log"):
        assert culprit in message


def test_a_layer_with_dotdot_paths_is_refused_naming_layer_and_member(tmp_path: Path) -> None:
    tree = drivers_tree(tmp_path / "tree", "amd64")
    evil = raw_tar([("kernel-modules/../../etc/passwd", tarfile.REGTYPE, "root::0:0")])
    build_image({"amd64": tree}, tmp_path / "image", layers={"amd64": [evil]})
    with open_image(tmp_path / "image") as image:
        layer = image.manifests["amd64"].layers[1]["digest"]
        with pytest.raises(ImageError, match="path traversal") as caught:
            extract(image, "amd64")
    assert layer in str(caught.value) and "../../etc/passwd" in str(caught.value)


def test_an_absolute_symlink_in_the_driver_tree_is_refused(tmp_path: Path) -> None:
    tree = drivers_tree(tmp_path / "tree", "amd64")
    (tree / "kernel-modules/2.3.0/collector-6.1.0.ko.gz").symlink_to("/etc/shadow")
    build_image({"amd64": tree}, tmp_path / "image")
    with open_image(tmp_path / "image") as image:
        with pytest.raises(ImageError, match="collector-6.1.0.ko.gz' is an absolute link"):
            extract(image, "amd64")


def test_an_absolute_symlink_outside_the_driver_trees_is_ignored(tmp_path: Path) -> None:
    tree = drivers_tree(tmp_path / "tree", "amd64")
    (tree / "etc" / "localtime").symlink_to("/usr/share/zoneinfo/UTC")
    build_image({"amd64": tree}, tmp_path / "image")
    with open_image(tmp_path / "image") as image:
        assert len(extract(image, "amd64").drivers) == 3


def test_links_leaving_the_tree_and_devices_are_refused(tmp_path: Path) -> None:
    tree = drivers_tree(tmp_path / "tree", "amd64")
    cases = {
        "outside the image": [("kernel-modules/2.3.0/x.ko.gz", tarfile.SYMTYPE, "../../../x")],
        "is a device": [("kernel-modules/2.3.0/null", tarfile.CHRTYPE, "")],
        "lies under the link": [
            ("kernel-modules/2.4.0", tarfile.SYMTYPE, "2.3.0"),
            ("kernel-modules/2.4.0/collector-1.ko.gz", tarfile.REGTYPE, "x"),
        ],
    }
    for i, (why, members) in enumerate(cases.items()):
        build_image({"amd64": tree}, tmp_path / f"image{i}", layers={"amd64": [raw_tar(members)]})
        with open_image(tmp_path / f"image{i}") as image:
            with pytest.raises(ImageError, match=why):
                extract(image, "amd64")


def test_a_link_to_a_file_outside_the_driver_trees_is_a_bad_file(tmp_path: Path) -> None:
    tree = drivers_tree(tmp_path / "tree", "amd64")
    (tree / "kernel-modules/2.3.0/collector-6.1.0.ko.gz").symlink_to("../../etc/os-release")
    build_image({"amd64": tree}, tmp_path / "image")
    with open_image(tmp_path / "image") as image:
        with pytest.raises(ImageError, match="does not lead to a file of the driver trees"):
            extract(image, "amd64")


def test_leading_dot_slash_member_names_are_read(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "empty", {"etc/x": b""})
    layer = raw_tar(
        [
            (f"./kernel-modules/2.3.0/collector-{KERNEL}.ko.gz", tarfile.REGTYPE, "m"),
            (f"./FAILURES/{KERNEL}/2.3.0/bpf.log", tarfile.REGTYPE, "boom"),
        ]
    )
    build_image({"amd64": tree}, tmp_path / "image", layers={"amd64": [layer]})
    with open_image(tmp_path / "image") as image:
        result = extract(image, "amd64")
    assert result.drivers == {f"2.3.0/collector-{KERNEL}.ko.gz": b"m"}
    assert result.failures == [Failure(KERNEL, "2.3.0", "bpf", b"boom")]


def test_build_refuses_an_existing_output(tmp_path: Path) -> None:
    tree = drivers_tree(tmp_path / "tree", "amd64")
    build_image({"amd64": tree}, tmp_path / "image")
    with pytest.raises(ImageError, match="already exists"):
        build_image({"amd64": tree}, tmp_path / "image")


def test_cmd_image_builds_from_arch_arguments(tmp_path: Path, capsys) -> None:
    amd64 = drivers_tree(tmp_path / "amd64", "amd64")
    s390x = drivers_tree(tmp_path / "s390x", "s390x")
    upper = make_tree(
        tmp_path / "upper", {f"kernel-modules/2.3.0/.wh.collector-{KERNEL}.ko.gz": b""}
    )
    args = Namespace(
        action="build",
        out=str(tmp_path / "image.tar"),
        tar=True,
        arch=[f"amd64={amd64}", f"s390x={s390x}", f"s390x={upper}"],
    )
    assert cmd_image(args) == 0
    digest = capsys.readouterr().out.strip()
    with open_image(tmp_path / "image.tar") as image:
        assert image.digest == digest
        assert f"2.3.0/collector-{KERNEL}.ko.gz" in extract(image, "amd64").drivers
        assert f"2.3.0/collector-{KERNEL}.ko.gz" not in extract(image, "s390x").drivers


def test_cmd_image_refuses_bad_arch_arguments(tmp_path: Path) -> None:
    for item, why in (("amd64", "expected ARCH=DIR"), (f"arm64={tmp_path}", "no CPaaS cache")):
        args = Namespace(action="build", out=str(tmp_path / "x"), tar=False, arch=[item])
        with pytest.raises(ImageError, match=why):
            cmd_image(args)
