"""Building snapshot images of shared release directories.

For a source subtree S the snapshot is one EROFS image (:mod:`ovlrun.store.image`),
written straight from the walk, with no intermediate tree:
- every directory opaque (``trusted.overlay.opaque=y``) with S's mode, owner and mtime,
  so overlayfs never looks below it;
- every regular file data-less (a sparse chunk-based inode of S's size), with S's mode,
  owner and mtime, marked ``trusted.overlay.metacopy`` with ``trusted.overlay.redirect``
  set to its absolute path inside S ("/lib/libfoo.so"): mounted with S as the data-only
  layer, the kernel finds the data there (Documentation/filesystems/overlayfs.rst,
  "Data-only lower layers");
- symlinks as symlinks with owner and mtime;
- files stored whole, as ordinary files with their data in the image: empty files, and
  the files the tree's ``inline`` patterns select (at most ``inline_max`` bytes each;
  :class:`ovlrun.profile.parse.Inline`).  Their data is read during the walk (opened
  without following symlinks, checked against the walk's lstat before and after the
  read) into a spool beside the image, so the walk holds no file data in memory.  A file
  that cannot be read (root squashed on NFS) or changes while being read stays metacopy,
  with a warning;
- sockets, FIFOs and device nodes are skipped with a warning: a software release has no
  business shipping them and the overlay is mounted ``nodev`` anyway.

The walk (:mod:`ovlrun.store.walk`) uses directory file descriptors (openat with
O_NOFOLLOW), so a symlink swapped in during the walk cannot lead it outside S, and costs
one readdir per directory and one lstat per entry on the shared tree; it reads no xattrs
(so file capabilities in ``security.capability`` are not carried over) and no file data
but that of inlined files.  Names are handled as opaque bytes (newline, ':', ',', '\\'
and non-UTF-8 all work).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ovlrun.errors import OvlrunError
from ovlrun.linux.kernel import redirect_max
from ovlrun.profile.parse import Inline, Profile, Tree, check_within_root
from ovlrun.profile.patterns import Pattern, PatternError, is_glob
from ovlrun.store import layout
from ovlrun.store.bounded import DEFAULT_TIMEOUT, run_bounded
from ovlrun.store.image.tree import ImageError, ImageStats, Node
from ovlrun.store.image.writer import write_image
from ovlrun.store.index import Manifest, Snapshot, Store, format_time, new_snapshot_id
from ovlrun.store.walk import BuildError, WalkState, WalkSummary, describe_open_failure, node_of, open_source, walk

Reporter = Callable[[str], None]


@dataclass
class BuildResult:
    path: str
    status: str  # "built", "exists" (not re-walked), "up-to-date" (re-walked, unchanged), "failed"
    snapshot: Snapshot | None = None
    message: str = ""


def expand(tree: Tree, pattern: Pattern) -> list[str]:
    """Directories (relative to the root) that ``pattern`` matches now, walking only as deep as it."""
    found = [""]
    for i, comp in enumerate(pattern.components):
        nxt = []
        for rel in found:
            base = tree.path_of(rel) if rel else tree.root
            if not is_glob(comp):  # a literal component costs one lookup, not a listing
                cand = f"{rel}/{comp}" if rel else comp
                if os.path.isdir(tree.path_of(cand)):
                    nxt.append(cand)
                continue
            try:
                # follow_symlinks=False: a symlink is never a release (an alias like
                # latest -> 6.0 is served by 6.0's overlay; one to '..' would localise the
                # whole parent).  d_type from readdir: no extra lookup.
                names = sorted(e.name for e in os.scandir(base) if e.is_dir(follow_symlinks=False))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                # An I/O error must not pass for "matches nothing": that would silently
                # leave every release below unlocalised.
                raise OvlrunError(f"cannot list {base} while expanding {pattern.text!r}: {e.strerror}") from None
            nxt.extend(f"{rel}/{n}" if rel else n for n in names if pattern.component_matches(i, n))
        found = nxt
    return found


def source_root_of(source: str, root: str) -> str:
    """The real path of the tree root ``source`` lies below (computed at build time)."""
    real_root = os.path.realpath(root) if root else ""
    if not real_root or not source.startswith(real_root.rstrip("/") + "/"):
        raise BuildError(f"{source}: no tree root recorded for it; rebuild it from its profile "
                         "(ovlrun snapshot build --profile NAME --rebuild)")
    return real_root


def build_image(source_root: str, source: str, image: Path, inline: Inline | None = None) -> WalkSummary:
    """Walk ``source`` (opened as a launch will) and write its snapshot image to ``image``
    (a new file), storing the files ``inline`` selects whole."""
    state = WalkState()
    limit = redirect_max()
    try:
        src_fd = open_source(source_root, source)
    except OSError as e:
        raise BuildError(f"cannot open {source} as a launch will: {describe_open_failure(e)} "
                         "(localise real release directories of the tree)") from None
    # The inlined files' data, until the image is written (unnamed: gone with the worker).
    spool = tempfile.TemporaryFile(dir=image.parent) if inline is not None else None
    try:
        root = node_of(os.fstat(src_fd), children={})
        walk(src_fd, root, state, limit, inline, spool)
        os.close(src_fd)
        src_fd = -1
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            stats = _write(root, out, spool, source)
            out.flush()
            os.fsync(out.fileno())
    finally:
        if src_fd >= 0:
            os.close(src_fd)
        if spool is not None:
            spool.close()
    summary = WalkSummary.of(state)
    summary.image_bytes = stats.bytes
    summary.image_sha256 = file_sha256(str(image))
    return summary


def _write(root: Node, out: BinaryIO, spool: BinaryIO | None, source: str) -> ImageStats:
    try:
        return write_image(root, out, spool)
    except ImageError as e:
        raise BuildError(f"cannot write the snapshot image of {source}: {e}") from None


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def inline_of(manifest: Manifest) -> Inline | None:
    """The inline rule a snapshot was built with (None: none)."""
    if not manifest.inline:
        return None
    try:
        return Inline.of(manifest.inline, manifest.inline_max)
    except (ValueError, PatternError) as e:
        raise BuildError(f"snapshot {manifest.id} of {manifest.path} records an invalid inline rule: {e}") from None


def _inline_fields(inline: Inline | None) -> tuple[list[str], int]:
    return ([p.text for p in inline.patterns], inline.max_bytes) if inline else ([], 0)


def build_one(store: Store, path: str, source: str, *, rebuild: bool = False,
              timeout: float = DEFAULT_TIMEOUT, root: str = "", inline: Inline | None = None) -> BuildResult:
    """Build (or confirm) the snapshot serving ``path``, whose real path is ``source``,
    storing the files ``inline`` selects whole.  A snapshot built with other inline
    settings is rebuilt.

    The walk runs in a bounded worker (:mod:`ovlrun.store.bounded`): a stalled source fails this
    snapshot after ``timeout`` seconds instead of hanging the builder.
    """
    store.ensure()
    with store.source_lock(path) as lock_fd:
        store.clean_stale_builds(path)
        current = store.read_index().get(path)
        old = store.load(current) if current else None
        if old is not None:
            # Snapshots published before directories were made 0700 are tightened here,
            # by the builder, so launches (which refuse open ones) need not write.
            os.chmod(old.directory, 0o700)
        if old is not None and not old.is_image:
            old = None  # a directory snapshot (before images): replaced by an image
        # A snapshot without a recorded source identity (built by an older ovlrun) cannot
        # be mounted any more (launch checks the identity): rebuild it.
        fields = _inline_fields(inline)
        same_inline = old is not None and (old.manifest.inline, old.manifest.inline_max) == fields
        if old is not None and old.manifest.source == source and old.manifest.source_ino and not rebuild \
                and same_inline:
            return BuildResult(path, "exists", old, f"built {format_time(old.manifest.built)}; "
                               "'ovlrun snapshot refresh' rebuilds changed sources")
        build_dir = store.new_build_dir(path)
        try:
            started = time.monotonic()
            image = build_dir / layout.IMAGE
            source_root = source_root_of(source, root or (old.manifest.root if old else ""))
            state = run_bounded(lambda: build_image(source_root, source, image, inline), timeout=timeout,
                                what=f"building snapshot of {path}", close_fds=(lock_fd,))
            fingerprint = state.fingerprint
            if (old is not None and old.manifest.source == source and old.manifest.fingerprint == fingerprint
                    and old.manifest.source_ino == state.root_ino and old.manifest.source_root == source_root
                    and same_inline):
                shutil.rmtree(build_dir)
                return BuildResult(path, "up-to-date", old, "source unchanged")
            manifest = Manifest(path=path, source=source, id=new_snapshot_id(), built=time.time(),
                                fingerprint=fingerprint, counts=state.counts, max_redirect=state.max_redirect,
                                long_redirects=state.long_redirects, redirect_max=redirect_max(),
                                warnings=state.warnings, root=root or (old.manifest.root if old else ""),
                                image_bytes=state.image_bytes, image_sha256=state.image_sha256,
                                source_root=source_root, source_ino=state.root_ino, inline=fields[0],
                                inline_max=fields[1])
            snapshot = store.publish(build_dir, manifest)
        except BaseException as e:
            shutil.rmtree(build_dir, ignore_errors=True)
            if isinstance(e, OvlrunError):
                raise
            if isinstance(e, OSError):
                if e.errno == errno.ENOSPC:
                    raise BuildError(f"snapshot store {store.path} is full (no space left on device); "
                                     f"nothing was published for {path}") from None
                raise BuildError(f"building snapshot of {path} failed: {e}") from None
            raise
        total = sum(state.counts[k] for k in ("dirs", "files", "symlinks")) + 1
        took = time.monotonic() - started
        message = f"{total} entries in {took:.2f}s"
        if inline is not None:
            message += (f", {state.counts.get('inlined', 0)} files stored whole "
                        f"({state.counts.get('inlined_bytes', 0) / 1e6:.1f} MB; {inline.describe()})")
        if old is not None and not same_inline:
            message += "; rebuilt: inline settings changed"
        return BuildResult(path, "built", snapshot, message)


def resolve_tree(tree: Tree) -> list[tuple[Pattern, list[tuple[str, str | None, str]]]]:
    """Per pattern: (path, real source or None, why not) for every directory it matches now.
    Touches the shared tree (expansion, symlink resolution): run it bounded."""
    if not os.path.isdir(tree.root):
        raise OvlrunError(f"tree root {tree.root} is missing or not a directory (not mounted?)")
    real_root = os.path.realpath(tree.root)
    out = []
    for pattern in tree.patterns:
        matches: list[tuple[str, str | None, str]] = []
        for rel in expand(tree, pattern):
            try:
                real = check_within_root(tree, rel)
                if real != os.path.join(real_root, rel):
                    # A symlink below the root on the way (e.g. 6.0 -> ..): the snapshot
                    # would serve its target, possibly a whole parent.  Launches never
                    # follow symlinks below the root, so it could not be mounted anyway.
                    raise OvlrunError(f"{tree.path_of(rel)} reaches {real} through a symlink below the tree "
                                      "root; localise the real release path instead")
                matches.append((tree.path_of(rel), real, ""))
            except OvlrunError as e:
                matches.append((tree.path_of(rel), None, str(e)))
        out.append((pattern, matches))
    return out


def build_profile(profile: Profile, store: Store, *, rebuild: bool = False,
                  report: Reporter | None = None, timeout: float = DEFAULT_TIMEOUT) -> list[BuildResult]:
    """Build snapshots for every directory the profile's patterns match now."""
    say = report or (lambda m: print(m, file=sys.stderr))
    results = []
    for tree in profile.trees:
        resolved = run_bounded(lambda tree=tree: resolve_tree(tree), timeout=timeout,  # type: ignore[misc]
                               what=f"expanding the patterns of tree {tree.root} (profile {profile.name})")
        for pattern, matches in resolved:
            if not matches:
                say(f"warning: {tree.path_of(pattern.text)} matches nothing")
            for path, source, why in matches:
                try:
                    if source is None:
                        raise OvlrunError(why)
                    result = build_one(store, path, source, rebuild=rebuild, timeout=timeout, root=tree.root,
                                       inline=tree.inline)
                except OvlrunError as e:
                    result = BuildResult(path, "failed", None, str(e))
                results.append(result)
                say(f"{result.status}: {path} {result.message}".rstrip())
                if result.snapshot and result.status == "built":
                    for w in result.snapshot.manifest.warnings:
                        say(f"  warning: {w}")
    return results
