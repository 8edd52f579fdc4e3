"""Building opaque metacopy snapshots of shared release directories.

For a source subtree S the snapshot is a local tree T where
- every directory is a real directory, marked opaque (``trusted.overlay.opaque=y``) so
  overlayfs never looks below it, with S's mode, owner and times;
- every regular file is an empty sparse file of S's size, mode, owner and times, marked
  ``trusted.overlay.metacopy`` (metadata only) with ``trusted.overlay.redirect`` set to its
  absolute path inside S ("/lib/libfoo.so"): mounted with S as the data-only layer, the
  kernel finds the data there (Documentation/filesystems/overlayfs.rst, "Data-only lower
  layers");
- symlinks are copied as symlinks with owner and times;
- sockets, FIFOs and device nodes are skipped with a warning: a software release has no
  business shipping them and the overlay is mounted ``nodev`` anyway.

The walk uses directory file descriptors (openat with O_NOFOLLOW), so a symlink swapped in
during the walk cannot lead it outside S, and costs one readdir per directory and one
lstat per entry on the shared tree; it reads no file data and no xattrs (so file
capabilities in ``security.capability`` are not carried over).  Names are handled as
opaque bytes (newline, ':', ',', '\\' and non-UTF-8 all work).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ovlrun.errors import OvlrunError
from ovlrun.linux.kernel import redirect_max
from ovlrun.profile.parse import Profile, Tree, check_within_root
from ovlrun.profile.patterns import Pattern, is_glob
from ovlrun.store.bounded import DEFAULT_TIMEOUT, run_bounded
from ovlrun.store.index import Manifest, Snapshot, Store, new_snapshot_id

XATTR_OPAQUE = "trusted.overlay.opaque"
XATTR_METACOPY = "trusted.overlay.metacopy"
XATTR_REDIRECT = "trusted.overlay.redirect"
MAX_WARNINGS_KEPT = 50

Reporter = Callable[[str], None]
# What verify compares per entry: the fingerprint inputs (mode, uid, gid, size, mtime_ns,
# symlink target).  The snapshot tree carries exactly these, so it is its own record.
Record = tuple[int, int, int, int, int, bytes]


class BuildError(OvlrunError):
    pass


@dataclass
class BuildResult:
    path: str
    status: str  # "built", "up-to-date", "failed"
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

    @classmethod
    def of(cls, state: _WalkState) -> WalkSummary:
        return cls(state.counts, state.digest.hexdigest(), state.max_redirect, state.long_redirects,
                   state.warnings, state.records)


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
                names = sorted(e.name for e in os.scandir(base) if e.is_dir())
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                # An I/O error must not pass for "matches nothing": that would silently
                # leave every release below unlocalised.
                raise OvlrunError(f"cannot list {base} while expanding {pattern.text!r}: {e.strerror}") from None
            nxt.extend(f"{rel}/{n}" if rel else n for n in names if pattern.component_matches(i, n))
        found = nxt
    return found


def _fingerprint(state: _WalkState, rel: bytes, st: os.stat_result, extra: bytes = b"") -> None:
    record = b"%s\0%o\0%d\0%d\0%d\0%d\0%s\n" % (rel, st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                                 st.st_mtime_ns, extra)
    state.digest.update(record)
    if state.records is not None:
        state.records[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, extra)


def _link_target(name: str, src_fd: int, rel: bytes, st: os.stat_result, state: _WalkState) -> str:
    known = state.known.get(rel) if state.known is not None else None
    if known is not None and known[:5] == (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns):
        # Same symlink inode metadata as in the snapshot: a new target would mean a new
        # symlink (new mtime), so skip the readlink round trip.
        return os.fsdecode(known[5])
    return os.readlink(name, dir_fd=src_fd)


def _set_metadata(fd: int, st: os.stat_result) -> None:
    # chown first: it clears set-uid/set-gid bits that chmod then restores.
    os.fchown(fd, st.st_uid, st.st_gid)
    os.fchmod(fd, stat.S_IMODE(st.st_mode))
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _open_dir(name: str, dir_fd: int) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def _write_file(name: str, rel: bytes, st: os.stat_result, dst_fd: int, state: _WalkState, limit: int) -> None:
    redirect = b"/" + rel
    if len(redirect) > state.max_redirect:
        state.max_redirect = len(redirect)
    if len(redirect) > limit:
        state.long_redirects += 1
        state.warn(f"redirect of {len(redirect)} bytes exceeds redirect_max={limit}: {os.fsdecode(redirect)!r}")
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dst_fd)
    try:
        os.ftruncate(fd, st.st_size)  # sparse: no data blocks
        os.setxattr(fd, XATTR_METACOPY, b"")
        os.setxattr(fd, XATTR_REDIRECT, redirect)
        _set_metadata(fd, st)
    finally:
        os.close(fd)


# One directory being mirrored: (src_fd, dst_fd, relpath bytes, remaining names, its stat).
_Frame = tuple[int, int | None, bytes, list[str], os.stat_result]


def _walk(src_root_fd: int, dst_root_fd: int | None, state: _WalkState, limit: int) -> None:
    """Mirror the directory ``src_root_fd`` into ``dst_root_fd`` iteratively (deep trees are fine).

    With ``dst_root_fd`` None nothing is written: the walk only fingerprints and records
    (``snapshot verify``), at the same cost on the source as a build.
    """
    root_st = os.fstat(src_root_fd)
    _fingerprint(state, b"", root_st)
    stack: list[_Frame] = [(src_root_fd, dst_root_fd, b"", _list(src_root_fd, b"/"), root_st)]
    while stack:
        src_fd, dst_fd, rel, entries, _ = stack[-1]
        if not entries:
            _finish_dir(stack, state)
            continue
        name = entries.pop()
        child = (rel + b"/" if rel else b"") + os.fsencode(name)
        st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            stack.append(_enter_dir(name, child, st, src_fd, dst_fd, state))
        elif stat.S_ISREG(st.st_mode):
            _fingerprint(state, child, st)
            state.counts["files"] += 1
            if st.st_nlink > 1:
                state.counts["hardlinked"] += 1
            if dst_fd is not None:
                _write_file(name, child, st, dst_fd, state, limit)
        elif stat.S_ISLNK(st.st_mode):
            _copy_symlink(name, child, st, src_fd, dst_fd, state)
        else:
            state.counts["skipped"] += 1
            kind = {stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device",
                    stat.S_IFBLK: "block device"}.get(stat.S_IFMT(st.st_mode), "special file")
            state.warn(f"skipped {kind} /{os.fsdecode(child)} (not represented in snapshots)")


def _finish_dir(stack: list[_Frame], state: _WalkState) -> None:
    """All entries of the top directory are done: seal its copy and leave it."""
    src_fd, dst_fd, _, _, dir_st = stack.pop()
    if dst_fd is not None:
        os.setxattr(dst_fd, XATTR_OPAQUE, b"y")
        _set_metadata(dst_fd, dir_st)
    if stack:  # the root fds belong to the caller
        os.close(src_fd)
        if dst_fd is not None:
            os.close(dst_fd)


def _enter_dir(name: str, child: bytes, st: os.stat_result, src_fd: int, dst_fd: int | None,
               state: _WalkState) -> _Frame:
    _fingerprint(state, child, st)
    state.counts["dirs"] += 1
    sub_dst = None
    if dst_fd is not None:
        os.mkdir(name, 0o700, dir_fd=dst_fd)
        sub_dst = _open_dir(name, dst_fd)
    try:
        sub_src = _open_dir(name, src_fd)
    except PermissionError:  # refused at open (FUSE/NFS opendir), not at readdir
        raise BuildError(f"cannot list '/{os.fsdecode(child)}' in the source: permission denied") from None
    return (sub_src, sub_dst, child, _list(sub_src, b"/" + child), st)


def _copy_symlink(name: str, child: bytes, st: os.stat_result, src_fd: int, dst_fd: int | None,
                  state: _WalkState) -> None:
    target = _link_target(name, src_fd, child, st, state)
    _fingerprint(state, child, st, os.fsencode(target))
    state.counts["symlinks"] += 1
    if dst_fd is None:
        return
    os.symlink(target, name, dir_fd=dst_fd)
    os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_fd, follow_symlinks=False)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_fd, follow_symlinks=False)


def _list(fd: int, where: bytes) -> list[str]:
    try:
        # Reverse-sorted so pop() yields names in order: deterministic fingerprints.
        return sorted((e.name for e in os.scandir(fd)), reverse=True)
    except PermissionError:
        # Root may be squashed on NFS: a directory we cannot list cannot be localised
        # faithfully (an empty opaque dir would hide files the user can see).
        raise BuildError(f"cannot list {os.fsdecode(where)!r} in the source: permission denied") from None


def build_tree(source: str, build_dir: Path) -> tuple[WalkSummary, Path]:
    tree_dir = build_dir / "tree"
    tree_dir.mkdir(mode=0o700)
    state = _WalkState()
    limit = redirect_max()
    src_fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    dst_fd = os.open(tree_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _walk(src_fd, dst_fd, state, limit)
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    return WalkSummary.of(state), tree_dir


def walk_records(directory: str, known: dict[bytes, Record] | None = None) -> WalkSummary:
    """Walk ``directory`` like a build does, writing nothing; returns counts, fingerprint
    and one :data:`Record` per entry (``known``: records to reuse symlink targets from)."""
    state = _WalkState(records={}, known=known)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _walk(fd, None, state, redirect_max())
    finally:
        os.close(fd)
    return WalkSummary.of(state)


def build_one(store: Store, path: str, source: str, *, rebuild: bool = False,
              timeout: float = DEFAULT_TIMEOUT, root: str = "") -> BuildResult:
    """Build (or confirm) the snapshot serving ``path``, whose real path is ``source``.

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
        if old is not None and old.manifest.source == source and not rebuild:
            return BuildResult(path, "up-to-date", old, f"built {time.ctime(old.manifest.built)}")
        build_dir = store.new_build_dir(path)
        try:
            started = time.monotonic()
            state, _ = run_bounded(lambda: build_tree(source, build_dir), timeout=timeout,
                                   what=f"building snapshot of {path}", close_fds=(lock_fd,))
            fingerprint = state.fingerprint
            if old is not None and old.manifest.source == source and old.manifest.fingerprint == fingerprint:
                shutil.rmtree(build_dir)
                return BuildResult(path, "up-to-date", old, "source unchanged")
            manifest = Manifest(path=path, source=source, id=new_snapshot_id(), built=time.time(),
                                fingerprint=fingerprint, counts=state.counts, max_redirect=state.max_redirect,
                                long_redirects=state.long_redirects, redirect_max=redirect_max(),
                                warnings=state.warnings, root=root or (old.manifest.root if old else ""))
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
    out = []
    for pattern in tree.patterns:
        matches: list[tuple[str, str | None, str]] = []
        for rel in expand(tree, pattern):
            try:
                matches.append((tree.path_of(rel), check_within_root(tree, rel), ""))
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
                    result = build_one(store, path, source, rebuild=rebuild, timeout=timeout, root=tree.root)
                except OvlrunError as e:
                    result = BuildResult(path, "failed", None, str(e))
                results.append(result)
                say(f"{result.status}: {path} {result.message}".rstrip())
                if result.snapshot and result.status == "built":
                    for w in result.snapshot.manifest.warnings:
                        say(f"  warning: {w}")
    return results
