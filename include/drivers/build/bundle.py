"""What a kernel bundle is (DESIGN.md §2): ``bundle-<kernel>.tgz``, the kernel's header/build
tree plus one-value files at the archive root; and opening an extracted one for a build,
with the compiler the kernel was built with and the one kbuild will call there (the
toolchain guard: :mod:`drivers.domain.toolchain`). Making bundles from Debian's packages:
:mod:`drivers.build.bundles`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from drivers.domain import layout
from drivers.domain.toolchain import DEFAULT_CC, Compiler, kbuild_cc, parse_compiler

VALUE_PREFIX = "BUNDLE_"
# The one-value files at a bundle's root, each the value and a newline: the full uname,
# where to run make (relative to the root), the distro, the kernel's x.y.z (named as in
# the original bundles: VERSION.MAJOR.MINOR) and the sha256 of the tree.
METADATA_FILES = tuple(
    VALUE_PREFIX + name
    for name in ("UNAME", "BUILD_DIR", "DISTRO", "VERSION", "MAJOR", "MINOR", "CHECKSUM")
)


# Where a build tree records its compiler's --version line, in the order read: the first
# found wins. (file in the build dir, the line that holds it)
COMPILER_RECORDS = (
    (".config", re.compile(r'^CONFIG_CC_VERSION_TEXT="(?P<text>[^"\n]*)"', re.MULTILINE)),
    (
        "include/generated/autoconf.h",
        re.compile(r'^#define\s+CONFIG_CC_VERSION_TEXT\s+"(?P<text>[^"\n]*)"', re.MULTILINE),
    ),
    (
        "include/generated/compile.h",
        re.compile(r'^#define\s+LINUX_COMPILER\s+"(?P<text>[^"\n]*)"', re.MULTILINE),
    ),
)
KERNEL_VARIABLES = ".kernelvariables"  # Debian's: CC and CROSS_COMPILE for kbuild
_READ_LIMIT = 4 * 1024 * 1024  # a .config is ~300 KB; the tree is untrusted input


class BundleCorrupt(Exception):
    """An extracted bundle that cannot be built against; the message says why."""


@dataclasses.dataclass(frozen=True)
class Bundle:
    root: Path
    uname: str
    build_dir: Path  # absolute, inside root
    info: dict[str, str]  # every BUNDLE_* value, keyed by the suffix (UNAME, DISTRO, ...)
    compiler: Compiler | None = None  # the kernel was built with it; None: not recorded
    cc: str = DEFAULT_CC  # the command kbuild runs as CC in build_dir


def _text(path: Path) -> str | None:
    """A regular file's text (not a link: the tree is untrusted), its first few MB."""
    if not path.is_file() or path.is_symlink():
        return None
    with open(path, "rb") as f:
        return f.read(_READ_LIMIT).decode(errors="replace")


def kernel_compiler(build_dir: Path) -> Compiler | None:
    """The compiler the kernel was built with, from the first of :data:`COMPILER_RECORDS`
    that names one; None when none does."""
    for name, pattern in COMPILER_RECORDS:
        text = _text(build_dir / name)
        match = pattern.search(text) if text else None
        compiler = parse_compiler(match["text"]) if match else None
        if compiler is not None:
            return compiler
    return None


def tree_cc(build_dir: Path) -> str:
    """The command kbuild runs as CC in ``build_dir`` (Debian trees name it)."""
    return kbuild_cc(_text(build_dir / KERNEL_VARIABLES), dict(os.environ))


def open_bundle(root: Path, kernel: str) -> Bundle:
    """Read the BUNDLE_* files of an extracted bundle and check it is the kernel's."""
    bundle = layout.bundle_object(kernel)
    info = {}
    for name in METADATA_FILES:
        path = root / name
        if path.is_file() and not path.is_symlink():
            info[name.removeprefix(VALUE_PREFIX)] = path.read_text(errors="replace").strip()
    uname = info.get("UNAME")
    if not uname:
        raise BundleCorrupt(f"{bundle} has no BUNDLE_UNAME at its root")
    if uname != kernel:
        raise BundleCorrupt(f"{bundle} is for another kernel: BUNDLE_UNAME is {uname!r}")
    relative = info.get("BUILD_DIR")
    if not relative:
        raise BundleCorrupt(f"{bundle} has no BUNDLE_BUILD_DIR at its root")
    build_dir = (root / relative).resolve()
    if relative.startswith("/") or not build_dir.is_relative_to(root.resolve()):
        raise BundleCorrupt(f"{bundle}: BUNDLE_BUILD_DIR {relative!r} leaves the tree")
    if not (build_dir / "Makefile").is_file():
        raise BundleCorrupt(f"{bundle}: BUNDLE_BUILD_DIR {relative!r} has no Makefile")
    return Bundle(root, uname, build_dir, info, kernel_compiler(build_dir), tree_cc(build_dir))
