"""Checks on built drivers, in pure Python (no binutils, no kmod): the DAG's verify step
runs them on every staged object, and the builder uses the same ELF reading for its
vermagic check, so both agree on what a good driver is.

- ``collector-<kernel>.ko.gz``: a gzip stream holding an x86-64 relocatable ELF (a kernel
  module) whose ``.modinfo`` vermagic starts with ``<kernel> ``.
- ``collector-ebpf-<kernel>.o.gz``: a gzip stream holding a relocatable eBPF ELF.
- ``.collector-ebpf-<kernel>.unavail``: empty, and only for eBPF.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from drivers.domain.names import DriverKey

ET_REL = 1
EM_X86_64 = 62
EM_BPF = 247
ELF_MAGIC = b"\x7fELF"
SHN_XINDEX = 0xFFFF
# A driver is a few MB at most; anything far larger is not one (and must not fill memory).
MAX_DRIVER_SIZE = 256 << 20

_MACHINES = {EM_X86_64: "x86-64", EM_BPF: "eBPF", 3: "i386", 183: "aarch64", 22: "s390",
             21: "ppc64"}  # fmt: skip
_TYPES = {0: "ET_NONE", 1: "ET_REL (relocatable)", 2: "ET_EXEC", 3: "ET_DYN", 4: "ET_CORE"}


class ElfError(ValueError):
    """Bytes that are not a well-formed ELF file; the message says what is wrong."""


@dataclass(frozen=True)
class ElfHeader:
    elf_class: int  # 1: 32-bit, 2: 64-bit
    little_endian: bool
    e_type: int
    e_machine: int

    @property
    def machine_name(self) -> str:
        return _MACHINES.get(self.e_machine, f"machine {self.e_machine}")

    @property
    def type_name(self) -> str:
        return _TYPES.get(self.e_type, f"type {self.e_type}")


def read_elf_header(data: bytes) -> ElfHeader:
    if len(data) < 20:
        raise ElfError(f"{len(data)} bytes is too short for an ELF header")
    if data[:4] != ELF_MAGIC:
        raise ElfError(f"not an ELF file (starts with {data[:4]!r})")
    elf_class, encoding = data[4], data[5]
    if elf_class not in (1, 2):
        raise ElfError(f"unknown ELF class {elf_class}")
    if encoding not in (1, 2):
        raise ElfError(f"unknown ELF data encoding {encoding}")
    e_type, e_machine = struct.unpack_from("<HH" if encoding == 1 else ">HH", data, 16)
    return ElfHeader(elf_class, encoding == 1, e_type, e_machine)


def elf_sections(data: bytes) -> dict[str, bytes]:
    """Section name -> contents (empty for SHT_NOBITS), every offset bounds-checked."""
    header = read_elf_header(data)
    end = "<" if header.little_endian else ">"
    if header.elf_class == 2:
        ehdr, shdr = struct.Struct(end + "16xHHIQQQIHHHHHH"), struct.Struct(end + "IIQQQQIIQQ")
    else:
        ehdr, shdr = struct.Struct(end + "16xHHIIIIIHHHHHH"), struct.Struct(end + "IIIIIIIIII")
    if len(data) < ehdr.size:
        raise ElfError(f"{len(data)} bytes is too short for an ELF header")
    *_, e_shoff, _flags, _ehsize, _phentsize, _phnum, e_shentsize, e_shnum, e_shstrndx = (
        ehdr.unpack_from(data)
    )
    if e_shoff == 0:
        return {}
    if e_shentsize < shdr.size:
        raise ElfError(f"section header entries of {e_shentsize} bytes are too small")

    def section(i: int) -> tuple[int, int, int, int, int]:
        at = e_shoff + i * e_shentsize
        if at + shdr.size > len(data):
            raise ElfError(f"section header {i} lies past the end of the file ({len(data)} bytes)")
        name, sh_type, _f, _a, offset, size, link, *_ = shdr.unpack_from(data, at)
        return name, sh_type, offset, size, link

    first = section(0)
    count = e_shnum or first[3]  # more than 0xff00 sections: the count is in section 0
    strndx = first[4] if e_shstrndx == SHN_XINDEX else e_shstrndx
    if count > len(data) // shdr.size:
        raise ElfError(f"{count} section headers cannot fit in {len(data)} bytes")
    headers = [section(i) for i in range(count)]
    if not 0 <= strndx < count:
        raise ElfError(f"section name table index {strndx} is out of range (0..{count - 1})")

    def contents(i: int) -> bytes:
        _name, sh_type, offset, size, _link = headers[i]
        if sh_type == 8:  # SHT_NOBITS (.bss): occupies no file space
            return b""
        if offset + size > len(data):
            raise ElfError(f"section {i} ({size} bytes at {offset}) lies past the end of the file")
        return data[offset : offset + size]

    names = contents(strndx)
    out: dict[str, bytes] = {}
    for i, (name_at, *_rest) in enumerate(headers):
        if i == 0:
            continue
        if name_at >= len(names):
            raise ElfError(f"section {i} names offset {name_at}, outside the section name table")
        stop = names.find(b"\0", name_at)
        name = names[name_at : stop if stop >= 0 else None].decode(errors="replace")
        out.setdefault(name, contents(i))
    return out


def read_modinfo(elf_bytes: bytes) -> dict[str, str]:
    """A kernel module's ``.modinfo`` entries (``modinfo`` prints them: name, vermagic,
    depends, ...); empty when the ELF has none. Raises :class:`ElfError` when the bytes
    are not a well-formed ELF file."""
    modinfo = elf_sections(elf_bytes).get(".modinfo") or b""
    out: dict[str, str] = {}
    for entry in modinfo.split(b"\0"):
        key, eq, value = entry.partition(b"=")
        if eq:
            out.setdefault(key.decode(errors="replace"), value.decode(errors="replace"))
    return out


def read_vermagic(elf_bytes: bytes) -> str | None:
    """The ``vermagic=`` value of a kernel module (what ``modinfo -F vermagic`` prints),
    or None when the ELF has no such entry."""
    return read_modinfo(elf_bytes).get("vermagic")


def vermagic_matches(vermagic: str | None, kernel: str) -> bool:
    """A module loads only on the kernel whose release opens its vermagic."""
    return vermagic is not None and vermagic.startswith(kernel + " ")


def gunzip(data: bytes, limit: int = MAX_DRIVER_SIZE) -> bytes:
    """Decompress a whole gzip file (every member); raise ValueError saying what is wrong."""
    if data[:2] != b"\x1f\x8b":
        raise ValueError(f"not gzip data (starts with {data[:2]!r})")
    out, rest = bytearray(), data
    while rest:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out += d.decompress(rest, limit + 1 - len(out))
        except zlib.error as e:
            raise ValueError(f"corrupt gzip data: {e}") from None
        if len(out) > limit:
            raise ValueError(f"decompresses to more than {limit} bytes: not a driver")
        if not d.eof:
            raise ValueError(
                f"truncated gzip data: the stream ends after {len(data)} bytes "
                f"({len(out)} bytes decompressed)"
            )
        rest = d.unused_data
        if rest and rest[:2] != b"\x1f\x8b":
            raise ValueError(f"{len(rest)} bytes of trailing garbage after the gzip data")
    return bytes(out)


@dataclass(frozen=True)
class DriverFacts:
    """What the bytes of one driver object say, whatever name they are published under:
    an image reads each file once and checks it against every name that refers to it."""

    size: int
    problem: str | None = None  # not gzip, not ELF: nothing else could be read
    header: ElfHeader | None = None
    vermagic: str | None = None
    vermagic_problem: str | None = None


def inspect_driver(data: bytes) -> DriverFacts:
    if not data:
        return DriverFacts(0)
    try:
        elf = gunzip(data)
        header = read_elf_header(elf)
    except (ValueError, ElfError) as e:
        return DriverFacts(len(data), problem=str(e))
    if header.e_machine == EM_BPF:
        return DriverFacts(len(data), header=header)
    try:
        return DriverFacts(len(data), header=header, vermagic=read_vermagic(elf))
    except ElfError as e:
        return DriverFacts(len(data), header=header, vermagic_problem=str(e))


# Kernel modules per architecture of the caches (CPaaS names; upstream builds x86_64):
# ELF machine and byte order. eBPF objects are EM_BPF everywhere.
MODULE_ELF = {"x86_64": (EM_X86_64, True), "s390x": (22, False), "ppc64le": (21, True)}


def check_driver(
    key: DriverKey, facts: DriverFacts, unavailable: bool, arch: str = "x86_64"
) -> list[str]:
    """Problems of a driver object with ``facts`` published as ``key`` (``unavailable``:
    as its ``.unavail`` marker) on ``arch``; an empty list means it is fine."""
    if unavailable:
        if key.kind != "bpf":
            return [f"{key.kernel} {key.driver_version} mod: .unavail markers exist only for bpf"]
        name = key.unavail_name()
        return [f"{name}: marker holds {facts.size} bytes; it must be empty"] if facts.size else []

    name = key.object_name()
    if facts.size == 0:
        return [f"{name}: empty object: not gzip data"]
    if facts.problem is not None or facts.header is None:
        return [f"{name}: {facts.problem}"]
    header = facts.header
    problems = []
    machine, little_endian = MODULE_ELF[arch] if key.kind == "mod" else (EM_BPF, None)
    if header.e_machine != machine:
        problems.append(
            f"{name}: ELF machine is {header.machine_name} ({header.e_machine}), "
            f"expected {_MACHINES[machine]} ({machine})"
        )
    if header.e_type != ET_REL:
        problems.append(f"{name}: ELF type is {header.type_name}, expected ET_REL (relocatable)")
    if key.kind == "mod":
        if header.elf_class != 2 or header.little_endian != little_endian:
            order = "little" if little_endian else "big"
            problems.append(f"{name}: not a 64-bit {order}-endian ELF file")
        if facts.vermagic_problem is not None:
            return [*problems, f"{name}: {facts.vermagic_problem}"]
        if facts.vermagic is None:
            problems.append(f"{name}: no vermagic in .modinfo: not a kernel module")
        elif not vermagic_matches(facts.vermagic, key.kernel):
            problems.append(
                f"{name}: vermagic {facts.vermagic.strip()!r} is for another kernel, "
                f"expected it to start with {key.kernel!r}"
            )
    return problems


def verify_driver(
    key: DriverKey, data: bytes, unavailable: bool, arch: str = "x86_64"
) -> list[str]:
    """Problems with one driver object (empty list: it is fine). ``unavailable`` says
    ``data`` is the key's ``.unavail`` marker rather than its driver object."""
    return check_driver(key, inspect_driver(data), unavailable, arch)
