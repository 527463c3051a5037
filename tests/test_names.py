import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.domain.names import (
    CacheIndex,
    DriverKey,
    DriverVersionError,
    check_driver_version,
    check_kinds,
    parse_object_name,
)

SHA = "1123dde0458e72a49880b06922e135dbcd36fb784fed530ab84ddfa8924e5c05"


def test_object_names_follow_the_cache_layout():
    assert DriverKey("5.4.0-62-generic", "2.3.0", "mod").object_name() == (
        "2.3.0/collector-5.4.0-62-generic.ko.gz"
    )
    bpf = DriverKey("3.10.0-1160.80.1.el7.x86_64", "2.3.0-rc1", "bpf")
    assert bpf.object_name() == "2.3.0-rc1/collector-ebpf-3.10.0-1160.80.1.el7.x86_64.o.gz"
    assert bpf.unavail_name() == "2.3.0-rc1/.collector-ebpf-3.10.0-1160.80.1.el7.x86_64.unavail"


def test_kernel_modules_have_no_unavail_marker():
    with pytest.raises(ValueError, match="only eBPF"):
        DriverKey("5.4.0-62-generic", "2.3.0", "mod").unavail_name()


def test_parse_object_name_reads_all_three_shapes():
    mod = parse_object_name(f"{SHA}/collector-4.15.0-1001-gcp.ko.gz")
    assert mod == ((("4.15.0-1001-gcp", SHA, "mod")), False)
    assert parse_object_name("2.2.0/collector-ebpf-5.15.0-1020-gke~20.04.o.gz") == (
        ("5.15.0-1020-gke~20.04", "2.2.0", "bpf"),
        False,
    )
    marker = parse_object_name("2.2.0/.collector-ebpf-4.4.0-1-generic.unavail")
    assert marker.key == DriverKey("4.4.0-1-generic", "2.2.0", "bpf") and marker.unavailable


@pytest.mark.parametrize(
    "name",
    [
        "2.2.0/support-pkg.zip",
        "collector-5.4.0.ko.gz",
        "2.2.0/x/collector-5.4.0.ko.gz",
        "2.2.0/collector-.ko.gz",
        "index.html",
        "2.2.0/collector-5.4.0.ko",
    ],
)
def test_other_names_are_not_drivers(name):
    assert parse_object_name(name) is None


def test_cache_index_counts_unknown_names_without_failing():
    index = CacheIndex().add_names(
        [
            "2.2.0/collector-5.4.0-62-generic.ko.gz",
            "2.2.0/.collector-ebpf-3.10.0-514.el7.x86_64.unavail",
            "2.2.0/README",
            "stray.txt",
        ]
    )
    assert index.done == {
        DriverKey("5.4.0-62-generic", "2.2.0", "mod"),
        DriverKey("3.10.0-514.el7.x86_64", "2.2.0", "bpf"),
    }
    assert index.unavailable == 1
    assert index.unknown == {"2.2.0": 1, "(root)": 1}
    assert index.unknown_examples == ["2.2.0/README", "stray.txt"]


@pytest.mark.parametrize("version", ["2.3.0", "2.3.0-rc1", "10.20.30", SHA])
def test_accepted_driver_versions(version):
    assert check_driver_version(version) == version


@pytest.mark.parametrize("version", ["2.3", "v2.3.0", "2.3.0-beta", SHA[:-1], "", "2.3.0/x"])
def test_rejected_driver_versions_name_the_culprit(version):
    with pytest.raises(DriverVersionError, match="neither semver"):
        check_driver_version(version)


def test_kinds_are_validated_and_kept_in_canonical_order():
    assert check_kinds(["bpf", "mod"]) == ("mod", "bpf")
    with pytest.raises(ValueError, match="unknown kind"):
        check_kinds(["mod", "ko"])
    with pytest.raises(ValueError, match="no kind"):
        check_kinds([])


kernel_strings = st.from_regex(
    r"[0-9]\.[0-9]{1,2}\.[0-9]{1,3}(-[A-Za-z0-9._~+-]{1,30})?", fullmatch=True
)
versions = st.one_of(
    st.from_regex(r"[0-9]{1,2}\.[0-9]{1,2}\.[0-9]{1,2}(-rc[0-9])?", fullmatch=True),
    st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
)


@given(kernel_strings, versions, st.sampled_from(["mod", "bpf"]))
def test_object_names_round_trip(kernel, version, kind):
    key = DriverKey(kernel, version, kind)
    assert parse_object_name(key.object_name()) == (key, False)
    if kind == "bpf":
        assert parse_object_name(key.unavail_name()) == (key, True)
