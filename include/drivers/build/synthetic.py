"""Synthetic drivers: well-formed ELF relocatables that pass :mod:`drivers.domain.verify` for a
kernel, driver version and architecture, without a compiler or kernel headers.

For what cannot be built here (s390x and ppc64le modules, 20,000-driver benchmarks)
and for the demo's "extra" downstream drivers. They are never loadable: the
``.modinfo`` carries a vermagic and a ``synthetic=1`` tag, the payload is filler.
"""

from __future__ import annotations

import io
import random
import struct

from drivers.domain.deterministic import gzip_bytes
from drivers.domain.names import DriverKey
from drivers.domain.verify import EM_BPF, MODULE_ELF

_SHT_PROGBITS, _SHT_STRTAB = 1, 3


def elf_relocatable(machine: int, little_endian: bool, sections: dict[str, bytes]) -> bytes:
    """A 64-bit ET_REL ELF file holding ``sections`` (PROGBITS) and a name table."""
    end = "<" if little_endian else ">"
    names = b"\0" + b"".join(n.encode() + b"\0" for n in [*sections, ".shstrtab"])
    body, headers, offset = io.BytesIO(), [], 64
    name_at = 1
    for name, data in [*sections.items(), (".shstrtab", names)]:
        kind = _SHT_STRTAB if name == ".shstrtab" else _SHT_PROGBITS
        headers.append(struct.pack(end + "IIQQQQIIQQ", name_at, kind, 0, 0, offset, len(data),
                                   0, 0, 1, 0))  # fmt: skip
        body.write(data)
        offset += len(data)
        name_at += len(name) + 1
    shoff = offset + (-offset % 8)
    padding = b"\0" * (shoff - offset)
    null = b"\0" * 64
    count = len(headers) + 1
    ident = b"\x7fELF" + bytes([2, 1 if little_endian else 2, 1]) + b"\0" * 9
    header = ident + struct.pack(end + "HHIQQQIHHHHHH", 1, machine, 1, 0, 0, shoff, 0, 64, 0, 0,
                                 64, count, count - 1)  # fmt: skip
    return header + body.getvalue() + padding + null + b"".join(headers)


def driver(key: DriverKey, arch: str = "x86_64", size: int = 4096, seed: int = 0) -> bytes:
    """The gzip'd driver object of ``key`` for ``arch`` (a cache architecture name), about
    ``size`` bytes long (incompressible filler), deterministic for a given ``seed``."""
    filler = random.Random(f"{key}/{arch}/{seed}").randbytes(max(size - 512, 0))
    if key.kind == "mod":
        machine, little = MODULE_ELF[arch]
        modinfo = f"vermagic={key.kernel} SMP mod_unload \0synthetic=1\0license=GPL\0".encode()
        elf = elf_relocatable(machine, little, {".modinfo": modinfo, ".data": filler})
    else:
        elf = elf_relocatable(EM_BPF, arch != "s390x", {".data": filler})
    return gzip_bytes(elf, 1)
