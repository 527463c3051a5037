"""Kernel release parsing, families, ordering, kernel lists and eBPF support."""

from __future__ import annotations

import random
import re
from functools import cmp_to_key

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.domain.kernels import (
    FAMILIES,
    FAMILY_RULES,
    SERIES,
    KernelParseError,
    LineProblem,
    ebpf_supported,
    parse_kernel,
    read_kernel_list,
)

# --- parsing ---------------------------------------------------------------------------


def test_every_line_of_the_real_list_parses_into_its_own_xyz(real_lines):
    assert len(real_lines) == 5676
    for line in real_lines:
        kernel = parse_kernel(line)
        assert kernel.release == line
        x, y, z = re.match(r"(\d+)\.(\d+)\.(\d+)", line).groups()
        assert (kernel.major, kernel.minor, kernel.patch) == (int(x), int(y), int(z))


@pytest.mark.parametrize(
    ("release", "family", "flavour"),
    [
        ("2.6.32-754.el6.x86_64", "el6", ""),
        ("2.6.32-358.111.1.openstack.el6.x86_64", "el6", ""),
        ("3.10.0-1160.80.1.el7.x86_64", "el7", ""),
        ("4.18.0-305.10.2.el8_4.x86_64", "el8", ""),
        ("4.18.0-147.8.1.rt24.101.el8_1.x86_64", "el8", "rt"),
        ("4.18.0-193.24.1.rt13.74.el8_2.dt1.x86_64", "el8", "rt"),
        ("5.14.0-70.13.1.el9_0.x86_64", "el9", ""),
        ("4.14.35-1902.0.9.el7uek.x86_64", "el7uek", ""),
        ("5.4.0-1.el7uek.x86_64", "el7uek", ""),
        ("4.14.35-1910a.el7uek.x86_64", "el7uek", ""),
        ("4.4.102-1.el7.elrepo.x86_64", "elrepo", ""),
        ("5.19.16-200.fc36.x86_64", "fc", ""),
        ("4.14.114-103.97.amzn2.x86_64", "amzn2", ""),
        ("4.14.94-11647.112.0-cos", "cos", ""),
        ("5.4.0-62-generic", "ubuntu", "generic"),
        ("5.4.0-1036-aws", "ubuntu", "aws"),
        ("5.4.0-1021-azure-fips", "ubuntu", "azure-fips"),
        ("5.15.0-1020-gke~20.04", "ubuntu", "gke"),
        ("4.15.0-1040-gcp~16.04", "ubuntu", "gcp"),
        ("4.19.0-10-amd64", "debian", "amd64"),
        ("4.19.0-10-cloud-amd64", "debian", "cloud-amd64"),
        ("5.10.0-9-rt-amd64", "debian", "rt-amd64"),
        ("4.9.0-0.bpo.6-amd64", "debian", "amd64"),
        ("5.10.0-9-amd64-gl-5.10.83-1gardenlinux1", "garden", ""),
        ("5.10.0-6-cloud-amd64-gl-5.10.26-1", "garden", ""),
        ("5.15.77-gardenlinux-cloud-amd64-gl-5.15.77-0gardenlinux1", "garden", ""),
        ("4.12.14-122.106-default", "suse", "default"),
        ("5.3.18-24.37.1-default", "suse", "default"),
        ("4.19.106-flatcar", "flatcar", ""),
        ("4.19.56-coreos", "coreos", ""),
        ("4.14.96-coreos-r1", "coreos", ""),
        ("4.19.202-minikube-v1.2.3", "minikube", ""),
        ("4.19.182-minikube", "minikube", ""),
        ("4.4.102-k8s", "k8s", ""),
        ("5.15.0-k3s", "k3s", ""),
        ("4.19.121-dockerdesktop-2021-01-21-15-36-34", "dockerdesktop", ""),
        ("4.14.131-linuxkit", "linuxkit", ""),
        ("4.15.0", "other", ""),
    ],
)
def test_family_and_flavour_of_representative_releases(release, family, flavour):
    kernel = parse_kernel(release)
    assert (kernel.family, kernel.flavour) == (family, flavour)


@pytest.mark.parametrize(
    ("release", "series"),
    [
        ("6.12.117+deb13-amd64", "trixie"),
        ("6.12.115+deb13.1-rt-amd64", "trixie"),  # a rebuild of the same upstream version
        ("6.12.95+deb12-cloud-amd64", "bookworm"),  # bookworm-backports
        ("6.12.117+deb12-amd64", "bookworm"),  # bookworm-security's 6.12
        ("6.1.0-0.deb11.52-amd64", "bullseye"),  # bullseye-security's 6.1
        ("6.1.0-47-amd64", "bookworm"),
        ("5.10.0-32-rt-amd64", "bullseye"),
        ("4.19.0-10-cloud-amd64", "buster"),
        ("5.10.0-0.bpo.15-amd64", ""),  # a backport: built for an older release, unnamed
        ("4.9.0-0.bpo.6-amd64", ""),
        ("3.16.0-4-amd64", ""),  # an ABI with no rule
        ("6.12.117+deb13-amd64-gl-1", ""),  # garden, not debian
        ("5.4.0-62-generic", ""),
        ("4.18.0-305.el8.x86_64", ""),
    ],
)
def test_series_of_representative_releases(release, series):
    kernel = parse_kernel(release)
    assert kernel.series == series
    assert series == "" or series in SERIES[kernel.family]


def test_series_of_the_real_lists_debian_kernels_match_their_abi_text(real_kernels):
    debian = [k for k in real_kernels if k.family == "debian"]
    by_series = {s: sum(k.series == s for k in debian) for s in {k.series for k in debian}}
    expected = {
        "buster": sum(bool(re.match(r"4\.19\.0-\d+-", k.release)) for k in debian),
        "bullseye": sum(bool(re.match(r"5\.10\.0-\d+-", k.release)) for k in debian),
        "bookworm": sum(bool(re.match(r"6\.1\.0-\d+-", k.release)) for k in debian),
    }
    assert {s: n for s, n in by_series.items() if s} == {s: n for s, n in expected.items() if n}
    assert expected["buster"] > 0 and expected["bullseye"] > 0
    assert all(k.series == "" for k in real_kernels if k.family != "debian")


def test_every_family_rule_names_a_short_lowercase_selector_prefix():
    assert len(set(FAMILIES)) == len(FAMILIES) == len(FAMILY_RULES) + 1
    assert all(re.fullmatch(r"[a-z][a-z0-9]*", f) for f in FAMILIES)


def test_family_counts_on_the_real_list_match_independent_text_counts(real_lines, real_kernels):
    by_family: dict[str, int] = {}
    for kernel in real_kernels:
        by_family[kernel.family] = by_family.get(kernel.family, 0) + 1
    assert by_family["elrepo"] == sum(".elrepo." in line for line in real_lines)
    assert by_family["el7uek"] == sum("el7uek" in line for line in real_lines)
    assert by_family["el7"] == sum(
        ".el7." in line and ".elrepo." not in line for line in real_lines
    )
    assert by_family["el8"] == sum(re.search(r"\.el8[._]", line) is not None for line in real_lines)
    assert by_family["cos"] == sum(line.endswith("-cos") for line in real_lines)
    assert by_family["fc"] == sum(".fc3" in line for line in real_lines)
    assert by_family["other"] == 1  # only the plain "4.15.0"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("   ", "only whitespace"),
        ("4.15.0 -generic", "whitespace at position 6"),
        ("4.15.0-1\t", "whitespace"),
        ("4.15.0/evil", "character '/'"),
        ("4.15.0-\x00", r"character '\\x00'"),
        ("4.15.0-é", "character 'é'"),
        ("4.15", "does not start with a version x.y.z"),
        ("v4.15.0", "does not start with a version x.y.z"),
        ("4.15.0generic", "does not start with a version x.y.z"),
        ("generic", "does not start with a version x.y.z"),
        ("4.1" + "5" * 300 + ".0", "characters long"),
    ],
)
def test_a_string_that_is_not_a_release_is_rejected_naming_it_and_why(text, why):
    with pytest.raises(KernelParseError, match=why) as raised:
        parse_kernel(text)
    if text.strip() and len(text) < 100:
        assert repr(text) in str(raised.value)


@given(st.text(max_size=60))
def test_parse_kernel_accepts_or_raises_kernel_parse_error_only(text):
    try:
        kernel = parse_kernel(text)
    except KernelParseError:
        return
    assert kernel.release == text and text[0].isdigit()


# --- ordering --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ascending",
    [
        [
            "4.18.0-305.el8.x86_64",  # GA build before its updates (letters before numbers)
            "4.18.0-305.10.2.el8_4.x86_64",
            "4.18.0-305.12.1.el8_4.x86_64",
            "4.18.0-372.9.1.el8.x86_64",
            "4.18.0-3050.el8.x86_64",
        ],
        ["3.10.0-862.el7.x86_64", "3.10.0-957.el7.x86_64", "3.10.0-1160.80.1.el7.x86_64"],
        # rt and non-rt builds of the same version: deterministic, non-rt first ("el" < "rt")
        ["4.18.0-147.8.1.el8_1.x86_64", "4.18.0-147.8.1.rt24.101.el8_1.x86_64"],
        ["5.15.0-1020-gke", "5.15.0-1020-gke~20.04", "5.15.0-1021-gke"],
        ["4.15.0-1040-gcp~16.04", "4.15.0-1041-gcp"],
        ["4.14.94-11647.112.0-cos", "4.14.94-11647.119.0-cos", "4.14.137-11647.121.0-cos"],
        ["4.9.0-0.bpo.6-amd64", "4.9.0-6-amd64"],
        ["4.15.0", "4.15.0-20-generic"],  # a prefix sorts first
        ["5.4.0-9-generic", "5.4.0-10-generic", "5.10.0-1-generic", "6.0.9-300.fc37.x86_64"],
        ["2.6.32-754.el6.x86_64", "3.10.0-123.el7.x86_64"],
    ],
)
def test_key_orders_releases_version_aware(ascending):
    kernels = [parse_kernel(r) for r in ascending]
    for low, high in zip(kernels, kernels[1:], strict=False):
        assert low.key < high.key and low < high and high > low and low <= high
    shuffled = kernels[::-1]
    assert [k.release for k in sorted(shuffled)] == ascending


def test_releases_that_tokenise_alike_still_differ_and_order_by_string():
    a, b = parse_kernel("4.15.0-01-generic"), parse_kernel("4.15.0-1-generic")
    assert a.tokens == b.tokens
    assert a != b and a.key != b.key and a < b  # tie broken by the release string
    assert not (a < a) and a <= a and a == parse_kernel("4.15.0-01-generic")


def test_kernels_are_hashed_and_compared_equal_by_release():
    first = parse_kernel("5.4.0-62-generic")
    again = parse_kernel.__wrapped__("5.4.0-62-generic")  # a distinct, uncached object
    assert first is not again and first == again and hash(first) == hash(again)
    assert len({first, again, parse_kernel("5.4.0-63-generic")}) == 2
    assert first != "5.4.0-62-generic"


def test_sorting_the_real_list_is_a_deterministic_total_order(real_kernels):
    keys = [k.key for k in real_kernels]
    assert len(set(keys)) == len(real_kernels)  # no two different releases are equal
    ordered = sorted(real_kernels)
    shuffled = real_kernels[:]
    random.Random(7).shuffle(shuffled)
    assert sorted(shuffled) == ordered == sorted(reversed(real_kernels))
    assert ordered == sorted(real_kernels, key=lambda k: k.key)
    assert all(a < b for a, b in zip(ordered, ordered[1:], strict=False))


def _reference_segments(text: str) -> list[tuple[int, str]]:
    """Runs of ASCII digits (1, …) and letters (0, …), written without regexes."""
    segments: list[tuple[int, str]] = []
    for ch in text:
        kind = 1 if ch in "0123456789" else 0 if ch.isascii() and ch.isalpha() else None
        if kind is None:
            segments.append((-1, ""))  # separator: ends the current run
        elif segments and segments[-1][0] == kind:
            segments[-1] = (kind, segments[-1][1] + ch)
        else:
            segments.append((kind, ch))
    return [s for s in segments if s[0] >= 0]


def _reference_compare(a: str, b: str) -> int:
    """rpmvercmp-like: numbers by value (no int()), letters before numbers, prefix first."""
    for (ka, va), (kb, vb) in zip(_reference_segments(a), _reference_segments(b), strict=False):
        if ka != kb:
            return -1 if ka < kb else 1
        if ka == 1:
            va, vb = va.lstrip("0"), vb.lstrip("0")
            if len(va) != len(vb):
                return -1 if len(va) < len(vb) else 1
        if va != vb:
            return -1 if va < vb else 1
    la, lb = len(_reference_segments(a)), len(_reference_segments(b))
    if la != lb:
        return -1 if la < lb else 1
    return (a > b) - (a < b)


SEGMENT = st.one_of(
    st.integers(0, 400).map(str),
    st.sampled_from(["0", "00", "05", "el", "el8", "rt24", "a", "aws", "x86", "gke", "1910a"]),
)
VERSIONISH = st.builds(
    lambda x, y, z, rest: f"{x}.{y}.{z}" + "".join(sep + seg for sep, seg in rest),
    st.integers(2, 6),
    st.integers(0, 20),
    st.integers(0, 3),
    st.lists(st.tuples(st.sampled_from(".-_~+"), SEGMENT), max_size=5),
)


@settings(max_examples=300)
@given(st.lists(VERSIONISH, min_size=2, max_size=30))
def test_key_order_agrees_with_an_independent_reference(releases):
    kernels = [parse_kernel(r) for r in releases]
    by_key = [k.release for k in sorted(kernels, key=lambda k: k.key)]
    by_reference = sorted(releases, key=cmp_to_key(_reference_compare))
    assert by_key == by_reference
    a, b = kernels[0], kernels[1]
    assert (a.key < b.key) == (_reference_compare(a.release, b.release) < 0)
    assert (a.key == b.key) == (a.release == b.release)


# --- kernel lists ----------------------------------------------------------------------


def test_read_kernel_list_reports_bad_and_duplicate_lines_with_their_numbers():
    lines = [
        "# kernels to build",  # 1
        "5.4.0-62-generic",  # 2
        "",  # 3
        "4.18.0-305.10.2.el8_4.x86_64   # trailing comment",  # 4
        "not-a-kernel",  # 5
        "5.4.0-62-generic\r\n",  # 6: duplicate of line 2
        "   ",  # 7
        "4.15.0/x",  # 8
    ]
    kernels, problems = read_kernel_list(lines, "KERNELS")
    assert [k.release for k in kernels] == ["5.4.0-62-generic", "4.18.0-305.10.2.el8_4.x86_64"]
    assert [(p.source, p.line_number) for p in problems] == [
        ("KERNELS", 5),
        ("KERNELS", 6),
        ("KERNELS", 8),
    ]
    assert problems[0].text == "not-a-kernel" and "x.y.z" in problems[0].message
    assert problems[1].message.startswith("duplicate of line 2")
    assert "'/'" in problems[2].message
    assert str(problems[2]).startswith("KERNELS:8: ")
    assert isinstance(problems[0], LineProblem)


def test_read_kernel_list_takes_the_whole_real_list_without_problems(real_lines):
    kernels, problems = read_kernel_list(real_lines, "KERNEL_VERSIONS")
    assert problems == [] and len(kernels) == 5676


# --- eBPF ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("release", "supported"),
    [
        ("4.14.0-1-generic", True),
        ("4.13.16-coreos-r1", False),
        ("5.4.0-62-generic", True),
        ("4.14.35-1902.0.9.el7uek.x86_64", True),
        ("4.18.0-305.10.2.el8_4.x86_64", True),
        ("3.10.0-957.el7.x86_64", True),  # RHEL 7.6 GA
        ("3.10.0-957.1.3.el7.x86_64", True),
        ("3.10.0-1160.80.1.el7.x86_64", True),
        ("3.10.0-862.14.4.el7.x86_64", False),  # RHEL 7.5
        ("3.10.0-123.el7.x86_64", False),
        ("4.4.102-1.el7.elrepo.x86_64", False),
        ("4.9.86-30.el7.x86_64", False),
        ("4.1.12-124.48.6.el7uek.x86_64", False),
        ("2.6.32-754.el6.x86_64", False),
        ("4.4.102-k8s", False),
    ],
)
def test_ebpf_supported(release, supported):
    assert ebpf_supported(parse_kernel(release)) is supported


def test_ebpf_support_on_the_real_list_matches_a_text_count(real_lines, real_kernels):
    def expected(line: str) -> bool:
        major, minor = (int(p) for p in line.split(".")[:2])
        if (major, minor) >= (4, 14):
            return True
        m = re.fullmatch(r"3\.10\.0-(\d+)\.(?:.*\.)?el7\.x86_64", line)
        return m is not None and int(m.group(1)) >= 957

    want = [expected(line) for line in real_lines]
    assert [ebpf_supported(k) for k in real_kernels] == want
    el7_backports = [k for k in real_kernels if k.major == 3 and ebpf_supported(k)]
    assert 0 < len(el7_backports) < sum(k.major == 3 for k in real_kernels)
