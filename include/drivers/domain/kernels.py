"""Kernel release strings: parsing, distro family, version-aware ordering, eBPF support.

A kernel release is a ``uname -r`` style string plus a few distro suffixes, e.g.
``3.10.0-1160.80.1.el7.x86_64``, ``5.15.0-1020-gke~20.04``, ``4.14.94-11647.112.0-cos``.
It must start with ``x.y.z`` and holds only letters, digits and ``. - _ ~ +``.

Families (short lowercase names, usable as a selector prefix such as ``el8:``). They are
decided by the ordered regex table :data:`FAMILY_RULES`, first match wins; this list is
grouped for reading, the table's order is what counts:

================  ==========================================================================
family            examples
================  ==========================================================================
``elrepo``        ``4.4.102-1.el7.elrepo.x86_64`` (ELRepo mainline kernels built for EL)
``el7uek``        ``4.14.35-1902.0.9.el7uek.x86_64``, ``5.4.0-1.el7uek.x86_64`` (Oracle UEK)
``el8uek``        ``5.4.17-2136.300.7.el8uek.x86_64``
``el6``           ``2.6.32-754.el6.x86_64``, ``2.6.32-358.111.1.openstack.el6.x86_64``
``el7``           ``3.10.0-1160.80.1.el7.x86_64``, rt: ``3.10.0-1160.rt56.1131.el7.x86_64``
``el8``           ``4.18.0-305.10.2.el8_4.x86_64``, rt: ``4.18.0-147.8.1.rt24.101.el8_1.x86_64``
``el9``           ``5.14.0-70.13.1.el9_0.x86_64``
``fc``            ``5.19.16-200.fc36.x86_64`` (Fedora)
``amzn2``         ``4.14.114-103.97.amzn2.x86_64`` (Amazon Linux 2)
``cos``           ``4.14.94-11647.112.0-cos`` (Google Container-Optimized OS)
``garden``        ``5.10.0-9-amd64-gl-5.10.83-1gardenlinux1``, ``5.10.100-garden-amd64-gl-…``
``debian``        ``4.19.0-10-amd64``, ``-cloud-amd64``, ``-rt-amd64``, ``4.9.0-0.bpo.6-amd64``
``suse``          ``4.12.14-122.106-default``
``ubuntu``        ``5.4.0-62-generic``, ``-aws``, ``-azure-fips``, ``5.15.0-1020-gke~20.04``
``flatcar``       ``5.10.77-flatcar``
``coreos``        ``4.19.56-coreos``, ``4.14.96-coreos-r1``
``minikube``      ``4.19.202-minikube``, ``4.19.202-minikube-v1.25.2``
``k8s``           ``4.4.102-k8s`` (the only ``-kNs`` shape in the 2022 list)
``k3s``           ``5.15.0-k3s``
``dockerdesktop`` ``4.19.121-dockerdesktop-2021-01-21-15-36-34``
``linuxkit``      ``4.14.131-linuxkit``
``other``         everything else, e.g. a plain ``4.15.0``
================  ==========================================================================

``series`` (:attr:`Kernel.series`) is the distribution release a kernel belongs to, where
the string says it; ``""`` otherwise and for every family but ``debian``. It decides which
builder (whose compiler is that release's) a kernel is routed to, and the selector prefix
``FAMILY/SERIES:`` (``debian/trixie:*``). Debian: the ``+debN`` / ``.debN.`` marker
(``N`` from :data:`DEBIAN_RELEASES`) wins, else the ABI's base version, else ``""``:

==================================  ============  ==================================
release                             series        why
==================================  ============  ==================================
``6.12.117+deb13-amd64``            ``trixie``    ``+deb13`` (also ``+deb13.1-``)
``6.12.95+deb12-cloud-amd64``       ``bookworm``  ``+deb12`` (bookworm-backports too)
``6.1.0-0.deb11.52-amd64``          ``bullseye``  ``.deb11.`` (bullseye's 6.1 updates)
``6.1.0-47-amd64``                  ``bookworm``  ABI ``6.1.0-N``
``5.10.0-32-rt-amd64``              ``bullseye``  ABI ``5.10.0-N``
``4.19.0-10-amd64``                 ``buster``    ABI ``4.19.0-N``
``5.10.0-0.bpo.15-amd64``           ``""``        a backport: the string does not say
                                                  which older release it was built for
==================================  ============  ==================================

``flavour`` is the variant inside a family where one is cheap to read off the string:
``rt`` for RHEL real-time kernels, the Ubuntu flavour (``generic``, ``aws``,
``azure-fips``, …), the Debian one (``amd64``, ``cloud-amd64``, ``rt-amd64``), the SUSE
one (``default``); otherwise ``""``.

Ordering: :attr:`Kernel.key` is ``(tokens, release)``. ``tokens`` splits the release into
maximal runs of digits and of ASCII letters, dropping every separator (``. - _ ~ +``);
a run of digits becomes ``(1, int)`` and a run of letters ``(0, str)``. So numbers
compare as numbers (``305.10 < 305.12 < 372``), a letter run sorts before a number in
the same place (``305.el8`` — the GA build — before its updates ``305.3.1.el8``, as in
RPM), and a token list that is a prefix of another sorts first. Two different release
strings can tokenise alike (``4.15.0-1`` vs ``4.15.0.1``); the release string breaks the
tie, so the order is total and never calls two different releases equal. Selectors
compare a release's tokens truncated to a bound's length (prefix semantics); because a
token is a whole run, ``305`` never prefix-matches ``3050``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

__all__ = [
    "DEBIAN_RELEASES",
    "FALLBACK_FAMILY",
    "FAMILIES",
    "SERIES",
    "FAMILY_RULES",
    "Kernel",
    "KernelParseError",
    "LineProblem",
    "Token",
    "VersionKey",
    "ebpf_supported",
    "kernel_series",
    "parse_kernel",
    "read_kernel_list",
    "version_tokens",
]

Token = tuple[int, int | str]
"""One key token: ``(0, letters)`` or ``(1, number)``; letters sort before numbers."""
VersionKey = tuple[Token, ...]

EXAMPLE_RELEASE = "4.18.0-305.10.2.el8_4.x86_64"
# uname -r is at most 64 characters; leave room for bundle-name suffixes, and keep
# pathological input (e.g. a 5,000-digit "version") out of int().
MAX_RELEASE_LENGTH = 200


class KernelParseError(ValueError):
    """A string that is not a kernel release; the message names it and says why."""


# ---------------------------------------------------------------------------------------
# Families: ordered (family, regex) rows, searched in the release; first match wins.
# A named group ``flavour`` (if present and matched) gives Kernel.flavour. Only a few rows
# overlap (noted below); the others are ordered by how common they are, for speed.
# ---------------------------------------------------------------------------------------


def _el(n: str) -> str:
    # ….el8_4.x86_64, and RHEL real-time ….rt24.101.el8_1.x86_64 (flavour "rt").
    return rf"\.(?:(?P<flavour>rt)\d+(?:\.\d+)*\.)?el{n}(?:_\d+)?(?:\.|$)"


FAMILY_RULES: tuple[tuple[str, str], ...] = (
    ("ubuntu", r"^\d+\.\d+\.\d+-\d+-(?P<flavour>[a-z]+(?:-[a-z]+)*)(?:~\d+(?:\.\d+)*)?$"),
    ("cos", r"-cos$"),
    ("fc", r"\.fc\d+(?:\.|$)"),
    # EL-built kernels that are not RHEL's come before the elN rows, which match them too.
    ("elrepo", r"\.el\d+\.elrepo(?:\.|$)"),
    ("el7uek", r"\.el7uek(?:\.|$)"),
    ("el8uek", r"\.el8uek(?:\.|$)"),
    ("el7", _el("7")),
    ("el8", _el("8")),
    ("el6", _el("6")),
    ("el9", _el("9")),
    ("suse", r"^\d+\.\d+\.\d+-\d+(?:\.\d+)+-(?P<flavour>default|azure|preempt|rt|kvmsmall)$"),
    # Garden Linux is Debian-based and its strings also end like Debian's (…-amd64-gl-…).
    ("garden", r"-gl-\d|-garden(?:linux)?-|gardenlinux\d*$"),
    ("debian", r"-(?P<flavour>(?:cloud-|rt-)?(?:amd64|arm64|686-pae|686))$"),
    ("amzn2", r"\.amzn2(?:\.|$)"),
    ("flatcar", r"-flatcar$"),
    ("coreos", r"-coreos(?:-r\d+)?$"),
    ("minikube", r"-minikube(?:-v\d+(?:\.\d+)*)?$"),
    ("k8s", r"-k8s$"),
    ("k3s", r"[-+]k3s\d*$"),
    ("dockerdesktop", r"-dockerdesktop(?:-|$)"),
    ("linuxkit", r"-linuxkit$"),
)
FALLBACK_FAMILY = "other"
FAMILIES: tuple[str, ...] = (*(name for name, _ in FAMILY_RULES), FALLBACK_FAMILY)

# Series (see the module docstring): Debian's release numbers and the base versions of
# their kernel ABIs.
DEBIAN_RELEASES: dict[int, str] = {
    10: "buster",
    11: "bullseye",
    12: "bookworm",
    13: "trixie",
    14: "forky",
}
_DEBIAN_ABI_SERIES: dict[str, str] = {"4.19.0": "buster", "5.10.0": "bullseye", "6.1.0": "bookworm"}
_DEBIAN_MARK_RE = re.compile(r"[+.]deb(\d+)[.-]", re.ASCII)
_DEBIAN_ABI_RE = re.compile(r"(\d+\.\d+\.\d+)-\d+-", re.ASCII)
SERIES: dict[str, tuple[str, ...]] = {"debian": tuple(DEBIAN_RELEASES.values())}
"""Every series a family can have (families not named have none)."""
_SERIES_CACHE: dict[str, str] = {}

# ASCII: \d must not accept other scripts' digits.
_FAMILY_SEARCHES = tuple(
    (name, re.compile(rx, re.ASCII).search, "(?P<flavour>" in rx) for name, rx in FAMILY_RULES
)

# x.y.z, then optionally a separator and more release characters.
_RELEASE_RE = re.compile(r"\d+\.\d+\.\d+(?:[-.+~_][A-Za-z0-9.+~_-]*)?", re.ASCII)
_BAD_CHAR_RE = re.compile(r"[^A-Za-z0-9.+~_-]")
_TOKEN_RE = re.compile(r"\d+|[A-Za-z]+", re.ASCII)

# Identical tokens share one tuple object, so comparing keys mostly hits the identity
# shortcut, and tokenising a release costs a dict lookup per token.
_TOKEN_CACHE: dict[str, Token] = {}


def _token(text: str) -> Token:
    tok = _TOKEN_CACHE.get(text)
    if tok is None:
        tok = (1, int(text)) if text[0].isdigit() else (0, text)
        if len(_TOKEN_CACHE) < 100_000:  # bounded: arbitrary input must not grow it forever
            _TOKEN_CACHE[text] = tok
    return tok


def version_tokens(text: str) -> VersionKey:
    """Tokenise a release or a version bound (see the module docstring for the rule)."""
    texts = _TOKEN_RE.findall(text)
    try:  # fast path: every token seen before, no Python-level call per token
        return tuple(map(_TOKEN_CACHE.__getitem__, texts))
    except KeyError:
        return tuple(map(_token, texts))


@dataclass(frozen=True, slots=True, eq=False)
class Kernel:
    """One kernel release. Ordered by :attr:`key`, equal and hashed by :attr:`release`."""

    release: str
    major: int
    minor: int
    patch: int
    family: str
    key: tuple[VersionKey, str] = field(repr=False)
    flavour: str = ""

    @property
    def series(self) -> str:
        """The distribution release (``trixie``, ``bookworm``, …), ``""`` when unknown;
        see the module docstring."""
        return kernel_series(self.release, self.family)

    @property
    def tokens(self) -> VersionKey:
        """The version tokens of the release (``key`` without the tie-breaker)."""
        return self.key[0]

    def __str__(self) -> str:
        return self.release

    def __hash__(self) -> int:
        return hash(self.release)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Kernel):
            return self.release == other.release
        return NotImplemented

    def __lt__(self, other: Kernel) -> bool:
        if isinstance(other, Kernel):
            return self.key < other.key
        return NotImplemented

    def __le__(self, other: Kernel) -> bool:
        if isinstance(other, Kernel):
            return self.key <= other.key
        return NotImplemented

    def __gt__(self, other: Kernel) -> bool:
        if isinstance(other, Kernel):
            return self.key > other.key
        return NotImplemented

    def __ge__(self, other: Kernel) -> bool:
        if isinstance(other, Kernel):
            return self.key >= other.key
        return NotImplemented


def _why_not_release(release: str) -> str:
    if not release:
        return "empty kernel release"
    if not release.strip():
        return f"kernel release {release!r} is only whitespace"
    if len(release) > MAX_RELEASE_LENGTH:
        return (
            f"kernel release {release[:40]!r}… is {len(release)} characters long; "
            f"at most {MAX_RELEASE_LENGTH} are accepted"
        )
    bad = _BAD_CHAR_RE.search(release)
    if bad:
        char = bad.group()
        what = "whitespace" if char.isspace() else f"character {char!r}"
        return (
            f"kernel release {release!r} contains {what} at position {bad.start()}; "
            "allowed are letters, digits and . - _ ~ +"
        )
    return (
        f"kernel release {release!r} does not start with a version x.y.z "
        f"followed by a separator (e.g. {EXAMPLE_RELEASE!r})"
    )


@lru_cache(maxsize=65_536)
def parse_kernel(release: str) -> Kernel:
    """Parse one kernel release string; raise :class:`KernelParseError` saying why not."""
    if _RELEASE_RE.fullmatch(release) is None or len(release) > MAX_RELEASE_LENGTH:
        raise KernelParseError(_why_not_release(release))
    family, flavour = FALLBACK_FAMILY, ""
    for name, search, has_flavour in _FAMILY_SEARCHES:
        fm = search(release)
        if fm is not None:
            family = name
            if has_flavour:
                flavour = fm.group("flavour") or ""
            break
    tokens = version_tokens(release)
    # The release starts with x.y.z, so the first three tokens are those numbers.
    return Kernel(
        release, tokens[0][1], tokens[1][1], tokens[2][1], family, (tokens, release), flavour
    )


def kernel_series(release: str, family: str) -> str:
    """The series of a release of ``family`` (rules in the module docstring); computed on
    first use, so parsing a kernel costs nothing more."""
    if family != "debian":
        return ""
    series = _SERIES_CACHE.get(release)
    if series is None:
        mark = _DEBIAN_MARK_RE.search(release)
        if mark is not None:
            series = DEBIAN_RELEASES.get(int(mark[1]), "")
        else:
            abi = _DEBIAN_ABI_RE.match(release)
            series = _DEBIAN_ABI_SERIES.get(abi[1], "") if abi else ""
        if len(_SERIES_CACHE) < 100_000:
            _SERIES_CACHE[release] = series
    return series


@dataclass(frozen=True, slots=True)
class LineProblem:
    """A line of an input file that was not taken, and why."""

    source: str
    line_number: int  # 1-based
    text: str
    message: str
    duplicate: bool = False  # a repeated release (kept once), not an unparsable line

    def __str__(self) -> str:
        return f"{self.source}:{self.line_number}: {self.message}"


def read_kernel_list(lines: Iterable[str], source: str) -> tuple[list[Kernel], list[LineProblem]]:
    """Parse a kernel list: one release per line, ``#`` starts a comment.

    Returns the kernels in file order (first occurrence of each) and one
    :class:`LineProblem` per line that was not taken: unparsable lines, and duplicates
    (message ``duplicate of line N``). Blank and comment-only lines are skipped.
    """
    kernels: list[Kernel] = []
    problems: list[LineProblem] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(lines, 1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            kernel = parse_kernel(text)
        except KernelParseError as e:
            problems.append(LineProblem(source, number, raw.rstrip("\r\n"), str(e)))
            continue
        seen = first_line.get(text)
        if seen is not None:
            problems.append(
                LineProblem(source, number, text, f"duplicate of line {seen}: {text!r}", True)
            )
            continue
        first_line[text] = number
        kernels.append(kernel)
    return kernels, problems


# RHEL 7.6 (kernel 3.10.0-957) backported eBPF; every later el7 build has it.
_EL7_EBPF_FIRST_BUILD = 957


def ebpf_supported(kernel: Kernel) -> bool:
    """Whether an eBPF probe can run on this kernel: 4.14+, or RHEL 7.6+ 3.10 kernels."""
    if (kernel.major, kernel.minor) >= (4, 14):
        return True
    if kernel.family == "el7" and (kernel.major, kernel.minor, kernel.patch) == (3, 10, 0):
        tokens = kernel.tokens
        # tokens: 3, 10, 0, <build>, …
        return len(tokens) > 3 and tokens[3][0] == 1 and tokens[3][1] >= _EL7_EBPF_FIRST_BUILD
    return False
