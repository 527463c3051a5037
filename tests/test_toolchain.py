"""The toolchain guard on its own: the compiler a kernel was built with, read from the
three places a build tree records it; the CC kbuild calls there; the builder's compiler
(the real ones on this host, found through PATH); the refusal before anything compiles;
and how the plan view, the quarantine and the blocklist suggestions treat it.

The recorded strings are real: copied from Debian's linux-headers packages (the .config,
include/generated/autoconf.h, include/generated/compile.h and .kernelvariables of
6.1.0-56-amd64 6.1.192-2, 6.12.115+deb12-amd64 6.12.115-2~deb12u1, 5.10.0-46-amd64 of
bullseye and 6.12.117+deb13-amd64 6.12.117-1 of trixie). The whole real 6.1 tree is read
in tests/test_build_one.py and tests/test_builder.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from drivers.build.bundle import kernel_compiler, open_bundle, tree_cc
from drivers.build.compile import BuilderToolchain, ToolMissing, build_driver, task_status
from drivers.domain.blocklist import Blocklist
from drivers.domain.decision import BUILD, Known, decide
from drivers.domain.failures import suggest_blocklist
from drivers.domain.names import DriverKey
from drivers.domain.planview import format_plan_view, plan_view
from drivers.domain.toolchain import (
    TOOLCHAIN_MISMATCH,
    Compiler,
    kbuild_cc,
    mismatch,
    parse_compiler,
)
from drivers.store import ledger
from example_sources import EXAMPLE_SOURCES

# CONFIG_CC_VERSION_TEXT of each, as its .config and autoconf.h have it
BOOKWORM_61 = "gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"
BOOKWORM_612 = "x86_64-linux-gnu-gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"
BULLSEYE_510 = "gcc-10 (Debian 10.2.1-6) 10.2.1 20210110"
TRIXIE_612 = "x86_64-linux-gnu-gcc-14 (Debian 14.2.0-19) 14.2.0"
# compile.h's LINUX_COMPILER: the compiler, then the linker
COMPILE_H_510 = f"{BULLSEYE_510}, GNU ld (GNU Binutils for Debian) 2.35.2"
COMPILE_H_612_TRIXIE = f"{TRIXIE_612}, GNU ld (GNU Binutils for Debian) 2.44"

# .kernelvariables (the Makefile includes it; kbuild's CC comes from here)
KERNELVARIABLES_61 = """\
override ARCH = x86
override KERNELRELEASE = 6.1.0-56-amd64
CCACHE = ccache
CC = $(if $(DEBIAN_KERNEL_USE_CCACHE),$(CCACHE)) $(CROSS_COMPILE)gcc-12
ifneq ($(DEB_BUILD_ARCH),$(DEB_HOST_ARCH))
override CROSS_COMPILE = $(DEB_HOST_GNU_TYPE)-
endif
DEBIAN_KERNEL_NO_CC_VERSION_CHECK = y
"""
KERNELVARIABLES_510 = """\
override ARCH = x86
override KERNELRELEASE = 5.10.0-46-amd64
CCACHE = ccache
CC = $(if $(DEBIAN_KERNEL_USE_CCACHE),$(CCACHE)) $(CROSS_COMPILE)gcc-10
ifneq ($(DEB_BUILD_ARCH),$(DEB_HOST_ARCH))
override CROSS_COMPILE = $(DEB_HOST_GNU_TYPE)-
endif
"""
KERNELVARIABLES_612_BOOKWORM = """\
override ARCH = x86
override KERNELRELEASE = 6.12.115+deb12-amd64
CCACHE = ccache
CC = $(if $(DEBIAN_KERNEL_USE_CCACHE),$(CCACHE)) $(CROSS_COMPILE)gcc-12
DEB_BUILD_ARCH ?= $(shell dpkg --print-architecture)
override CROSS_COMPILE = x86_64-linux-gnu-
DEBIAN_KERNEL_NO_CC_VERSION_CHECK = y
"""
KERNELVARIABLES_612_TRIXIE = KERNELVARIABLES_612_BOOKWORM.replace(
    "6.12.115+deb12", "6.12.117+deb13"
).replace("gcc-12", "gcc-14")


# --- the kernel's compiler ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, name, version, major",
    [
        (BOOKWORM_61, "gcc", "12.2.0", 12),
        (BOOKWORM_612, "gcc", "12.2.0", 12),
        (BULLSEYE_510, "gcc", "10.2.1", 10),  # the build date after it is not the version
        (TRIXIE_612, "gcc", "14.2.0", 14),
        (COMPILE_H_612_TRIXIE, "gcc", "14.2.0", 14),  # the linker is cut off
        ("gcc version 4.8.5 20150623 (Red Hat 4.8.5-44) (GCC) ", "gcc", "4.8.5", 4),  # el7
        ("Debian clang version 14.0.6", "clang", "14.0.6", 14),
    ],
)
def test_a_recorded_version_line_gives_the_compiler_and_its_major(text, name, version, major):
    compiler = parse_compiler(text)
    assert (compiler.name, compiler.version, compiler.major) == (name, version, major)
    assert compiler.label == f"{name} {major}"
    assert compiler.text == text.split(", GNU ld")[0].strip()


@pytest.mark.parametrize("text", [None, "", "icc (ICC) 2021.1", "gcc without a version"])
def test_a_line_naming_no_gcc_or_clang_with_a_version_is_unknown(text):
    assert parse_compiler(text) is None


def header_tree(root: Path, **files: str) -> Path:
    """A build dir with the given files ("config" is .config, "kernelvariables"
    .kernelvariables, "autoconf"/"compile" the generated headers)."""
    names = {
        "config": ".config",
        "kernelvariables": ".kernelvariables",
        "autoconf": "include/generated/autoconf.h",
        "compile": "include/generated/compile.h",
    }
    for key, text in files.items():
        path = root / names[key]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def config(text: str) -> str:
    head = "#\n# Automatically generated file; DO NOT EDIT.\n"
    return f'{head}CONFIG_CC_VERSION_TEXT="{text}"\nCONFIG_CC_IS_GCC=y\n'


def autoconf(text: str) -> str:
    return f'#define CONFIG_X86_64 1\n#define CONFIG_CC_VERSION_TEXT "{text}"\n'


def compile_h(text: str) -> str:
    return f'#define UTS_MACHINE\t\t"x86_64"\n#define LINUX_COMPILER\t\t"{text}"\n'


def test_the_config_is_read_first_then_autoconf_h_then_compile_h(tmp_path):
    every = header_tree(
        tmp_path / "all",
        config=config(BULLSEYE_510),
        autoconf=autoconf(BOOKWORM_61),
        compile=compile_h(COMPILE_H_612_TRIXIE),
    )
    assert kernel_compiler(every).text == BULLSEYE_510
    no_config = header_tree(
        tmp_path / "headers-only",
        autoconf=autoconf(TRIXIE_612),
        compile=compile_h(COMPILE_H_510),
    )
    assert kernel_compiler(no_config).text == TRIXIE_612
    # kernels before 5.8 record CC_VERSION_TEXT nowhere; compile.h still names it
    old = header_tree(
        tmp_path / "compile-h", config="CONFIG_X86_64=y\n", compile=compile_h(COMPILE_H_510)
    )
    assert kernel_compiler(old) == Compiler("gcc", "10.2.1", BULLSEYE_510)
    assert kernel_compiler(header_tree(tmp_path / "none", config="CONFIG_X86_64=y\n")) is None


def test_a_recorded_file_that_is_a_link_is_not_read(tmp_path):
    tree = header_tree(tmp_path / "t", compile=compile_h(COMPILE_H_510))
    (tmp_path / "elsewhere").write_text(config(TRIXIE_612))
    (tree / ".config").symlink_to(tmp_path / "elsewhere")
    assert kernel_compiler(tree).text == BULLSEYE_510  # the link was skipped


@pytest.mark.parametrize(
    "variables, cc",
    [
        (KERNELVARIABLES_61, "gcc-12"),  # the cross-build block does not apply
        (KERNELVARIABLES_510, "gcc-10"),
        (KERNELVARIABLES_612_BOOKWORM, "x86_64-linux-gnu-gcc-12"),
        (KERNELVARIABLES_612_TRIXIE, "x86_64-linux-gnu-gcc-14"),
        (None, "gcc"),  # no .kernelvariables (not a Debian tree): kbuild's own
    ],
)
def test_the_cc_kbuild_calls_in_a_debian_tree(variables, cc, tmp_path):
    assert kbuild_cc(variables) == cc
    files = {"kernelvariables": variables} if variables is not None else {}
    assert tree_cc(header_tree(tmp_path / "t", **files)) == cc


def test_cross_compile_from_the_environment_reaches_kbuilds_default_cc():
    assert kbuild_cc(None, {"CROSS_COMPILE": "aarch64-linux-gnu-"}) == "aarch64-linux-gnu-gcc"
    assert kbuild_cc(KERNELVARIABLES_61, {"DEBIAN_KERNEL_USE_CCACHE": "1"}) == "gcc-12"


# --- the verdict -------------------------------------------------------------------------


def test_another_major_is_refused_naming_both_compilers_and_the_builder():
    gcc10 = parse_compiler(BULLSEYE_510)
    assert mismatch(gcc10, "gcc", "gcc (Debian 12.2.0-14) 12.2.0", "bookworm") == (
        f"kernel built with {BULLSEYE_510}; builder bookworm has gcc 12.2.0: "
        "route it to a builder with gcc 10"
    )
    trixie = parse_compiler(TRIXIE_612)
    assert mismatch(trixie, "x86_64-linux-gnu-gcc-12", BOOKWORM_612, "bookworm") == (
        f"kernel built with {TRIXIE_612}; builder bookworm has gcc 12.2.0 "
        "(x86_64-linux-gnu-gcc-12): route it to a builder with gcc 14"
    )
    clang = parse_compiler("Debian clang version 14.0.6")
    assert "has gcc 12.2.0" in mismatch(clang, "gcc", BOOKWORM_61, "b")  # another compiler


def test_the_same_major_builds_whatever_the_minor_and_an_unknown_kernel_compiler_too():
    gcc12 = parse_compiler(BOOKWORM_61)
    assert mismatch(gcc12, "gcc-12", "gcc-12 (Debian 12.4.0-1) 12.4.0", "bookworm") is None
    assert mismatch(None, "gcc-12", None, "bookworm") is None  # unknown: built, recorded so


def test_a_tree_calling_a_compiler_the_builder_lacks_is_a_mismatch():
    gcc10 = parse_compiler(BULLSEYE_510)
    assert mismatch(gcc10, "gcc-10", None, "bookworm", BOOKWORM_61) == (
        f"kernel built with {BULLSEYE_510}; builder bookworm has no gcc-10 (the CC its "
        "kbuild calls; its gcc is 12.2.0): route it to a builder with gcc 10"
    )


# --- on this host's compilers ------------------------------------------------------------


def bin_with(tmp_path: Path, *tools: str) -> str:
    """A PATH of one folder linking only ``tools`` (the host's real ones)."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    for tool in tools:
        found = shutil.which(tool)
        assert found, f"{tool} is not installed (scripts/host-deps.sh)"
        (folder / tool).symlink_to(found)
    return str(folder)


def tiny_bundle(tmp_path: Path, **files: str):
    """An extracted bundle whose Makefile would fail any make: nothing may run it."""
    root = tmp_path / "bundle"
    build = header_tree(root / "build", **files)
    (build / "Makefile").write_text("all:\n\tfalse\n")
    (root / "BUNDLE_UNAME").write_text("6.1.0-56-amd64\n")
    (root / "BUNDLE_BUILD_DIR").write_text("build\n")
    return open_bundle(root, "6.1.0-56-amd64")


KEY = DriverKey("6.1.0-56-amd64", "2.3.0", "mod")


def test_a_mismatch_is_refused_before_the_sources_are_copied_or_make_runs(tmp_path):
    bundle = tiny_bundle(tmp_path, config=config(BULLSEYE_510), kernelvariables=KERNELVARIABLES_61)
    assert (bundle.compiler.label, bundle.cc) == ("gcc 10", "gcc-12")
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    built = build_driver(
        KEY, EXAMPLE_SOURCES / "2.3.0", bundle, scratch, BuilderToolchain("bookworm")
    )

    host = parse_compiler(BuilderToolchain("x").version("gcc-12"))
    assert (built.failure, built.data, built.log, built.make_s) == (
        TOOLCHAIN_MISMATCH,
        None,
        b"",
        0.0,
    )
    assert built.message == (
        f"kernel built with {BULLSEYE_510}; builder bookworm has gcc {host.version} (gcc-12): "
        "route it to a builder with gcc 10"
    )
    assert task_status(built) == TOOLCHAIN_MISMATCH
    assert list(scratch.iterdir()) == []  # no copy of the sources, no make log


def test_a_builder_without_the_trees_gcc_n_but_with_a_gcc_is_a_mismatch(tmp_path, monkeypatch):
    bundle = tiny_bundle(tmp_path, config=config(BOOKWORM_61), kernelvariables=KERNELVARIABLES_61)
    monkeypatch.setenv("PATH", bin_with(tmp_path, "gcc"))  # the host's gcc, no gcc-12

    why = BuilderToolchain("bullseye").refuses(bundle)

    assert why.startswith(f"kernel built with {BOOKWORM_61}; builder bullseye has no gcc-12 ")
    assert "its gcc is 12." in why and why.endswith("route it to a builder with gcc 12")


def test_a_builder_without_any_gcc_is_an_incomplete_image_not_a_routing_error(
    tmp_path, monkeypatch
):
    bundle = tiny_bundle(tmp_path, config=config(BOOKWORM_61), kernelvariables=KERNELVARIABLES_61)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ToolMissing, match="gcc-12 is not installed in this builder image"):
        BuilderToolchain("bookworm").refuses(bundle)


def test_the_builders_compiler_is_asked_once_per_command(tmp_path, monkeypatch):
    toolchain = BuilderToolchain("bookworm")
    bundle = tiny_bundle(tmp_path, config=config(BOOKWORM_61), kernelvariables=KERNELVARIABLES_61)
    assert toolchain.refuses(bundle) is None  # this host has gcc-12: it builds
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # asked again, it would be missing
    assert toolchain.refuses(bundle) is None and toolchain.version("gcc-12").startswith("gcc-12 ")


def test_a_cc_that_is_a_path_into_the_tree_is_never_run(tmp_path):
    evil = "CC = ./scripts/not-a-compiler\n"
    bundle = tiny_bundle(tmp_path, config=config(BULLSEYE_510), kernelvariables=evil)
    assert bundle.cc == "./scripts/not-a-compiler"
    assert BuilderToolchain("bookworm").refuses(bundle) is None
    assert not os.path.exists(bundle.build_dir / "scripts")


# --- a routing error, not a failure of the driver ------------------------------------------


FP = "img|sources:a|bundle:b"


def mismatched(kernel: str, run_id: str, kind: str = "mod") -> dict:
    message = f"kernel built with {BULLSEYE_510}; builder bookworm has gcc 12.2.0: route it"
    return ledger.record(
        (kernel, "2.3.0", kind),
        TOOLCHAIN_MISMATCH,
        run_id,
        builder="bookworm",
        failure=TOOLCHAIN_MISMATCH,
        reason=f"{TOOLCHAIN_MISMATCH}: {message}",
        fingerprint=FP,
        kernel_compiler=BULLSEYE_510,
    )


class Index:
    """The decision's view of one coverage index (what ledger.Standing gives)."""

    def __init__(self, coverage: ledger.Coverage) -> None:
        self.coverage = coverage

    def entry(self, task):
        return self.coverage.entry(task[0], task[2])

    def fingerprint(self, task, builder):
        return FP


def test_a_mismatch_run_after_run_is_never_quarantined_nor_suggested_for_the_blocklist():
    kernels = ["5.10.0-45-amd64", "5.10.0-46-amd64"]  # one series, one identical error
    coverage = ledger.Coverage("2.3.0", {}, [])
    for n in range(5):
        for kernel in kernels:
            coverage.apply(mismatched(kernel, f"run{n}"))
    entry = coverage.entry(kernels[0], "mod")
    assert entry["status"] == TOOLCHAIN_MISMATCH and "failures" not in entry
    assert entry["kernel_compiler"] == BULLSEYE_510
    known = Known(Blocklist([]), ledger=Index(coverage), quarantine_after=1)
    assert decide((kernels[0], "2.3.0", "mod"), "bookworm", False, known).status == BUILD
    assert suggest_blocklist({"2.3.0": coverage.entries}) == []
    # the same kernels failing to compile twice would be both (the contrast)
    for kernel in kernels:
        coverage.apply(
            ledger.record(
                (kernel, "2.3.0", "mod"),
                "failed",
                "r",
                fingerprint=FP,
                failure="compile",
                reason="compile: main.c:1:1: error: x",
            )
        )
    assert decide((kernels[0], "2.3.0", "mod"), "bookworm", False, known).status == "quarantined"
    assert [s.kernels for s in suggest_blocklist({"2.3.0": coverage.entries})] == [tuple(kernels)]
    # a builder reading the bundle again keeps the compiler the entry knows
    coverage.apply(ledger.record((kernels[0], "2.3.0", "mod"), "infra_failed", "r9"))
    assert coverage.entry(kernels[0], "mod")["kernel_compiler"] == BULLSEYE_510


# --- the plan view -------------------------------------------------------------------------


def test_the_plan_view_shows_per_builder_the_compilers_of_its_kernels():
    plan_json = {
        "summary": {"to_build": 5, "done": 0, "blocked": 0, "unroutable": 0},
        "builders": {
            "bookworm": {"mod": 3, "bpf": 0, "kernels": 3, "shards": 1, "first_kernels": []},
            "bullseye": {"mod": 1, "bpf": 1, "kernels": 1, "shards": 1, "first_kernels": []},
        },
        "shards": [
            {"builder": "bookworm", "tasks": [[k, "2.3.0", "mod"] for k in ("a", "b", "c")]},
            {"builder": "bullseye", "tasks": [["d", "2.3.0", "mod"], ["d", "2.3.0", "bpf"]]},
        ],
        "slots": 2,
        "pod_seconds": 3600,
        "makespan_s": 1800,
        "lower_bound_s": 1800,
    }
    view = plan_view(plan_json, {"a": BOOKWORM_61, "b": BOOKWORM_612, "d": BULLSEYE_510})
    assert view["builders"]["bookworm"]["compilers"] == {"gcc 12": 2, "?": 1}
    assert view["builders"]["bullseye"]["compilers"] == {"gcc 10": 1}
    text = format_plan_view(view)
    assert "kernels built with: gcc 12 (2), ? (1)" in text
    assert "kernels built with: gcc 10 (1)" in text
    # nothing known yet: every kernel is "?"
    assert plan_view(plan_json)["builders"]["bullseye"]["compilers"] == {"?": 1}
