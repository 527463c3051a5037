"""The toolchain guard: the compiler a kernel was built with, the compiler kbuild will run
on a builder, and whether they match.

A kernel records its compiler's ``--version`` line in its ``.config``
(``CONFIG_CC_VERSION_TEXT="gcc-12 (Debian 12.2.0-14) 12.2.0"``, kernels from 5.8 on), in
``include/generated/autoconf.h`` and, older kernels too, in
``include/generated/compile.h`` (``LINUX_COMPILER``); :mod:`drivers.build.bundle` reads
them from an extracted bundle. kbuild compiles an external module with the tree's
``CC``: Debian's header trees name it in ``.kernelvariables`` (``CC = ...
$(CROSS_COMPILE)gcc-12``, 6.12 on with ``override CROSS_COMPILE = x86_64-linux-gnu-``),
other trees leave kbuild's default ``$(CROSS_COMPILE)gcc``.

A builder whose compiler has another major version (or is another compiler, or is not
installed under the name the tree calls) is refused before anything compiles, as
:data:`TOOLCHAIN_MISMATCH`: a routing error (the route sent the kernel to the wrong
builder), counted apart from compile failures, never quarantined, never a blocklist
suggestion. A kernel whose compiler is not recorded is built (the record says unknown).

Pure: text in, answers out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The status and failure class of a task refused by the guard (build records, ledger).
TOOLCHAIN_MISMATCH = "toolchain_mismatch"
UNKNOWN = "?"  # a kernel whose compiler is not known (plan view)
DEFAULT_CC = "gcc"  # kbuild's own: CC = $(CROSS_COMPILE)gcc

_PARENTHESES = re.compile(r"\([^()]*\)")
_VERSION = re.compile(r"(?<![\w.])(\d+)\.(\d+)(?:\.(\d+))?(?![\w.])")
_ASSIGNMENT = re.compile(
    r"^(?:override\s+)?(?P<name>\w+)\s*(?P<op>\?=|:=|::=|\+=|=)\s*(?P<value>.*)$"
)
_CONDITIONAL = re.compile(r"^(?:ifeq|ifneq|ifdef|ifndef)\b")
_REFERENCE = re.compile(r"\$\((\w+)\)")
# A command kbuild can be told to run as CC that the guard may ask for its version: a
# name on PATH, never a path into the (untrusted) bundle.
_COMMAND = re.compile(r"^[\w.+-]+$")


@dataclass(frozen=True, slots=True)
class Compiler:
    """A compiler as a kernel or a builder reports it."""

    name: str  # gcc or clang
    version: str  # e.g. 12.2.0
    text: str  # the whole --version line, e.g. gcc-12 (Debian 12.2.0-14) 12.2.0

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def label(self) -> str:
        """``gcc 12``: what must match."""
        return f"{self.name} {self.major}"


def parse_compiler(text: str | None) -> Compiler | None:
    """A compiler's ``--version`` line (or ``LINUX_COMPILER``, linker part and all) as
    (name, version), or None when it names no gcc or clang with a version.

    The version is the first x.y[.z] outside parentheses: ``gcc-10 (Debian 10.2.1-6)
    10.2.1 20210110`` is 10.2.1, ``gcc version 4.8.5 20150623 (Red Hat 4.8.5-44) (GCC)``
    4.8.5, ``Debian clang version 14.0.6`` 14.0.6."""
    if not text:
        return None
    lines = text.strip().splitlines()
    compiler = lines[0].split(", GNU ld", 1)[0].split(", LLD", 1)[0].strip() if lines else ""
    words = compiler.lower()  # "cc (GCC) 4.8.5": the name may be in parentheses
    name = "clang" if "clang" in words else "gcc" if "gcc" in words else None
    version = _VERSION.search(_PARENTHESES.sub(" ", compiler))
    if name is None or version is None:
        return None
    return Compiler(name, version.group(0), compiler)


def kbuild_cc(kernelvariables: str | None, environment: dict[str, str] | None = None) -> str:
    """The command kbuild runs as CC for a tree whose ``.kernelvariables`` (Debian) is
    ``kernelvariables`` (None: the tree has none, kbuild's default gcc).

    Read as make reads it for a native build: assignments at the top level (the
    ``ifneq ($(DEB_BUILD_ARCH),$(DEB_HOST_ARCH))`` blocks are Debian's cross builds),
    ``$(VAR)`` expanded from the file and then ``environment``, the ``$(if ...)`` of the
    optional ccache left out; the command is the last word."""
    environment = environment or {}
    variables: dict[str, str] = {}
    depth = 0
    for raw in (kernelvariables or "").splitlines():
        line = raw.split("#", 1)[0].strip()
        if _CONDITIONAL.match(line):
            depth += 1
        elif line == "endif":
            depth = max(0, depth - 1)
        elif depth == 0 and (m := _ASSIGNMENT.match(line)):
            name, op, value = m["name"], m["op"], m["value"].strip()
            if op == "?=" and name in variables:
                continue
            variables[name] = f"{variables.get(name, '')} {value}".strip() if op == "+=" else value
    cc = variables.get("CC", f"$(CROSS_COMPILE){DEFAULT_CC}")
    cc = _drop_if(cc)
    for _ in range(8):  # nested references, bounded
        expanded = _REFERENCE.sub(lambda m: variables.get(m[1], environment.get(m[1], "")), cc)
        if expanded == cc:
            break
        cc = expanded
    words = cc.split()
    return words[-1] if words else DEFAULT_CC


def _drop_if(value: str) -> str:
    """``value`` without its ``$(if ...)`` calls (balanced parentheses)."""
    out, i = [], 0
    while (start := value.find("$(if ", i)) >= 0:
        out.append(value[i:start])
        depth, j = 0, start + 1
        while j < len(value):
            depth += {"(": 1, ")": -1}.get(value[j], 0)
            j += 1
            if depth == 0:
                break
        i = j
    out.append(value[i:])
    return "".join(out)


def askable(command: str) -> bool:
    """Whether the guard may run ``command --version``: a bare command name."""
    return bool(_COMMAND.match(command))


def mismatch(
    kernel: Compiler | None,
    command: str,
    builder_text: str | None,
    builder: str,
    default_text: str | None = None,
) -> str | None:
    """Why ``builder`` must not build a kernel built with ``kernel``, when kbuild would
    run ``command`` there and its ``--version`` line is ``builder_text`` (None: not
    installed; then ``default_text`` is the builder's plain gcc or clang, named in the
    message); None when it may (or when the kernel's compiler is unknown)."""
    if kernel is None:
        return None
    fix = f"route it to a builder with {kernel.label}"
    if builder_text is None:
        other = parse_compiler(default_text)
        its = f"; its {other.name} is {other.version}" if other is not None else ""
        return (
            f"kernel built with {kernel.text}; builder {builder} has no {command} "
            f"(the CC its kbuild calls{its}): {fix}"
        )
    have = parse_compiler(builder_text)
    if have is None:  # an answer we cannot read: not proof of a mismatch
        return None
    if (have.name, have.major) == (kernel.name, kernel.major):
        return None
    called = f" ({command})" if command != have.name else ""
    has = f"{have.name} {have.version}{called}"
    return f"kernel built with {kernel.text}; builder {builder} has {has}: {fix}"


def label(text: str | None) -> str:
    """A kernel compiler's ``gcc 12`` from its recorded text, :data:`UNKNOWN` if none."""
    compiler = parse_compiler(text)
    return compiler.label if compiler is not None else UNKNOWN
