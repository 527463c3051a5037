"""Field syntax shared with blocklists, and kernel selectors."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.domain.kernels import FAMILIES, SERIES, Kernel, parse_kernel
from drivers.domain.selectors import SelectorError, compile_field, parse_selector


def selected(expr: str, kernels: list[Kernel]) -> list[str]:
    return [k.release for k in parse_selector(expr).filter(kernels)]


# --- compile_field ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "matching", "not_matching"),
    [
        ("4.1?", ["4.1?"], ["4.12", "4.1"]),  # ? is literal
        ("a[1]", ["a[1]"], ["a1", "a"]),  # [ is literal
        ("4.18", ["4.18"], ["4x18", "4.180"]),  # . is literal, anchored at the end
        ("*", ["", "anything at all", "a/b\nc"], []),
        ("4.18.0-*", ["4.18.0-", "4.18.0-305.el8"], ["x4.18.0-1", "4.18.1-1"]),
        ("*-aws", ["5.4.0-1-aws"], ["5.4.0-1-aws-fips"]),
        ("*a*b*", ["ab", "xaybz"], ["ba"]),
        ("~4\\.18\\..*", ["4.18.0"], ["x4.18.0", "4x18.0"]),
        ("~a|b", ["a", "b"], ["ab", "xa", "bx"]),  # alternation is anchored as a whole
        ("~(?i)mod", ["MOD", "mod"], ["module"]),  # global flags stay valid
        ("~", [""], ["a"]),
    ],
)
def test_compile_field_semantics(field, matching, not_matching):
    pattern = compile_field(field)
    for text in matching:
        assert pattern.fullmatch(text), (field, text)
    for text in not_matching:
        # anchored in the pattern itself, so even search() cannot find a partial match
        assert not pattern.search(text), (field, text)


def test_compile_field_rejects_an_invalid_regex_naming_it_and_the_error():
    with pytest.raises(SelectorError, match=r"invalid regex in '~4\.18\.\(': missing \)") as e:
        compile_field("~4.18.(")
    assert "e.g." in str(e.value)


def test_compile_field_patterns_can_be_joined_into_one_alternation():
    # drivers.domain.blocklist ORs every kernel field into one regex; anchors must survive that.
    joined = re.compile("|".join(f"(?:{compile_field(f).pattern})" for f in ["5.4*", "~x|y"]))
    assert joined.fullmatch("5.4.0-1-aws") and joined.fullmatch("y")
    assert not joined.fullmatch("xy") and not joined.search("15.4")


# --- selectors over the real list --------------------------------------------------------


def _xy(line: str) -> tuple[int, int]:
    major, minor = line.split(".")[:2]
    return int(major), int(minor)


def test_comparison_counts_on_the_real_list_match_the_original_routing(real_lines, real_kernels):
    expected = {
        ">=5.10": [line for line in real_lines if _xy(line) >= (5, 10)],
        ">=3,<5.10": [line for line in real_lines if (3, 0) <= _xy(line) < (5, 10)],
        "<3": [line for line in real_lines if _xy(line)[0] < 3],
        ">=4,<5.10": [line for line in real_lines if (4, 0) <= _xy(line) < (5, 10)],
        ">=3,<4": [line for line in real_lines if _xy(line)[0] == 3],
    }
    counts = {expr: len(lines) for expr, lines in expected.items()}
    assert counts == {
        ">=5.10": 1259,
        ">=3,<5.10": 4294,
        "<3": 123,
        ">=4,<5.10": 3961,
        ">=3,<4": 333,
    }
    for expr, lines in expected.items():
        assert selected(expr, real_kernels) == lines, expr


def _el8_build(line: str) -> int | None:
    """The RHEL build number of an el8 4.18.0 release (4.18.0-<build>.…el8…), else None."""
    if not line.startswith("4.18.0-") or (".el8." not in line and ".el8_" not in line):
        return None
    return int(line.split("-")[1].split(".")[0])


def test_family_range_matches_a_manual_filter(real_lines, real_kernels):
    builds = {line: _el8_build(line) for line in real_lines}
    want = [line for line, b in builds.items() if b is not None and 305 <= b <= 372]
    assert len(want) == 70
    assert selected("el8:4.18.0-305..4.18.0-372", real_kernels) == want
    assert selected("el8:4.18.0-305..", real_kernels) == [
        line for line, b in builds.items() if b is not None and b >= 305
    ]
    # the upper bound prefixes every 4.18.0-372.* release; "<" excludes them all
    assert selected("el8:..4.18.0-372", real_kernels) == [
        line for line, b in builds.items() if b is not None and b <= 372
    ]
    assert selected("el8:<4.18.0-372", real_kernels) == [
        line for line, b in builds.items() if b is not None and b < 372
    ]
    assert selected("el8:==4.18.0-305", real_kernels) == [
        line for line, b in builds.items() if b == 305
    ]


def test_glob_regex_exact_and_family_selectors_on_the_real_list(real_lines, real_kernels):
    assert selected("*-aws", real_kernels) == [x for x in real_lines if x.endswith("-aws")]
    assert selected("~.*-gke(~.*)?", real_kernels) == [x for x in real_lines if "-gke" in x]
    assert selected("5.4.0-62-generic", real_kernels) == ["5.4.0-62-generic"]
    assert selected("cos:*", real_kernels) == [x for x in real_lines if x.endswith("-cos")]
    assert selected("ubuntu:>=5.15", real_kernels) == [
        x
        for x in real_lines
        if _xy(x) >= (5, 15) and re.fullmatch(r"[\d.]+-\d+-[a-z-]+(~[\d.]+)?", x)
    ]


@pytest.mark.parametrize(
    ("expr", "release", "selected_"),
    [
        (">=5.10", "5.10.0-9-amd64", True),
        (">=5.10", "5.10.1", True),
        (">=5.10", "5.9.16-flatcar", False),
        ("<5.10", "5.10.0-9-amd64", False),
        (">5.10", "5.10.200", False),  # a bound stands for everything it prefixes
        (">5.10", "5.11.0-1-generic", True),
        ("..4.18.0-372", "4.18.0-372.32.1.el8_6.x86_64", True),
        ("<4.18.0-372", "4.18.0-372.32.1.el8_6.x86_64", False),
        ("<4.18.0-372", "4.18.0-348.7.1.el8_5.x86_64", True),
        ("4.18.0-305..", "4.18.0-305.el8.x86_64", True),
        ("4.18.0-305..", "4.18.0-240.22.1.el8_3.x86_64", False),
        ("==4.18.0-305", "4.18.0-305.10.2.el8_4.x86_64", True),
        ("==4.18.0-305", "4.18.0-3050.el8.x86_64", False),  # 305 does not prefix 3050
        ("..4.18.0-305", "4.18.0-3050.el8.x86_64", False),
        ("==4.18.0-305.10.2.el8_4", "4.18.0-305.10.2.el8_4.x86_64", True),
        ("4.18.0-305.10.2.el8_4..4.18.0-305.12.1.el8_4", "4.18.0-305.12.1.el8_4.x86_64", True),
        ("4.18.0-305.10.2.el8_4..4.18.0-305.12.1.el8_4", "4.18.0-305.19.1.el8_4.x86_64", False),
        (">=4.18.0-305.10,<=4.18.0-305", "4.18.0-305.10.2.el8_4.x86_64", True),
        ("el7:>=3.10.0-957", "3.10.0-1160.el7.x86_64", True),
        ("el7:>=3.10.0-957", "4.18.0-305.el8.x86_64", False),
    ],
)
def test_bounds_match_as_prefixes_of_the_release_key(expr, release, selected_):
    assert parse_selector(expr).matches(parse_kernel(release)) is selected_


@pytest.mark.parametrize(
    ("expr", "canonical"),
    [
        ("  el8: 4.18.0-305 .. 4.18.0-372 ", "el8:4.18.0-305..4.18.0-372"),
        (">= 5.10 , < 6.0", ">=5.10,<6.0"),
        ("..5.4", "..5.4"),
        ("5.4..", "5.4.."),
        ("*-aws", "*-aws"),
        ("~.*gke.*", "~.*gke.*"),
        ("ubuntu:5.4.0-62-generic", "ubuntu:5.4.0-62-generic"),
        (" debian/trixie: *-amd64 ", "debian/trixie:*-amd64"),
        ("debian/bookworm:6.1.0-47-amd64", "debian/bookworm:6.1.0-47-amd64"),
    ],
)
def test_str_gives_a_canonical_form_that_parses_back_to_the_same_selector(expr, canonical):
    selector = parse_selector(expr)
    assert str(selector) == canonical
    assert parse_selector(canonical) == selector


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("", "empty selector"),
        ("   ", "empty selector"),
        ("..", "empty range"),
        ("4.18.0-372..4.18.0-305", "comes after its end.*'4.18.0-305..4.18.0-372'"),
        (">=5.10,<5.4", "no kernel release can satisfy both '>=5.10' and '<5.4'"),
        (">5.10,<=5.10.3", "no kernel release can satisfy"),
        ("==5.4,==5.10", "no kernel release can satisfy"),
        ("5.10..x", "bound 'x' is not a kernel version"),
        ("4.18/0..", "bound '4.18/0' is not a kernel version"),
        (">=" + "1" * 300, "is longer than 200 characters"),
        (">=5.10,6.0", "comparison '6.0' does not start with one of"),
        ("=5.10", "'=' is written '=='"),
        ("!=5.10", "does not start with one of"),
        ("5.10,6.0", "a comma joins comparisons"),
        ("1..2..3", "exactly one '..'"),
        ("5.10", "not an exact kernel release.*'==5.10'"),
        ("rhel8:>=4", "unknown kernel family 'rhel8'; known families: .*el8"),
        ("el8:", "nothing after 'el8:'"),
        ("el7:4.18.0-305.el8.x86_64", "belongs to family 'el8', not 'el7'"),
        ("~4.18.(", r"invalid regex in '~4\.18\.\('"),
        ("debian/sid:*", "unknown series 'sid' of family 'debian'; known series: .*trixie"),
        ("el8/rhel8:*", "unknown series 'rhel8' of family 'el8'; that family has none"),
        ("debian/trixie:", "nothing after 'debian/trixie:'"),
        ("debian/trixie:6.1.0-47-amd64", "belongs to series 'bookworm', not 'trixie'"),
    ],
)
def test_bad_selectors_are_rejected_with_a_reason_and_a_valid_example(expr, message):
    with pytest.raises(SelectorError, match=message) as raised:
        parse_selector(expr)
    text = str(raised.value)
    assert repr(expr) in text
    assert "e.g." in text or "valid selectors look like" in text


DEBIAN_KERNELS = [
    "5.10.0-32-amd64",
    "5.10.0-46-cloud-amd64",
    "6.1.0-0.deb11.52-rt-amd64",
    "6.1.0-47-amd64",
    "6.12.95+deb12-amd64",
    "6.12.117+deb12-cloud-amd64",
    "6.12.117+deb13-amd64",
    "6.12.115+deb13.1-rt-amd64",
    "5.10.0-0.bpo.15-amd64",
    "6.12.117+deb13-amd64-gl-1",  # garden
]


@pytest.mark.parametrize(
    ("expr", "releases"),
    [
        (
            "debian/bullseye:*",
            ["5.10.0-32-amd64", "5.10.0-46-cloud-amd64", "6.1.0-0.deb11.52-rt-amd64"],
        ),
        (
            "debian/bookworm:*",
            ["6.1.0-47-amd64", "6.12.95+deb12-amd64", "6.12.117+deb12-cloud-amd64"],
        ),
        ("debian/trixie:*", ["6.12.117+deb13-amd64", "6.12.115+deb13.1-rt-amd64"]),
        ("debian/bookworm:>=6.12", ["6.12.95+deb12-amd64", "6.12.117+deb12-cloud-amd64"]),
        ("debian/trixie:*-rt-amd64", ["6.12.115+deb13.1-rt-amd64"]),
        ("debian/buster:*", []),
    ],
)
def test_series_prefix_keeps_only_that_release(expr, releases):
    kernels = [parse_kernel(r) for r in DEBIAN_KERNELS]
    selector = parse_selector(expr)
    assert selected(expr, kernels) == releases
    assert [k.release for k in kernels if selector.matches(k)] == releases


def test_series_prefixes_split_the_family_by_series(real_kernels):
    debian = parse_selector("debian:*").filter(real_kernels)
    per_series = {s: parse_selector(f"debian/{s}:*").filter(real_kernels) for s in SERIES["debian"]}
    assert sum(map(len, per_series.values())) == sum(k.series != "" for k in debian) > 0
    assert all(k.series == s for s, ks in per_series.items() for k in ks)


def test_unknown_family_error_lists_every_known_family():
    with pytest.raises(SelectorError) as raised:
        parse_selector("centos:*")
    assert all(family in str(raised.value) for family in FAMILIES)


def test_every_family_is_a_usable_selector_prefix(real_kernels):
    total = sum(len(parse_selector(f"{family}:*").filter(real_kernels)) for family in FAMILIES)
    assert total == len(real_kernels)


# --- properties --------------------------------------------------------------------------

SEGMENT = st.one_of(
    st.integers(0, 400).map(str),
    st.sampled_from(["0", "05", "el", "el8", "rt", "a", "aws", "x86", "1910a"]),
)
VERSIONISH = st.builds(
    lambda head, rest: head + "".join(sep + seg for sep, seg in rest),
    st.integers(0, 12).map(str),
    st.lists(st.tuples(st.sampled_from(".-_~"), SEGMENT), max_size=5),
)
RELEASE = st.builds(
    lambda x, y, z, tail: f"{x}.{y}.{z}{tail}",
    st.integers(2, 6),
    st.integers(0, 12),
    st.integers(0, 3),
    VERSIONISH.map(lambda v: "-" + v),
)


@settings(max_examples=200)
@given(VERSIONISH, VERSIONISH, st.lists(RELEASE, min_size=1, max_size=40))
def test_a_range_selects_exactly_what_the_two_inclusive_comparisons_select(low, high, releases):
    kernels = [parse_kernel(r) for r in releases]
    try:
        as_range = parse_selector(f"{low}..{high}")
    except SelectorError:
        # reversed: the comparison form is rejected too, and the swapped range is accepted
        with pytest.raises(SelectorError):
            parse_selector(f">={low},<={high}")
        parse_selector(f"{high}..{low}")
        return
    as_comparisons = parse_selector(f">={low},<={high}")
    assert as_range.filter(kernels) == as_comparisons.filter(kernels)


def _reference_parts(text: str) -> list[object]:
    return [int(p) if p.isdigit() else p for p in re.findall(r"[0-9]+|[A-Za-z]+", text)]


def _prefix_at_least(release: str, bound: str) -> bool:
    """Reference for '>=bound': the release's first len(bound) parts are >= the bound's."""
    parts, bound_parts = _reference_parts(release), _reference_parts(bound)
    for r, b in zip(parts, bound_parts, strict=False):
        if r == b:
            continue
        if isinstance(r, int) != isinstance(b, int):
            return isinstance(r, int)  # a number sorts after letters
        return r > b
    return len(parts) >= len(bound_parts)


@settings(max_examples=200)
@given(VERSIONISH, st.lists(RELEASE, min_size=1, max_size=40))
def test_lower_bound_is_a_prefix_comparison(bound, releases):
    kernels = [parse_kernel(r) for r in releases]
    assert selected(f">={bound}", kernels) == [r for r in releases if _prefix_at_least(r, bound)]
    assert selected(f"<{bound}", kernels) == [r for r in releases if not _prefix_at_least(r, bound)]
