"""Which files to store whole in the proposed snapshots (``learn --inline``; issue 17).

A snapshot answers lookups, but every file open still walks its redirect on the shared
tree and reads the data there; a profile's ``inline`` patterns store small files whole in
the image instead (README, *Inlined files*).  Which files are worth it is what the job
opened: learn groups the files it opened for data below the proposed release
directories by kind (``**/*.pyc``, ``**/*.so*``, ``**/*.EXT``; files without an
extension are left out: a pattern for them would name files one by one), keeps those of
at most ``max_bytes``, and proposes one pattern per kind.  What it costs is the image
growth: every file of the proposed releases that the patterns would store whole, not
only the ones this job opened, so the releases are walked (``lstat`` only, no symlink
followed, nothing read), with the caller's rights.
"""

from __future__ import annotations

import os
import posixpath
import stat
from typing import NamedTuple

from ovlrun.learn.report import Tally
from ovlrun.profile.parse import Inline, format_size
from ovlrun.profile.patterns import FilePattern, Pattern

MAX_EXTENSION = 16  # a longer "extension" is part of a name, not a kind of file


class Kind(NamedTuple):
    """One proposed pattern and its evidence."""

    pattern: str  # "**/*.pyc"
    files: int  # distinct files the job opened, of at most max_bytes
    opens: int  # how often it opened them
    opened_bytes: int
    larger: int  # files of this kind the job opened that are over max_bytes (stay metacopy)


class InlineProposal(NamedTuple):
    root: str
    kinds: list[Kind]
    max_bytes: int
    growth_bytes: int  # what the proposed releases' images grow by (every matching file)
    growth_files: int

    def inline(self) -> Inline:
        return Inline(tuple(FilePattern.parse(k.pattern) for k in self.kinds), self.max_bytes)

    def describe(self) -> str:
        kinds = ", ".join(f"{k.pattern} ({k.files:,} files opened {k.opens:,} times, {format_size(k.opened_bytes)})"
                          for k in self.kinds)
        return (f"inline for {self.root}: {kinds}; the images grow by {format_size(self.growth_bytes)} "
                f"({self.growth_files:,} files up to {format_size(self.max_bytes)})")

    def to_json(self) -> dict[str, object]:
        return {"root": self.root, "kinds": [k._asdict() for k in self.kinds], "max_bytes": self.max_bytes,
                "growth_bytes": self.growth_bytes, "growth_files": self.growth_files}


def kind_of(name: str) -> str | None:
    """The inline pattern for a file named ``name``; None if it has no usable extension."""
    stem, dot, ext = name.rpartition(".")
    so = name.find(".so")
    if so > 0 and (len(name) == so + 3 or name[so + 3] == "."):  # libfoo.so, libfoo.so.1.2
        return "**/*.so*"
    if not dot or not stem or not ext or len(ext) > MAX_EXTENSION or not (ext.isascii() and ext.isalnum()):
        return None
    return f"**/*.{ext}"


def _release_of(path: str, releases: list[tuple[str, Pattern]]) -> tuple[str, str] | None:
    """(tree root, release directory) if ``path`` lies below a proposed release."""
    for root, pattern in releases:
        if not path.startswith(root.rstrip("/") + "/"):
            continue
        parts = path[len(root.rstrip("/")) + 1:].split("/")
        n = len(pattern.components)
        if len(parts) > n and pattern.matches("/".join(parts[:n])):
            return root, posixpath.join(root, *parts[:n])
    return None


def propose(tally: Tally, chosen: list[tuple[str, str]], max_bytes: int) -> list[InlineProposal]:
    """The inline set per tree for the proposed (root, pattern) pairs, from what the job
    opened (``tally.opened``)."""
    releases = [(root, Pattern.parse(pattern)) for root, pattern in chosen]
    seen: dict[str, dict[str, list[int]]] = {}  # root -> kind -> [files, opens, bytes, larger]
    walk: dict[str, set[str]] = {}  # root -> release directories to measure
    for path, opens in tally.opened.items():
        if path.endswith("/"):
            continue
        place = _release_of(path, releases)
        kind = kind_of(posixpath.basename(path)) if place is not None else None
        if place is None or kind is None:
            continue
        try:
            st = os.lstat(path)
        except OSError:
            continue  # gone since the job ran, or not the caller's to see
        if not stat.S_ISREG(st.st_mode):
            continue
        root, release = place
        figures = seen.setdefault(root, {}).setdefault(kind, [0, 0, 0, 0])
        if st.st_size > max_bytes:
            figures[3] += 1
            continue
        figures[0] += 1
        figures[1] += opens
        figures[2] += st.st_size
        walk.setdefault(root, set()).add(release)
    out = []
    for root, kinds in sorted(seen.items()):
        chosen_kinds = sorted((Kind(p, *f) for p, f in kinds.items() if f[0]), key=lambda k: (-k.opens, k.pattern))
        if not chosen_kinds:
            continue
        inline = Inline(tuple(FilePattern.parse(k.pattern) for k in chosen_kinds), max_bytes)
        files = size = 0
        for release in sorted(walk.get(root, ())):
            n, b = _growth(release, inline)
            files, size = files + n, size + b
        out.append(InlineProposal(root, chosen_kinds, max_bytes, size, files))
    return out


def _growth(release: str, inline: Inline) -> tuple[int, int]:
    """Files of ``release`` that ``inline`` stores whole, and their bytes."""
    files = size = 0
    for directory, dirs, names in os.walk(release, followlinks=False):
        rel_dir = os.path.relpath(directory, release)
        for name in names:
            try:
                st = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if stat.S_ISREG(st.st_mode) and inline.selects(rel, st.st_size):
                files += 1
                size += st.st_size
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(directory, d))]
    return files, size
