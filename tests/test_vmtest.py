"""vm-test: the real 2.3.0 collector module and eBPF probe, built against Debian's headers,
captured through by the real consumer (scap-open built from the same prepared sources)
in the real Debian kernel booted under QEMU (software emulation); the verdicts come from
the guest's serial console only."""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from drivers.build import consumer as consumer_mod
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
from drivers.build.consumer import Consumer, ConsumerError, consumer_for
from drivers.build.one_kernel import cache_file_name
from drivers.build.safetar import safe_extract
from drivers.domain import layout
from drivers.domain.errors import RunInputError
from drivers.domain.layout import report_prefix
from drivers.domain.names import DriverKey
from drivers.store.storage import (
    ObjectStore,
    Stores,
    client_from_environment,
    read_json,
    write_json,
)
from example_sources import EXAMPLE_SOURCES

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"
KERNEL = "6.1.0-56-amd64"  # Debian publishes linux-image-6.1.0-56-amd64
OTHER = "6.1.0-56-cloud-amd64"  # same release, another flavour: other symbol versions
EVENTS = 1000

needs_qemu = pytest.mark.skipif(
    shutil.which(vmtest.QEMU) is None or not vmtest.BUSYBOX.is_file(),
    reason="qemu-system-x86 and busybox-static are not installed (scripts/host-deps.sh)",
)


def bundle_root(kernel: str, tmp: Path) -> Path:
    bundle = CACHE / "bundles" / layout.bundle_object(kernel)
    if not bundle.exists():
        make_debian_bundle(kernel, CACHE / "bundles", CACHE / "debs")
    root = tmp / kernel
    if not root.exists():
        safe_extract(bundle, root)
    return root


def build_example_driver(
    kernel: str, tmp: Path, kind: str = "mod", sources: Path | None = None
) -> bytes:
    """The example (toy) 2.3.0 module or probe (or ``sources`` of that shape), built by the
    builder against Debian's headers: a fixture for what the kernel refuses."""
    key = DriverKey(kernel, "2.3.0", kind)
    sources = sources or EXAMPLE_SOURCES / "2.3.0"
    built = build_driver(key, sources, open_bundle(bundle_root(kernel, tmp), kernel), tmp)
    assert built.data, built.message
    return built.data


@pytest.fixture(scope="module")
def prepared_tgz(real_build) -> Path:
    """2.3.0's real sources as `drivers sources prepare` makes them."""
    return real_build.sources


@pytest.fixture(scope="module")
def real(real_build) -> dict[str, bytes]:
    """The real 2.3.0 module and probe for KERNEL, gzip'd as published: the session's
    shared `drivers build` (tests/conftest.py)."""
    assert real_build.status == 0, real_build.stderr
    return {key.kind: (real_build.out / cache_file_name(key)).read_bytes() for key in (MOD, BPF)}


@pytest.fixture(scope="module")
def sources_bucket(gcs, prepared_tgz) -> ObjectStore:
    """A sources bucket holding the prepared 2.3.0 sources, as `drivers sources prepare
    --upload` leaves them."""
    bucket = "test-sources-vmtest"
    gcs.create_buckets([bucket])
    store = ObjectStore(client_from_environment(), bucket)
    store.upload_new_file(layout.source_object("2.3.0"), prepared_tgz)
    return store


@pytest.fixture(scope="module")
def consumer(sources_bucket, tmp_path_factory) -> Consumer:
    """2.3.0's scap-open: built once from its prepared sources, cached beside them."""
    return consumer_for(sources_bucket, "2.3.0", tmp_path_factory.mktemp("consumers"))


@pytest.fixture(scope="module")
def boot_image() -> Path:
    image = debian_boot_image(KERNEL, CACHE / "debs", CACHE / "kernel-images")
    assert image is not None and image.stat().st_size > 1 << 20, image  # a real vmlinuz
    return image


MOD, BPF = DriverKey(KERNEL, "2.3.0", "mod"), DriverKey(KERNEL, "2.3.0", "bpf")


def test_the_consumer_is_static_and_cached_beside_its_sources(
    consumer, sources_bucket, tmp_path, monkeypatch
):
    ldd = subprocess.run(["ldd", str(consumer.path)], capture_output=True, text=True, check=False)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr  # runs in a bare initramfs
    name = layout.consumer_object("2.3.0", consumer_mod.recipe_id("2.3.0"), "x86_64")
    assert sources_bucket.exists(name)
    from drivers.store.ledger import source_hashes

    assert list(source_hashes(sources_bucket)) == ["2.3.0.tgz"]  # never taken for sources

    def no_build(*args, **kwargs):
        raise AssertionError("the bucket's consumer must be used, not built again")

    monkeypatch.setattr(consumer_mod, "build_consumer", no_build)
    again = consumer_for(sources_bucket, "2.3.0", tmp_path)  # another worker: empty cache
    assert again.path.read_bytes() == consumer.path.read_bytes()
    with pytest.raises(ConsumerError, match=r"9\.9\.9\.tgz does not exist: prepare the sources"):
        consumer_for(sources_bucket, "9.9.9", tmp_path)


@needs_qemu
def test_a_guest_that_never_prints_its_markers_times_out_as_boot_failed(
    boot_image, consumer, monkeypatch
):
    monkeypatch.setattr(vmtest, "INIT_HEAD", "#!/bin/busybox sh\n/bin/busybox sleep 600\n")
    never_loaded = gzip.compress(b"\x7fELF")
    [result] = vmtest.vm_test(
        KERNEL, [(MOD, never_loaded)], boot_image, {"2.3.0": consumer}, timeout=6
    )
    assert result.status == "boot_failed"
    assert result.messages[0] == "the guest never ran its script (no BOOTED marker)"
    assert re.fullmatch(r"timed out after \d+ s", result.messages[1]) and result.seconds >= 6


def test_a_kernel_without_a_boot_image_is_untested_never_passed():
    el8 = DriverKey("4.18.0-477.el8.x86_64", "2.3.0", "mod")
    [result] = vmtest.vm_test(el8.kernel, [(el8, b"")], None, {})
    assert result.status == "no_boot_image"


def test_drivers_are_tested_in_their_own_kernel_only():
    with pytest.raises(vmtest.VmTestError, match="test it in its own kernel"):
        vmtest.vm_test(OTHER, [(MOD, b"")], None, {})


def test_a_release_debian_does_not_publish_has_no_boot_image(tmp_path):
    assert debian_boot_image("4.18.0-477.el8.x86_64", tmp_path, tmp_path) is None


FAKE = Consumer("2.3.0", "2.x", Path("/nonexistent/scap-open"))


def test_the_initramfs_is_a_newc_archive_the_guest_can_use(tmp_path):
    if not vmtest.BUSYBOX.is_file():
        pytest.skip("busybox-static is not installed")
    binary = tmp_path / "scap-open"
    binary.write_bytes(b"consumer")
    consumer = dataclasses.replace(FAKE, path=binary)
    drivers = [
        ("mod", b"\x7fELF module bytes", vmtest.consumer_command(consumer, "mod", 1, 5)),
        ("bpf", b"\x7fELF probe bytes", vmtest.consumer_command(consumer, "bpf", 2, 5)),
    ]
    archive = gzip.decompress(vmtest.initramfs(drivers, [consumer]))
    listing = (
        subprocess.run(
            [str(vmtest.BUSYBOX), "cpio", "-t"], input=archive, capture_output=True, check=True
        )
        .stdout.decode()
        .split()
    )
    assert listing == [
        "bin", "dev", "drivers", "proc", "sys", "tmp",
        "bin/busybox", "init", "bin/scap-open-2.3.0", "drivers/1.ko", "drivers/2.o",
    ]  # fmt: skip
    (tmp_path / "x").mkdir()
    subprocess.run(
        [str(vmtest.BUSYBOX), "cpio", "-i", "-d"], input=archive, cwd=tmp_path / "x", check=True
    )
    assert (tmp_path / "x/drivers/1.ko").read_bytes() == b"\x7fELF module bytes"
    init = (tmp_path / "x/init").read_text()
    opens = f"{consumer.recipe.open_s + vmtest.CAPTURE_TIMEOUT_S} '{consumer.recipe.summary}'"
    assert (
        f'test_module 1 collector "" {opens} /bin/scap-open-2.3.0 --kmod --num_events 5\n' in init
    )
    assert f"capture {opens} /bin/scap-open-2.3.0 --bpf /drivers/2.o --num_events 5\n" in init
    assert (tmp_path / "x/init").stat().st_mode & 0o111


BOOTED = "VMTEST:BOOTED 6.1.0-56-amd64\n"
CAPTURED = "VMTEST:OUT Events correctly captured (SCAP_SUCCESS): {}\n"
MOD_OK = "VMTEST:LOADED\nVMTEST:CONSUMER_EXIT 0\n" + CAPTURED.format(1000) + "VMTEST:UNLOADED\n"
MMAP_3 = (
    "VMTEST:CONSUMER_EXIT 1\nVMTEST:OUT mmap (3): Cannot allocate memory. (If you get memory "
    "allocation errors try to reduce the buffer dimension) (1)\nVMTEST:OUT [SCAP-OPEN]: Hello!\n"
)
VERIFIER = (
    "VMTEST:CONSUMER_EXIT 1\nVMTEST:OUT -- BEGIN PROG LOAD LOG --\nVMTEST:OUT 0: (85) call\n"
    "VMTEST:OUT R1 invalid mem access 'scalar'\nVMTEST:OUT processed 9 insns\n"
    "VMTEST:OUT -- END PROG LOAD LOG --\nVMTEST:OUT libscap: bpf_load_program() err=13\n"
)


def blocks(*bodies: str) -> str:
    return BOOTED + "".join(
        f"VMTEST:BEGIN {i}\n{body}VMTEST:END {i}\n" for i, body in enumerate(bodies, 1)
    )


@pytest.mark.parametrize(
    ("serial", "timed_out", "statuses", "message"),
    [
        ("garbage\n", True, ["boot_failed", "boot_failed"], "no BOOTED marker"),
        ("VMTEST:BOOTED 6.1.0-47-amd64\n", False, ["boot_failed"] * 2, "not '6.1.0-56-amd64'"),
        (
            blocks(
                "VMTEST:LOAD_FAILED insmod: bad\nVMTEST:KMSG [1.0] collector: Unknown symbol x\n"
            ),
            False,
            ["load_failed", "boot_failed"],
            "collector: Unknown symbol x",
        ),
        (
            blocks(MOD_OK, "VMTEST:CONSUMER_EXIT 0\n" + CAPTURED.format(2000)),
            False,
            ["loaded", "loaded"],
            None,
        ),
        (
            blocks(
                "VMTEST:LOADED\nVMTEST:CONSUMER_EXIT 0\n"
                + CAPTURED.format(0)
                + "VMTEST:UNLOADED\n",
                "VMTEST:CONSUMER_EXIT 0\n" + CAPTURED.format(12),
            ),
            False,
            ["too_few_events", "too_few_events"],
            "captured 12 of the 1000 events asked for",
        ),
        (
            blocks(
                "VMTEST:LOADED\nVMTEST:CONSUMER_EXIT 1\nVMTEST:OUT error opening device "
                "/dev/collector0\nVMTEST:UNLOADED\n",
                MMAP_3,
            ),
            False,
            ["consumer_cannot_attach", "consumer_cannot_attach"],
            "perf/core: Prevent VMA split of buffer mappings",
        ),
        (
            blocks(MOD_OK, VERIFIER),
            False,
            ["loaded", "verifier_rejected"],
            "verifier: R1 invalid mem access 'scalar'",
        ),
        (
            blocks(MOD_OK, "VMTEST:CONSUMER_EXIT 1\nVMTEST:OUT missing api_version section\n"),
            False,
            ["loaded", "load_failed"],
            "not a loadable probe: missing api_version section",
        ),
        (
            "\x1b[0m." + blocks("VMTEST:LOADED\nVMTEST:CONSUMER_EXIT 0\n" + CAPTURED.format(5000)),
            False,
            ["load_failed", "boot_failed"],
            "captured its events but could not be unloaded",
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
    results = vmtest.judge([MOD, BPF], serial, 1.0, {"2.3.0": FAKE}, EVENTS, timed_out)
    assert [r.status for r in results] == statuses
    if message is None:
        assert all(r.events and r.events >= EVENTS and not r.messages for r in results)
    else:
        assert any(message in m for r in results for m in r.messages), results


@pytest.mark.parametrize(
    ("generation", "output", "events"),
    [
        ("2.x", "events captured: 17\nseen by driver: 20", 17),  # 2.2.0
        ("2.x", "Events correctly captured (SCAP_SUCCESS): 2000\nSeen by driver: 2100", 2000),
        ("8.x", "Number of `SCAP_SUCCESS` (events correctly captured): 1000", 1000),
        ("2.x", "mmap (3): Cannot allocate memory", None),
    ],
)
def test_each_generations_consumer_output_gives_its_events(generation, output, events):
    consumer = dataclasses.replace(FAKE, generation=generation)
    assert consumer_mod.captured_events(consumer, output) == events


# 8.1.0's scap-open, as the guest carried it: its captured line comes before its stats'
# per-syscall lines, so the output's tail may have lost it; the summary keeps it.
SYSCALLS = "".join(f"VMTEST:OUT - [sc{i}__enter]: 1\n" for i in range(vmtest.OUTPUT_LINES))
STARTED_8X = "VMTEST:SUMMARY * Live capture in progress...\n"
CAPTURED_8X = "VMTEST:SUMMARY Number of `SCAP_SUCCESS` (events correctly captured): {}\n"
MOD_8X = DriverKey("6.1.0-56-amd64", "8.1.0", "mod")
BPF_8X = DriverKey("6.1.0-56-amd64", "8.1.0", "bpf")


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (STARTED_8X + CAPTURED_8X.format(1000) + SYSCALLS, "loaded", None),
        (STARTED_8X + CAPTURED_8X.format(148) + SYSCALLS, "too_few_events", "captured 148"),
        (CAPTURED_8X.format(0), "consumer_cannot_attach", "still opening the driver"),
    ],
)
def test_the_guests_summary_gives_the_events_whatever_the_output_tail(body, status, message):
    consumer = dataclasses.replace(FAKE, driver_version="8.1.0", generation="8.x")
    serial = blocks(f"VMTEST:LOADED\nVMTEST:CONSUMER_EXIT 0\n{body}VMTEST:UNLOADED\n", body)
    results = vmtest.judge([MOD_8X, BPF_8X], serial, 1.0, {"8.1.0": consumer}, EVENTS)
    assert [r.status for r in results] == [status] * 2, results
    if message is None:
        assert all(r.events == 1000 and not r.messages for r in results)
    else:
        assert all(any(message in m for m in r.messages) for r in results), results


@pytest.mark.parametrize("generation", sorted(consumer_mod.RECIPES))
def test_the_summary_pattern_is_the_same_for_the_guests_grep(generation, tmp_path):
    recipe = consumer_mod.RECIPES[generation]
    output = tmp_path / "out"
    output.write_text(
        "* Live capture in progress...\nEvents correctly captured (SCAP_SUCCESS): 7\n"
        "Number of `SCAP_SUCCESS` (events correctly captured): 7\n- [read__enter]: 3\n"
    )
    grep = subprocess.run(
        [str(vmtest.BUSYBOX), "grep", "-E", recipe.summary, str(output)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert grep == [
        line for line in output.read_text().splitlines() if re.match(recipe.summary, line)
    ]
    assert grep[0] == "* Live capture in progress..." and len(grep) == 2


def test_a_generation_without_a_consumer_is_refused_saying_why(tmp_path):
    (tmp_path / "build.json").write_text(
        json.dumps({"driver_version": "1.0.0", "generation": "1.x"})
    )
    with pytest.raises(ConsumerError, match="1.0.0: generation 1.x's scap-open cannot be run"):
        consumer_mod.read_prepared(tmp_path)
    (tmp_path / "build.json").write_text(json.dumps({"generation": "3.x"}))
    with pytest.raises(ConsumerError, match="generation '3.x' is not one of"):
        consumer_mod.read_prepared(tmp_path)


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
    """The example (toy) module, changed to call crc8(): modpost gives it depends=crc8."""
    tmp = tmp_path_factory.mktemp("crc8")
    sources = tmp / "2.3.0"
    shutil.copytree(EXAMPLE_SOURCES / "2.3.0", sources)
    module = sources / "module" / "collector.c"
    module.write_text(module.read_text() + USES_CRC8)
    data = build_example_driver(KERNEL, tmp, "mod", sources)
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
    store, needs_crc8, real, consumer, boot_image, tmp_path
):
    images = store()
    published = publish_boot_image(images, KERNEL, CACHE / "debs", tmp_path / "a", ["crc8"])
    assert published == "created"
    assert sorted(i.name for i in images.list()) == [
        f"{KERNEL}/modules/lib/crc8.ko",
        f"{KERNEL}/vmlinuz",
    ]
    image = fetch_boot_image(images, KERNEL, tmp_path / "b")
    consumers = {"2.3.0": consumer}
    # The toy module loads (crc8 first) but has no device for the consumer to open.
    toy, loaded = vmtest.vm_test(KERNEL, [(MOD, needs_crc8), (MOD, real["mod"])], image, consumers)
    assert toy.status == "consumer_cannot_attach", toy
    assert loaded.status == "loaded", loaded

    bare = tmp_path / "bare" / "vmlinuz"  # the same kernel without its modules: no boot
    bare.parent.mkdir()
    shutil.copy(boot_image, bare)
    [untested] = vmtest.vm_test(KERNEL, [(MOD, needs_crc8)], bare, consumers)
    assert untested.status == "not_tested" and "needs module(s) crc8" in untested.messages[0]


# --- the integration_tests stage of upstream_drivers ----------------------------------------

EL8 = "4.18.0-477.el8.x86_64"  # no Debian kernel image: untested, published


@pytest.fixture
def stage(store, boot_image, real, consumer, sources_bucket, tmp_path):
    """A run's staged, verified drivers: the real ones, a module built for another kernel,
    a file that is no probe, one without a boot image, an eBPF-unavailable marker, and a
    version without prepared sources (so without a consumer)."""

    work, images, cache = store(), store(), store()
    buckets = dataclasses.replace(
        layout.Buckets.from_env(),
        work=work.bucket_name,
        kernel_images=images.bucket_name,
        drivers=cache.bucket_name,
        sources=sources_bucket.bucket_name,
    )
    stores = Stores(work.client, buckets)
    images.upload_new_file(layout.boot_image_object(KERNEL), boot_image)
    staged = {
        f"2.3.0/collector-{KERNEL}.ko.gz": real["mod"],
        f"2.3.0/collector-ebpf-{KERNEL}.o.gz": real["bpf"],
        f"2.3.0/collector-{EL8}.ko.gz": real["mod"],
        "2.3.0/.collector-ebpf-3.10.0-957.el7.x86_64.unavail": b"",
        f"2.4.0-rc1/collector-{KERNEL}.ko.gz": build_example_driver(OTHER, tmp_path),
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


VM = {"parallel": 2, "kvm": False, "memory_mb": 512, "events": EVENTS}


@needs_qemu
def test_enforce_publishes_only_what_captured_in_its_kernel_or_is_marked_untested(stage):
    """The real module and probe, both captured through the real consumer in one boot."""
    from drivers.flows import upstream

    stores, run = stage
    run_id = run("r-enforce")
    summary = upstream.integration_tests(stores, run_id, params(), VM)
    assert summary["statuses"] == {"loaded": 2, "no_boot_image": 1, "not_tested": 1}
    assert (summary["kernels"], summary["refused"], summary["held_back"]) == (2, 0, 0)
    results = vm_report(stores, run_id)
    assert [
        results[f"2.3.0/collector{k}-{KERNEL}{e}"]["events"]
        for k, e in (("", ".ko.gz"), ("-ebpf", ".o.gz"))
    ] >= [EVENTS] * 2
    untested = results[f"2.4.0-rc1/collector-{KERNEL}.ko.gz"]
    assert untested["messages"][0].startswith("no consumer for 2.4.0-rc1: gs://")
    assert results[f"2.3.0/collector-{EL8}.ko.gz"]["status"] == "no_boot_image"

    pushed = upstream.push_drivers(stores, run_id)
    assert pushed["created"] == 5  # untested ones are published, named why
    steps = {"unify": {"compile_failures": 0}, "integration_tests": summary, "push_drivers": pushed}
    assert upstream.report(stores, run_id, params(), steps, [])["status"] == "success"


@needs_qemu
def test_enforce_holds_back_what_its_kernel_refuses_and_warn_publishes_it(stage, consumer):
    from drivers.flows import upstream

    stores, run = stage
    # 2.4.0-rc1 given 2.3.0's prepared sources, and its consumer already cached beside them:
    # the consumer attaches, the module (built for another kernel) is refused.
    with tempfile.TemporaryDirectory() as tmp:
        archive = stores.sources.download_to(layout.source_object("2.3.0"), Path(tmp) / "s.tgz")
        stores.sources.upload_new_file(layout.source_object("2.4.0-rc1"), archive)
    recipe = consumer_mod.recipe_id("2.4.0-rc1")
    name = layout.consumer_object("2.4.0-rc1", recipe, consumer_mod.ARCH)
    stores.sources.upload_new_file(name, consumer.path)
    run_id = run("r-refused")
    summary = upstream.integration_tests(stores, run_id, params(), VM)
    assert (summary["refused"], summary["held_back"]) == (1, 1), summary
    refused = vm_report(stores, run_id)[f"2.4.0-rc1/collector-{KERNEL}.ko.gz"]
    assert refused["status"] == "load_failed"
    assert any("disagrees about version of symbol" in m for m in refused["messages"])
    steps = {"unify": {"compile_failures": 0}, "integration_tests": summary}
    verdict = upstream.report(stores, run_id, params(), steps, [])
    assert verdict["status"] == "failed"
    assert verdict["reasons"] == [
        "0 compile failure(s) + 1 driver(s) their kernel refused (not published) > max_failures=0"
    ]
    warned = upstream.integration_tests(stores, run("r-warn"), params(vm_tests="warn"), VM)
    assert (warned["refused"], warned["held_back"]) == (1, 0)


def test_off_spent_budget_and_no_new_drivers_boot_no_vm(stage, monkeypatch):
    from drivers.flows import upstream

    def no_vm(*args, **kwargs):
        raise AssertionError("no VM may boot here")

    monkeypatch.setattr(vmtest, "vm_test", no_vm)
    stores, run = stage
    off = upstream.integration_tests(stores, run("r-off"), params(vm_tests="off"), VM)
    assert off["statuses"] == {"not_tested": 4} and off["held_back"] == 0
    spent = upstream.integration_tests(stores, run("r-spent"), params(vm_tests_budget_s=0), VM)
    assert spent["statuses"] == {"not_tested": 4} and spent["held_back"] == 0
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
    builds = {build_example_driver(kernel, tmp_path / str(i)) for i in range(5)}
    assert len(builds) == 1
