"""Preparing a falcosecurity-libs tree for the builders: what the collector's
``prepare-src`` did with CMake (``cmake -DCMAKE_BUILD_TYPE=Release -DPROBE_NAME=collector
-DDRIVER_NAME=collector -DDRIVER_DEVICE_NAME=collector -DBUILD_BPF=ON``, then the generated
files copied into the source tree), without CMake: each template substituted as CMake's
``configure_file`` does, in place, so that kbuild builds the module in ``driver/`` and the
probe in ``driver/bpf/`` of the whole tree (they share headers).

The sources come in three generations, told apart by what ``driver/driver_config.h.in``
names and whether ``driver/configure/`` exists:

- ``1.x`` (the collector's fork at 1.0.0): ``PROBE_NAME``, ``PROBE_VERSION``,
  ``PROBE_DEVICE_NAME``, as ``@PROBE_NAME@`` in ``Makefile.in`` and ``${PROBE_NAME}`` in
  ``driver_config.h.in``;
- ``2.x`` (the fork at 2.2.0, 2.3.0): ``DRIVER_NAME``, ``DRIVER_VERSION``,
  ``DRIVER_DEVICE_NAME``, ``GIT_COMMIT`` and the API and schema versions read from
  ``driver/API_VERSION`` and ``driver/SCHEMA_VERSION`` (``compute_versions.cmake``);
- ``8.x`` (upstream 8.1.0): as 2.x, plus the kernel feature checks
  ``driver/configure/<FEATURE>/`` (module) and ``driver/bpf/configure/<FEATURE>/`` (probe):
  each gets the folder's ``Makefile`` and ``build.sh`` and a ``Makefile.inc`` generated
  from ``Makefile.inc.in`` with ``@CONFIGURE_MODULE@`` = ``<FEATURE>``, which the driver's
  Makefile includes at build time to set ``HAS_<FEATURE>`` (without them 8.1.0's probe
  does not compile on 6.1 or 6.12: "no member named '__parent' in 'struct kernfs_node'",
  "'struct percpu_counter[4]' is not a structure"). The probe is staged as
  ``driver/bpf/CMakeLists.txt`` does: the driver's headers (``driver_config.h`` included)
  copied into ``driver/bpf/``.

In every generation the top-level ``CMakeLists.txt`` leaves out ``include(libsinsp)``:
libsinsp is not in the sources (it needs tbb) and the drivers' consumer, libscap's
``scap-open``, does not need it. A tree this cannot prepare is refused with
:class:`TreeRefused`, naming the file and what is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from drivers.build.bundles import Member, file_mode
from drivers.build.safetar import UnsafeArchive, safe_extract
from drivers.domain.names import check_driver_version

DRIVER_NAME = "collector"  # module, probe and device name: collector.ko, /dev/collector*
GENERATIONS = ("1.x", "2.x", "8.x")
MODULE_DIR, PROBE_DIR = "driver", "driver/bpf"
CONFIGURE_TEMPLATE = "Makefile.inc.in"
# What configure_file reads as a variable name, after ``${`` or between two ``@``.
_NAME_CHARS = r"[A-Za-z0-9/_.+-]"
_REFERENCE = re.compile(rf"\$\{{({_NAME_CHARS}+)\}}|@({_NAME_CHARS}+)@")
_CMAKEDEFINE = re.compile(r"#([ \t]*)cmakedefine[ \t]+([A-Za-z_0-9]*)")
_CMAKEDEFINE01 = re.compile(r"#([ \t]*)cmakedefine01[ \t]+([A-Za-z_0-9]*)")
_FALSE = {"", "0", "OFF", "NO", "FALSE", "N", "IGNORE", "NOTFOUND"}  # CMake's false constants
_LIBSINSP = re.compile(r"^([ \t]*)include\([ \t]*libsinsp[ \t]*\)[ \t]*$", re.MULTILINE)
_LIBSINSP_LEFT_OUT = (
    r"\1# include(libsinsp): left out by drivers sources prepare "
    "(libsinsp is not in the sources; scap-open needs only libscap)"
)


class TreeRefused(ValueError):
    """A tree that cannot be prepared; the message names the file and what is missing."""


@dataclasses.dataclass(frozen=True)
class Tree:
    """A falcosecurity-libs tree on disk; ``shown`` is how messages name it (the folder,
    or the tarball and its top folder)."""

    root: Path
    shown: str

    def name_of(self, rel: str) -> str:
        return f"{self.shown}/{rel}"


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What preparing a tree gives: the build spec (``build.json``) and the files to add
    to the tree or replace in it, named relative to its root."""

    spec: dict[str, object]
    files: list[Member]


@contextlib.contextmanager
def opened_tree(source: Path) -> Iterator[Tree]:
    """The tree of a folder, or of a .tar.gz whose single top folder is the tree
    (extracted safely into a temporary folder, deleted afterwards)."""
    source = Path(source)
    if source.is_dir():
        yield Tree(source.resolve(), str(source))  # resolved: "." has no name for build.json
        return
    if not source.is_file():
        raise TreeRefused(f"{source} does not exist: give a falcosecurity-libs folder or .tar.gz")
    with tempfile.TemporaryDirectory(prefix="drivers-prepare-") as scratch:
        try:
            safe_extract(source, Path(scratch))
        except UnsafeArchive as e:
            raise TreeRefused(f"{source} is not a tree to prepare: {e}") from None
        top = sorted(p.name for p in Path(scratch).iterdir())
        if len(top) != 1 or not (Path(scratch) / top[0]).is_dir():
            raise TreeRefused(
                f"{source}: expected one top folder, the tree, found {', '.join(top) or 'nothing'}"
            )
        yield Tree(Path(scratch) / top[0], f"{source}: {top[0]}")


def prepare_tree(tree: Tree, driver_version: str) -> Prepared:
    """The files CMake would have generated or staged for ``driver_version``."""
    check_driver_version(driver_version)
    if not (tree.root / MODULE_DIR).is_dir():
        raise TreeRefused(f"{tree.name_of(MODULE_DIR)} is missing: not a falcosecurity-libs tree")
    generation = detect_generation(tree)
    variables = driver_variables(tree, generation, driver_version)
    files = [
        _top_level_cmakelists(tree),
        _configured(tree, f"{MODULE_DIR}/Makefile.in", f"{MODULE_DIR}/Makefile", variables),
        _configured(
            tree, f"{MODULE_DIR}/driver_config.h.in", f"{MODULE_DIR}/driver_config.h", variables
        ),
    ]
    if generation == "8.x":
        files += _configure_checks(tree, f"{MODULE_DIR}/configure", variables)
        files += _configure_checks(tree, f"{PROBE_DIR}/configure", variables)
        files += _probe_staging(tree, files)
    spec: dict[str, object] = {
        "driver_version": driver_version,
        "driver_name": DRIVER_NAME,
        "generation": generation,
        "tree": tree.root.name,
        "mod": {"dir": MODULE_DIR, "output": f"{DRIVER_NAME}.ko"},
        "bpf": {"dir": PROBE_DIR, "output": "probe.o"},  # the probe Makefile's always-y
    }
    return Prepared(spec, files)


def detect_generation(tree: Tree) -> str:
    """1.x, 2.x or 8.x, from the variables ``driver_config.h.in`` names."""
    rel = f"{MODULE_DIR}/driver_config.h.in"
    names = referenced_variables(_read_template(tree, rel))
    if "PROBE_NAME" in names:
        return "1.x"
    if "DRIVER_NAME" in names:
        return "8.x" if (tree.root / MODULE_DIR / "configure").is_dir() else "2.x"
    raise TreeRefused(
        f"{tree.name_of(rel)} names neither PROBE_NAME (1.x sources) nor DRIVER_NAME "
        f"(2.x, 8.x): a generation of the sources this preparer does not know "
        f"(it knows {', '.join(GENERATIONS)})"
    )


def driver_variables(tree: Tree, generation: str, driver_version: str) -> dict[str, str]:
    """The CMake variables the driver's templates use, as the collector's build set them."""
    # CMAKE_BUILD_TYPE=Release: libscap.cmake sets KBUILD_FLAGS (debug flags) only for Debug.
    variables = {"KBUILD_FLAGS": ""}
    if generation == "1.x":
        return variables | {
            "PROBE_NAME": DRIVER_NAME,
            "PROBE_VERSION": driver_version,
            "PROBE_DEVICE_NAME": DRIVER_NAME,
        }
    variables |= {
        "DRIVER_NAME": DRIVER_NAME,
        "DRIVER_VERSION": driver_version,
        "DRIVER_DEVICE_NAME": DRIVER_NAME,
        # compute_versions.cmake runs `git rev-parse HEAD`, which gives nothing outside a
        # git work tree (a tarball's tree): the same sources, the same bytes.
        "GIT_COMMIT": "",
    }
    for file, prefix in (("API_VERSION", "PPM_API"), ("SCHEMA_VERSION", "PPM_SCHEMA")):
        major, minor, patch = _read_version(tree, f"{MODULE_DIR}/{file}")
        variables |= {
            f"{prefix}_CURRENT_VERSION_MAJOR": major,
            f"{prefix}_CURRENT_VERSION_MINOR": minor,
            f"{prefix}_CURRENT_VERSION_PATCH": patch,
        }
    return variables


def _read_version(tree: Tree, rel: str) -> tuple[str, str, str]:
    """MAJOR, MINOR, PATCH: the first three numbers of the file's first line, as
    compute_versions.cmake reads them."""
    path = tree.root / rel
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
        lines = [line for line in text.splitlines() if line.strip()]
    except FileNotFoundError:
        raise TreeRefused(
            f"{tree.name_of(rel)} is missing: 2.x and 8.x sources give the driver's "
            "version numbers there (MAJOR.MINOR.PATCH)"
        ) from None
    numbers = re.findall(r"[0-9]+", lines[0]) if lines else []
    if len(numbers) < 3:
        found = repr(lines[0]) if lines else "an empty file"
        raise TreeRefused(f"{tree.name_of(rel)}: expected MAJOR.MINOR.PATCH, found {found}")
    return numbers[0], numbers[1], numbers[2]


def referenced_variables(text: str) -> set[str]:
    """The variables a template names, as ``${VAR}``, ``@VAR@`` or ``#cmakedefine VAR``."""
    names = {m.group(1) or m.group(2) for m in _REFERENCE.finditer(text)}
    for pattern in (_CMAKEDEFINE, _CMAKEDEFINE01):
        names |= {m.group(2) for m in pattern.finditer(text)}
    return names


def configure_file(text: str, variables: Mapping[str, str], where: str) -> str:
    """``text`` as CMake's ``configure_file`` (without @ONLY) writes it: first each
    ``#cmakedefine VAR ...`` line becomes ``#define VAR ...`` or ``/* #undef VAR */``
    and ``#cmakedefine01 VAR`` becomes ``#define VAR 1`` or ``0``, then every ``${VAR}``
    and ``@VAR@`` is replaced by its value. A variable not in ``variables`` is refused
    (CMake would quietly write nothing for it), and so are ``$ENV{...}`` and
    ``$CACHE{...}`` (the output must not depend on where it is made) and references
    CMake itself rejects. Lines end with "\n", as CMake writes them. ``where`` names the
    template in messages."""
    unknown = sorted(referenced_variables(text) - variables.keys())
    if unknown:
        raise TreeRefused(
            f"{where} uses {', '.join(unknown)}, which drivers sources prepare does not "
            f"know (it sets {', '.join(sorted(variables))}): a newer generation of the "
            "sources? drivers.build.prepare must learn the value CMake gives it"
        )
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # CMake reads lines and writes each with "\n": a missing last one added
    out = []
    for line in (line.removesuffix("\r") for line in lines):  # CRLF lines become LF
        if m := _CMAKEDEFINE.search(line):
            if _is_false(variables[m.group(2)]):
                line = f"/* #undef {m.group(2)} */"
            else:
                line = line.replace(f"#{m.group(1)}cmakedefine", f"#{m.group(1)}define")
        elif m := _CMAKEDEFINE01.search(line):
            on = "0" if _is_false(variables[m.group(2)]) else "1"
            line = line.replace(f"#{m.group(1)}cmakedefine01", f"#{m.group(1)}define") + " " + on
        out.append(line + "\n")
    return _expand("".join(out), variables, where)


def _is_false(value: str) -> bool:
    return value.upper() in _FALSE or value.upper().endswith("-NOTFOUND")


def _expand(text: str, variables: Mapping[str, str], where: str) -> str:
    """Replace ``${VAR}`` and ``@VAR@`` left to right, as CMake scans: a ``@`` starts a
    reference only if the next ``@`` closes a valid name (``@@X@@`` is ``@`` + ``@X@`` +
    ``@``); a ``$`` only when ``{`` follows."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "$":
            for reader in ("ENV{", "CACHE{"):
                if text.startswith(reader, i + 1):
                    line = text.count("\n", 0, i) + 1
                    raise TreeRefused(
                        f"{where}:{line}: ${reader}...}} reads a value from where the "
                        "sources are prepared: the prepared sources must not depend on it"
                    )
            if text.startswith("{", i + 1):
                m = _REFERENCE.match(text, i)
                if m is None or m.group(1) is None:
                    line = text.count("\n", 0, i) + 1
                    raise TreeRefused(
                        f"{where}:{line}: {text[i : i + 20].splitlines()[0]!r} is not a "
                        "variable reference CMake accepts (${NAME}, NAME of letters, digits "
                        "and /_.+-)"
                    )
                out.append(variables[m.group(1)])
                i = m.end()
                continue
        elif c == "@":
            m = _REFERENCE.match(text, i)
            if m is not None and m.group(2) is not None:
                out.append(variables[m.group(2)])
                i = m.end()
                continue
        out.append(c)
        i += 1
    return "".join(out)


def _read_template(tree: Tree, rel: str) -> str:
    try:
        return (tree.root / rel).read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        raise TreeRefused(
            f"{tree.name_of(rel)} is missing: a template the driver's CMake configures"
        ) from None


def _configured(tree: Tree, template: str, output: str, variables: Mapping[str, str]) -> Member:
    text = configure_file(_read_template(tree, template), variables, tree.name_of(template))
    return Member(output, "file", mode=0o644, data=text.encode("utf-8", "surrogateescape"))


def _copied(tree: Tree, source: str, dest: str) -> Member:
    """``configure_file(... COPYONLY)``: the same bytes and mode."""
    path = tree.root / source
    if not path.is_file():
        raise TreeRefused(f"{tree.name_of(source)} is missing: the driver's CMake copies it")
    return Member(dest, "file", mode=file_mode(path.stat().st_mode), source=path)


def _top_level_cmakelists(tree: Tree) -> Member:
    rel = "CMakeLists.txt"
    path = tree.root / rel
    if not path.is_file():
        raise TreeRefused(
            f"{tree.name_of(rel)} is missing: the drivers' consumer (libscap's scap-open) "
            "is built from the tree's top-level CMakeLists.txt"
        )
    text = path.read_text(encoding="utf-8", errors="surrogateescape")
    text = _LIBSINSP.sub(_LIBSINSP_LEFT_OUT, text)
    return Member(rel, "file", mode=0o644, data=text.encode("utf-8", "surrogateescape"))


def _configure_checks(tree: Tree, folder: str, variables: Mapping[str, str]) -> list[Member]:
    """What the 8.x CMakeLists do for each ``<folder>/<FEATURE>/`` (a folder holding a
    ``test.c``): ``test.c``, ``Makefile`` and ``build.sh`` in place, and ``Makefile.inc``
    generated from ``<folder>/Makefile.inc.in``."""
    base = tree.root / folder
    if not base.is_dir():
        raise TreeRefused(
            f"{tree.name_of(folder)} is missing: 8.x sources check kernel features there"
        )
    template = _read_template(tree, f"{folder}/{CONFIGURE_TEMPLATE}")
    features = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not features:
        raise TreeRefused(f"{tree.name_of(folder)} holds no <FEATURE>/ folder to check")
    members = []
    for feature in features:
        here = f"{folder}/{feature}"
        if not (base / feature / "test.c").is_file():
            raise TreeRefused(f"{tree.name_of(here)}/test.c is missing: each check compiles one")
        # CMake defines no NEWLINE: the template's @@NEWLINE@@ marker becomes @@ there, in
        # the sed that writes it and the $(subst) that reads it alike.
        feature_variables = {**variables, "CONFIGURE_MODULE": feature, "NEWLINE": ""}
        text = configure_file(
            template, feature_variables, f"{tree.name_of(folder)}/{CONFIGURE_TEMPLATE}"
        )
        members += [
            Member(f"{here}/Makefile.inc", "file", mode=0o644, data=text.encode()),
            _copied(tree, f"{folder}/Makefile", f"{here}/Makefile"),
            _copied(tree, f"{folder}/build.sh", f"{here}/build.sh"),
        ]
    return members


def _probe_staging(tree: Tree, generated: list[Member]) -> list[Member]:
    """8.x's bpf/CMakeLists.txt builds the probe in one folder with the driver's headers
    (``../*.h``, the configured ``driver_config.h`` included): copy them into the probe's."""
    driver_config = next(m for m in generated if m.name == f"{MODULE_DIR}/driver_config.h")
    headers = sorted(p.name for p in (tree.root / MODULE_DIR).glob("*.h") if p.is_file())
    members = [dataclasses.replace(driver_config, name=f"{PROBE_DIR}/driver_config.h")]
    for name in headers:
        if name == "driver_config.h":
            continue  # a leftover of an earlier build: the generated one is staged
        if (tree.root / PROBE_DIR / name).exists():
            raise TreeRefused(
                f"{tree.name_of(f'{PROBE_DIR}/{name}')} and {tree.name_of(f'{MODULE_DIR}/{name}')}"
                " share a name: staging the driver's headers into the probe would replace one"
            )
        members.append(_copied(tree, f"{MODULE_DIR}/{name}", f"{PROBE_DIR}/{name}"))
    return members
