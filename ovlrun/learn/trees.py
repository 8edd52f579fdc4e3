"""Which shared tree, and which release directory of it, a looked-up path belongs to.

A tree's releases live at some depth below its root (``/sw/app/1.0``: depth 2), below
levels that keep gaining releases.  For each path learn finds that depth, in order:

1. given per tree (``--tree /sw:2``, or ``release_depth`` of a ``[[learn_tree]]`` in the
   site configuration);
2. from the installed profiles' patterns for that root: a pattern ``app/1.0`` says the
   directories next to ``1.0`` under ``app`` are releases, whatever their names;
3. from the tree's shape as the job's (or the node's) paths show it: the first component
   that looks like a version (``1.0``, ``v2``, ``2024a``, ``gcc-11.2.0``) ends a release
   directory, and its siblings are releases too (``app/current``), while its parent
   (``app``) is a top level.

A lookup strictly below a release directory is what a snapshot of it answers; one of the
release directory itself, or above it, is at the tree's *top levels*, which a profile
cannot localise (they change whenever a release is added).
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path
from typing import NamedTuple

from ovlrun.errors import OvlrunError
from ovlrun.linux import mountinfo
from ovlrun.profile import locate
from ovlrun.profile.patterns import Pattern
from ovlrun.store.layout import snapshot_of_layer

VERSION = re.compile(r"^v?\d|\d\.\d")


class TreeSpec(NamedTuple):
    root: str  # as the profile or --tree names it
    real: str  # where it resolves now (a lookup may use either spelling)
    depth: int | None  # releases this many components below the root (None: learn it)
    patterns: tuple[Pattern, ...]  # the installed profiles' patterns for this root


class Place(NamedTuple):
    """Where a path falls: ``release`` is the release directory relative to the root
    ("" at the top levels, None when no release level could be recognised: then
    ``top`` holds the path's first component)."""

    tree: TreeSpec
    release: str | None
    top: str = ""


def parse_tree_option(text: str) -> tuple[str, int | None]:
    """``ROOT`` or ``ROOT:DEPTH``."""
    root, colon, depth = text.rpartition(":")
    if colon and depth.isascii() and depth.isdigit():
        if not 1 <= int(depth) <= 32:
            raise OvlrunError(f"--tree {text}: the release depth must be between 1 and 32")
        return root, int(depth)
    return text, None


def installed_profile_trees() -> dict[str, list[Pattern]]:
    """root -> patterns of every readable installed profile (unreadable ones are skipped:
    they only help learn recognise release depths)."""
    from ovlrun.profile.parse import parse_profile

    found: dict[str, list[Pattern]] = {}
    for directory in locate.profile_dirs():
        try:
            names = sorted(n for n in os.listdir(directory) if n.endswith(".toml"))
        except OSError:
            continue
        for name in names:
            try:
                profile = parse_profile(Path(directory, name))
            except OvlrunError:
                continue
            for tree in profile.trees:
                found.setdefault(tree.root, []).extend(tree.patterns)
    return found


def make_trees(options: list[str], profile_trees: dict[str, list[Pattern]] | None = None) -> list[TreeSpec]:
    """The trees to attribute to: ``--tree`` options, else ``profile_trees`` (learn
    ``--profile``: that profile's), else the site configuration's ``[[learn_tree]]``,
    else the installed profiles' trees.  A tree's release depth is its ``--tree
    ROOT:DEPTH``, else its ``release_depth`` in the site configuration, else learned
    (see :class:`Attributor`)."""
    from ovlrun.store.siteconfig import load_site_config

    known = installed_profile_trees()
    for root, patterns in (profile_trees or {}).items():
        known.setdefault(root, []).extend(patterns)
    configured = {t.root: t.release_depth for t in load_site_config().learn_trees}
    if options:
        wanted = [parse_tree_option(o) for o in options]
    else:
        wanted = [(r, None) for r in (profile_trees or configured or known)]
    if not wanted:
        where = ", ".join(locate.profile_dirs())
        raise OvlrunError("no tree to attribute lookups to: give --tree ROOT (no [[learn_tree]] in the site "
                          f"configuration, no installed profiles in {where})")
    trees = []
    for root, depth in wanted:
        if not root.startswith("/") or "\0" in root:
            raise OvlrunError(f"--tree {root}: not an absolute path")
        root = posixpath.normpath(root)
        if root == "/":
            raise OvlrunError("--tree /: the root directory cannot be a software tree")
        if not os.path.isdir(root):
            raise OvlrunError(f"tree {root} does not exist or is not a directory (not mounted?)")
        depth = depth if depth is not None else configured.get(root)
        trees.append(TreeSpec(root, os.path.realpath(root), depth, tuple(known.get(root, ()))))
    return trees


def _pattern_depth(tree: TreeSpec, parts: list[str]) -> int | None:
    for pattern in sorted(tree.patterns, key=lambda p: -len(p.components)):
        n = len(pattern.components)
        if len(parts) >= n - 1 and all(pattern.component_matches(i, parts[i]) for i in range(n - 1)):
            return n
    return None


def _version_depth(parts: list[str]) -> int | None:
    for i, part in enumerate(parts):
        if VERSION.search(part):
            return i + 1
    return None


class Attributor:
    """Maps absolute paths to :class:`Place` (or None: outside every tree).

    :meth:`learn` first shows it the paths to come: a release directory recognised by its
    version (``lib5/1.0``) makes its parent (``lib5``) a known level, so the lookup of
    ``lib5`` itself is at the top levels and ``lib5/current/x`` is in release
    ``lib5/current``, whatever order the lookups came in.
    """

    def __init__(self, trees: list[TreeSpec]) -> None:
        self.trees = trees
        # Longest root first: nested roots attribute to the innermost.
        self._prefixes = sorted(((p.rstrip("/") + "/", t) for t in trees for p in {t.root, t.real}),
                                key=lambda item: -len(item[0]))
        self._parents: dict[str, set[tuple[str, ...]]] = {t.root: set() for t in trees}  # releases' parents
        self._above: dict[str, set[tuple[str, ...]]] = {t.root: set() for t in trees}  # and their ancestors

    def _split(self, path: str) -> tuple[TreeSpec, list[str]] | None:
        for prefix, tree in self._prefixes:
            if path.startswith(prefix) or path == prefix[:-1]:
                return tree, [p for p in path[len(prefix):].split("/") if p]
        return None

    def learn(self, paths: list[str]) -> None:
        for path in paths:
            found = self._split(path)
            if found is None:
                continue
            tree, parts = found
            if tree.depth is not None or _pattern_depth(tree, parts) is not None:
                continue
            depth = _version_depth(parts)
            if depth is not None:
                parent = tuple(parts[:depth - 1])
                self._parents[tree.root].add(parent)
                self._above[tree.root].update(parent[:k] for k in range(len(parent) + 1))

    def _depth(self, tree: TreeSpec, parts: list[str]) -> int | None:
        if tree.depth is not None:
            return tree.depth
        depth = _pattern_depth(tree, parts)
        if depth is not None:
            return depth
        parents = self._parents[tree.root]
        for k in range(len(parts)):
            if tuple(parts[:k]) in parents:
                return k + 1
        if tuple(parts) in self._above[tree.root]:
            return len(parts)  # above a known release level: the top levels
        return _version_depth(parts)

    def place(self, path: str) -> Place | None:
        found = self._split(path)
        if found is None:
            return None
        tree, parts = found
        depth = self._depth(tree, parts) if parts else 0
        if depth is None:
            return Place(tree, None, parts[0] if parts else "")
        if len(parts) <= depth:
            return Place(tree, "")
        return Place(tree, "/".join(parts[:depth]))


def localised_paths(mountinfo_file: str = "/proc/self/mountinfo") -> list[str]:
    """The paths ovlrun localised in the mount namespace of ``mountinfo_file``'s process:
    overlays one of whose layers is a snapshot tree (what ``ovlrun status`` lists)."""
    out = []
    for m in mountinfo.read(mountinfo_file):
        layers = mountinfo.overlay_layers(m.super_options) if m.fstype == "overlay" else []
        if any(snapshot_of_layer(layer) for layer in layers):
            out.append(m.point)
    return sorted(set(out))


def under_any(path: str, roots: set[str]) -> bool:
    """Is ``path`` strictly below one of ``roots``?"""
    parent = posixpath.dirname(path)
    while parent not in ("/", ""):
        if parent in roots:
            return True
        parent = posixpath.dirname(parent)
    return False


def release_real_path(tree: TreeSpec, release: str) -> tuple[str | None, str]:
    """Where a release directory really is, as a path below the tree root, and why not
    if it cannot be localised: missing (the lookups failed at the top levels), not a
    directory, or a symlink leaving the tree."""
    path = posixpath.join(tree.root, release)
    try:
        if not os.path.isdir(path):
            return None, "missing" if not os.path.lexists(path) else "not a directory"
    except OSError as e:  # e.g. EACCES
        return None, e.strerror or "unreadable"
    real = os.path.realpath(path)
    prefix = tree.real.rstrip("/") + "/"
    if not real.startswith(prefix):
        return None, f"resolves to {real}, outside the tree"
    return real[len(prefix):], "symlink" if real != posixpath.join(tree.real, release) else ""
