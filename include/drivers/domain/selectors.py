"""Kernel selectors (backfills, routing) and the shared field syntax of blocklists.

Field syntax (:func:`compile_field`, also used by :mod:`drivers.domain.blocklist`): a field
starting with ``~`` is a Python regex (the rest of the field); otherwise only ``*`` is
special (any run of characters, possibly empty) and everything else — ``?``, ``[``,
``.`` included — is literal. A field always matches a whole string.

Selector syntax (:func:`parse_selector`), optionally prefixed by ``FAMILY:`` (a family
of :data:`drivers.domain.kernels.FAMILIES`, e.g. ``el8:``) to keep only that family, or
by ``FAMILY/SERIES:`` (a series of :data:`drivers.domain.kernels.SERIES`, e.g.
``debian/trixie:``) to keep only that release of it (:attr:`Kernel.series`):

==============================  ========================================================
``5.4.0-62-generic``            exactly this release
``*-aws``                       glob over the release (field syntax above)
``~5\\.4\\.0-\\d+-gcp``            Python regex, matching the whole release
``4.18.0-305..4.18.0-372``      inclusive range; ``A..`` and ``..B`` are open-ended
``>=5.10,<6.0``                 comparisons ``>= > <= < ==``, comma means AND
``debian/bookworm:*``           every kernel of Debian 12 (``6.1.0-N-*``, ``*+deb12-*``)
``debian/trixie:*-cloud-amd64`` prefixes combine with any of the forms above
==============================  ========================================================

Bounds are version prefixes, compared token by token exactly like
:attr:`drivers.domain.kernels.Kernel.key` (numbers as numbers, separators ignored). A bound with
fewer tokens than a release is compared with the release's tokens cut to the bound's
length, so a bound stands for every release it prefixes: ``..4.18.0-372`` includes every
``4.18.0-372.*`` release, ``<4.18.0-372`` excludes them all, ``>=5.10`` includes
``5.10.0-9-amd64`` and ``5.10.1``, ``==4.18.0-305`` matches every ``4.18.0-305.*``, and
``305`` never prefixes ``3050`` (tokens are whole numbers).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from drivers.domain.kernels import (
    FAMILIES,
    MAX_RELEASE_LENGTH,
    SERIES,
    Kernel,
    KernelParseError,
    VersionKey,
    parse_kernel,
    version_tokens,
)

__all__ = ["Selector", "SelectorError", "compile_field", "parse_selector"]

EXAMPLES = (
    "valid selectors look like 'el8:4.18.0-305..4.18.0-372', '>=5.10,<6.0', '*-aws', "
    "'~5\\.4\\.0-\\d+-gcp' or an exact release such as '5.4.0-62-generic'"
)


class SelectorError(ValueError):
    """A selector or field that cannot be used; the message says why and shows a valid one."""


# ---------------------------------------------------------------------------------------
# Field syntax, shared with the blocklist.
# ---------------------------------------------------------------------------------------
# Inline global flags such as "(?i)" must stay at the very start of a pattern.
_GLOBAL_FLAGS_RE = re.compile(r"\(\?[aiLmsux]+\)")


@lru_cache(maxsize=4096)
def compile_field(pattern: str) -> re.Pattern[str]:
    """Compile one blocklist/selector field into a pattern anchored at both ends.

    ``~regex`` is a Python regex; otherwise ``*`` matches any run of characters (possibly
    empty) and every other character is literal. The returned pattern is anchored
    (``\\A…\\Z``), so ``match``, ``search`` and ``fullmatch`` all test the whole string.
    """
    if pattern.startswith("~"):
        regex = pattern[1:]
        try:
            re.compile(regex)
        except re.error as e:
            raise SelectorError(
                f"invalid regex in {pattern!r}: {e}; a '~' field is a Python regex matching "
                "the whole value, e.g. '~4\\.18\\.0-305\\..*'"
            ) from None
        flags = _GLOBAL_FLAGS_RE.match(regex)
        head = flags.group() if flags else ""
        return re.compile(rf"{head}\A(?:{regex[len(head) :]})\Z")
    body = "(?s:.*)".join(re.escape(part) for part in pattern.split("*"))
    return re.compile(rf"\A{body}\Z")


# ---------------------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------------------
_FAMILY_PREFIX_RE = re.compile(
    r"([A-Za-z][A-Za-z0-9_]*)(?:/([A-Za-z][A-Za-z0-9_]*))?:(.*)", re.DOTALL
)
_BOUND_RE = re.compile(r"[0-9][A-Za-z0-9.+~_-]*", re.ASCII)
_COMPARISON_RE = re.compile(r"(>=|<=|==|>|<)\s*(.*)", re.DOTALL)
_OPERATORS: dict[str, Callable[[VersionKey, VersionKey], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
}


@dataclass(frozen=True, slots=True)
class _Bound:
    op: str  # one of _OPERATORS
    text: str
    tokens: VersionKey

    def __str__(self) -> str:
        return f"{self.op}{self.text}"


@dataclass(frozen=True, slots=True)
class Selector:
    """A parsed selector; ``str()`` gives its canonical form, which parses back to it."""

    family: str | None
    form: str  # "exact" | "glob" | "regex" | "range" | "compare"
    body: str  # canonical text after the family prefix
    _predicate: Callable[[Kernel], bool] = field(compare=False, repr=False)
    series: str | None = None  # only with a family

    def __str__(self) -> str:
        if self.series:
            return f"{self.family}/{self.series}:{self.body}"
        return f"{self.family}:{self.body}" if self.family else self.body

    def matches(self, kernel: Kernel) -> bool:
        """Whether this selector selects ``kernel``."""
        if self.family is not None and kernel.family != self.family:
            return False
        if self.series is not None and kernel.series != self.series:
            return False
        return self._predicate(kernel)

    def filter(self, kernels: Iterable[Kernel]) -> list[Kernel]:
        """The selected kernels, in their input order."""
        predicate, family, series = self._predicate, self.family, self.series
        if family is None:
            return [k for k in kernels if predicate(k)]
        if series is None:
            return [k for k in kernels if k.family == family and predicate(k)]
        # The series is computed on demand: test it only on the family's kernels.
        return [k for k in kernels if k.family == family and k.series == series and predicate(k)]


def _error(expr: str, problem: str) -> SelectorError:
    return SelectorError(f"selector {expr!r}: {problem}; {EXAMPLES}")


def _parse_bound(expr: str, op: str, text: str) -> _Bound:
    text = text.strip()
    if len(text) > MAX_RELEASE_LENGTH:
        raise _error(expr, f"bound {text[:40]!r}… is longer than {MAX_RELEASE_LENGTH} characters")
    if not _BOUND_RE.fullmatch(text):
        raise _error(
            expr,
            f"bound {text!r} is not a kernel version: it must start with a digit and hold only "
            "letters, digits and . - _ ~ + (e.g. '5.10', '4.18.0-305', "
            "'4.18.0-305.10.2.el8_4')",
        )
    return _Bound(op, text, version_tokens(text))


def _selects_nothing(lower: _Bound, upper: _Bound) -> bool:
    """True when no release can satisfy both a lower and an upper bound."""
    m = min(len(lower.tokens), len(upper.tokens))
    low, high = lower.tokens[:m], upper.tokens[:m]
    if low != high:
        return low > high
    # One bound prefixes the other: a strict operator on the shorter one (the one that
    # stands for every release it prefixes) excludes everything the other one admits.
    return (len(lower.tokens) == m and lower.op == ">") or (
        len(upper.tokens) == m and upper.op == "<"
    )


def _check_satisfiable(expr: str, bounds: list[_Bound], is_range: bool) -> None:
    lowers = [b for b in bounds if b.op in (">=", ">", "==")]
    uppers = [b for b in bounds if b.op in ("<=", "<", "==")]
    for low in lowers:
        for high in uppers:
            # `==` counts as both an inclusive lower and an inclusive upper bound.
            low_i = _Bound(">=", low.text, low.tokens) if low.op == "==" else low
            high_i = _Bound("<=", high.text, high.tokens) if high.op == "==" else high
            if not _selects_nothing(low_i, high_i):
                continue
            if is_range:
                raise _error(
                    expr,
                    f"range start {low.text!r} comes after its end {high.text!r}, so it selects "
                    f"nothing; put the lower bound first: '{high.text}..{low.text}'",
                )
            raise _error(
                expr,
                f"no kernel release can satisfy both '{low}' and '{high}', so it selects nothing",
            )


def _bounds_predicate(bounds: list[_Bound]) -> Callable[[Kernel], bool]:
    checks = tuple((len(b.tokens), b.tokens, _OPERATORS[b.op]) for b in bounds)
    if len(checks) == 1:
        ((n, bound, op),) = checks
        return lambda k: op(k.key[0][:n], bound)
    if len(checks) == 2:  # the common case (ranges, ">=A,<B"): no inner loop
        (n1, b1, op1), (n2, b2, op2) = checks
        return lambda k: op1(k.key[0][:n1], b1) and op2(k.key[0][:n2], b2)

    def predicate(kernel: Kernel) -> bool:
        tokens = kernel.key[0]
        return all(op(tokens[:n], bound) for n, bound, op in checks)

    return predicate


def _parse_range(expr: str, body: str) -> tuple[str, list[_Bound]]:
    start, _, end = (part.strip() for part in body.partition(".."))
    if ".." in end:
        raise _error(expr, "a range has exactly one '..' between its bounds")
    if not start and not end:
        raise _error(expr, "empty range '..': give at least one bound, e.g. '4.18.0-305..'")
    bounds = []
    if start:
        bounds.append(_parse_bound(expr, ">=", start))
    if end:
        bounds.append(_parse_bound(expr, "<=", end))
    _check_satisfiable(expr, bounds, is_range=True)
    return f"{start}..{end}", bounds


def _parse_comparisons(expr: str, body: str) -> tuple[str, list[_Bound]]:
    bounds = []
    for part in body.split(","):
        part = part.strip()
        m = _COMPARISON_RE.fullmatch(part)
        if m is None:
            hint = " ('=' is written '==')" if part.startswith(("=", "!")) else ""
            raise _error(
                expr,
                f"comparison {part!r} does not start with one of >= > <= < =={hint}; "
                "every comma-separated part needs its own operator",
            )
        bounds.append(_parse_bound(expr, m.group(1), m.group(2)))
    _check_satisfiable(expr, bounds, is_range=False)
    return ",".join(map(str, bounds)), bounds


def _parse_exact(
    expr: str, family: str | None, series: str | None, body: str
) -> Callable[[Kernel], bool]:
    try:
        kernel = parse_kernel(body)
    except KernelParseError as e:
        hint = ""
        if _BOUND_RE.fullmatch(body):
            hint = (
                f"; to select every release starting with this version write '=={body}' "
                f"or '{body}..'"
            )
        raise _error(expr, f"{body!r} is not an exact kernel release: {e}{hint}") from None
    if family is not None and kernel.family != family:
        raise _error(
            expr,
            f"release {body!r} belongs to family {kernel.family!r}, not {family!r}, so it "
            "selects nothing",
        )
    if series is not None and kernel.series != series:
        raise _error(
            expr,
            f"release {body!r} belongs to series {kernel.series or '(none)'!r}, not "
            f"{series!r}, so it selects nothing",
        )
    return lambda k: k.release == body


@lru_cache(maxsize=1024)
def parse_selector(expr: str) -> Selector:
    """Parse a kernel selector (syntax in the module docstring); raise :class:`SelectorError`."""
    text = expr.strip()
    if not text:
        raise _error(expr, "empty selector")
    family = series = None
    m = _FAMILY_PREFIX_RE.fullmatch(text)
    if m is not None:
        family, series, text = m.group(1), m.group(2), m.group(3).strip()
        if family not in FAMILIES:
            raise _error(
                expr,
                f"unknown kernel family {family!r}; known families: {', '.join(sorted(FAMILIES))}",
            )
        if series is not None and series not in SERIES.get(family, ()):
            known = SERIES.get(family)
            raise _error(
                expr,
                f"unknown series {series!r} of family {family!r}; "
                + (f"known series: {', '.join(known)}" if known else "that family has none"),
            )
        prefix = f"{family}/{series}" if series else family
        if not text:
            raise _error(expr, f"nothing after '{prefix}:'; e.g. '{prefix}:*' selects them all")

    predicate: Callable[[Kernel], bool]
    if text.startswith("~"):
        form, body = "regex", text
        predicate = _pattern_predicate(expr, text)
    elif ".." in text:
        form = "range"
        body, bounds = _parse_range(expr, text)
        predicate = _bounds_predicate(bounds)
    elif text.startswith(("<", ">", "=", "!")):
        form = "compare"
        body, bounds = _parse_comparisons(expr, text)
        predicate = _bounds_predicate(bounds)
    elif "," in text:
        raise _error(expr, "a comma joins comparisons, each with its operator, e.g. '>=5.10,<6.0'")
    elif "*" in text:
        form, body = "glob", text
        predicate = _pattern_predicate(expr, text)
    else:
        form, body = "exact", text
        predicate = _parse_exact(expr, family, series, text)
    return Selector(family, form, body, predicate, series)


def _pattern_predicate(expr: str, text: str) -> Callable[[Kernel], bool]:
    try:
        fullmatch = compile_field(text).fullmatch
    except SelectorError as e:
        raise SelectorError(f"selector {expr!r}: {e}") from None
    return lambda k: fullmatch(k.release) is not None
