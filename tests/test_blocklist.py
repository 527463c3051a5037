import pytest

from drivers.domain.blocklist import Blocklist, BlocklistError, parse_rules
from scenarios import BLOCKLISTS


def blocklist(*lines: str) -> Blocklist:
    return Blocklist(parse_rules(lines, "BLOCKLIST"))


def test_missing_fields_mean_any_version_and_kind():
    b = blocklist("*.el6.*")
    for version in ("1.0.0", "2.3.0-rc1"):
        for kind in ("mod", "bpf"):
            assert b.match("2.6.32-754.el6.x86_64", version, kind)
    assert b.match("3.10.0-1160.el7.x86_64", "1.0.0", "mod") is None


def test_the_matching_rule_names_its_file_and_line():
    b = blocklist("# comment", "", "*dockerdesktop* * bpf", "4.14.131-linuxkit")
    rule = b.match("4.19.121-dockerdesktop-2021-01-21-15-36-34", "2.2.0", "bpf")
    assert rule.where == "BLOCKLIST:3" and rule.text == "*dockerdesktop* * bpf"
    assert b.match("4.19.121-dockerdesktop-2021-01-21-15-36-34", "2.2.0", "mod") is None
    assert b.match("4.14.131-linuxkit", "2.2.0", "mod").where == "BLOCKLIST:4"


def test_first_matching_rule_wins():
    b = blocklist("5.4.* 2.2.0", "5.4.0-62-generic")
    assert b.match("5.4.0-62-generic", "2.2.0", "mod").line == 1
    assert b.match("5.4.0-62-generic", "2.3.0", "mod").line == 2


def test_only_star_is_special_in_a_plain_field():
    b = blocklist("5.8.*20.04", "4.4.?-x", "4.4.[1]-y")
    assert b.match("5.8.0-63-generic~20.04", "2.2.0", "mod")
    assert b.match("5.8X0-63-generic~20.04", "2.2.0", "mod") is None  # '.' is literal
    assert b.match("4.4.?-x", "2.2.0", "mod") and b.match("4.4.1-x", "2.2.0", "mod") is None
    assert b.match("4.4.[1]-y", "2.2.0", "mod") and b.match("4.4.1-y", "2.2.0", "mod") is None


def test_fields_are_anchored_at_both_ends():
    b = blocklist("4.14.131-linuxkit 2.2.0 mod")
    assert b.match("4.14.131-linuxkit2", "2.2.0", "mod") is None
    assert b.match("x4.14.131-linuxkit", "2.2.0", "mod") is None
    assert b.match("4.14.131-linuxkit", "2.2.0-rc1", "mod") is None


def test_tilde_fields_are_python_regexes():
    b = blocklist(
        r"~3\.10\.0-1062(?:\.\d+)*\.el7.x86_64 * bpf", r"~5\.([7-9]|1[0-9])\..* ~2\.[01]\..*"
    )
    assert b.match("3.10.0-1062.12.1.el7.x86_64", "2.2.0", "bpf")
    assert b.match("3.10.0-1062.12.1.el7.x86_64", "2.2.0", "mod") is None
    assert b.match("5.13.0-1-generic", "2.1.0", "mod")
    assert b.match("5.13.0-1-generic", "2.2.0", "mod") is None
    assert b.match("5.6.0-1-generic", "2.1.0", "mod") is None


@pytest.mark.parametrize(
    "line, message",
    [
        ("a b mod extra", "4 fields"),
        ("~5.(4 * mod", "~5.(4"),
        ("5.4.0 * ko", "kind 'ko' matches neither"),
    ],
)
def test_bad_rules_name_file_and_line(line, message):
    with pytest.raises(BlocklistError, match=r"BLOCKLIST:2: .*") as e:
        parse_rules(["# header", line], "BLOCKLIST")
    assert message in str(e.value)


def test_missing_blocklist_file_is_named(tmp_path):
    with pytest.raises(BlocklistError, match="cannot read blocklist .*nope"):
        Blocklist.from_files([tmp_path / "nope"])


def test_the_real_blocklists_parse():
    b = Blocklist.from_files(BLOCKLISTS)
    assert len(b.rules) > 40
    assert b.match("4.18.0-193.el8.x86_64", "2.2.0", "mod") is None
    # BLOCKLIST.osci: Oracle UEK modules need libdtrace-ctf
    assert b.match("4.14.35-1902.300.11.el7uek.x86_64", "2.3.0-rc1", "mod").source == (
        "BLOCKLIST.osci"
    )
    assert b.match("4.14.35-1902.300.11.el7uek.x86_64", "2.3.0-rc1", "bpf") is None
