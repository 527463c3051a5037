"""`drivers build KERNEL`: one kernel's drivers on this machine, through the shard's code.

The session's one real build (tests/conftest.py, shared with the VM tests) is checked
here as the command: the collector's real 2.3.0 kernel module and eBPF probe on Debian's
6.1.0-56-amd64 (exit 0); and the example module made not to compile (exit 1, one more
bundle extraction and a short compile). Bad inputs (exit 2) are refused before anything
builds: tiny archives, no compiler. Plus the first-error rule on excerpts of real 8.1.0 build logs.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest

from drivers.build.bundles import write_tgz
from drivers.build.compile import first_error, tool_version
from drivers.build.one_kernel import cache_file_name, log_file_name
from drivers.build.sources import package_sources, source_members
from drivers.domain import layout
from drivers.domain.names import DriverKey
from drivers.domain.toolchain import TOOLCHAIN_MISMATCH, parse_compiler
from drivers.domain.verify import elf_sections, read_modinfo, verify_driver
from drivers.ops.cli import main
from example_sources import EXAMPLE_SOURCES
from tarballs import rewritten, tgz, without_common_tree

REPO = Path(__file__).resolve().parents[1]
KERNEL = "6.1.0-56-amd64"
KERNEL_COMPILER = "gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"  # its .config's CC_VERSION_TEXT


# --- inputs ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bundle(debian_6_1_bundle) -> Path:
    return debian_6_1_bundle


def build(*args: str) -> list[str]:
    return ["build", *args]


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


# --- the real builds: one module-scoped fixture -----------------------------------------


def run_build(argv: list[str]) -> tuple[int, list[dict], str]:
    stdout, stderr = io.StringIO(), io.StringIO()  # capsys is per test: capture by hand
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(argv)
    return status, json_lines(stdout.getvalue()), stderr.getvalue()


@pytest.fixture(scope="module")
def broken_build(bundle, tmp_path_factory) -> tuple:
    """`drivers build` of the example sources with a module that does not compile, the
    module only (one more bundle extraction and a short compile)."""
    tmp = tmp_path_factory.mktemp("broken-build")
    broken = tmp / "broken" / "2.3.0"
    shutil.copytree(EXAMPLE_SOURCES / "2.3.0", broken)
    source = broken / "module/collector.c"
    source.write_text(source.read_text() + "\nstatic int oops = undeclared_thing;\n")
    broken_tgz = package_sources(broken, tmp / "broken-tgz")
    argv = build(KERNEL, "--driver-version", "2.3.0", "--bundle", str(bundle), "--kinds", "mod")
    return (
        *run_build(argv + ["--sources", str(broken_tgz), "--out", str(tmp / "out")]),
        tmp / "out",
    )


def test_the_real_2_3_0_module_and_probe_build_and_land_under_their_cache_names(real_build):
    """The session's shared real build (tests/conftest.py), checked as the command."""
    status, lines, stderr, out, work = (
        real_build.status,
        real_build.lines,
        real_build.stderr,
        real_build.out,
        real_build.work,
    )
    assert status == 0, stderr
    mod, bpf = DriverKey(KERNEL, "2.3.0", "mod"), DriverKey(KERNEL, "2.3.0", "bpf")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"collector-{KERNEL}.ko.gz", f"collector-ebpf-{KERNEL}.o.gz"]
    )
    for key, line in zip((mod, bpf), lines, strict=True):
        data = (out / cache_file_name(key)).read_bytes()
        assert line == {
            "kernel": KERNEL,
            "driver_version": "2.3.0",
            "kind": key.kind,
            "builder": "fc36",  # the shipped config's route for 6.1 kernels
            "status": "built",
            "object": str(out / cache_file_name(key)),
            "sha256": hashlib.sha256(data).hexdigest(),
            "seconds": line["seconds"],
            "failure": None,
            "message": "",
            "log": None,
            # the toolchain guard read it from the bundle's .config and let gcc-12 build
            "kernel_compiler": KERNEL_COMPILER,
        }
        assert line["seconds"] > 1  # a real compile, not a cached object
        assert verify_driver(key, data, unavailable=False) == []
    # The real module, its driver_config.h as prepared: version, API and schema, name.
    modinfo = read_modinfo(gzip.decompress((out / cache_file_name(mod)).read_bytes()))
    assert modinfo["vermagic"].split()[0] == KERNEL
    assert (modinfo["name"], modinfo["version"]) == ("collector", "2.3.0")
    assert (modinfo["api_version"], modinfo["schema_version"]) == ("2.0.0", "2.2.0")
    # The real probe (its fillers), built with the whole tree's ../driver_config.h.
    probe = gzip.decompress((out / cache_file_name(bpf)).read_bytes())
    sections = elf_sections(probe)
    assert any(s.startswith("raw_tracepoint/filler/") for s in sections) and "maps" in sections
    assert not any(s.startswith(".debug_") for s in sections)  # llvm-strip -g ran
    assert sections["probe_version"] == b"2.3.0\0"
    assert sections["kernel_version"] == KERNEL.encode() + b"\0"
    assert not list(work.iterdir())  # the scratch is gone


def test_a_compile_failure_exits_1_with_its_first_error_and_log(broken_build):
    status, lines, stderr, out = broken_build
    assert status == 1
    (line,) = lines
    log = out / log_file_name(DriverKey(KERNEL, "2.3.0", "mod"))
    assert line["status"] == "failed" and line["failure"] == "compile"
    assert line["object"] is None and line["sha256"] is None
    assert line["log"] == str(log) and str(log) in stderr
    assert line["message"].startswith("module/collector.c:")  # as in the sources
    assert "undeclared_thing" in line["message"] and "error:" in line["message"]
    assert "undeclared_thing" in log.read_text()
    assert sorted(p.name for p in out.iterdir()) == [log.name]  # no driver object


# --- the toolchain guard: exit 1 before anything compiles -------------------------------


def test_a_kernel_built_by_another_gcc_major_is_refused_and_exits_1(bundle, tmp_path):
    """The real 6.1.0-56 bundle with its .config saying bullseye's gcc-10 built it."""
    gcc10 = "gcc-10 (Debian 10.2.1-6) 10.2.1 20210110"
    config = f"usr/src/linux-headers-{KERNEL}/.config"
    line = f'CONFIG_CC_VERSION_TEXT="{KERNEL_COMPILER}"'.encode()

    def edit(name: str, data: bytes) -> bytes:
        if name == config:
            assert line in data  # the real tree's, as the guard read it in real_builds
            return data.replace(line, f'CONFIG_CC_VERSION_TEXT="{gcc10}"'.encode())
        return data

    edited = tmp_path / layout.bundle_object(KERNEL)
    edited.write_bytes(rewritten(bundle, edit, without_common_tree))
    sources = package_sources(EXAMPLE_SOURCES / "2.3.0", tmp_path / "sources")
    out = tmp_path / "out"

    status, lines, stderr = run_build(
        build(KERNEL, "--driver-version", "2.3.0", "--builder", "rhel7")
        + ["--sources", str(sources), "--bundle", str(edited), "--out", str(out)]
    )

    assert status == 1, stderr
    host = parse_compiler(tool_version("gcc-12"))  # the CC of this tree's kbuild
    message = (
        f"kernel built with {gcc10}; builder rhel7 has gcc {host.version} (gcc-12): "
        "route it to a builder with gcc 10"
    )
    for line_, kind in zip(lines, ("mod", "bpf"), strict=True):
        assert (line_["kind"], line_["builder"], line_["status"], line_["failure"]) == (
            kind,
            "rhel7",
            TOOLCHAIN_MISMATCH,
            TOOLCHAIN_MISMATCH,
        )
        assert (line_["message"], line_["log"], line_["kernel_compiler"]) == (message, None, gcc10)
        assert line_["seconds"] < 0.5  # no make ran
        assert (
            f"{KERNEL} 2.3.0 {kind}: refused before compiling, {TOOLCHAIN_MISMATCH}: {message}"
            in stderr
        )
    assert f"{KERNEL}: building as builder rhel7" in stderr
    assert list(out.iterdir()) == []  # no driver, no log


# --- exit 2: bad input, before anything builds --------------------------------------------


@pytest.fixture(scope="module")
def example_tgz(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("example-sources")
    return {v: package_sources(EXAMPLE_SOURCES / v, out) for v in ("2.3.0", "2.4.0-rc1")}


def tiny_bundle(path: Path, uname: str) -> Path:
    path.write_bytes(
        tgz(
            ("BUNDLE_UNAME", "file", f"{uname}\n"),
            ("BUNDLE_BUILD_DIR", "file", "build\n"),
            ("build/Makefile", "file", "modules:\n\t@false\n"),
        )
    )
    return path


def test_a_kernel_without_ebpf_gets_the_unavail_marker_and_exits_0(example_tgz, tmp_path, capsys):
    kernel = "4.9.0-19-amd64"
    status = main(
        build(kernel, "--driver-version", "2.3.0", "--kinds", "bpf")
        + ["--sources", str(example_tgz["2.3.0"]), "--bundle", str(tmp_path / "none.tgz")]
        + ["--out", str(tmp_path / "out")]
    )
    assert status == 0
    (line,) = json_lines(capsys.readouterr().out)
    marker = tmp_path / "out" / f".collector-ebpf-{kernel}.unavail"
    assert (line["status"], line["object"]) == ("unavailable", str(marker))
    assert marker.read_bytes() == b""


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"--kinds": "mod,kmod"}, "unknown kind(s) ['kmod']"),
        ({"kernel": "not a kernel"}, "not a kernel"),
        ({"--driver-version": "2.3"}, "2.3"),
        ({"--sources": "missing.tgz"}, "--sources {tmp}/missing.tgz: no such file"),
        ({"--bundle": "missing.tgz"}, "--bundle {tmp}/missing.tgz: no such file"),
        ({"--bundle": "other"}, "is for another kernel: BUNDLE_UNAME is '6.1.0-47-amd64'"),
        ({"--sources": "2.4.0-rc1"}, "the sources of 2.4.0-rc1, not of 2.3.0"),
        ({"--sources": "named"}, "driver version '2.2.0', not '2.3.0'"),
        ({"--sources": "gs://"}, "not a gs:// URI"),
        ({"--sources": "mod only"}, "build.json has no bpf entry (it builds mod)"),
        ({"--builder": "bookworm"}, "--builder bookworm: not a builder of"),
        (
            {"kernel": "2.6.32-754.el6.x86_64"},
            "takes 2.6.32-754.el6.x86_64 (mod, bpf): pass --builder",
        ),
        (
            {"kernel": "4.18.0-372.9.1.el8.x86_64"},
            "kinds go to different builders (mod -> rhel8, bpf -> rhel7)",
        ),
    ],
)
def test_bad_input_exits_2_naming_the_culprit(change, words, example_tgz, tmp_path, capsys):
    named = tmp_path / "named" / "2.3.0"  # build.json names another version
    shutil.copytree(EXAMPLE_SOURCES / "2.3.0", named)
    spec = json.loads((named / "build.json").read_text()) | {"driver_version": "2.2.0"}
    (named / "build.json").write_text(json.dumps(spec))
    mod_only = tmp_path / "mod-only" / "2.3.0"
    shutil.copytree(EXAMPLE_SOURCES / "2.3.0", mod_only)
    spec = json.loads((mod_only / "build.json").read_text())
    (mod_only / "build.json").write_text(json.dumps({"mod": spec["mod"]}))
    choices = {
        "mod only": str(write_tgz(source_members(mod_only), tmp_path / "mod-only.tgz")),
        "other": str(tiny_bundle(tmp_path / "other.tgz", "6.1.0-47-amd64")),
        "2.4.0-rc1": str(example_tgz["2.4.0-rc1"]),
        "named": str(write_tgz(source_members(named), tmp_path / "sources.tgz")),
        "missing.tgz": str(tmp_path / "missing.tgz"),
        "gs://": "gs://",
    }
    args = {
        "kernel": KERNEL,
        "--driver-version": "2.3.0",
        "--kinds": "mod,bpf",
        "--sources": str(example_tgz["2.3.0"]),
        "--bundle": str(tiny_bundle(tmp_path / "bundle.tgz", KERNEL)),
        "--out": str(tmp_path / "out"),
    }
    for name, value in change.items():
        args[name] = choices.get(value, value)
    argv = ["build", args.pop("kernel")] + [x for kv in args.items() for x in kv]

    status = main(argv)

    captured = capsys.readouterr()
    assert status == 2
    assert words.format(tmp=tmp_path) in captured.err
    assert captured.out == "" and not list((tmp_path / "out").glob("*collector*"))


# --- the first error is the driver's, not a configure probe's ----------------------------

# From a real build: the 8.1.0 kernel module on 6.1.0-56-amd64 (bare make, paths
# shortened to $W). Three of its feature probes fail, as they should on 6.1; 6.1's
# Kbuild.include has no `newline`, so each probe's output is one line. The module built.
REAL_8_1_0_LOG = """\
make: Entering directory '$W/linux-headers-6.1.0-56-amd64'
[configure-kmod] Including $W/driver//configure/FS_MNT_IDMAP/Makefile.inc $W/driver//configure/ACCESS_OK_2/Makefile.inc
[configure-kmod] Build output for HAS_FS_MNT_IDMAP:
[configure-kmod] make: Entering directory '$W/driver/configure/FS_MNT_IDMAP'make -C $W/linux-headers-6.1.0-56-amd64 M=$W/driver/configure/FS_MNT_IDMAP modules make[1]: Entering directory '$W/linux-headers-6.1.0-56-amd64'  CC [M]  $W/driver/configure/FS_MNT_IDMAP/test.o $W/driver/configure/FS_MNT_IDMAP/test.c: In function 'fs_mnt_idmap_init':$W/driver/configure/FS_MNT_IDMAP/test.c:26:32: error: passing argument 1 of 'inode_owner_or_capable' from incompatible pointer type [-Werror=incompatible-pointer-types] cc1: some warnings being treated as errorsmake[2]: *** [$W/linux-headers-6.1.0-56-common/scripts/Makefile.build:255: $W/driver/configure/FS_MNT_IDMAP/test.o] Error 1 make[1]: Leaving directory '$W/linux-headers-6.1.0-56-amd64'make: *** [Makefile:15: all] Error 2
[configure-kmod] Setting HAS_ACCESS_OK_2 flag
[configure-kmod] Setting HAS_0__SANITY flag
[configure-kmod] Build system is sane
[configure-kmod] Build output for HAS_CLASS_CREATE_1:
[configure-kmod] make: Entering directory '$W/driver/configure/CLASS_CREATE_1'make -C $W/linux-headers-6.1.0-56-amd64 M=$W/driver/configure/CLASS_CREATE_1 modules  CC [M]  $W/driver/configure/CLASS_CREATE_1/test.o $W/driver/configure/CLASS_CREATE_1/test.c:23:56: error: macro "class_create" requires 2 arguments, but only 1 given make: *** [Makefile:15: all] Error 2
  CC [M]  $W/driver/main.o
  CC [M]  $W/driver/dynamic_params_table.o
"""  # noqa: E501 (log lines as they are)
# From a real build: the 8.1.0 eBPF probe on 6.12.115+deb12-amd64 (paths shortened).
# 6.12's Kbuild.include defines `newline`, so a failed probe's output spans lines, only
# the first prefixed; its make's last line ends it. The probe built.
MULTI_LINE_PROBE = """\
[configure-bpf] Build output for HAS_TASK_PIDS_FIELD:
[configure-bpf] make: Entering directory '$W/driver/bpf/configure/TASK_PIDS_FIELD'
make -C $W/linux-headers-6.12.115+deb12-amd64 M=$PWD make[1]: Entering directory '$W/linux-headers-6.12.115+deb12-amd64'
$W/driver/bpf/configure/TASK_PIDS_FIELD/test.c:23:11: error: no member named 'pids' in 'struct task_struct'; did you mean 'pid'?         if(task->pids) {
make[3]: *** [$W/driver/bpf/configure/TASK_PIDS_FIELD/Makefile:33: $W/driver/bpf/configure/TASK_PIDS_FIELD/test.o] Error 1 make[2]: *** [$W/linux-headers-6.12.115+deb12-common/Makefile:2007: $W/driver/bpf/configure/TASK_PIDS_FIELD] Error 2
make[1]: *** [../linux-headers-6.12.115+deb12-common/Makefile:236: __sub-make] Error 2 make[1]: Leaving directory '$W/linux-headers-6.12.115+deb12-amd64'
make: *** [Makefile:26: all] Error 2
[configure-bpf] Setting HAS_0__SANITY flag
[configure-bpf] Build system is sane
"""  # noqa: E501
DRIVER_ERROR = "$W/driver/main.c:2070:22: error: implicit declaration of function 'fd_is_open'"


@pytest.mark.parametrize("probes", [REAL_8_1_0_LOG, MULTI_LINE_PROBE], ids=["one-line", "multi"])
def test_a_failed_configure_probe_is_never_the_drivers_first_error(probes):
    assert first_error(probes.encode(), "make exit status 2") == "make exit status 2"
    failed = (probes + DRIVER_ERROR + "\nmake: *** [Makefile:2065] Error 2\n").encode()
    assert first_error(failed, "fallback", "$W/") == DRIVER_ERROR.removeprefix("$W/")


def test_a_compiler_error_wins_over_the_makefiles_shell_noise():
    # 8.1.0's probe Makefile: `expr` on a header kbuild does not have, on every kernel.
    log = b"expr: syntax error: unexpected argument '1'\n" + DRIVER_ERROR.encode() + b"\n"
    assert first_error(log, "fallback", "$W/") == DRIVER_ERROR.removeprefix("$W/")
    assert first_error(log[: log.index(b"\n")], "fallback").startswith("expr: syntax error")


def test_gs_inputs_are_read_as_build_shard_reads_them(store, example_tgz, tmp_path, capsys):
    sources = store()
    sources.upload_new_file("2.3.0.tgz", example_tgz["2.3.0"])
    kernel = "4.9.0-19-amd64"  # no eBPF: the marker, and no bundle is fetched
    common = ["--driver-version", "2.3.0", "--kinds", "bpf", "--out", str(tmp_path / "out")]
    bundle = f"gs://{sources.bucket_name}/{layout.bundle_object(kernel)}"

    ok = main(build(kernel, *common, "--sources", f"gs://{sources.bucket_name}/2.3.0.tgz")
              + ["--bundle", bundle])  # fmt: skip
    assert ok == 0 and json_lines(capsys.readouterr().out)[0]["status"] == "unavailable"

    missing = f"gs://{sources.bucket_name}/2.4.0.tgz"
    assert main(build(kernel, *common, "--sources", missing, "--bundle", bundle)) == 2
    assert f"object {missing} does not exist" in capsys.readouterr().err
