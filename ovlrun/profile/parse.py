"""Profiles: which release paths of which shared trees a job localises.

A profile is ``NAME.toml``::

    description = "pipeline 2024"
    network = "host"            # or "none": private network namespace with loopback only
    [[tree]]
    root = "/sw"
    localise = ["thing/UIIDA/versionXX", "apps/*/2.1/lib"]
    inline = ["**/*.pyc", "**/*.so*"]   # optional: files stored whole in the snapshots
    inline_max = "256KiB"               # optional: only files up to this size (default 256 KiB)

TOML is read with the stdlib ``tomllib``: the third-party ``toml`` 0.10 package silently
drops valid TOML 1.0 data (e.g. some inline-table and dotted-key forms), and a profile that
loses a ``localise`` entry without an error is exactly the kind of silent wrongness we
refuse.  Every problem is reported as ``OvlrunError`` naming the file and the key.
"""

from __future__ import annotations

import os
import posixpath
import tomllib
from collections.abc import Callable, Collection
from pathlib import Path
from typing import NamedTuple, TypeVar

from ovlrun.errors import OvlrunError
from ovlrun.profile import locate
from ovlrun.profile.patterns import FilePattern, Pattern, PatternError, overlap

NETWORK_MODES = ("host", "none")
MISSING_ROOT_MODES = ("fail", "unlocalised")
MAX_PROFILE_BYTES = 1 << 20
_P = TypeVar("_P", Pattern, FilePattern)
DEFAULT_INLINE_MAX = 256 << 10
MAX_INLINE_MAX = 1 << 30  # a file stored whole is read at build time and held in every node's image
_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


class Inline(NamedTuple):
    """Which files of a tree's localised releases are stored whole in their snapshots:
    those matching a pattern, of at most ``max_bytes`` (empty files always are)."""

    patterns: tuple[FilePattern, ...]
    max_bytes: int

    def selects(self, relpath: str, size: int) -> bool:
        return size <= self.max_bytes and any(p.matches(relpath) for p in self.patterns)

    def describe(self) -> str:
        """One line for ``profile check`` and the manifest's reader."""
        return f"inline {', '.join(p.text for p in self.patterns)} (files up to {format_size(self.max_bytes)})"

    def to_json(self) -> dict[str, object]:
        return {"patterns": [p.text for p in self.patterns], "max_bytes": self.max_bytes}

    @classmethod
    def of(cls, patterns: list[str], max_bytes: int) -> Inline:
        """From a manifest's record (raises PatternError or ValueError when it is not one)."""
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or not 0 < max_bytes <= MAX_INLINE_MAX:
            raise ValueError(f"inline size limit {max_bytes!r} out of range")
        if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) for p in patterns):
            raise ValueError("inline patterns must be a non-empty list of strings")
        return cls(tuple(FilePattern.parse(p) for p in patterns), max_bytes)


def format_size(n: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]} {unit}"
    return f"{n} B"


def parse_size(value: object, maximum: int = MAX_INLINE_MAX) -> int:
    """A size: an integer (bytes) or a string "N", "N B", "N KiB", "N MiB", "N GiB"; at
    most ``maximum``."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str):
        text = value.strip()
        digits = text.rstrip("BKMGib ")
        unit = text[len(digits):].strip() or "B"
        if not digits.isascii() or not digits.isdigit() or unit not in _UNITS:
            raise ValueError(f"{value!r} is not a size (write it as bytes, or with B, KiB, MiB or GiB: \"256KiB\")")
        n = int(digits) * _UNITS[unit]
    else:
        raise ValueError(f"must be a size (an integer or a string like \"256KiB\"), not {_type_name(value)}")
    if not 0 < n <= maximum:
        raise ValueError(f"{value!r} is out of range (1 B to {format_size(maximum)})")
    return n


class Tree(NamedTuple):
    root: str
    patterns: tuple[Pattern, ...]
    inline: Inline | None = None  # None: only empty files are stored whole

    def path_of(self, relpath: str) -> str:
        return posixpath.join(self.root, relpath)

    def matches_in(self, pattern: Pattern, paths: Collection[str]) -> list[str]:
        """The localised paths among ``paths`` (e.g. the store index) that ``pattern`` names."""
        if pattern.is_literal:
            path = self.path_of(pattern.text)
            return [path] if path in paths else []
        prefix = self.root.rstrip("/") + "/"
        return sorted(p for p in paths if p.startswith(prefix) and pattern.matches(p[len(prefix):]))


class Profile(NamedTuple):
    name: str
    file: Path
    description: str
    trees: tuple[Tree, ...]
    network: str = "host"
    missing_root: str = "fail"  # a tree root that is absent/empty at launch: fail, or run unlocalised

    def select(self, paths: Collection[str]) -> list[tuple[Tree, Pattern, list[str]]]:
        """For each pattern, the localised paths among ``paths`` (e.g. the store index's
        keys) it names: what a launch plans, verify checks and ``profile check`` counts."""
        return [(tree, pattern, tree.matches_in(pattern, paths)) for tree in self.trees for pattern in tree.patterns]


def load_profile(spec: str, dirs: list[Path] | None = None, *, trusted_only: bool = False) -> Profile:
    """Locate (:func:`ovlrun.profile.locate.open_profile`) and parse a profile, from the
    fd that was checked."""
    search = None if dirs is None else [str(d) for d in dirs]
    located = locate.open_profile(spec, search, trusted_only=trusted_only)
    try:
        path = Path(located.path)
        return parse_profile(path, path.stem, fd=located.fd)
    finally:
        located.close()


def parse_profile(path: Path, name: str | None = None, *, fd: int | None = None) -> Profile:
    """Parse the profile file ``path``, read from ``fd`` if given (one already opened and
    checked: see :class:`ovlrun.profile.locate.ProfileFile`), else opened by name."""
    try:
        with open(path, "rb") if fd is None else open(fd, "rb", closefd=False) as f:
            # Capped: a profile is a few lines, and a huge (or sparse) file must not make
            # whoever checks it (a submit filter, a prolog) exhaust its memory.
            raw = f.read(MAX_PROFILE_BYTES + 1)
    except OSError as e:
        raise OvlrunError(f"cannot read profile {path}: {e.strerror}") from None
    if len(raw) > MAX_PROFILE_BYTES:
        raise OvlrunError(f"{path}: larger than {MAX_PROFILE_BYTES >> 20} MiB; not a profile")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OvlrunError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # The message carries "(at line N, column M)", except for errors found at the end
        # of the input: name the last line there too.
        message = str(e).replace("(at end of document)", f"(at end of document, line {text.count(chr(10)) + 1})")
        raise OvlrunError(f"{path}: TOML syntax error: {message}") from None
    except RecursionError:
        # tomllib parses arrays and inline tables recursively.
        raise OvlrunError(f"{path}: TOML nested too deeply; not a profile") from None
    return validate(data, path, name or path.stem)


def _fail(path: Path, key: str, why: str) -> OvlrunError:
    return OvlrunError(f"{path}: {key}: {why}")


def _type_name(value: object) -> str:
    return {str: "a string", list: "an array", dict: "a table", bool: "a boolean", int: "an integer",
            float: "a float"}.get(type(value), type(value).__name__)


def validate(data: dict[str, object], path: Path, name: str) -> Profile:
    known = {"description", "tree", "network", "missing_root"}
    for key in data:
        if key not in known:
            raise _fail(path, key, f"unknown key (allowed: {', '.join(sorted(known))})")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise _fail(path, "description", f"must be a string, not {_type_name(description)}")
    network = data.get("network", "host")
    if not isinstance(network, str) or network not in NETWORK_MODES:
        raise _fail(path, "network", f"must be one of {', '.join(repr(m) for m in NETWORK_MODES)}")
    missing_root = data.get("missing_root", "fail")
    if not isinstance(missing_root, str) or missing_root not in MISSING_ROOT_MODES:
        raise _fail(path, "missing_root", f"must be one of {', '.join(repr(m) for m in MISSING_ROOT_MODES)}")
    tables = data.get("tree")
    if tables is None:
        raise _fail(path, "tree", "missing: a profile needs at least one [[tree]] table")
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise _fail(path, "tree", "must be an array of tables ([[tree]])")
    if not tables:
        raise _fail(path, "tree", "empty: a profile needs at least one [[tree]] table")
    trees = tuple(_validate_tree(t, path, f"tree[{i}]") for i, t in enumerate(tables))
    _check_overlaps(trees, path)
    return Profile(name=name, file=path, description=description, trees=trees, network=network,
                   missing_root=missing_root)


def _validate_tree(table: dict[str, object], path: Path, where: str) -> Tree:
    for key in table:
        if key not in ("root", "localise", "inline", "inline_max"):
            raise _fail(path, f"{where}.{key}", "unknown key (allowed: inline, inline_max, localise, root)")
    root = table.get("root")
    if root is None:
        raise _fail(path, f"{where}.root", "missing")
    if not isinstance(root, str):
        raise _fail(path, f"{where}.root", f"must be a string, not {_type_name(root)}")
    if not root.startswith("/") or "\0" in root:
        raise _fail(path, f"{where}.root", f"{root!r} is not an absolute path")
    if any(c in (".", "..") for c in root.split("/")):
        raise _fail(path, f"{where}.root", f"{root!r} has '.' or '..' components")
    root = posixpath.normpath(root)
    if root == "/":
        raise _fail(path, f"{where}.root", "'/' cannot be a software tree root")
    patterns = table.get("localise")
    if patterns is None:
        raise _fail(path, f"{where}.localise", "missing")
    parsed = _parse_list(patterns, Pattern.parse, path, f"{where}.localise",
                         "empty: name at least one release path to localise")
    return Tree(root=root, patterns=parsed, inline=_validate_inline(table, path, where))


def _parse_list(value: object, parse: Callable[[str], _P], path: Path, key: str, empty: str) -> tuple[_P, ...]:
    """A non-empty array of pattern strings, each parsed (errors name its index)."""
    if not isinstance(value, list):
        raise _fail(path, key, f"must be an array of strings, not {_type_name(value)}")
    if not value:
        raise _fail(path, key, empty)
    parsed = []
    for j, text in enumerate(value):
        if not isinstance(text, str):
            raise _fail(path, f"{key}[{j}]", f"must be a string, not {_type_name(text)}")
        try:
            parsed.append(parse(text))
        except PatternError as e:
            raise _fail(path, f"{key}[{j}]", str(e)) from None
    return tuple(parsed)


def _validate_inline(table: dict[str, object], path: Path, where: str) -> Inline | None:
    texts = table.get("inline")
    limit = table.get("inline_max")
    if texts is None:
        if limit is not None:
            raise _fail(path, f"{where}.inline_max", "set without inline (name the files to store whole)")
        return None
    patterns = _parse_list(texts, FilePattern.parse, path, f"{where}.inline",
                           "empty: name files to store whole, or leave inline out")
    try:
        max_bytes = DEFAULT_INLINE_MAX if limit is None else parse_size(limit)
    except ValueError as e:
        raise _fail(path, f"{where}.inline_max", str(e)) from None
    return Inline(patterns, max_bytes)


def _check_overlaps(trees: tuple[Tree, ...], path: Path) -> None:
    entries = []
    for i, tree in enumerate(trees):
        root_parts = tuple(p for p in tree.root.split("/") if p)
        for j, pat in enumerate(tree.patterns):
            entries.append((f"tree[{i}].localise[{j}]", tree.path_of(pat.text), root_parts + pat.components))
    for a in range(len(entries)):
        for b in range(a + 1, len(entries)):
            key_a, text_a, comps_a = entries[a]
            key_b, text_b, comps_b = entries[b]
            if overlap(comps_a, comps_b):
                raise _fail(path, key_b, f"{text_b!r} overlaps {key_a} {text_a!r}; localised paths cannot nest")


def check_within_root(tree: Tree, relpath: str) -> str:
    """Resolve ``root/relpath`` (following symlinks) and insist it stays inside the root.

    Returns the real path.  A pattern that reaches outside the tree through a symlink
    would let a profile mount over arbitrary host directories.
    """
    real_root = os.path.realpath(tree.root)
    real = os.path.realpath(tree.path_of(relpath))
    if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):
        raise OvlrunError(f"{tree.path_of(relpath)} resolves to {real}, outside the tree root {tree.root}")
    if real == real_root:
        raise OvlrunError(f"{tree.path_of(relpath)} resolves to the tree root itself; localise release paths")
    return real
