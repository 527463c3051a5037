"""Boot images for the VM load tests (:mod:`drivers.build.vmtest`): a kernel per release
in the kernel-images bucket (``<kernel>/vmlinuz``, :func:`drivers.domain.layout.boot_image_object`),
with the modules drivers may depend on kept beside it (``<kernel>/modules/…``).

Made from Debian's ``linux-image-<uname>`` package (``drivers bundle debian …
--boot-images``), published never overwriting, fetched by the tests.
"""

from __future__ import annotations

import lzma
from collections.abc import Sequence
from pathlib import Path

from drivers.build.debian import (
    DISTRO,
    IMAGE_PREFIX,
    DebianArchive,
    DebianError,
    Dependency,
    deb_members,
    fetch_deb,
)
from drivers.domain import layout
from drivers.domain.errors import DriversError
from drivers.domain.kernels import parse_kernel
from drivers.domain.verify import read_modinfo
from drivers.store.storage import ObjectNotFound, ObjectStore


class BootImageError(DriversError):
    """A boot image cannot be made as asked (a module the kernel does not have)."""


def _plain_module(name: str, data: bytes) -> bytes:
    """A module file's ELF bytes (Debian compresses 6.12's with xz)."""
    return lzma.decompress(data) if name.endswith(".ko.xz") else data


def module_closure(wanted: Sequence[str], depends: dict[str, list[str]]) -> list[str]:
    """``wanted`` and everything they depend on (names as ``modinfo`` gives them, with
    ``-`` and ``_`` equal); raises BootImageError for a name the kernel does not have."""
    norm = {n.replace("-", "_"): n for n in depends}
    out: list[str] = []
    todo = [w.replace("-", "_") for w in wanted]
    while todo:
        name = todo.pop()
        if name in out:
            continue
        if name not in norm:
            raise BootImageError(f"the kernel has no loadable module {name!r}")
        out.append(name)
        todo += [d.replace("-", "_") for d in depends[norm[name]]]
    return sorted(norm[n] for n in out)


def _module_name(member: str) -> str:
    """A module's name from its file name, as kbuild derives it (``-`` → ``_``)."""
    base = member.rsplit("/", 1)[-1]
    return base.removesuffix(".xz").removesuffix(".ko").replace("-", "_")


def _read_image_package(
    deb: Path, uname: str, kernel_member: str | None, modules: Sequence[str]
) -> tuple[bytes | None, dict[str, bytes]]:
    """The kernel image (when ``kernel_member`` is given) and the plain ``.ko`` bytes of
    ``modules`` and their dependencies by path under the module tree, in one pass over
    the ~400 MB package per level of dependencies (usually one): only the modules wanted
    so far are decompressed and read."""
    # bookworm and older ship /lib/modules; trixie (merged /usr) /usr/lib/modules.
    trees = (f"./lib/modules/{uname}/kernel/", f"./usr/lib/modules/{uname}/kernel/")
    wanted = {m.replace("-", "_") for m in modules}
    kernel: bytes | None = None
    found: dict[str, tuple[str, bytes, list[str]]] = {}  # name: (path, bytes, depends)
    present: set[str] = set()
    while True:
        for name, f in deb_members(deb):
            if f is None:
                continue
            if name == kernel_member:
                kernel = f.read()
            elif name.startswith(trees) and name.endswith((".ko", ".ko.xz")):
                module = _module_name(name)
                present.add(module)
                if module in wanted and module not in found:
                    data = _plain_module(name, f.read())
                    depends = [d for d in read_modinfo(data).get("depends", "").split(",") if d]
                    tree = next(t for t in trees if name.startswith(t))
                    found[module] = (name[len(tree) :].removesuffix(".xz"), data, depends)
            elif not wanted - found.keys() and (kernel_member is None or kernel is not None):
                break  # everything asked for is read: stop decompressing
        missing = wanted - present
        if missing:
            raise BootImageError(f"the kernel has no loadable module {sorted(missing)[0]!r}")
        deps = {d.replace("-", "_") for _, _, ds in found.values() for d in ds}
        if deps <= found.keys():
            return kernel, {path: data for path, data, _ in found.values()}
        wanted |= deps
        kernel_member = None  # read in the first pass


def debian_boot_image(
    uname: str,
    deb_cache: Path,
    out_dir: Path,
    modules: Sequence[str] = (),
    archive: DebianArchive | None = None,
) -> Path | None:
    """``vmlinuz`` of Debian's ``linux-image-<uname>`` (from the .deb cache, else from
    the release that offers it, :func:`drivers.build.debian.fetch_deb`),
    extracted to ``out_dir/<uname>/vmlinuz``, and the ``modules`` drivers may depend on
    (with their own dependencies) as plain ``.ko`` files under
    ``out_dir/<uname>/modules/``; None when Debian has no such package."""
    folder = out_dir / uname
    target = folder / "vmlinuz"
    if target.is_file() and not modules:
        return target
    if parse_kernel(uname).family != DISTRO:
        return None  # no release to ask
    try:
        deb, _ = fetch_deb(Dependency(IMAGE_PREFIX + uname), deb_cache, archive)
    except DebianError:
        return None
    kernel_member = f"./boot/vmlinuz-{uname}" if not target.is_file() else None
    kernel, files = _read_image_package(deb, uname, kernel_member, modules)
    if kernel_member is not None:
        if not kernel:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".part")
        partial.write_bytes(kernel)
        partial.replace(target)
    for relative, data in files.items():
        path = folder / "modules" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return target


def publish_boot_image(
    store: ObjectStore,
    uname: str,
    deb_cache: Path,
    out_dir: Path,
    modules: Sequence[str] = (),
    archive: DebianArchive | None = None,
) -> str:
    """Put Debian's kernel image for ``uname``, and the ``modules`` drivers may depend on,
    in the kernel-images bucket (never overwriting); returns what happened to the image:
    created, identical, different or absent."""
    image = debian_boot_image(uname, deb_cache, out_dir, modules, archive)
    if image is None:
        return "absent"
    tree = image.parent / "modules"
    for path in sorted(tree.rglob("*.ko")) if modules else ():
        store.upload_new_file(layout.boot_module_object(uname, str(path.relative_to(tree))), path)
    return store.upload_new_file(layout.boot_image_object(uname), image).value


def fetch_boot_image(store: ObjectStore, uname: str, out_dir: Path) -> Path | None:
    """The kernel image of ``uname`` from the kernel-images bucket, with the modules kept
    beside it in ``modules/`` (None: there is none, so its drivers are untested, never
    passed)."""
    target = out_dir / uname / "vmlinuz"
    try:
        store.download_to(layout.boot_image_object(uname), target)
    except ObjectNotFound:
        return None
    prefix = layout.boot_module_object(uname, "")
    for info in store.list(prefix):
        store.download_to(info.name, target.parent / "modules" / info.name[len(prefix) :])
    return target
