"""vm-test: real modules built by the builder against Debian's headers, loaded into the
real Debian kernel booted under QEMU (software emulation); the verdicts come from the
guest's serial console only."""

from __future__ import annotations

import dataclasses
import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from drivers.build import vmtest
from drivers.build.boot_images import (
    BootImageError,
    debian_boot_image,
    fetch_boot_image,
    module_closure,
    publish_boot_image,
)
from drivers.build.bundle import open_bundle
from drivers.build.bundles import make_debian_bundle
from drivers.build.compile import build_driver
from drivers.build.safetar import safe_extract
from drivers.domain import layout
from drivers.domain.errors import RunInputError
from drivers.domain.layout import report_prefix
from drivers.domain.names import DriverKey
from drivers.store.storage import Stores, read_json, write_json
from example_sources import EXAMPLE_SOURCES

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"
KERNEL = "6.1.0-56-amd64"  # Debian publishes linux-image-6.1.0-56-amd64
OTHER = "6.1.0-56-cloud-amd64"  # same release, another flavour: other symbol versions

needs_qemu = pytest.mark.skipif(
    shutil.which(vmtest.QEMU) is None or not vmtest.BUSYBOX.is_file(),
    reason="qemu-system-x86 and busybox-static are not installed (scripts/host-deps.sh)",
)


def build_driver_for(
    kernel: str, tmp: Path, kind: str = "mod", sources: Path | None = None
) -> bytes:
    """The example 2.3.0 module or probe (or ``sources`` of that shape), built by the
    builder against Debian's headers."""
    bundle = CACHE / "bundles" / layout.bundle_object(kernel)
    if not bundle.exists():
        make_debian_bundle(kernel, CACHE / "bundles", CACHE / "debs")
    root = tmp / kernel
    if not root.exists():
        safe_extract(bundle, root)
    key = DriverKey(kernel, "2.3.0", kind)
    sources = sources or EXAMPLE_SOURCES / "2.3.0"
    built = build_driver(key, sources, open_bundle(root, kernel), tmp)
    assert built.data, built.message
    return built.data


def build_module(kernel: str, tmp: Path) -> bytes:
    return build_driver_for(kernel, tmp, "mod")


@pytest.fixture(scope="module")
def boot_image() -> Path:
    image = debian_boot_image(KERNEL, CACHE / "debs", CACHE / "kernel-images")
    assert image is not None and image.stat().st_size > 1 << 20, image  # a real vmlinuz
    return image


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("drivers")
    return {kind: build_driver_for(KERNEL, tmp, kind) for kind in ("mod", "bpf")}


MOD, BPF = DriverKey(KERNEL, "2.3.0", "mod"), DriverKey(KERNEL, "2.3.0", "bpf")


def unverifiable_probe(tmp: Path) -> bytes:
    """A probe every verifier refuses: a map value used without its NULL check."""
    source = tmp / "bad.c"
    source.write_text(
        "#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\n"
        "struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1);\n"
        '  __type(key, __u32); __type(value, __u64); } counts SEC(".maps");\n'
        'SEC("tracepoint/sched/sched_switch") int count(void *ctx) {\n'
        "  __u32 key = 0; __u64 *n = bpf_map_lookup_elem(&counts, &key);\n"
        "  *n += 1; return 0; }\n"
        'char LICENSE[] SEC("license") = "GPL";\n'
    )
    multiarch = subprocess.run(
        ["gcc", "-print-multiarch"], capture_output=True, text=True, check=True
    ).stdout.strip()
    subprocess.run(
        ["clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{multiarch}", "-c"]
        + [str(source), "-o", str(tmp / "bad.o")],
        check=True,
    )
    return gzip.compress((tmp / "bad.o").read_bytes())


@needs_qemu
def test_a_real_module_and_probe_load_count_events_and_unload_in_one_boot(boot_image, built):
    results = vmtest.vm_test(KERNEL, [(MOD, built["mod"]), (BPF, built["bpf"])], boot_image)
    assert [(r.kind, r.status) for r in results] == [("mod", "loaded"), ("bpf", "loaded")], results
    assert all(r.events and r.events > 0 for r in results)


@needs_qemu
def test_a_module_built_for_another_kernel_is_refused_with_the_kernels_reason(boot_image, tmp_path):
    other = build_module(OTHER, tmp_path)
    [result] = vmtest.vm_test(KERNEL, [(MOD, other)], boot_image)
    assert result.status == "load_failed", result
    assert any("disagrees about version of symbol" in m for m in result.messages), result
    assert any("insmod" in m for m in result.messages)


@needs_qemu
def test_the_verifier_of_the_kernel_rejects_a_bad_probe_and_a_corrupt_one_fails_to_load(
    boot_image, built, tmp_path
):
    corrupt = gzip.compress(b"\x7fELF" + b"\x02\x01\x01" + bytes(200))
    drivers = [(BPF, unverifiable_probe(tmp_path)), (BPF, corrupt), (BPF, built["bpf"])]
    rejected, broken, good = vmtest.vm_test(KERNEL, drivers, boot_image)
    assert rejected.status == "verifier_rejected", rejected
    assert any("invalid mem access 'map_value_or_null'" in m for m in rejected.messages)
    assert broken.status == "load_failed", broken
    assert broken.messages[0].startswith("not a loadable eBPF object")
    assert good.status == "loaded"  # the bad ones before it broke nothing


@needs_qemu
def test_a_guest_that_never_prints_its_markers_times_out_as_boot_failed(
    boot_image, built, monkeypatch
):
    monkeypatch.setattr(vmtest, "INIT_HEAD", "#!/bin/busybox sh\n/bin/busybox sleep 600\n")
    [result] = vmtest.vm_test(KERNEL, [(MOD, built["mod"])], boot_image, timeout=20)
    assert result.status == "boot_failed"
    assert result.messages[0] == "the guest never ran its script (no BOOTED marker)"
    assert result.messages[1].startswith("timed out after 2")


def test_a_kernel_without_a_boot_image_is_untested_never_passed():
    el8 = DriverKey("4.18.0-477.el8.x86_64", "2.3.0", "mod")
    [result] = vmtest.vm_test(el8.kernel, [(el8, b"")], None)
    assert result.status == "no_boot_image"


def test_drivers_are_tested_in_their_own_kernel_only():
    with pytest.raises(vmtest.VmTestError, match="test it in its own kernel"):
        vmtest.vm_test(OTHER, [(MOD, b"")], None)


def test_a_release_debian_does_not_publish_has_no_boot_image(tmp_path):
    assert debian_boot_image("4.18.0-477.el8.x86_64", tmp_path, tmp_path) is None


def test_the_initramfs_is_a_newc_archive_the_guest_can_use(tmp_path):
    if not vmtest.BUSYBOX.is_file():
        pytest.skip("busybox-static is not installed")
    loader = tmp_path / "loader"
    loader.write_bytes(b"loader")
    drivers = [("mod", b"\x7fELF module bytes"), ("bpf", b"\x7fELF probe bytes")]
    archive = gzip.decompress(vmtest.initramfs(drivers, loader))
    listing = (
        subprocess.run(
            [str(vmtest.BUSYBOX), "cpio", "-t"], input=archive, capture_output=True, check=True
        )
        .stdout.decode()
        .split()
    )
    assert listing == [
        "bin", "dev", "drivers", "proc", "sys", "tmp",
        "bin/busybox", "init", "bin/vmtest-loader", "drivers/1.ko", "drivers/2.o",
    ]  # fmt: skip
    (tmp_path / "x").mkdir()
    subprocess.run(
        [str(vmtest.BUSYBOX), "cpio", "-i", "-d"], input=archive, cwd=tmp_path / "x", check=True
    )
    assert (tmp_path / "x/drivers/1.ko").read_bytes() == b"\x7fELF module bytes"
    init = (tmp_path / "x/init").read_text()
    assert 'test_module 1 collector ""\n' in init and "test_probe 2\n" in init
    assert (tmp_path / "x/init").stat().st_mode & 0o111


def test_the_loader_builds_static_against_libbpf(tmp_path):
    loader = vmtest.loader_binary(tmp_path)
    ldd = subprocess.run(["ldd", str(loader)], capture_output=True, text=True, check=False)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr  # runs in a bare initramfs
    assert vmtest.loader_binary(tmp_path) == loader  # built once per source version


BOOTED = "VMTEST:BOOTED 6.1.0-56-amd64\n"


@pytest.mark.parametrize(
    ("serial", "timed_out", "statuses", "message"),
    [
        ("garbage\n", True, ["boot_failed", "boot_failed"], "no BOOTED marker"),
        ("VMTEST:BOOTED 6.1.0-47-amd64\n", False, ["boot_failed"] * 2, "not '6.1.0-56-amd64'"),
        (
            BOOTED + "VMTEST:BEGIN 1\nVMTEST:LOAD_FAILED insmod: bad\n"
            "VMTEST:KMSG [1.0] collector: Unknown symbol x\nVMTEST:END 1\nVMTEST:DONE\n",
            False,
            ["load_failed", "boot_failed"],
            "collector: Unknown symbol x",
        ),
        (
            BOOTED + "VMTEST:BEGIN 1\nVMTEST:LOADED\nVMTEST:EVENTS 0\nVMTEST:UNLOADED\n"
            "VMTEST:END 1\nVMTEST:BEGIN 2\nVMTEST:BPF_LOADED 1\nVMTEST:BPF_ATTACHED 1\n"
            "VMTEST:BPF_EVENTS 3\nVMTEST:BPF_DETACHED\nVMTEST:END 2\nVMTEST:DONE\n",
            False,
            ["load_failed", "loaded"],
            "counted no events",
        ),
        (
            "\x1b[0m." + BOOTED + "VMTEST:BEGIN 1\nVMTEST:LOADED\nVMTEST:EVENTS 42\n"
            "VMTEST:UNLOADED\nVMTEST:END 1\nVMTEST:BEGIN 2\nVMTEST:BPF_VERIFIER R0 invalid\n"
            "VMTEST:BPF_REJECTED Permission denied\nVMTEST:END 2\nVMTEST:DONE\n",
            False,
            ["loaded", "verifier_rejected"],
            "R0 invalid",
        ),
        (
            BOOTED + "VMTEST:BEGIN 1\n[ 2.0] BUG: kernel NULL pointer dereference\n",
            True,
            ["load_failed", "boot_failed"],
            "BUG: kernel NULL pointer dereference",
        ),
    ],
)
def test_only_the_markers_decide(serial, timed_out, statuses, message):
    results = vmtest.judge([MOD, BPF], serial, 1.0, timed_out)
    assert [r.status for r in results] == statuses
    assert any(message in m for r in results for m in r.messages), results


def test_boot_images_go_to_the_kernel_images_bucket_and_come_back(store, tmp_path):
    images = store()
    assert publish_boot_image(images, KERNEL, CACHE / "debs", tmp_path / "a") == "created"
    assert publish_boot_image(images, KERNEL, CACHE / "debs", tmp_path / "a") == (
        "identical"
    )  # never overwritten
    fetched = fetch_boot_image(images, KERNEL, tmp_path / "b")
    assert fetched.read_bytes() == (tmp_path / "a" / KERNEL / "vmlinuz").read_bytes()
    assert [i.name for i in images.list()] == [layout.boot_image_object(KERNEL)]
    el8 = "4.18.0-477.el8.x86_64"
    assert publish_boot_image(images, el8, tmp_path / "debs", tmp_path / "a") == "absent"
    assert fetch_boot_image(images, el8, tmp_path / "b") is None


def test_drivers_bundle_also_stores_boot_images_even_for_bundles_already_there(
    store, tmp_path, capsys
):
    from drivers.ops.cli import main

    bundles, images = store(), store()
    args = ["bundle", "debian", KERNEL, "--deb-cache", str(CACHE / "debs")]
    args += ["--out", str(tmp_path / "bundles"), "--upload", f"gs://{bundles.bucket_name}"]
    assert main(args) == 0  # the bundle only
    assert list(images.list()) == []
    assert main([*args, "--boot-images", f"gs://{images.bucket_name}"]) == 0
    assert [i.name for i in images.list()] == [f"{KERNEL}/vmlinuz"]
    assert "boot image" in capsys.readouterr().err


# --- modules a driver depends on ---------------------------------------------------------

USES_CRC8 = """
#include <linux/crc8.h>
static u8 collector_crc_table[CRC8_TABLE_SIZE];
u8 collector_crc(const u8 *data, size_t len)  /* exported: the call to crc8() stays */
{
	crc8_populate_msb(collector_crc_table, 0x07);
	return crc8(collector_crc_table, data, len, 0);
}
EXPORT_SYMBOL(collector_crc);
"""


@pytest.fixture(scope="module")
def needs_crc8(tmp_path_factory) -> bytes:
    """The example module, changed to call crc8(): modpost gives it depends=crc8."""
    tmp = tmp_path_factory.mktemp("crc8")
    sources = tmp / "2.3.0"
    shutil.copytree(EXAMPLE_SOURCES / "2.3.0", sources)
    module = sources / "module" / "collector.c"
    module.write_text(module.read_text() + USES_CRC8)
    data = build_driver_for(KERNEL, tmp, "mod", sources)
    assert vmtest.module_depends(gzip.decompress(data)) == ["crc8"]
    return data


def test_the_modules_a_driver_needs_are_resolved_with_their_own_dependencies():
    depends = {"a": ["b_c"], "b-c": ["d"], "d": [], "e": []}
    assert module_closure(["a"], depends) == ["a", "b-c", "d"]
    assert module_closure([], depends) == []
    with pytest.raises(BootImageError, match="no loadable module 'zz'"):
        module_closure(["zz"], depends)


@needs_qemu
def test_a_module_loads_after_the_modules_it_depends_on_kept_beside_the_boot_image(
    store, needs_crc8, built, boot_image, tmp_path
):
    images = store()
    published = publish_boot_image(images, KERNEL, CACHE / "debs", tmp_path / "a", ["crc8"])
    assert published == "created"
    assert sorted(i.name for i in images.list()) == [
        f"{KERNEL}/modules/lib/crc8.ko",
        f"{KERNEL}/vmlinuz",
    ]
    image = fetch_boot_image(images, KERNEL, tmp_path / "b")
    results = vmtest.vm_test(KERNEL, [(MOD, needs_crc8), (MOD, built["mod"])], image)
    assert [r.status for r in results] == ["loaded", "loaded"], results

    bare = tmp_path / "bare" / "vmlinuz"  # the same kernel without its modules
    bare.parent.mkdir()
    shutil.copy(boot_image, bare)
    untested, loaded = vmtest.vm_test(KERNEL, [(MOD, needs_crc8), (MOD, built["mod"])], bare)
    assert untested.status == "not_tested" and "needs module(s) crc8" in untested.messages[0]
    assert loaded.status == "loaded"


# --- the integration_tests stage of upstream_drivers ----------------------------------------

EL8 = "4.18.0-477.el8.x86_64"  # no Debian kernel image: untested, published


@pytest.fixture
def stage(store, boot_image, built, tmp_path):
    """A run's staged, verified drivers: good ones, one the kernel refuses, one the
    verifier rejects, one without a boot image, an eBPF-unavailable marker."""

    work, images, cache = store(), store(), store()
    buckets = dataclasses.replace(
        layout.Buckets.from_env(),
        work=work.bucket_name,
        kernel_images=images.bucket_name,
        drivers=cache.bucket_name,
    )
    stores = Stores(work.client, buckets)
    images.upload_new_file(layout.boot_image_object(KERNEL), boot_image)
    staged = {
        f"2.3.0/collector-{KERNEL}.ko.gz": built["mod"],
        f"2.3.0/collector-ebpf-{KERNEL}.o.gz": built["bpf"],
        f"2.4.0-rc1/collector-{KERNEL}.ko.gz": build_module(OTHER, tmp_path),
        f"2.4.0-rc1/collector-ebpf-{KERNEL}.o.gz": unverifiable_probe(tmp_path),
        f"2.3.0/collector-{EL8}.ko.gz": built["mod"],
        "2.3.0/.collector-ebpf-3.10.0-957.el7.x86_64.unavail": b"",
    }

    def run(run_id: str) -> str:
        for name, data in staged.items():
            work.put(layout.staged_drivers_prefix(run_id) + name, data)
        write_json(work, f"{layout.staging_prefix(run_id)}verified.json", list(staged))
        return run_id

    return stores, run


def vm_report(stores, run_id: str) -> dict:

    doc = read_json(stores.work, f"{report_prefix(run_id)}vm-tests.json")
    return {r["object"]: r for r in doc["results"]}


def params(**raw):
    from drivers.domain.config import load_config
    from drivers.flows import upstream

    return upstream.RunParams.from_params(raw, load_config())


VM = {"parallel": 2, "kvm": False, "memory_mb": 512}


@needs_qemu
def test_enforce_publishes_only_what_loads_in_its_kernel_or_is_marked_untested(stage):
    from drivers.flows import upstream

    stores, run = stage
    run_id = run("r-enforce")
    summary = upstream.integration_tests(stores, run_id, params(), VM)
    assert summary["statuses"] == {
        "load_failed": 1,
        "loaded": 2,
        "no_boot_image": 1,
        "verifier_rejected": 1,
    }
    assert (summary["kernels"], summary["refused"], summary["held_back"]) == (2, 2, 2)
    results = vm_report(stores, run_id)
    refused = results[f"2.4.0-rc1/collector-{KERNEL}.ko.gz"]
    assert any("disagrees about version of symbol" in m for m in refused["messages"])
    rejected = results[f"2.4.0-rc1/collector-ebpf-{KERNEL}.o.gz"]
    assert rejected["messages"][0].startswith("verifier: R0 invalid mem access")
    assert results[f"2.3.0/collector-{EL8}.ko.gz"]["status"] == "no_boot_image"

    pushed = upstream.push_drivers(stores, run_id)
    assert sorted(i.name for i in stores.drivers.list()) == sorted(
        [
            f"2.3.0/collector-{KERNEL}.ko.gz",
            f"2.3.0/collector-ebpf-{KERNEL}.o.gz",
            f"2.3.0/collector-{EL8}.ko.gz",  # untested, named why
            "2.3.0/.collector-ebpf-3.10.0-957.el7.x86_64.unavail",
        ]
    )
    steps = {"unify": {"compile_failures": 0}, "integration_tests": summary, "push_drivers": pushed}
    verdict = upstream.report(stores, run_id, params(), steps, [])
    assert verdict["status"] == "failed"
    assert verdict["reasons"] == [
        "0 compile failure(s) + 2 driver(s) their kernel refused (not published) > max_failures=0"
    ]
    tolerant = params(max_failures=2)
    assert upstream.report(stores, run_id, tolerant, steps, [])["status"] == "success"


@needs_qemu
def test_warn_publishes_everything_and_reports_what_the_kernel_refused(stage):
    from drivers.flows import upstream

    stores, run = stage
    run_id = run("r-warn")
    summary = upstream.integration_tests(stores, run_id, params(vm_tests="warn"), VM)
    assert (summary["refused"], summary["held_back"]) == (2, 0)
    assert upstream.push_drivers(stores, run_id)["created"] == 6
    steps = {"integration_tests": summary}
    assert upstream.report(stores, run_id, params(), steps, [])["status"] == "success"


def test_off_spent_budget_and_no_new_drivers_boot_no_vm(stage, monkeypatch):
    from drivers.flows import upstream

    def no_vm(*args, **kwargs):
        raise AssertionError("no VM may boot here")

    monkeypatch.setattr(vmtest, "vm_test", no_vm)
    stores, run = stage
    off = upstream.integration_tests(stores, run("r-off"), params(vm_tests="off"), VM)
    assert off["statuses"] == {"not_tested": 5} and off["held_back"] == 0
    spent = upstream.integration_tests(stores, run("r-spent"), params(vm_tests_budget_s=0), VM)
    assert spent["statuses"] == {"not_tested": 5} and spent["held_back"] == 0
    why = vm_report(stores, "r-spent")[f"2.3.0/collector-{KERNEL}.ko.gz"]["messages"]
    assert why == ["the stage's time budget of 0 s was spent before its turn"]
    nightly = upstream.integration_tests(stores, "r-noop", params(), VM)  # nothing staged
    assert (nightly["kernels"], nightly["drivers"]) == (0, 0)


def test_bad_vm_test_parameters_are_refused_before_anything_runs():

    with pytest.raises(RunInputError, match="vm_tests must be one of"):
        params(vm_tests="sometimes")
    with pytest.raises(RunInputError, match="vm_tests_budget_s must be seconds"):
        params(vm_tests_budget_s=-1)


def test_6_12_modules_build_reproducibly_btf_included(tmp_path):
    """pahole < 1.27 encodes BTF with threads unless kbuild is asked for a reproducible
    build; then a retried shard would find other bytes staged under the same name."""
    kernel = "6.12.115+deb12-cloud-amd64"
    builds = {build_driver_for(kernel, tmp_path / str(i)) for i in range(5)}
    assert len(builds) == 1
