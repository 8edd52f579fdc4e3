"""Localise patterns and inline file patterns: parsing, matching and overlap rules.

A pattern is relative to its tree's root (a localise pattern) or to a localised release
(an inline pattern: :class:`FilePattern`) and made of '/'-separated components; in a
component '*' matches any run of characters and '?' exactly one, never across '/'. All
other characters, including '[' and '\\', are literal (unlike fnmatch), so any real name
can be written down.  Inline patterns also take '**' as a whole component: any number
of directories, none included ("**/*.pyc" is every .pyc at any depth).
"""

from __future__ import annotations

import re
from typing import NamedTuple


class PatternError(ValueError):
    """A pattern that is not acceptable; the message says why."""


class Pattern(NamedTuple):
    text: str
    components: tuple[str, ...]
    regexes: tuple[re.Pattern[str], ...]

    @classmethod
    def parse(cls, text: str) -> Pattern:
        _check_text(text, "the tree's root")
        components = tuple(text.rstrip("/").split("/"))
        for comp in components:
            if comp in ("", ".", ".."):
                raise PatternError(f"{text!r} has an empty, '.' or '..' component")
        return cls(text, components, tuple(_component_regex(c) for c in components))

    @property
    def is_literal(self) -> bool:
        return not any(is_glob(c) for c in self.components)

    def matches(self, relpath: str) -> bool:
        parts = relpath.split("/")
        return len(parts) == len(self.components) and all(
            rx.fullmatch(p) is not None for rx, p in zip(self.regexes, parts, strict=True)
        )

    def component_matches(self, index: int, name: str) -> bool:
        return self.regexes[index].fullmatch(name) is not None


def _check_text(text: str, relative_to: str) -> None:
    if not text:
        raise PatternError("empty pattern")
    if "\0" in text:
        raise PatternError("NUL byte in pattern")
    if text.startswith("/"):
        raise PatternError(f"{text!r} is absolute; patterns are relative to {relative_to}")


def is_glob(component: str) -> bool:
    return "*" in component or "?" in component


def _component_regex(component: str) -> re.Pattern[str]:
    out = []
    for ch in component:
        out.append(".*" if ch == "*" else "." if ch == "?" else re.escape(ch))
    return re.compile("".join(out), re.DOTALL)


def _components_may_meet(a: str, b: str) -> bool:
    """Could some single name match both components?"""
    if not is_glob(a):
        return _component_regex(b).fullmatch(a) is not None
    if not is_glob(b):
        return _component_regex(a).fullmatch(b) is not None
    # Two globs: compare their literal heads and tails; if those are compatible some
    # name can match both (conservative: we only reject profiles, never mount wrongly).
    head_a, head_b = re.split(r"[*?]", a, maxsplit=1)[0], re.split(r"[*?]", b, maxsplit=1)[0]
    tail_a, tail_b = re.split(r"[*?]", a)[-1], re.split(r"[*?]", b)[-1]
    heads_ok = head_a.startswith(head_b) or head_b.startswith(head_a)
    tails_ok = tail_a.endswith(tail_b) or tail_b.endswith(tail_a)
    return heads_ok and tails_ok


def overlap(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """True if some path matched by ``a`` equals, contains or lies inside one matched by ``b``.

    Overlays cannot nest sensibly (the inner one would hide part of the outer snapshot), so
    a profile whose patterns overlap is refused.
    """
    return all(_components_may_meet(x, y) for x, y in zip(a, b, strict=False))


class FilePattern(NamedTuple):
    """An inline pattern: which files of a release are stored whole in its snapshot."""

    text: str
    regex: re.Pattern[str]

    @classmethod
    def parse(cls, text: str) -> FilePattern:
        _check_text(text, "the localised release")
        if text.endswith("/"):
            raise PatternError(f"{text!r} ends with '/'; inline patterns name files")
        out = []
        components = text.split("/")
        for i, comp in enumerate(components):
            if comp in ("", ".", ".."):
                raise PatternError(f"{text!r} has an empty, '.' or '..' component")
            if comp == "**":
                # Any directories (none included) before the rest; at the end: anything.
                out.append(".*" if i == len(components) - 1 else "(?:[^/]*/)*")
                continue
            if "**" in comp:
                raise PatternError(f"{text!r}: '**' must be a whole component (as in '**/*.pyc')")
            out.append("".join("[^/]*" if ch == "*" else "[^/]" if ch == "?" else re.escape(ch) for ch in comp))
            if i < len(components) - 1:
                out.append("/")
        return cls(text, re.compile("".join(out), re.DOTALL))

    def matches(self, relpath: str) -> bool:
        """Does the file at ``relpath`` (relative to the release, no leading '/') match?"""
        return self.regex.fullmatch(relpath) is not None
