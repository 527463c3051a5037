"""Real compile failures as data: the first error of a real log, and the blocklist lines
suggested for repeated identical failures (drivers.domain.failures), checked with the
blocklist parser itself."""

from __future__ import annotations

import pytest

from compile_logs import FIRST_ERROR, KERNEL, MOD_2_3_0_ON_6_12, log_for
from drivers.build.compile import first_error
from drivers.domain.blocklist import Blocklist, parse_rules
from drivers.domain.failures import normalise_error, suggest_blocklist

CLOUD, RT = "6.12.115+deb12-cloud-amd64", "6.12.115+deb12-rt-amd64"
OLD = "6.1.0-56-amd64"
FD_IS_OPEN = (
    "main.c: error: implicit declaration of function ‘fd_is_open’; did you mean "
    "‘finish_open’? [-Werror=implicit-function-declaration]"
)


def test_the_first_error_of_a_real_log_is_the_first_in_source_order():
    assert first_error(MOD_2_3_0_ON_6_12.encode(), "make exit status 2") == FIRST_ERROR
    # make -j interleaves the compilers: ppm_events.c's errors may come first in the log
    lines = MOD_2_3_0_ON_6_12.splitlines()
    start = next(i for i, line in enumerate(lines) if "ppm_events.c: In function" in line)
    end = next(i for i, line in enumerate(lines) if "ppm_events.o] Error 1" in line) + 1
    reordered = lines[:3] + lines[start:end] + lines[3:start] + lines[end:]
    assert reordered != lines
    assert first_error("\n".join(reordered).encode(), "make exit status 2") == FIRST_ERROR
    assert first_error(b"ERROR: modpost: x undefined\n", "make exit status 2") == (
        "ERROR: modpost: x undefined"
    )
    assert first_error(b"make: *** Error 2\n", "make exit status 2") == "make exit status 2"


def test_a_normalised_error_is_the_same_on_every_kernel_of_the_series():
    reasons = {k: "compile: " + first_error(log_for(k).encode(), "") for k in (KERNEL, CLOUD)}
    assert {normalise_error(r, k) for k, r in reasons.items()} == {f"compile: {FD_IS_OPEN}"}
    header = "/usr/src/linux-headers-6.12.115+deb12-common/include/linux/init.h:180:22: error: x"
    assert normalise_error(header, KERNEL) == "init.h: error: x"
    vermagic = f"vermagic '{CLOUD} SMP mod_unload ' does not start with '{CLOUD}'"
    assert normalise_error(vermagic, CLOUD) == (
        "vermagic '<kernel> SMP mod_unload ' does not start with '<kernel>'"
    )


def failed(kernel: str, error: str | None = None, failure: str = "compile") -> dict:
    """A coverage entry as the ledger leaves it after a failure (flows.upstream's
    reason): by default the real failure, as the kernel's log gives it."""
    error = error or first_error(log_for(kernel).encode(), "make exit status 2")
    reason = f"{failure}: {error}"
    status = "failed" if failure == "compile" else "refused"
    return {"status": status, "last_failure": failure, "last_reason": reason, "reason": reason}


def built() -> dict:
    return {"status": "published"}


def covered(rule: str, entries: dict, version: str = "2.3.0") -> set[tuple[str, str]]:
    """What the line blocks among the entries, as the blocklist parser reads it."""
    blocklist = Blocklist(parse_rules([rule], "BLOCKLIST"))
    return {
        (kernel, kind)
        for kernel, kinds in entries.items()
        for kind in kinds
        if blocklist.match(kernel, version, kind)
    }


def failing(entries: dict) -> set[tuple[str, str]]:
    return {(k, kind) for k, kinds in entries.items() for kind, e in kinds.items() if "reason" in e}


def test_identical_failures_on_a_series_get_one_line_that_covers_exactly_them():
    entries = {
        KERNEL: {"mod": failed(KERNEL), "bpf": built()},
        CLOUD: {"mod": failed(CLOUD), "bpf": built()},
        RT: {"mod": failed(RT) | {"status": "quarantined"}},
        OLD: {"mod": built(), "bpf": built()},
    }
    [suggestion] = suggest_blocklist({"2.3.0": entries})
    assert suggestion.rule == "6.12.* 2.3.0 mod"
    assert suggestion.kernels == (KERNEL, CLOUD, RT)  # in kernel order
    assert (suggestion.failure, suggestion.error) == ("compile", FD_IS_OPEN)
    assert covered(suggestion.rule, entries) == failing(entries)
    # one failing kernel is not repeated: the quarantine handles it
    assert suggest_blocklist({"2.3.0": {KERNEL: entries[KERNEL], OLD: entries[OLD]}}) == []


def test_a_series_with_a_built_driver_or_another_cause_gets_exactly_its_kernels():
    other = "build/2.3.0/mod/ppm_events.c:400:22: error: ‘struct fd’ has no member named ‘file’"
    cases = {
        "a built driver in the series": {"6.12.22-amd64": {"mod": built()}},
        "another cause in the series": {"6.12.22-amd64": {"mod": failed("6.12.22-amd64", other)}},
    }
    for why, extra in cases.items():
        entries = {KERNEL: {"mod": failed(KERNEL)}, CLOUD: {"mod": failed(CLOUD)}} | extra
        suggestions = [s for s in suggest_blocklist({"2.3.0": entries}) if len(s.kernels) > 1]
        assert [s.rule for s in suggestions] == [
            r"~(?:6\.12\.115\+deb12\-amd64|6\.12\.115\+deb12\-cloud\-amd64) 2.3.0 mod"
        ], why
        assert covered(suggestions[0].rule, entries) == {(KERNEL, "mod"), (CLOUD, "mod")}, why
        # and it holds for the next kernels of neither (a line names its kernels)
        assert not covered(suggestions[0].rule, {"6.12.115+deb12-arm64": {"mod": {}}}), why


@pytest.mark.parametrize(
    ("entries", "lines"),
    [
        # two causes on one series: a line each would overlap, so each names its kernels
        (
            {
                KERNEL: {"mod": failed(KERNEL)},
                CLOUD: {"mod": failed(CLOUD)},
                "6.12.22-amd64": {"mod": failed("6.12.22-amd64", "a.c:1:1: error: y")},
                "6.12.22-cloud-amd64": {"mod": failed("6.12.22-cloud-amd64", "a.c:9:2: error: y")},
            },
            2,
        ),
        # two series, two kinds, another failure class (refused in the VM)
        (
            {
                KERNEL: {"mod": failed(KERNEL), "bpf": failed(KERNEL, "p.c:3: error: z")},
                CLOUD: {"mod": failed(CLOUD), "bpf": failed(CLOUD, "p.c:4: error: z")},
                "6.1.0-55-amd64": {"mod": failed("6.1.0-55-amd64", "no events", "load_failed")},
                OLD: {"mod": failed(OLD, "no events", "load_failed"), "bpf": built()},
            },
            3,
        ),
    ],
)
def test_every_suggestion_covers_its_failures_and_nothing_else(entries, lines):
    suggestions = suggest_blocklist({"2.3.0": entries, "8.1.0": {KERNEL: {"mod": built()}}})
    assert len(suggestions) == lines and all(s.driver_version == "2.3.0" for s in suggestions)
    for s in suggestions:
        assert covered(s.rule, entries) == {(k, s.kind) for k in s.kernels}
    assert not any(covered(s.rule, {KERNEL: {"mod": {}}}, "8.1.0") for s in suggestions)


def test_the_drivers_own_error_comes_before_one_placed_in_a_kernel_header():
    log = (
        b"$W/bundle/include/linux/init.h:180:22: error: passing argument 1 of 'class_create'\n"
        b"$W/build/2.3.0/mod/driver/main.c:3237:23: error: too many arguments to 'class_create'\n"
    )
    assert first_error(log, "make exit status 2", "$W/build/2.3.0/mod/") == (
        "driver/main.c:3237:23: error: too many arguments to 'class_create'"
    )
