"""Support packages: the zip, the change check, index and matrix, publishing on the emulator."""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import subprocess
import tracemalloc
import zipfile
from datetime import UTC, datetime, timedelta, timezone

import pytest

from drivers.build import packages
from drivers.build.packages import (
    LICENSE_TEXT,
    DriverSource,
    IndexEntry,
    PackageConflict,
    ZipInfo,
    build_zip,
    driver_matrix,
    needs_rebuild,
    publish_support_packages,
    render_index,
    set_digest,
    sha256_line,
)

V = "2.3.0"
DRIVERS = {
    f"{V}/collector-5.4.0-62-generic.ko.gz": b"\x1f\x8b mod 5.4" * 50,
    f"{V}/collector-ebpf-5.4.0-62-generic.o.gz": b"\x1f\x8b bpf 5.4" * 40,
    f"{V}/collector-3.10.0-1160.80.1.el7.x86_64.ko.gz": b"\x1f\x8b mod el7" * 30,
    f"{V}/.collector-ebpf-3.10.0-1160.80.1.el7.x86_64.unavail": b"",
}
T1 = datetime(2022, 12, 1, 10, 0, 0, tzinfo=UTC)
T2 = T1 + timedelta(days=1)
T3 = T1 + timedelta(days=2)


def zip_bytes(drivers, license_text: str = LICENSE_TEXT) -> tuple[bytes, ZipInfo]:
    out = io.BytesIO()
    info = build_zip(V, drivers, out, license_text)
    return out.getvalue(), info


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the zip ---------------------------------------------------------------------------


def test_same_driver_set_gives_byte_identical_zips_whatever_the_order_or_source(tmp_path):
    items = list(DRIVERS.items())
    first, info = zip_bytes(items)
    shuffled = items[:]
    random.Random(7).shuffle(shuffled)
    as_files = []
    for name, data in shuffled:  # files instead of bytes, bare basenames instead of names
        path = tmp_path / name.rpartition("/")[2]
        path.write_bytes(data)
        as_files.append((path.name, path))
    again, info_again = zip_bytes(as_files)
    to_path = tmp_path / "package.zip"
    on_disk = build_zip(V, reversed(items), to_path)

    assert again == first and to_path.read_bytes() == first
    assert info == info_again == on_disk == ZipInfo(sha256(first), len(first), len(DRIVERS))


def test_zip_is_written_front_to_back_to_a_stream_that_cannot_seek():
    class Pipe:  # e.g. a pipe or a streaming upload: write() only
        def __init__(self) -> None:
            self.chunks: list[bytes] = []

        def write(self, data: bytes) -> int:
            self.chunks.append(bytes(data))
            return len(data)

    pipe = Pipe()
    info = build_zip(V, DRIVERS.items(), pipe)
    expected, expected_info = zip_bytes(DRIVERS.items())
    assert b"".join(pipe.chunks) == expected and info == expected_info


def test_zip_holds_every_driver_as_stored_plus_license_with_fixed_attributes():
    data, _ = zip_bytes(DRIVERS.items(), license_text="the license\n")
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.testzip() is None
        names = z.namelist()
        assert names == sorted(
            [f"kernel-modules/{name}" for name in DRIVERS] + [f"kernel-modules/{V}/LICENSE"]
        )
        for name, content in DRIVERS.items():
            assert z.read(f"kernel-modules/{name}") == content
        assert z.read(f"kernel-modules/{V}/LICENSE") == b"the license\n"
        for info in z.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            assert info.date_time == (1980, 1, 1, 0, 0, 0)
            assert info.external_attr >> 16 == 0o100644
            assert info.flag_bits & 0x08 == 0  # no data descriptors: sizes in the headers


def test_license_text_names_both_licenses():
    assert "GPL-2.0-only" in LICENSE_TEXT and "BSD-2-Clause OR GPL-2.0-only" in LICENSE_TEXT


def test_unzip_accepts_the_package(tmp_path):
    if shutil.which("unzip") is None:
        pytest.skip("unzip is not installed")
    path = tmp_path / "p.zip"
    build_zip(V, DRIVERS.items(), path)
    listing = subprocess.run(
        ["unzip", "-t", str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert "No errors detected" in listing
    assert listing.count("OK") == len(DRIVERS) + 1


def test_zip64_records_are_written_past_the_limits(tmp_path, monkeypatch):
    # Lowered limits exercise the ZIP64 end records and header-offset extra fields that
    # packages over 4 GiB or 65,535 entries need.
    monkeypatch.setattr(packages, "_ZIP64_LIMIT", 600)
    monkeypatch.setattr(packages, "_ZIP_MAX_ENTRIES", 3)
    path = tmp_path / "big.zip"
    build_zip(V, DRIVERS.items(), path)
    raw = path.read_bytes()
    assert b"PK\x06\x06" in raw and b"PK\x06\x07" in raw  # ZIP64 end record and locator
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        for name, content in DRIVERS.items():
            assert z.read(f"kernel-modules/{name}") == content
    if shutil.which("unzip"):
        subprocess.run(["unzip", "-tq", str(path)], check=True, capture_output=True)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("2.2.0/collector-5.4.0-62-generic.ko.gz", "not of driver version 2.3.0"),
        ("2.3.0/LICENSE", "not a driver object name"),
        ("2.3.0/collector-5.4.0-62-generic.ko", "not a driver object name"),
    ],
)
def test_build_zip_refuses_names_that_are_not_drivers_of_the_version(name, message):
    with pytest.raises(ValueError, match=message):
        zip_bytes([(name, b"x")])


def test_build_zip_refuses_a_driver_given_twice():
    name = f"{V}/collector-5.4.0-62-generic.ko.gz"
    with pytest.raises(ValueError, match="given twice"):
        zip_bytes([(name, b"a"), (name.rpartition("/")[2], b"b")])


def test_failed_build_leaves_no_partial_file(tmp_path):
    path = tmp_path / "p.zip"
    missing = tmp_path / "collector-5.4.0-1-generic.ko.gz"
    with pytest.raises(FileNotFoundError):
        build_zip(V, [*DRIVERS.items(), (missing.name, missing)], path)
    assert not path.exists()


def test_build_zip_streams_one_driver_at_a_time(tmp_path):
    size, count = 100_000, 200  # 20 MB of drivers
    files = []
    for i in range(count):
        path = tmp_path / f"collector-5.4.0-{i}-generic.ko.gz"
        path.write_bytes(bytes([i % 256]) * size)
        files.append((path.name, path))
    tracemalloc.start()
    try:
        build_zip(V, files, tmp_path / "p.zip")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * size  # read-ahead of a few drivers, not all 200


def test_sha256_line_is_what_sha256sum_checks(tmp_path):
    path = tmp_path / "support-pkg-2.3.0-20221201100000.zip"
    info = build_zip(V, DRIVERS.items(), path)
    line = sha256_line(info.sha256, path.name)
    assert line == f"{sha256(path.read_bytes())}  {path.name}\n"
    (tmp_path / f"{path.name}.sha256").write_text(line)
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "-c", f"{path.name}.sha256"], cwd=tmp_path, check=True)


# --- has the set changed? --------------------------------------------------------------


def test_set_digest_depends_on_names_and_checksums_not_order():
    pairs = [("collector-a.ko.gz", "md5:1"), ("collector-b.ko.gz", "md5:2")]
    digest = set_digest(pairs)
    assert set_digest(reversed(pairs)) == digest
    assert set_digest([(f"{V}/{n}", c) for n, c in pairs]) == digest  # prefix-independent
    assert set_digest([pairs[0], ("collector-b.ko.gz", "md5:3")]) != digest
    assert set_digest(pairs[:1]) != digest
    assert set_digest([*pairs, ("collector-c.ko.gz", "md5:2")]) != digest


def test_needs_rebuild_only_when_set_license_or_format_changed():
    meta = {"format": packages.PACKAGE_FORMAT, "driver_set_digest": "d", "license_sha256": "l"}
    assert needs_rebuild(None, "d")
    assert not needs_rebuild(meta, "d")
    assert not needs_rebuild(meta, "d", license_sha256="l")
    assert needs_rebuild(meta, "other")
    assert needs_rebuild(meta, "d", license_sha256="new license")
    assert needs_rebuild({**meta, "format": packages.PACKAGE_FORMAT - 1}, "d")


# --- index and matrix ------------------------------------------------------------------


def test_index_escapes_names_and_lists_newest_version_first():
    entries = [
        IndexEntry("2.2.0", "support-pkg-2.2.0-20221101.zip", 2048, "aa" * 32, "20221101000000"),
        IndexEntry(
            "2.3.0-rc1", 'p<script>alert("x")</script>&.zip', 5, "bb" * 32, "20221201100000"
        ),
        IndexEntry("2.3.0", "support-pkg-2.3.0-20221202.zip", 3 << 20, "cc" * 32, "20221202000000"),
    ]
    page = render_index(entries, title="<root> & co")

    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "&amp;.zip</a>" in page
    assert 'href="2.3.0-rc1/p%3Cscript%3Ealert%28%22x%22%29%3C/script%3E%26.zip"' in page
    assert "<title>&lt;root&gt; &amp; co</title>" in page
    assert page.index(">2.3.0<") < page.index(">2.3.0-rc1<") < page.index(">2.2.0<")
    assert "3.0 MiB" in page and "cc" * 32 in page and "2022-12-02 00:00:00 UTC" in page
    assert 'href="2.3.0/support-pkg-2.3.0-latest.zip"' in page


def test_matrix_statuses_upstream_downstream_unavailable():
    upstream = [
        "2.3.0/collector-5.4.0-62-generic.ko.gz",
        "2.3.0/collector-ebpf-5.4.0-62-generic.o.gz",
        "2.3.0/collector-3.10.0-957.el7.x86_64.ko.gz",
        "2.3.0/.collector-ebpf-3.10.0-957.el7.x86_64.unavail",
        "2.2.0/collector-ebpf-5.4.0-62-generic.o.gz",
        "2.2.0/.collector-ebpf-5.4.0-62-generic.unavail",  # a built probe beats the marker
        "2.3.0/notes.txt",
    ]
    downstream = [
        "2.3.0/collector-ebpf-5.4.0-62-generic.o.gz",
        "2.3.0/collector-4.18.0-305.el8.x86_64.ko.gz",
    ]
    assert driver_matrix(upstream, downstream) == {
        "3.10.0-957.el7.x86_64": {"2.3.0": {"kmod": "upstream", "ebpf": "unavailable"}},
        "4.18.0-305.el8.x86_64": {"2.3.0": {"kmod": "downstream"}},
        "5.4.0-62-generic": {
            "2.2.0": {"ebpf": "upstream"},
            "2.3.0": {"kmod": "upstream", "ebpf": "downstream"},
        },
    }
    only_downstream = driver_matrix(downstream=downstream)
    assert only_downstream["5.4.0-62-generic"] == {"2.3.0": {"ebpf": "downstream"}}


def test_matrix_orders_kernels_by_version():
    names = [f"2.3.0/collector-5.4.0-{n}-generic.ko.gz" for n in (100, 9, 62)]
    assert list(driver_matrix(names)) == [f"5.4.0-{n}-generic" for n in (9, 62, 100)]


# --- publishing on the emulator ----------------------------------------------------------


def fill(store, objects: dict[str, bytes], prefix: str = "") -> None:
    store.upload_many((prefix + name, data) for name, data in objects.items())


def listing(store) -> dict[str, int]:
    return {o.name: o.generation for o in store.list()}


def read_zip(store, name: str) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(store.download(name))) as z:
        return {n: z.read(n) for n in z.namelist()}


OLD = {
    "2.2.0/collector-5.4.0-62-generic.ko.gz": b"\x1f\x8b old mod",
    "2.2.0/.collector-ebpf-5.4.0-62-generic.unavail": b"",
}


def test_publish_builds_package_checksum_pointers_index_and_matrix(store, tmp_path):
    cache, support = store(), store()
    fill(cache, {**DRIVERS, **OLD, "2.3.0/build.log": b"not a driver"})

    report = publish_support_packages(
        [DriverSource(cache)], support, [V, "2.2.0"], timestamp=T1, work_dir=tmp_path
    )

    zip_name = "support-pkg-2.3.0-20221201100000.zip"
    assert set(listing(support)) == {
        f"{V}/{zip_name}",
        f"{V}/{zip_name}.sha256",
        f"{V}/latest",
        f"{V}/support-pkg-2.3.0-latest.zip",
        f"{V}/support-pkg-2.3.0-latest.zip.sha256",
        f"{V}/metadata.json",
        *(n.replace("2.3.0", "2.2.0") for n in (
            f"{V}/support-pkg-2.3.0-20221201100000.zip",
            f"{V}/support-pkg-2.3.0-20221201100000.zip.sha256",
            f"{V}/latest",
            f"{V}/support-pkg-2.3.0-latest.zip",
            f"{V}/support-pkg-2.3.0-latest.zip.sha256",
            f"{V}/metadata.json",
        )),
        "index.html",
        "driver-matrix.json",
    }  # fmt: skip
    package = support.download(f"{V}/{zip_name}")
    expected, _ = zip_bytes(DRIVERS.items())
    assert package == expected  # the same bytes as the pure builder gives
    assert read_zip(support, f"{V}/{zip_name}") == {
        **{f"kernel-modules/{n}": d for n, d in DRIVERS.items()},
        f"kernel-modules/{V}/LICENSE": LICENSE_TEXT.encode(),
    }
    digest = sha256(package)
    assert support.download(f"{V}/{zip_name}.sha256") == f"{digest}  {zip_name}\n".encode()
    assert support.download(f"{V}/latest") == f"{zip_name}\n".encode()
    assert support.download(f"{V}/support-pkg-2.3.0-latest.zip") == package
    assert support.download(f"{V}/support-pkg-2.3.0-latest.zip.sha256") == (
        f"{digest}  support-pkg-2.3.0-latest.zip\n".encode()
    )
    assert support.info(f"{V}/support-pkg-2.3.0-latest.zip").size == len(package)
    bucket = support.client.bucket(support.bucket_name)
    for pointer in ("latest", "support-pkg-2.3.0-latest.zip", "metadata.json"):
        assert bucket.get_blob(f"{V}/{pointer}").cache_control == "no-cache, max-age=0"
    assert bucket.get_blob("index.html").content_type == "text/html"
    assert bucket.get_blob(f"{V}/{zip_name}").cache_control is None  # immutable: cacheable

    meta = json.loads(support.download(f"{V}/metadata.json"))
    assert meta["driver_version"] == V and meta["timestamp"] == "20221201100000"
    assert meta["package"] == zip_name and meta["sha256"] == digest
    assert meta["size"] == len(package)
    assert meta["drivers"] == {"mod": 2, "bpf": 1, "bpf_unavailable": 1, "downstream": 0}
    assert meta["license_sha256"] == sha256(LICENSE_TEXT.encode())
    assert len(meta["driver_set_digest"]) == 64

    index = support.download("index.html").decode()
    assert f'href="{V}/{zip_name}"' in index and digest in index
    assert 'href="2.2.0/support-pkg-2.2.0-20221201100000.zip"' in index
    assert "2022-12-01 10:00:00 UTC" in index

    matrix = json.loads(support.download("driver-matrix.json"))
    assert matrix["3.10.0-1160.80.1.el7.x86_64"] == {V: {"kmod": "upstream", "ebpf": "unavailable"}}
    assert matrix["5.4.0-62-generic"] == {
        "2.2.0": {"kmod": "upstream", "ebpf": "unavailable"},
        V: {"kmod": "upstream", "ebpf": "upstream"},
    }

    assert report["built"] == 2 and report["unchanged"] == 0
    assert report["versions"][V] == {
        "status": "built",
        "package": zip_name,
        "sha256": digest,
        "size": len(package),
        "drivers": meta["drivers"],
    }
    json.dumps(report)  # XCom-able
    assert list(tmp_path.iterdir()) == []  # the temp folder is gone


def test_unchanged_driver_set_is_not_rebuilt(store):
    cache, support = store(), store()
    fill(cache, {**DRIVERS, **OLD})
    publish_support_packages([DriverSource(cache)], support, [V, "2.2.0"], timestamp=T1)
    before = listing(support)

    report = publish_support_packages([DriverSource(cache)], support, [V, "2.2.0"], timestamp=T2)

    assert report["built"] == 0 and report["unchanged"] == 2
    assert report["versions"][V]["status"] == "unchanged"
    assert report["versions"][V]["package"] == "support-pkg-2.3.0-20221201100000.zip"
    after = listing(support)
    assert set(after) == set(before)  # no new package
    for name in before:  # only the index and the matrix were rewritten
        assert (after[name] == before[name]) == (name not in ("index.html", "driver-matrix.json"))


def test_changed_driver_set_gets_a_new_package_and_pointers_old_one_kept(store):
    cache, support = store(), store()
    fill(cache, {**DRIVERS, **OLD})
    publish_support_packages([DriverSource(cache)], support, [V, "2.2.0"], timestamp=T1)
    old_zip = f"{V}/support-pkg-2.3.0-20221201100000.zip"
    before = listing(support)
    new_driver = {f"{V}/collector-6.0.0-1-generic.ko.gz": b"\x1f\x8b new"}
    fill(cache, new_driver)

    report = publish_support_packages([DriverSource(cache)], support, [V, "2.2.0"], timestamp=T3)

    assert report["versions"][V]["status"] == "built"
    assert report["versions"]["2.2.0"]["status"] == "unchanged"
    new_zip = "support-pkg-2.3.0-20221203100000.zip"
    after = listing(support)
    assert after[old_zip] == before[old_zip] and after[old_zip + ".sha256"]  # kept, untouched
    package = support.download(f"{V}/{new_zip}")
    assert f"kernel-modules/{V}/collector-6.0.0-1-generic.ko.gz" in read_zip(
        support, f"{V}/{new_zip}"
    )
    assert support.download(f"{V}/latest") == f"{new_zip}\n".encode()
    assert support.download(f"{V}/support-pkg-2.3.0-latest.zip") == package
    assert support.download(f"{V}/support-pkg-2.3.0-latest.zip.sha256").startswith(
        sha256(package).encode()
    )
    meta = json.loads(support.download(f"{V}/metadata.json"))
    assert meta["package"] == new_zip and meta["drivers"]["mod"] == 3
    index = support.download("index.html").decode()
    assert new_zip in index and "20221201100000" not in index.split("2.2.0")[0]
    # 2.2.0 untouched
    old_version = {name: g for name, g in before.items() if name.startswith("2.2.0/")}
    assert old_version and {name: after[name] for name in old_version} == old_version


def test_cpaas_root_packages_upstream_and_downstream_with_downstream_winning(store):
    cache, cpaas_cache, support = store(), store(), store()
    fill(cache, DRIVERS)
    prefix = "cpaas/x86_64/"
    downstream = {
        f"{V}/collector-5.4.0-62-generic.ko.gz": b"\x1f\x8b rebuilt downstream",
        f"{V}/collector-4.18.0-305.el8.x86_64.ko.gz": b"\x1f\x8b el8 downstream",
    }
    fill(cpaas_cache, downstream, prefix=prefix)
    publish_support_packages([DriverSource(cache)], support, [V], timestamp=T1)  # the upstream root

    # the order of the sources does not matter: downstream wins
    sources = [DriverSource(cpaas_cache, prefix, "downstream"), DriverSource(cache)]
    report = publish_support_packages(sources, support, [V], timestamp=T2, root=prefix)

    zip_name = f"{prefix}{V}/support-pkg-2.3.0-20221202100000.zip"
    contents = read_zip(support, zip_name)
    assert contents[f"kernel-modules/{V}/collector-5.4.0-62-generic.ko.gz"] == (
        b"\x1f\x8b rebuilt downstream"
    )
    assert contents[f"kernel-modules/{V}/collector-4.18.0-305.el8.x86_64.ko.gz"] == (
        b"\x1f\x8b el8 downstream"
    )
    assert len(contents) == len(DRIVERS) + 1 + 1  # + el8 + LICENSE
    assert report["versions"][V]["drivers"]["downstream"] == 2
    matrix = json.loads(support.download(f"{prefix}driver-matrix.json"))
    assert matrix["5.4.0-62-generic"] == {V: {"kmod": "downstream", "ebpf": "upstream"}}
    assert matrix["4.18.0-305.el8.x86_64"] == {V: {"kmod": "downstream"}}
    assert matrix["3.10.0-1160.80.1.el7.x86_64"] == {V: {"kmod": "upstream", "ebpf": "unavailable"}}

    cpaas_index = support.download(f"{prefix}index.html").decode()
    assert "support-pkg-2.3.0-20221202100000.zip" in cpaas_index
    assert "20221201100000" not in cpaas_index
    # the upstream root is untouched and its index does not see the cpaas/ subtree
    assert support.download(f"{V}/latest") == b"support-pkg-2.3.0-20221201100000.zip\n"
    publish_support_packages([DriverSource(cache)], support, [V], timestamp=T3)
    upstream_index = support.download("index.html").decode()
    assert "20221202100000" not in upstream_index and "cpaas" not in upstream_index


def test_single_downstream_set_is_labelled_downstream(store):
    cpaas_cache, support = store(), store()
    fill(cpaas_cache, DRIVERS, prefix="cpaas/s390x/")
    downstream = DriverSource(cpaas_cache, "cpaas/s390x/", "downstream")
    publish_support_packages([downstream], support, [V], timestamp=T1, root="cpaas/s390x/")
    matrix = json.loads(support.download("cpaas/s390x/driver-matrix.json"))
    assert matrix["5.4.0-62-generic"] == {V: {"kmod": "downstream", "ebpf": "downstream"}}
    meta = json.loads(support.download(f"cpaas/s390x/{V}/metadata.json"))
    assert meta["drivers"]["downstream"] == len(DRIVERS)


def test_retry_at_the_same_timestamp_accepts_its_own_package(store):
    cache, support = store(), store()
    fill(cache, DRIVERS)
    publish_support_packages([DriverSource(cache)], support, [V], timestamp=T1)
    # as if the first try died after the package, before its metadata
    support.client.bucket(support.bucket_name).blob(f"{V}/metadata.json").delete()

    report = publish_support_packages([DriverSource(cache)], support, [V], timestamp=T1)

    assert report["versions"][V]["status"] == "built"
    assert json.loads(support.download(f"{V}/metadata.json"))["timestamp"] == "20221201100000"


def test_other_bytes_under_the_same_package_name_are_a_conflict(store):
    cache, support = store(), store()
    fill(cache, DRIVERS)
    publish_support_packages([DriverSource(cache)], support, [V], timestamp=T1)
    fill(cache, {f"{V}/collector-6.0.0-1-generic.ko.gz": b"\x1f\x8b new"})

    # timestamps are UTC: 11:00 at +01:00 is the 10:00 UTC package name again
    same_instant = T1.astimezone(timezone(timedelta(hours=1)))
    with pytest.raises(PackageConflict, match="never replaced"):
        publish_support_packages([DriverSource(cache)], support, [V], timestamp=same_instant)
    assert support.download(f"{V}/latest") == b"support-pkg-2.3.0-20221201100000.zip\n"


def test_license_change_rebuilds(store):
    cache, support = store(), store()
    fill(cache, DRIVERS)
    publish_support_packages([DriverSource(cache)], support, [V], timestamp=T1)
    report = publish_support_packages(
        [DriverSource(cache)], support, [V], timestamp=T2, license_text="new\n"
    )
    assert report["versions"][V]["status"] == "built"
    contents = read_zip(support, f"{V}/support-pkg-2.3.0-20221202100000.zip")
    assert contents[f"kernel-modules/{V}/LICENSE"] == b"new\n"


def test_version_without_drivers_is_reported_not_published(store):
    cache, support = store(), store()
    fill(cache, DRIVERS)
    report = publish_support_packages([DriverSource(cache)], support, [V, "2.4.0"], timestamp=T1)
    assert report["versions"]["2.4.0"] == {"status": "no-drivers"}
    assert report["no_drivers"] == 1
    assert not any(n.startswith("2.4.0/") for n in listing(support))


def test_index_lists_packages_made_by_the_original_system(store):
    cache, support = store(), store()
    fill(cache, DRIVERS)
    legacy = "support-pkg-2.1.0-20220601080000.zip"
    fill(
        support,
        {
            f"2.1.0/{legacy}": b"PK legacy",
            f"2.1.0/{legacy}.sha256": f"{'ab' * 32}  {legacy}\n".encode(),
            "2.1.0/latest": f"{legacy}\n".encode(),
        },
    )
    publish_support_packages([DriverSource(cache)], support, [V], timestamp=T1)
    index = support.download("index.html").decode()
    assert f'href="2.1.0/{legacy}"' in index and "ab" * 32 in index
    assert "2022-06-01 08:00:00 UTC" in index


def test_bad_root_and_version_are_refused(store):
    cache, support = store(), store()
    with pytest.raises(ValueError, match="must be '' or end with one '/'"):
        publish_support_packages(
            [DriverSource(cache)], support, [V], timestamp=T1, root="cpaas/x86_64"
        )
    with pytest.raises(ValueError, match="neither semver"):
        publish_support_packages([DriverSource(cache)], support, ["latest"], timestamp=T1)
    with pytest.raises(ValueError, match="no driver source"):
        publish_support_packages([], support, [V], timestamp=T1)


def test_package_names_use_the_utc_timestamp():
    plus_one = timezone(timedelta(hours=1))
    assert packages.package_name(V, T1) == "support-pkg-2.3.0-20221201100000.zip"
    assert packages.package_name(V, T1.astimezone(plus_one)) == (
        "support-pkg-2.3.0-20221201100000.zip"
    )
    assert packages.latest_package_name(V) == "support-pkg-2.3.0-latest.zip"
