"""Walking a release directory: what a build writes into its image and verify compares.

One walk serves both (:func:`walk` with or without a node tree to fill): directory file
descriptors (openat with O_NOFOLLOW), so a symlink swapped in during the walk cannot lead
it outside the source; one readdir per directory and one lstat per entry on the shared
tree (plus one readlink per new symlink, and the data of the files a tree inlines).
Every entry is fingerprinted and, for verify, recorded.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ovlrun.errors import OvlrunError
from ovlrun.linux.files import TreeRootError, open_release
from ovlrun.linux.kernel import redirect_max
from ovlrun.profile.parse import Inline
from ovlrun.store.image.reader import read_image
from ovlrun.store.image.tree import Node

MAX_WARNINGS_KEPT = 50


# What verify compares per entry: the fingerprint inputs (mode, uid, gid, size, mtime_ns,
# symlink target; a directory's size is 0: it is the filesystem's business, not the
# release's).  The image carries exactly these, so it is its own record.
Record = tuple[int, int, int, int, int, bytes]


class BuildError(OvlrunError):
    pass


@dataclass
class WalkState:
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
    def of(cls, state: WalkState) -> WalkSummary:
        return cls(state.counts, state.digest.hexdigest(), state.max_redirect, state.long_redirects,
                   state.warnings, state.records, root_ino=state.root_ino)


def entry_record(mode: int, uid: int, gid: int, size: int, mtime_ns: int, extra: bytes) -> Record:
    # A directory's size is the filesystem's business; a symlink's is its target's length.
    if stat.S_ISDIR(mode):
        size = 0
    elif stat.S_ISLNK(mode):
        size = len(extra)
    return (mode, uid, gid, size, mtime_ns, extra)


def _fingerprint(state: WalkState, rel: bytes, st: os.stat_result, extra: bytes = b"") -> None:
    record = entry_record(st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, extra)
    state.digest.update(b"%s\0%o\0%d\0%d\0%d\0%d\0%s\n" % (rel, *record))
    if state.records is not None:
        state.records[rel] = record


def _link_target(name: str, src_fd: int, rel: bytes, st: os.stat_result, state: WalkState) -> str:
    known = state.known.get(rel) if state.known is not None else None
    if known is not None and known == entry_record(st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                                              known[5]) and len(known[5]) == st.st_size:
        # Same symlink inode metadata as in the snapshot: a new target would mean a new
        # symlink (new mtime), so skip the readlink round trip.
        return os.fsdecode(known[5])
    return os.readlink(name, dir_fd=src_fd)


def _open_dir(name: str, dir_fd: int) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def node_of(st: os.stat_result, **kw: object) -> Node:
    return Node(st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, **kw)  # type: ignore[arg-type]


_READ_PIECE = 1 << 20


def _open_regular(name: str, src_fd: int, st: os.stat_result) -> int:
    """Open the regular file ``name`` for reading, only if it is still the inode the walk
    lstat'ed as ``st``: an O_PATH open first (it opens nothing: a device node or FIFO
    swapped in meanwhile is never opened for reading by root), checked, then reopened
    through /proc/self/fd, which opens that very inode rather than the name again."""
    path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd)
    try:
        now = os.fstat(path_fd)
        if not stat.S_ISREG(now.st_mode) or (now.st_ino, now.st_size, now.st_mtime_ns) != (
                st.st_ino, st.st_size, st.st_mtime_ns):
            return -1
        return os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    finally:
        os.close(path_fd)


def _spool_file(name: str, src_fd: int, rel: bytes, st: os.stat_result, state: WalkState,
                spool: BinaryIO) -> int:
    """Copy the file ``name`` (lstat'ed as ``st``) into ``spool``; returns where it starts
    there, or -1 (with a warning) if it cannot be read or is not what the walk saw."""
    where = "/" + os.fsdecode(rel)
    try:
        fd = _open_regular(name, src_fd, st)
    except OSError as e:
        state.warn(f"{where}: cannot be read to inline it ({e.strerror}); stored as a redirect")
        return -1
    start = spool.seek(0, os.SEEK_END)
    copied, after = -2, st  # -2: replaced since the walk's lstat
    if fd >= 0:
        try:
            copied = 0
            while copied <= st.st_size:  # one read past the end: the file must not have grown
                piece = os.read(fd, min(_READ_PIECE, st.st_size - copied + 1))
                if not piece:
                    break
                spool.write(piece)
                copied += len(piece)
            after = os.fstat(fd)
        except OSError as e:
            state.warn(f"{where}: cannot be read to inline it ({e.strerror}); stored as a redirect")
            copied = -1
        finally:
            os.close(fd)
    if copied != st.st_size or (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        if copied != -1:
            state.warn(f"{where}: changed while being inlined; stored as a redirect")
        spool.truncate(start)
        return -1
    state.counts["inlined"] = state.counts.get("inlined", 0) + 1
    state.counts["inlined_bytes"] = state.counts.get("inlined_bytes", 0) + copied
    return start


def _file_node(rel: bytes, st: os.stat_result, state: WalkState, limit: int) -> Node:
    redirect = b"/" + rel
    if len(redirect) > state.max_redirect:
        state.max_redirect = len(redirect)
    if len(redirect) > limit:
        state.long_redirects += 1
        state.warn(f"redirect of {len(redirect)} bytes exceeds redirect_max={limit}: {os.fsdecode(redirect)!r}")
    return node_of(st, size=st.st_size, redirect=redirect)


# One directory being walked: (its fd, its node or None when only recording, relpath
# bytes, remaining names).
_Frame = tuple[int, Node | None, bytes, list[str]]


def walk(src_root_fd: int, root: Node | None, state: WalkState, limit: int,
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
            new = node_of(st, children={}) if node is not None else None
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
            new = node_of(st, size=len(target), target=target) if node is not None else None
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


def open_source(source_root: str, source: str) -> int:
    """Open ``source`` (below the real tree root ``source_root``) for a walk, the one way
    a launch will open it (:func:`ovlrun.linux.files.open_release`), so the walk and the
    inode it records are the directory a launch checks against.  Raises its OSError
    (:func:`describe_open_failure` words it)."""
    prefix = source_root.rstrip("/") + "/"
    if not source.startswith(prefix):
        raise BuildError(f"{source} is not below its tree root {source_root}")
    return open_release(source_root, source[len(prefix):], os.O_RDONLY | os.O_DIRECTORY)


def describe_open_failure(e: OSError) -> str:
    """Why :func:`open_source` failed, in words."""
    where = "to its tree root" if isinstance(e, TreeRootError) else "below its tree root"
    if e.errno == errno.ELOOP:
        return f"a symlink on the way {where}"
    if e.errno == errno.EXDEV:
        return f"another file system is mounted on the way {where}"
    return os.strerror(e.errno or 0)


def image_records(image: Path) -> dict[bytes, Record]:
    """The record of every entry in a snapshot image (local: no request to the shared tree)."""
    with open(image, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as data:
        root = read_image(data)
    records: dict[bytes, Record] = {}
    stack: list[tuple[bytes, Node]] = [(b"", root)]
    while stack:
        rel, node = stack.pop()
        records[rel] = entry_record(node.mode, node.uid, node.gid, node.size, node.mtime_ns, node.target or b"")
        for name, child in (node.children or {}).items():
            stack.append(((rel + b"/" if rel else b"") + name, child))
    return records


def walk_records(directory: str, known: dict[bytes, Record] | None = None, source_root: str = "") -> WalkSummary:
    """Walk ``directory`` like a build does, writing nothing; returns counts, fingerprint
    and one :data:`Record` per entry (``known``: records to reuse symlink targets from).
    With ``source_root`` the directory is opened as a build opens its source."""
    state = WalkState(records={}, known=known)
    if source_root:
        fd = open_source(source_root, directory)
    else:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        walk(fd, None, state, redirect_max())
    finally:
        os.close(fd)
    return WalkSummary.of(state)
