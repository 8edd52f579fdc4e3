"""A proposed profile from counted lookups: which release directories to localise.

A release directory is proposed when at least ``min_enoent`` of its lookups failed
(the failing lookups of long search paths are what ovlrun exists to take off the
server; 0: any lookup a snapshot would answer), ranked by the lookups a snapshot would
answer (every lookup but file opens, whose data still comes from the shared tree).
Only real release directories are proposed: one that does not exist (its lookups
failed at the tree's top levels), that leaves the tree through a symlink, or whose name
a pattern cannot spell ('*', '?', non-UTF-8) is listed as skipped with the reason; a
symlinked one (``app/latest -> 1.0``) is proposed as its target.  With ``glob``, two or
more sibling releases become one ``parent/*`` pattern (which a build expands to *every*
sibling, including ones no job used).  The text is checked with the profile parser
before anyone sees it, so ``ovlrun profile check`` accepts what learn writes.
"""

from __future__ import annotations

import json
import posixpath
import time
import tomllib
from pathlib import Path
from typing import NamedTuple

from ovlrun.errors import OvlrunError
from ovlrun.learn.inline import InlineProposal
from ovlrun.learn.trees import TreeSpec, release_real_path
from ovlrun.profile.parse import Profile, format_size, validate
from ovlrun.profile.patterns import Pattern, is_glob, overlap


class Candidate(NamedTuple):
    root: str
    release: str
    lookups: int
    enoent: int
    opens: int

    @property
    def saved(self) -> int:
        return self.lookups - self.opens


class Choice(NamedTuple):
    root: str
    pattern: str
    lookups: int
    enoent: int
    opens: int
    note: str = ""

    @property
    def saved(self) -> int:
        return self.lookups - self.opens


class Proposal(NamedTuple):
    chosen: list[Choice]
    skipped: list[tuple[str, str]]  # (path, why)


def _spellable(release: str) -> str:
    if any(is_glob(part) for part in release.split("/")):
        return "its name has '*' or '?', which a pattern cannot name literally"
    try:
        release.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not UTF-8, which a TOML profile cannot hold"
    return ""


def choose(candidates: list[Candidate], trees: list[TreeSpec], *, min_enoent: int, glob: bool) -> Proposal:
    by_root = {t.root: t for t in trees}
    merged: dict[tuple[str, str], Choice] = {}
    skipped: list[tuple[str, str]] = []
    for c in candidates:
        label = posixpath.join(c.root, c.release)
        if c.enoent < min_enoent or c.saved < 1:
            continue
        real, note = release_real_path(by_root[c.root], c.release) if c.root in by_root else (None, "unknown tree")
        problem = "" if real is None else _spellable(real)
        if real is None or problem:
            skipped.append((label, problem or note))
            continue
        note = f"via the symlink {c.release}" if note == "symlink" else ""
        old = merged.get((c.root, real))
        if old is not None:
            note = ", ".join(n for n in (old.note, note) if n)
            c = Candidate(c.root, real, c.lookups + old.lookups, c.enoent + old.enoent, c.opens + old.opens)
        merged[(c.root, real)] = Choice(c.root, real, c.lookups, c.enoent, c.opens, note)
    chosen = list(merged.values())
    if glob:
        chosen = _collapse(chosen)
    return Proposal(_without_overlaps(chosen, skipped), skipped)


def _collapse(chosen: list[Choice]) -> list[Choice]:
    groups: dict[tuple[str, str], list[Choice]] = {}
    for c in chosen:
        groups.setdefault((c.root, posixpath.dirname(c.pattern)), []).append(c)
    out = []
    for (root, parent), members in groups.items():
        if len(members) < 2 or not parent:
            out.extend(members)
            continue
        names = ", ".join(sorted(posixpath.basename(m.pattern) for m in members))
        out.append(Choice(root, f"{parent}/*", sum(m.lookups for m in members), sum(m.enoent for m in members),
                          sum(m.opens for m in members), f"siblings seen: {names}"))
    return out


def _without_overlaps(chosen: list[Choice], skipped: list[tuple[str, str]]) -> list[Choice]:
    """Localised paths cannot nest: keep the outer of two (it answers the inner's lookups too)."""
    kept: list[Choice] = []
    for c in sorted(chosen, key=lambda c: (c.pattern.count("/"), -c.saved)):
        mine = (*c.root.strip("/").split("/"), *Pattern.parse(c.pattern).components)
        clash = next((k for k in kept if overlap(mine, (*k.root.strip("/").split("/"),
                                                         *Pattern.parse(k.pattern).components))), None)
        if clash is not None:
            skipped.append((posixpath.join(c.root, c.pattern), f"inside {posixpath.join(clash.root, clash.pattern)}"))
            continue
        kept.append(c)
    return sorted(kept, key=lambda c: (-c.saved, c.root, c.pattern))


def render(proposal: Proposal, description: str, source: str,
           inline: list[InlineProposal] | None = None) -> str:
    """The profile text, with the evidence for each pattern as a comment; ``inline``: the
    files to store whole, per tree (``learn --inline``)."""
    inline_of = {p.root: p for p in inline or ()}
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    lines = [f"# Proposed by ovlrun learn on {when} from {source}.",
             "# Review it: jobs using this profile see each path below as it was when its snapshot was built.",
             f"description = {json.dumps(description, ensure_ascii=False)}", ""]
    for root in sorted({c.root for c in proposal.chosen}):
        lines += ["[[tree]]", f"root = {json.dumps(root, ensure_ascii=False)}", "localise = ["]
        for c in (c for c in proposal.chosen if c.root == root):
            why = (f"{c.saved:,} lookups answered locally ({c.enoent:,} ENOENT); {c.opens:,} file opens still "
                   "reach the tree")
            note = f"; {c.note}" if c.note else ""
            lines.append(f"    {json.dumps(c.pattern, ensure_ascii=False)},  # {why}{note}")
        lines.append("]")
        if root in inline_of:
            p = inline_of[root]
            lines.append(f"# Stored whole: the images grow by {format_size(p.growth_bytes)} "
                         f"({p.growth_files:,} files).")
            lines.append("inline = [")
            for k in p.kinds:
                lines.append(f"    {json.dumps(k.pattern)},  # {k.files:,} files opened {k.opens:,} times, "
                             f"{format_size(k.opened_bytes)}" + (f"; {k.larger:,} larger ones stay metacopy"
                                                                  if k.larger else ""))
            lines += ["]", f"inline_max = {json.dumps(format_size(p.max_bytes).replace(' ', ''))}"]
        lines.append("")
    for path, why in proposal.skipped:
        lines.append(f"# not proposed: {path!r}: {why}")
    return "\n".join(lines).rstrip("\n") + "\n"


def check(text: str, file: str, name: str = "proposed") -> Profile:
    """Parse ``text`` as the profile parser does (what ``ovlrun profile check`` runs)."""
    try:
        return validate(tomllib.loads(text), Path(file), name)
    except tomllib.TOMLDecodeError as e:  # a bug in render: never show a broken proposal
        raise OvlrunError(f"internal error: the proposed profile is not valid TOML ({e})") from None
