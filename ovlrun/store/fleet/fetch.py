"""A node's side of a fleet (see :mod:`ovlrun.store.fleet`): fetch the published images
it lacks into its store, checked, as if built here; and the Slurm Prolog's bounded fetch
of a job's missing images."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import posixpath
import shutil
import time
from collections.abc import Iterator
from typing import Any

from ovlrun.errors import OvlrunError
from ovlrun.linux.files import write_all
from ovlrun.profile.parse import Profile
from ovlrun.store import layout
from ovlrun.store.bounded import StallError, run_bounded
from ovlrun.store.fleet.directory import (
    CHUNK,
    Entry,
    Outcome,
    is_int,
    open_checked,
    open_top,
    read_index,
    read_small,
    refuse,
)
from ovlrun.store.index import Manifest, Store, format_time
from ovlrun.store.layout import source_key
from ovlrun.store.siteconfig import DEFAULT_MAX_IMAGE_BYTES, Owner
from ovlrun.store.walk import describe_open_failure, open_source

FETCH_LOCK = "fetch.lock"  # in the store's locks/: one fetch per node at a time


def read_published(directory: str, owner: Owner, *, timeout: float) -> dict[str, Entry]:
    """DIR's index (bounded: one open and a read or two)."""
    def read() -> dict[str, Entry]:
        dir_fd = open_top(directory, owner)
        try:
            return read_index(dir_fd, owner, directory)
        finally:
            os.close(dir_fd)

    return run_bounded(read, timeout=timeout, what=f"reading the published index in {directory}")


def fetch(store: Store, directory: str, owner: Owner, profile: Profile | None, *, timeout: float,
          max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> list[Outcome]:
    """Make the published version of every path ``profile`` selects in DIR's index the
    current snapshot in ``store``, copying what the store lacks.  With no profile: every
    path in DIR's index below a tree root of one of this node's profiles; any other path
    is refused (a manifest's own tree root never decides what enters the store).

    One fetch per node at a time (``locks/fetch.lock``, held by the fetch's workers too:
    one stuck on a stalled DIR keeps it, so later fetches wait within their own bound and
    give up instead of each leaving a worker behind).  ``timeout`` bounds the whole
    fetch, the wait for that lock included; a path not done by then fails (the node
    keeps what it had for it).  Raises :class:`OvlrunError` if DIR cannot be read at all.
    """
    deadline = time.monotonic() + timeout
    store.ensure()
    with _lock_until(store, FETCH_LOCK, deadline, "another fetch is running on this node") as _held:
        # _held is inherited by every worker forked below (not closed there): a worker
        # abandoned in a stalled request keeps the node's fetch lock until it dies.
        # What is left of the bound after waiting for the lock (to a tenth: it is shown).
        index = read_published(directory, owner, timeout=max(0.1, round(deadline - time.monotonic(), 1)))
        out: list[Outcome] = []
        selected: list[tuple[str, tuple[str, ...]]] = []
        if profile is None:
            roots = _node_tree_roots()
            for path in sorted(index):
                above = tuple(r for r in roots if path.startswith(r.rstrip("/") + "/"))
                if above:
                    selected.append((path, above))
                else:
                    out.append(Outcome(path, index[path].snapshot, "failed", message=(
                        f"refusing {path}: no profile on this node has a tree root above it "
                        "(only this node's profiles decide what is fetched)")))
        else:
            for tree, _pattern, hits in profile.select(index):
                selected += [(p, (tree.root,)) for p in hits]
        local = store.read_index()
        for path, allowed in selected:
            entry = index[path]
            rel = f"{layout.SNAPSHOTS}/{entry.snapshot}"
            if local.get(path) == rel:
                out.append(Outcome(path, entry.snapshot, "up-to-date"))
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                out.append(Outcome(path, entry.snapshot, "failed", message=f"no time left within {timeout:g}s"))
                continue
            try:
                out.append(_fetch_one(store, directory, owner, path, allowed, entry, left, max_image_bytes))
            except StallError:
                out.append(Outcome(path, entry.snapshot, "failed", message=f"no answer from {directory} within the "
                                   f"fetch's {timeout:g}s (stalled or unreachable?); nothing was published"))
            except OvlrunError as e:
                out.append(Outcome(path, entry.snapshot, "failed", message=e.message))
    return out


def _node_tree_roots() -> list[str]:
    """The tree roots of this node's profiles (those root may use: root-owned, not
    group/other-writable), which alone may hold what ``fetch --all`` fetches."""
    from ovlrun.profile.locate import profile_names
    from ovlrun.profile.parse import load_profile

    roots: set[str] = set()
    for name in profile_names():
        try:
            roots.update(tree.root for tree in load_profile(name, trusted_only=True).trees)
        except OvlrunError:
            continue  # an invalid or untrusted profile selects nothing (profile check says why)
    return sorted(roots)


def _fetch_one(store: Store, directory: str, owner: Owner, path: str, roots: tuple[str, ...], entry: Entry,
               timeout: float, max_image_bytes: int) -> Outcome:
    rel = f"{layout.SNAPSHOTS}/{entry.snapshot}"
    # The build lock of this path: a build and a fetch of one path never race, and a
    # fetch never copies what a build is replacing.  Waited for only until the deadline:
    # a Prolog must not sit behind a 300-second build.
    deadline = time.monotonic() + timeout
    busy = f"a build or fetch of {path} is running here"
    with _lock_until(store, f"{source_key(path)}.lock", deadline, busy) as lock_fd:
        timeout = deadline - time.monotonic()
        current = _current_manifest(store, path)
        if store.read_index().get(path) == rel:
            return Outcome(path, entry.snapshot, "up-to-date")
        if (store.path / rel).exists():
            return _reinstate(store, path, rel, roots, entry, current, timeout)
        _check_room(store, path, entry, max_image_bytes)
        store.clean_stale_builds(path)
        build_dir = store.new_build_dir(path)
        try:
            image = str(build_dir / layout.IMAGE)
            data, copied = run_bounded(lambda: _copy_in(directory, owner, path, roots, entry, image),
                                       timeout=timeout, what=f"fetching {path} from {directory}",
                                       close_fds=(lock_fd,))
            manifest = Manifest.from_json(data)
            store.publish(build_dir, manifest)
        except BaseException as e:
            shutil.rmtree(build_dir, ignore_errors=True)
            if isinstance(e, OSError):
                if e.errno == errno.ENOSPC:
                    raise OvlrunError(f"snapshot store {store.path} is full; nothing was fetched for {path}") from None
                raise OvlrunError(f"fetching {path} failed: {e}") from None
            raise
    return Outcome(path, entry.snapshot, "fetched", copied)


def _current_manifest(store: Store, path: str) -> Manifest | None:
    current = store.read_index().get(path)
    if current is None:
        return None
    try:
        return store.load(current).manifest
    except OvlrunError:
        return None  # gone or unreadable: nothing to protect


# Room the store keeps free besides a fetched image (its index, manifests, plans, builds).
STORE_RESERVE = 64 << 20


def _check_room(store: Store, path: str, entry: Entry, max_image_bytes: int) -> None:
    """Before a byte is copied: the image's size (DIR's index says it; the manifest and
    the file must agree, and the copy stops there) within the site's cap, and room for it
    in the store."""
    size = entry.image_bytes
    if size > max_image_bytes:
        raise OvlrunError(f"refusing {path}: its image is {size} bytes, more than the site's max_image_bytes "
                          f"({max_image_bytes})")
    try:
        st = os.statvfs(store.path / layout.TMP)
    except OSError as e:
        raise OvlrunError(f"cannot check the free space of {store.path}: {e.strerror}") from None
    free = st.f_bavail * st.f_frsize
    if size + STORE_RESERVE > free:
        raise OvlrunError(f"refusing {path}: its image needs {size} bytes and the store {store.path} has only "
                          f"{free} bytes free (keeping {STORE_RESERVE} free)")


@contextlib.contextmanager
def _lock_until(store: Store, name: str, deadline: float, busy: str) -> Iterator[int]:
    """Hold the flock ``locks/NAME`` of ``store`` (:meth:`Store.source_lock`'s files), given
    up at ``deadline`` with ``busy`` in the message (polled: flock has no timeout)."""
    fd = os.open(store.path / layout.LOCKS / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise OvlrunError(f"{busy}; gave up waiting for it") from None
                time.sleep(0.05)
        yield fd
    finally:
        os.close(fd)


def _reinstate(store: Store, path: str, rel: str, roots: tuple[str, ...], entry: Entry,
               current: Manifest | None, timeout: float) -> Outcome:
    """The store still holds this version (fetched earlier, then replaced): make it
    current again instead of copying it twice, after the checks a copy would get (its
    manifest against this node, its image's sha256), unless the node's current snapshot
    was built after it: a version the node has moved past is never made current again
    (DIR's index pointed back at it: a rollback)."""
    from ovlrun.store.build import file_sha256

    snap = store.load(rel)
    m = snap.manifest
    if m.path != path or file_sha256(str(snap.image)) != entry.image_sha256:
        raise OvlrunError(f"{snap.directory} exists but is not the published version of {path}; "
                          "run 'ovlrun snapshot gc' and fetch again")
    if current is not None and current.built > m.built:
        return Outcome(path, entry.snapshot, "kept", message=(
            f"the node's current snapshot of {path} (built {format_time(current.built)}) is newer than the "
            f"published one ({format_time(m.built)}), which it replaced: a fetch never rolls a node back"))
    key, _, snap_id = entry.snapshot.partition("/")
    run_bounded(lambda: _check_manifest(m, path, roots, key, snap_id, entry, str(snap.directory / layout.MANIFEST)),
                timeout=timeout, what=f"checking {path} on the shared tree")
    with store.index_lock():
        index = store.read_index()
        index[path] = rel
        store.write_index(index)
    return Outcome(path, entry.snapshot, "reinstated")


def _check_manifest(m: Manifest, path: str, roots: tuple[str, ...], key: str, snap_id: str, entry: Entry,
                    what: str) -> None:
    """The manifest decides where a launch mounts (its source and source identity): it
    must be exactly what this node finds for ``path`` itself.  Runs in a bounded worker
    (it opens the release on the shared tree)."""
    def bad(why: str) -> OvlrunError:
        return refuse(what, why)

    # Typed as the store's own manifests are: a launch, list and gc trust these fields.
    typed = (all(isinstance(v, str) for v in (m.path, m.source, m.id, m.fingerprint, m.root, m.image_sha256,
                                               m.source_root))
             and all(is_int(v) for v in (m.max_redirect, m.long_redirects, m.redirect_max, m.image_bytes,
                                         m.source_ino))
             and isinstance(m.built, (int, float)) and not isinstance(m.built, bool)
             and isinstance(m.counts, dict) and all(isinstance(k, str) and is_int(v) for k, v in m.counts.items())
             and isinstance(m.warnings, list) and all(isinstance(w, str) for w in m.warnings)
             and isinstance(m.inline, list) and all(isinstance(p, str) for p in m.inline) and is_int(m.inline_max))
    if not typed:
        raise bad("a field has the wrong type")
    if m.path != path or m.id != snap_id or source_key(m.source) != key:
        raise bad(f"it describes {m.path} ({m.id}), not {path} ({key}/{snap_id})")
    if (m.image_sha256, m.image_bytes) != (entry.image_sha256, entry.image_bytes):
        raise bad("its image sha256 or size differs from the published index")
    if not m.root or not m.source_root or not m.source_ino:
        raise bad("it records no tree root or source identity (built by an older ovlrun: rebuild and publish it)")
    if m.root not in roots:
        raise bad(f"its tree root {m.root!r} is not {' or '.join(map(repr, roots))}, the tree root this node's "
                  "profiles give it")
    for name, value in (("path", m.path), ("source", m.source), ("source_root", m.source_root)):
        if not value.startswith("/") or "\0" in value or posixpath.normpath(value) != value:
            raise bad(f"its {name} {value!r} is not a normalised absolute path")
    if not m.path.startswith(m.root.rstrip("/") + "/"):
        raise bad(f"its path {m.path} is not inside its tree root {m.root}")
    # Where a launch mounts is decided by the node: the tree root's real path here (as a
    # build resolves it), the path below it reached without any symlink and without
    # crossing a mount (ovlrun.linux.files.open_release), and that directory's inode.
    # Whatever the manifest says, the mount can land only where a local build of this
    # path would have put it.
    real_root = os.path.realpath(m.root)
    if m.source_root != real_root:
        raise bad(f"its source_root {m.source_root} is not the real path of the tree root {m.root} on this node "
                  f"({real_root})")
    relative = m.path[len(m.root.rstrip("/")) + 1:]
    expected = f"{real_root.rstrip('/')}/{relative}"
    if m.source != expected:
        raise bad(f"its source {m.source} is not where {m.path} is on this node ({expected}: no symlink is "
                  "followed below the tree root)")
    try:
        fd = open_source(real_root, expected)
    except OSError as e:
        raise bad(f"its source {expected} cannot be opened as a launch opens it on this node "
                  f"({describe_open_failure(e)})") from None
    try:
        ino = os.fstat(fd).st_ino
    finally:
        os.close(fd)
    if ino != m.source_ino:
        raise bad(f"its source_ino {m.source_ino} is not the inode of {expected} on this node ({ino})")


def _copy_in(directory: str, owner: Owner, path: str, roots: tuple[str, ...], entry: Entry,
             dest: str) -> tuple[dict[str, Any], int]:
    """In a worker: check and copy one published version's image to ``dest``; returns
    its manifest (as JSON data) and the bytes copied."""
    key, _, snap_id = entry.snapshot.partition("/")
    where = f"{directory}/{key}/{snap_id}"
    fds: list[int] = []
    try:
        fds.append(open_top(directory, owner))
        fds.append(open_checked(key, fds[-1], owner, f"{directory}/{key}", directory=True))
        fds.append(open_checked(snap_id, fds[-1], owner, where, directory=True))
        version_fd = fds[-1]
        fds.append(open_checked(layout.MANIFEST, version_fd, owner, f"{where}/{layout.MANIFEST}", directory=False))
        raw = read_small(fds[-1], f"{where}/{layout.MANIFEST}")
        try:
            data = json.loads(raw)
            manifest = Manifest.from_json(data)
        except (ValueError, TypeError, AttributeError, RecursionError) as e:
            raise OvlrunError(f"{where}/{layout.MANIFEST} is not a valid manifest: {e}") from None
        _check_manifest(manifest, path, roots, key, snap_id, entry, f"{where}/{layout.MANIFEST}")
        what = f"{where}/{layout.IMAGE}"
        fds.append(open_checked(layout.IMAGE, version_fd, owner, what, directory=False))
        image_fd = fds[-1]
        if os.fstat(image_fd).st_size != manifest.image_bytes:
            raise refuse(what, f"its size is not the manifest's {manifest.image_bytes} bytes")
        os.posix_fadvise(image_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        copied = _copy_verified(image_fd, dest, manifest.image_sha256, manifest.image_bytes, what)
        return manifest.to_json(), copied
    except FileNotFoundError as e:
        raise OvlrunError(f"{e.strerror} (removed by 'ovlrun snapshot gc --published' meanwhile?)") from None
    finally:
        for fd in reversed(fds):
            os.close(fd)


def _copy_verified(src_fd: int, dest: str, sha256: str, size: int, what: str) -> int:
    """Copy at most ``size`` bytes (the image may not grow while it is copied), check
    their sha256, then that the copy is an image ovlrun could have written
    (:func:`~ovlrun.store.image.reader.check_image`): the kernel will mount it with
    root's trust, and a file that is not one would fail every launch of the profile."""
    digest = hashlib.sha256()
    total = 0
    out = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        while total <= size and (chunk := os.read(src_fd, min(CHUNK, size + 1 - total))):
            digest.update(chunk)
            write_all(out, chunk)
            total += len(chunk)
        if total != size or digest.hexdigest() != sha256:
            raise refuse(what, "its size or sha256 does not match the manifest (corrupt or tampered with)")
        os.fsync(out)
        problem = _image_problem(out, size)
        if problem:
            raise refuse(what, f"it is not a snapshot image ovlrun writes ({problem})")
    finally:
        os.close(out)
    return total


def _image_problem(fd: int, size: int) -> str:
    """Why the copied image at ``fd`` is not one ovlrun could have written ("" if it is)."""
    import mmap

    from ovlrun.store.image.reader import check_image
    from ovlrun.store.image.tree import ImageError

    if size == 0:
        return "empty"
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as data:
        try:
            check_image(data)
        except ImageError as e:
            return str(e)
    return ""


def fetch_for_job(store: Store, profile: Profile, directory: str | None, owner: Owner, *,
                  timeout: float, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> list[Outcome] | None:
    """The Prolog's step: if some pattern of ``profile`` has no snapshot on this node,
    fetch the profile's published images within ``timeout``.  None if nothing was
    missing or no image directory is configured (then DIR is not contacted at all:
    2,000 nodes starting jobs must not each read DIR's index for nothing)."""
    if directory is None:
        return None
    if all(hits for _tree, _pattern, hits in profile.select(store.read_index())):
        return None
    return fetch(store, directory, owner, profile, timeout=timeout, max_image_bytes=max_image_bytes)
