"""vm-test: real modules built by the builder against Debian's headers, loaded into the
real Debian kernel booted under QEMU (software emulation); the verdicts come from the
guest's serial console only."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from drivers import layout, vmtest
from drivers.builder import build_driver, open_bundle, safe_extract
from drivers.bundles import make_debian_bundle
from drivers.names import DriverKey
from drivers.sources import shipped_sources_dir

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"
KERNEL = "6.1.0-56-amd64"  # Debian publishes linux-image-6.1.0-56-amd64
OTHER = "6.1.0-56-cloud-amd64"  # same release, another flavour: other symbol versions

needs_qemu = pytest.mark.skipif(
    shutil.which(vmtest.QEMU) is None or not vmtest.BUSYBOX.is_file(),
    reason="qemu-system-x86 and busybox-static are not installed (scripts/host-deps.sh)",
)


def build_module(kernel: str, tmp: Path) -> bytes:
    """The example 2.3.0 module, built by the builder against Debian's headers."""
    bundle = CACHE / "bundles" / layout.bundle_object(kernel)
    if not bundle.exists():
        make_debian_bundle(kernel, CACHE / "bundles", CACHE / "debs")
    root = tmp / kernel
    safe_extract(bundle, root)
    key = DriverKey(kernel, "2.3.0", "mod")
    built = build_driver(key, shipped_sources_dir() / "2.3.0", open_bundle(root, kernel), tmp)
    assert built.data, built.message
    return built.data


@pytest.fixture(scope="module")
def boot_image() -> Path:
    image = vmtest.debian_boot_image(KERNEL, CACHE / "debs", CACHE / "kernel-images")
    assert image is not None
    return image


@pytest.fixture(scope="module")
def module(tmp_path_factory) -> bytes:
    return build_module(KERNEL, tmp_path_factory.mktemp("mod"))


@needs_qemu
def test_a_real_module_loads_in_its_kernel_counts_events_and_unloads(boot_image, module):
    result = vmtest.vm_test(DriverKey(KERNEL, "2.3.0", "mod"), module, boot_image)
    assert result.status == "loaded", result
    assert result.events and result.events > 0


@needs_qemu
def test_a_module_built_for_another_kernel_is_refused_with_the_kernels_reason(boot_image, tmp_path):
    other = build_module(OTHER, tmp_path)
    result = vmtest.vm_test(DriverKey(KERNEL, "2.3.0", "mod"), other, boot_image)
    assert result.status == "load_failed", result
    assert any("disagrees about version of symbol" in m for m in result.messages), result
    assert any("insmod" in m for m in result.messages)


@needs_qemu
def test_a_guest_that_never_prints_its_markers_times_out_as_boot_failed(
    boot_image, module, monkeypatch
):
    monkeypatch.setattr(vmtest, "INIT", "#!/bin/busybox sh\n/bin/busybox sleep 600\n")
    result = vmtest.vm_test(DriverKey(KERNEL, "2.3.0", "mod"), module, boot_image, timeout=20)
    assert result.status == "boot_failed"
    assert result.messages == [
        "the guest never ran its script (no BOOTED marker)",
        "timed out after 20 s",
    ]


def test_a_kernel_without_a_boot_image_is_untested_never_passed():
    result = vmtest.vm_test(DriverKey("4.18.0-477.el8.x86_64", "2.3.0", "mod"), b"", None)
    assert result.status == "no_boot_image"


def test_a_release_debian_does_not_publish_has_no_boot_image(tmp_path):
    assert vmtest.debian_boot_image("4.18.0-477.el8.x86_64", tmp_path, tmp_path) is None


def test_the_initramfs_is_a_newc_archive_the_guest_can_use(tmp_path):
    if not vmtest.BUSYBOX.is_file():
        pytest.skip("busybox-static is not installed")
    archive = gzip.decompress(vmtest.initramfs(b"\x7fELF module bytes"))
    listing = (
        subprocess.run(
            [str(vmtest.BUSYBOX), "cpio", "-t"], input=archive, capture_output=True, check=True
        )
        .stdout.decode()
        .split()
    )
    assert listing == ["bin", "dev", "proc", "sys", "tmp", "bin/busybox", "init", "driver.ko"]
    (tmp_path / "x").mkdir()
    subprocess.run(
        [str(vmtest.BUSYBOX), "cpio", "-i", "-d"], input=archive, cwd=tmp_path / "x", check=True
    )
    assert (tmp_path / "x/driver.ko").read_bytes() == b"\x7fELF module bytes"
    assert (tmp_path / "x/init").stat().st_mode & 0o111


KEY = DriverKey(KERNEL, "2.3.0", "mod")


@pytest.mark.parametrize(
    ("serial", "status", "message"),
    [
        ("garbage\n", "boot_failed", "no BOOTED marker"),
        ("VMTEST:BOOTED 6.1.0-47-amd64\n", "boot_failed", "not '6.1.0-56-amd64'"),
        ("VMTEST:BOOTED 6.1.0-56-amd64\nVMTEST:LOADED\n", "boot_failed", "no DONE marker"),
        (
            "VMTEST:BOOTED 6.1.0-56-amd64\nVMTEST:LOAD_FAILED insmod: bad\n"
            "VMTEST:KMSG [1.0] collector: Unknown symbol x\nVMTEST:DONE\n",
            "load_failed",
            "collector: Unknown symbol x",
        ),
        (
            "VMTEST:BOOTED 6.1.0-56-amd64\nVMTEST:LOADED\nVMTEST:EVENTS 0\n"
            "VMTEST:UNLOADED\nVMTEST:DONE\n",
            "load_failed",
            "counted no events",
        ),
        (
            "\x1b[0m.VMTEST:BOOTED 6.1.0-56-amd64\nVMTEST:LOADED\nVMTEST:EVENTS 42\n"
            "VMTEST:UNLOADED\nVMTEST:DONE\n",
            "loaded",
            None,
        ),
    ],
)
def test_only_the_markers_decide(serial, status, message):
    result = vmtest.judge(KEY, vmtest.read_markers(serial), 1.0)
    assert result.status == status
    if message:
        assert any(message in m for m in result.messages), result.messages


def test_boot_images_go_to_the_kernel_images_bucket_and_come_back(store, tmp_path):
    images = store()
    assert vmtest.publish_boot_image(images, KERNEL, CACHE / "debs", tmp_path / "a") == "created"
    assert vmtest.publish_boot_image(images, KERNEL, CACHE / "debs", tmp_path / "a") == (
        "identical"
    )  # never overwritten
    fetched = vmtest.fetch_boot_image(images, KERNEL, tmp_path / "b")
    assert fetched.read_bytes() == (tmp_path / "a" / KERNEL / "vmlinuz").read_bytes()
    assert [i.name for i in images.list()] == [layout.boot_image_object(KERNEL)]
    el8 = "4.18.0-477.el8.x86_64"
    assert vmtest.publish_boot_image(images, el8, tmp_path / "debs", tmp_path / "a") == "absent"
    assert vmtest.fetch_boot_image(images, el8, tmp_path / "b") is None


def test_drivers_bundle_also_stores_boot_images_even_for_bundles_already_there(
    store, tmp_path, capsys
):
    from drivers.cli import main

    bundles, images = store(), store()
    args = ["bundle", "debian", KERNEL, "--deb-cache", str(CACHE / "debs")]
    args += ["--out", str(tmp_path / "bundles"), "--upload", f"gs://{bundles.bucket_name}"]
    assert main(args) == 0  # the bundle only
    assert list(images.list()) == []
    assert main([*args, "--boot-images", f"gs://{images.bucket_name}"]) == 0
    assert [i.name for i in images.list()] == [f"{KERNEL}/vmlinuz"]
    assert "boot image" in capsys.readouterr().err
