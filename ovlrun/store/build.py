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

The walk uses directory file descriptors (openat with O_NOFOLLOW), so a symlink swapped in
during the walk cannot lead it outside S, and costs one readdir per directory and one
lstat per entry on the shared tree; it reads no xattrs (so file capabilities in
``security.capability`` are not carried over) and no file data but that of inlined files.  Names are handled as
opaque bytes (newline, ':', ',', '\\' and non-UTF-8 all work).
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ovlrun.errors import OvlrunError
from ovlrun.linux import syscalls
from ovlrun.linux.kernel import redirect_max
from ovlrun.profile.parse import Inline, Profile, Tree, check_within_root
from ovlrun.profile.patterns import Pattern, PatternError, is_glob
from ovlrun.store import layout
from ovlrun.store.bounded import DEFAULT_TIMEOUT, run_bounded
from ovlrun.store.image.reader import read_image
from ovlrun.store.image.tree import ImageError, ImageStats, Node
from ovlrun.store.image.writer import write_image
from ovlrun.store.index import Manifest, Snapshot, Store, format_time, new_snapshot_id

MAX_WARNINGS_KEPT = 50

Reporter = Callable[[str], None]
# What verify compares per entry: the fingerprint inputs (mode, uid, gid, size, mtime_ns,
# symlink target; a directory's size is 0: it is the filesystem's business, not the
# release's).  The image carries exactly these, so it is its own record.
Record = tuple[int, int, int, int, int, bytes]


class BuildError(OvlrunError):
    pass


@dataclass
class BuildResult:
    path: str
    status: str  # "built", "exists" (not re-walked), "up-to-date" (re-walked, unchanged), "failed"
    snapshot: Snapshot | None = None
    message: str = ""


@dataclass
class _WalkState:
    counts: dict[str, int] = field(default_factory=lambda: {"dirs": 0, "files": 0, "symlinks": 0, "skipped": 0,
                                                            "hardlinked": 0})
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    max_redirect: int = 0
    long_redirects: int = 0
    warnings: list[str] = field(default_factory=list)
    root_ino: int = 0  # the walked directory's inode: the snapshot's source identity
    # Verify mode: every fingerprinted entry's record, and the snapshot's records, whose
    # symlink targets are reused when a symlink's lstat is unchanged (no readlink request).
    records: dict[bytes, Record] | None = None
    known: dict[bytes, Record] | None = None

    def warn(self, message: str) -> None:
        self.counts.setdefault("warnings", 0)
        self.counts["warnings"] += 1
        if len(self.warnings) < MAX_WARNINGS_KEPT:
            self.warnings.append(message)


@dataclass
class WalkSummary:
    """What a walk found, as plain data (it crosses the bounded worker's pipe)."""

    counts: dict[str, int]
    fingerprint: str
    max_redirect: int
    long_redirects: int
    warnings: list[str]
    records: dict[bytes, Record] | None
    image_bytes: int = 0
    image_sha256: str = ""
    root_ino: int = 0

    @classmethod
    def of(cls, state: _WalkState) -> WalkSummary:
        return cls(state.counts, state.digest.hexdigest(), state.max_redirect, state.long_redirects,
                   state.warnings, state.records, root_ino=state.root_ino)


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


def _record(mode: int, uid: int, gid: int, size: int, mtime_ns: int, extra: bytes) -> Record:
    # A directory's size is the filesystem's business; a symlink's is its target's length.
    if stat.S_ISDIR(mode):
        size = 0
    elif stat.S_ISLNK(mode):
        size = len(extra)
    return (mode, uid, gid, size, mtime_ns, extra)


def _fingerprint(state: _WalkState, rel: bytes, st: os.stat_result, extra: bytes = b"") -> None:
    record = _record(st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, extra)
    state.digest.update(b"%s\0%o\0%d\0%d\0%d\0%d\0%s\n" % (rel, *record))
    if state.records is not None:
        state.records[rel] = record


def _link_target(name: str, src_fd: int, rel: bytes, st: os.stat_result, state: _WalkState) -> str:
    known = state.known.get(rel) if state.known is not None else None
    if known is not None and known == _record(st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                                              known[5]) and len(known[5]) == st.st_size:
        # Same symlink inode metadata as in the snapshot: a new target would mean a new
        # symlink (new mtime), so skip the readlink round trip.
        return os.fsdecode(known[5])
    return os.readlink(name, dir_fd=src_fd)


def _open_dir(name: str, dir_fd: int) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def _node(st: os.stat_result, **kw: object) -> Node:
    return Node(st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, **kw)  # type: ignore[arg-type]


_READ_PIECE = 1 << 20


def _spool_file(name: str, src_fd: int, rel: bytes, st: os.stat_result, state: _WalkState,
                spool: BinaryIO) -> int:
    """Copy the file ``name`` (lstat'ed as ``st``) into ``spool``; returns where it starts
    there, or -1 (with a warning) if it cannot be read or is not what the walk saw."""
    where = "/" + os.fsdecode(rel)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=src_fd)
    except OSError as e:
        state.warn(f"{where}: cannot be read to inline it ({e.strerror}); stored as a redirect")
        return -1
    start = spool.seek(0, os.SEEK_END)
    try:
        before = os.fstat(fd)
        copied = 0
        if (before.st_ino, before.st_size, before.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns) \
                and stat.S_ISREG(before.st_mode):
            while copied <= st.st_size:  # one read past the end: the file must not have grown
                piece = os.read(fd, min(_READ_PIECE, st.st_size - copied + 1))
                if not piece:
                    break
                spool.write(piece)
                copied += len(piece)
        after = os.fstat(fd)
    except OSError as e:
        state.warn(f"{where}: cannot be read to inline it ({e.strerror}); stored as a redirect")
        copied, after = -1, st
    finally:
        os.close(fd)
    if copied != st.st_size or (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        if copied >= 0:
            state.warn(f"{where}: changed while being inlined; stored as a redirect")
        spool.truncate(start)
        return -1
    state.counts["inlined"] = state.counts.get("inlined", 0) + 1
    state.counts["inlined_bytes"] = state.counts.get("inlined_bytes", 0) + copied
    return start


def _file_node(rel: bytes, st: os.stat_result, state: _WalkState, limit: int) -> Node:
    redirect = b"/" + rel
    if len(redirect) > state.max_redirect:
        state.max_redirect = len(redirect)
    if len(redirect) > limit:
        state.long_redirects += 1
        state.warn(f"redirect of {len(redirect)} bytes exceeds redirect_max={limit}: {os.fsdecode(redirect)!r}")
    return _node(st, size=st.st_size, redirect=redirect)


# One directory being walked: (its fd, its node or None when only recording, relpath
# bytes, remaining names).
_Frame = tuple[int, Node | None, bytes, list[str]]


def _walk(src_root_fd: int, root: Node | None, state: _WalkState, limit: int,
          inline: Inline | None = None, spool: BinaryIO | None = None) -> None:
    """Walk the directory ``src_root_fd`` iteratively (deep trees are fine) into the node
    tree ``root`` (made from the root's stat by the caller); the files ``inline`` selects
    are copied into ``spool``.

    With ``root`` None nothing is built: the walk only fingerprints and records
    (``snapshot verify``), at the same cost on the source as a build.
    """
    root_st = os.fstat(src_root_fd)
    state.root_ino = root_st.st_ino
    _fingerprint(state, b"", root_st)
    stack: list[_Frame] = [(src_root_fd, root, b"", _list(src_root_fd, b"/"))]
    while stack:
        src_fd, node, rel, entries = stack[-1]
        if not entries:
            stack.pop()
            if stack:  # the root fd belongs to the caller
                os.close(src_fd)
            continue
        name = entries.pop()
        raw = os.fsencode(name)
        child = (rel + b"/" if rel else b"") + raw
        st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
        new: Node | None = None
        if stat.S_ISDIR(st.st_mode):
            _fingerprint(state, child, st)
            state.counts["dirs"] += 1
            new = _node(st, children={}) if node is not None else None
            sub_fd = _enter_dir(name, child, src_fd)
            stack.append((sub_fd, new, child, _list(sub_fd, b"/" + child)))
        elif stat.S_ISREG(st.st_mode):
            _fingerprint(state, child, st)
            state.counts["files"] += 1
            if st.st_nlink > 1:
                state.counts["hardlinked"] += 1
            new = _file_node(child, st, state, limit) if node is not None else None
            if (new is not None and spool is not None and inline is not None and st.st_size
                    and inline.selects(os.fsdecode(child), st.st_size)):
                new.data_at = _spool_file(name, src_fd, child, st, state, spool)
        elif stat.S_ISLNK(st.st_mode):
            target = os.fsencode(_link_target(name, src_fd, child, st, state))
            _fingerprint(state, child, st, target)
            state.counts["symlinks"] += 1
            new = _node(st, size=len(target), target=target) if node is not None else None
        else:
            state.counts["skipped"] += 1
            kind = {stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device",
                    stat.S_IFBLK: "block device"}.get(stat.S_IFMT(st.st_mode), "special file")
            state.warn(f"skipped {kind} /{os.fsdecode(child)} (not represented in snapshots)")
        if new is not None and node is not None and node.children is not None:
            node.children[raw] = new


def _enter_dir(name: str, child: bytes, src_fd: int) -> int:
    try:
        return _open_dir(name, src_fd)
    except PermissionError:  # refused at open (FUSE/NFS opendir), not at readdir
        raise BuildError(f"cannot list '/{os.fsdecode(child)}' in the source: permission denied") from None


def _list(fd: int, where: bytes) -> list[str]:
    try:
        # Reverse-sorted so pop() yields names in order: deterministic fingerprints.
        return sorted((e.name for e in os.scandir(fd)), reverse=True)
    except PermissionError:
        # Root may be squashed on NFS: a directory we cannot list cannot be localised
        # faithfully (an empty opaque dir would hide files the user can see).
        raise BuildError(f"cannot list {os.fsdecode(where)!r} in the source: permission denied") from None


def source_root_of(source: str, root: str) -> str:
    """The real path of the tree root ``source`` lies below (computed at build time)."""
    real_root = os.path.realpath(root) if root else ""
    if not real_root or not source.startswith(real_root.rstrip("/") + "/"):
        raise BuildError(f"{source}: no tree root recorded for it; rebuild it from its profile "
                         "(ovlrun snapshot build --profile NAME --rebuild)")
    return real_root


def open_source(source_root: str, source: str, flags: int = os.O_RDONLY | os.O_DIRECTORY) -> int:
    """Open ``source`` as a launch will: the root by path, then the rest without following
    any symlink and without leaving the root (so the walk and its recorded inode are the
    directory a launch will check against)."""
    root_fd = os.open(source_root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return syscalls.open_beneath(root_fd, source[len(source_root.rstrip("/")) + 1:], flags)
    finally:
        os.close(root_fd)


def build_image(source_root: str, source: str, image: Path, inline: Inline | None = None) -> WalkSummary:
    """Walk ``source`` (opened as a launch will) and write its snapshot image to ``image``
    (a new file), storing the files ``inline`` selects whole."""
    state = _WalkState()
    limit = redirect_max()
    src_fd = open_source(source_root, source)
    # The inlined files' data, until the image is written (unnamed: gone with the worker).
    spool = tempfile.TemporaryFile(dir=image.parent) if inline is not None else None
    try:
        root = _node(os.fstat(src_fd), children={})
        _walk(src_fd, root, state, limit, inline, spool)
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


def image_records(image: Path) -> dict[bytes, Record]:
    """The record of every entry in a snapshot image (local: no request to the shared tree)."""
    with open(image, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as data:
        root = read_image(data)
    records: dict[bytes, Record] = {}
    stack: list[tuple[bytes, Node]] = [(b"", root)]
    while stack:
        rel, node = stack.pop()
        records[rel] = _record(node.mode, node.uid, node.gid, node.size, node.mtime_ns, node.target or b"")
        for name, child in (node.children or {}).items():
            stack.append(((rel + b"/" if rel else b"") + name, child))
    return records


def walk_records(directory: str, known: dict[bytes, Record] | None = None, source_root: str = "") -> WalkSummary:
    """Walk ``directory`` like a build does, writing nothing; returns counts, fingerprint
    and one :data:`Record` per entry (``known``: records to reuse symlink targets from).
    With ``source_root`` the directory is opened as a build opens its source."""
    state = _WalkState(records={}, known=known)
    if source_root:
        fd = open_source(source_root, directory)
    else:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _walk(fd, None, state, redirect_max())
    finally:
        os.close(fd)
    return WalkSummary.of(state)


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
        return BuildResult(path, "built", snapshot, f"{total} entries in {took:.2f}s")


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
