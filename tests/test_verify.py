"""verify_driver and the ELF reader on objects made by the real compilers: an x86-64
relocatable object carrying a .modinfo vermagic (what a kernel module is, to the checks)
and the example eBPF probe compiled by clang. The builder tests run the same checks on
real kernel modules built against a Debian bundle."""

from __future__ import annotations

import gzip
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from drivers.build.compile import gzip_driver as gzip_deterministic
from drivers.domain.names import DriverKey
from drivers.domain.verify import (
    EM_BPF,
    EM_X86_64,
    ElfError,
    elf_sections,
    read_elf_header,
    read_vermagic,
    verify_driver,
)
from example_sources import EXAMPLE_SOURCES

KERNEL = "6.1.0-47-amd64"
VERMAGIC = f"{KERNEL} SMP preempt mod_unload modversions "
MOD = DriverKey(KERNEL, "2.3.0", "mod")
BPF = DriverKey(KERNEL, "2.3.0", "bpf")
PROBE = EXAMPLE_SOURCES / "2.3.0" / "bpf" / "probe.c"


def compile_c(tmp_path: Path, compiler: list[str], source: str | Path) -> bytes:
    if shutil.which(compiler[0]) is None:
        pytest.skip(f"{compiler[0]} is not installed (scripts/host-deps.sh)")
    src = tmp_path / "src.c"
    if isinstance(source, Path):
        shutil.copy(source, src)
    else:
        src.write_text(source)
    out = tmp_path / "out.o"
    subprocess.run([*compiler, "-c", str(src), "-o", str(out)], check=True)
    return out.read_bytes()


def module_like(tmp_path: Path, vermagic: str = VERMAGIC) -> bytes:
    """gcc -c output with the .modinfo entries modpost writes into a .ko."""
    return compile_c(
        tmp_path,
        ["gcc", "-O2"],
        'static const char __used_license[] __attribute__((used, section(".modinfo"))) = '
        '"license=GPL";\n'
        'static const char __used_vermagic[] __attribute__((used, section(".modinfo"))) = '
        f'"vermagic={vermagic}";\n'
        "int collector_init(void) { return 0; }\n",
    )


@pytest.fixture(scope="module")
def module(tmp_path_factory) -> bytes:
    return module_like(tmp_path_factory.mktemp("mod"))


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> bytes:
    # The host's UAPI headers: <asm/types.h> lives in the multiarch folder.
    multiarch = subprocess.run(
        ["gcc", "-print-multiarch"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return compile_c(
        tmp_path_factory.mktemp("bpf"),
        ["clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{multiarch}"],
        PROBE,
    )


def test_a_good_module_and_probe_pass(module, probe):
    assert verify_driver(MOD, gzip_deterministic(module), unavailable=False) == []
    assert verify_driver(BPF, gzip_deterministic(probe), unavailable=False) == []


def test_the_elf_reader_sees_what_the_compilers_wrote(module, probe):
    assert read_vermagic(module) == VERMAGIC
    assert read_elf_header(module).e_machine == EM_X86_64
    assert read_elf_header(probe).e_machine == EM_BPF
    assert read_vermagic(probe) is None  # no .modinfo
    assert "license" in elf_sections(probe)


def test_an_empty_marker_for_bpf_passes_and_a_mod_marker_does_not():
    assert verify_driver(BPF, b"", unavailable=True) == []
    (problem,) = verify_driver(MOD, b"", unavailable=True)
    assert "only for bpf" in problem


def test_a_non_empty_marker_fails():
    (problem,) = verify_driver(BPF, b"x", unavailable=True)
    assert BPF.unavail_name() in problem and "must be empty" in problem


def test_a_truncated_gzip_fails(module):
    data = gzip_deterministic(module)
    (problem,) = verify_driver(MOD, data[: len(data) // 2], unavailable=False)
    assert MOD.object_name() in problem and "truncated gzip" in problem


def test_data_that_is_not_gzip_fails(module):
    (problem,) = verify_driver(MOD, module, unavailable=False)
    assert "not gzip" in problem


def test_a_corrupt_gzip_fails(module):
    data = bytearray(gzip_deterministic(module))
    data[len(data) // 2] ^= 0xFF
    (problem,) = verify_driver(MOD, bytes(data), unavailable=False)
    assert "gzip" in problem


def test_a_gzip_of_something_that_is_not_elf_fails():
    (problem,) = verify_driver(BPF, gzip.compress(b"#!/bin/sh\necho probe\n"), unavailable=False)
    assert "not an ELF file" in problem


def with_machine(elf: bytes, machine: int) -> bytes:
    return elf[:18] + struct.pack("<H", machine) + elf[20:]


def test_a_module_for_another_machine_fails(module):
    problems = verify_driver(MOD, gzip_deterministic(with_machine(module, 183)), False)
    assert problems == [f"{MOD.object_name()}: ELF machine is aarch64 (183), expected x86-64 (62)"]


def test_a_probe_that_is_not_ebpf_fails(module):
    # A host object under the probe's name: what a Makefile calling gcc instead of clang
    # -target bpf would give.
    (problem,) = verify_driver(BPF, gzip_deterministic(module), unavailable=False)
    assert "ELF machine is x86-64 (62), expected eBPF (247)" in problem


def test_a_module_for_another_kernel_fails(tmp_path):
    other = module_like(tmp_path, "6.1.0-47-cloud-amd64 SMP preempt mod_unload modversions ")
    (problem,) = verify_driver(MOD, gzip_deterministic(other), unavailable=False)
    assert "vermagic '6.1.0-47-cloud-amd64 SMP" in problem and f"{KERNEL!r}" in problem


def test_a_vermagic_that_only_shares_a_prefix_fails(tmp_path):
    # 6.1.0-47-amd64 must not accept a module for 6.1.0-47-amd64-rt or the like.
    other = module_like(tmp_path, f"{KERNEL}-custom SMP mod_unload ")
    assert verify_driver(MOD, gzip_deterministic(other), unavailable=False) != []


def test_a_module_without_vermagic_fails(probe):
    # An eBPF object under a module's name: wrong machine and no .modinfo.
    problems = verify_driver(MOD, gzip_deterministic(probe), unavailable=False)
    assert any("expected x86-64" in p for p in problems)
    assert any("no vermagic" in p for p in problems)


def test_an_executable_is_not_a_driver(tmp_path):
    exe = tmp_path / "a.out"
    (tmp_path / "m.c").write_text("int main(void) { return 0; }\n")
    subprocess.run(["gcc", str(tmp_path / "m.c"), "-o", str(exe)], check=True)
    problems = verify_driver(MOD, gzip_deterministic(exe.read_bytes()), unavailable=False)
    assert any("expected ET_REL" in p for p in problems)


@pytest.mark.parametrize("cut", [3, 16, 40, 64, 200])
def test_a_cut_elf_raises_elf_error_not_struct_or_index_errors(module, cut):
    with pytest.raises(ElfError):
        read_vermagic(module[:cut])


def test_a_section_table_pointing_past_the_end_is_an_elf_error(module):
    broken = module[:40] + struct.pack("<Q", len(module) + 4096) + module[48:]  # e_shoff
    with pytest.raises(ElfError, match="past the end"):
        elf_sections(broken)


def test_decompression_is_bounded():
    bomb = gzip.compress(b"\0" * (8 << 20))
    from drivers.domain import verify

    with pytest.raises(ValueError, match="more than"):
        verify.gunzip(bomb, limit=1 << 20)
