"""What a kernel bundle is (DESIGN.md §2): ``bundle-<kernel>.tgz``, the kernel's header/build
tree plus one-value files at the archive root; and opening an extracted one for a build.
Making bundles from Debian's packages: :mod:`drivers.build.bundles`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from drivers.domain import layout

VALUE_PREFIX = "BUNDLE_"
# The one-value files at a bundle's root, each the value and a newline: the full uname,
# where to run make (relative to the root), the distro, the kernel's x.y.z (named as in
# the original bundles: VERSION.MAJOR.MINOR) and the sha256 of the tree.
METADATA_FILES = tuple(
    VALUE_PREFIX + name
    for name in ("UNAME", "BUILD_DIR", "DISTRO", "VERSION", "MAJOR", "MINOR", "CHECKSUM")
)


class BundleCorrupt(Exception):
    """An extracted bundle that cannot be built against; the message says why."""


@dataclasses.dataclass(frozen=True)
class Bundle:
    root: Path
    uname: str
    build_dir: Path  # absolute, inside root
    info: dict[str, str]  # every BUNDLE_* value, keyed by the suffix (UNAME, DISTRO, ...)


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
    return Bundle(root, uname, build_dir, info)
