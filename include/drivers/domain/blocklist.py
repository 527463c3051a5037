"""Blocklists: drivers that must not be built.

A rule is ``<kernel> [<driver-version>] [mod|bpf]``; ``#`` starts a comment; a missing
field means ``*``. Field syntax is :func:`drivers.domain.selectors.compile_field` (only ``*`` is
special in a plain field; ``~`` starts a Python regex). A task is blocked when the line
``<kernel> <version> <kind>`` matches a rule, anchored at both ends. Kernel releases,
versions and kinds hold no whitespace, so matching field by field is exactly matching
the joined line: each of the two separators has to consume one of the two spaces.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from drivers.domain.names import KINDS
from drivers.domain.selectors import SelectorError, compile_field


class BlocklistError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    source: str
    line: int
    text: str
    kernel_field: str
    kernel: re.Pattern[str]
    version: re.Pattern[str]
    kind: re.Pattern[str]

    @property
    def where(self) -> str:
        """Where the rule is written, e.g. ``BLOCKLIST:12``."""
        return f"{self.source}:{self.line}"


def parse_rules(lines: Iterable[str], source: str) -> list[Rule]:
    rules = []
    for number, raw in enumerate(lines, 1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        fields = text.split()
        if len(fields) > 3:
            raise BlocklistError(
                f"{source}:{number}: {len(fields)} fields in {text!r}; "
                "a rule is '<kernel> [<driver-version>] [mod|bpf]'"
            )
        fields += ["*"] * (3 - len(fields))
        try:
            kernel, version, kind = (compile_field(f) for f in fields)
        except SelectorError as e:
            raise BlocklistError(f"{source}:{number}: {e}") from None
        if not any(kind.fullmatch(k) for k in KINDS):
            raise BlocklistError(
                f"{source}:{number}: kind {fields[2]!r} matches neither mod nor bpf; "
                "use mod, bpf or *"
            )
        rules.append(Rule(source, number, text, fields[0], kernel, version, kind))
    return rules


class Blocklist:
    """Rules from one or more files; answers which rule (if any) blocks a driver."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules
        self._kernel_masks: dict[str, int] = {}
        self._vk_masks: dict[tuple[str, str], int] = {}
        # Most rules name one kernel: a dict lookup. The others are grouped by pattern, and
        # one alternation over them answers "no pattern matches" in a single C-level call.
        self._exact: dict[str, int] = {}
        patterns: dict[str, tuple[re.Pattern[str], int]] = {}
        for i, rule in enumerate(rules):
            field_ = rule.kernel_field
            if not field_.startswith("~") and "*" not in field_:
                self._exact[field_] = self._exact.get(field_, 0) | 1 << i
            else:
                pattern, mask = patterns.get(field_, (rule.kernel, 0))
                patterns[field_] = (pattern, mask | 1 << i)
        self._patterns = list(patterns.values())
        try:
            self._any_pattern = re.compile("|".join(f"(?:{p.pattern})" for p, _ in self._patterns))
        except re.error:  # e.g. a regex with global inline flags: test each pattern instead
            self._any_pattern = None

    @classmethod
    def from_files(cls, paths: Iterable[str | Path]) -> Blocklist:
        rules: list[Rule] = []
        for path in paths:
            path = Path(path)
            try:
                text = path.read_text()
            except OSError as e:
                raise BlocklistError(f"cannot read blocklist {path}: {e.strerror}") from None
            rules += parse_rules(text.splitlines(), path.name)
        return cls(rules)

    def _kernel_mask(self, kernel: str) -> int:
        mask = self._kernel_masks.get(kernel)
        if mask is None:
            mask = self._exact.get(kernel, 0)
            any_pattern = self._any_pattern
            if any_pattern is None or any_pattern.fullmatch(kernel):
                for pattern, rules in self._patterns:
                    if pattern.fullmatch(kernel):
                        mask |= rules
            self._kernel_masks[kernel] = mask
        return mask

    def _vk_mask(self, version: str, kind: str) -> int:
        mask = self._vk_masks.get((version, kind))
        if mask is None:
            mask = 0
            for i, rule in enumerate(self.rules):
                if rule.version.fullmatch(version) and rule.kind.fullmatch(kind):
                    mask |= 1 << i
            self._vk_masks[version, kind] = mask
        return mask

    def match(self, kernel: str, driver_version: str, kind: str) -> Rule | None:
        """The first rule that blocks this driver, or None."""
        kmask = self._kernel_mask(kernel)
        if not kmask:
            return None
        both = kmask & self._vk_mask(driver_version, kind)
        if not both:
            return None
        return self.rules[(both & -both).bit_length() - 1]
