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
from ovlrun.store.index import Manifest, Store
from ovlrun.store.layout import source_key
from ovlrun.store.siteconfig import Owner


def read_published(directory: str, owner: Owner, *, timeout: float) -> dict[str, Entry]:
    """DIR's index (bounded: one open and a read or two)."""
    def read() -> dict[str, Entry]:
        dir_fd = open_top(directory, owner)
        try:
            return read_index(dir_fd, owner, directory)
        finally:
            os.close(dir_fd)

    return run_bounded(read, timeout=timeout, what=f"reading the published index in {directory}")


def fetch(store: Store, directory: str, owner: Owner, profile: Profile | None, *, timeout: float) -> list[Outcome]:
    """Make the published version of every path ``profile`` selects in DIR's index (every
    path if None) the current snapshot in ``store``, copying what the store lacks.

    ``timeout`` bounds the whole fetch; a path not done by then fails (the node keeps what
    it had for it).  Raises :class:`OvlrunError` if DIR cannot be read at all.
    """
    deadline = time.monotonic() + timeout
    index = read_published(directory, owner, timeout=timeout)
    selected: list[tuple[str, str | None]] = []
    if profile is None:
        selected = [(p, None) for p in sorted(index)]
    else:
        for tree, _pattern, hits in profile.select(index):
            selected += [(p, tree.root) for p in hits]
    local = store.read_index()
    out = []
    for path, root in selected:
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
            out.append(_fetch_one(store, directory, owner, path, root, entry, left))
        except StallError:
            out.append(Outcome(path, entry.snapshot, "failed", message=f"no answer from {directory} within the "
                               f"fetch's {timeout:g}s (stalled or unreachable?); nothing was published"))
        except OvlrunError as e:
            out.append(Outcome(path, entry.snapshot, "failed", message=e.message))
    return out


def _fetch_one(store: Store, directory: str, owner: Owner, path: str, root: str | None, entry: Entry,
               timeout: float) -> Outcome:
    rel = f"{layout.SNAPSHOTS}/{entry.snapshot}"
    store.ensure()
    # The build lock of this path: a build and a fetch of one path never race, and two
    # fetches (cron and a Prolog) copy it once.  Waited for only until the deadline: a
    # Prolog must not sit behind a 300-second build.
    deadline = time.monotonic() + timeout
    with _source_lock_until(store, path, deadline) as lock_fd:
        timeout = deadline - time.monotonic()
        if store.read_index().get(path) == rel:
            return Outcome(path, entry.snapshot, "up-to-date")
        if (store.path / rel).exists():
            return _reinstate(store, path, rel, entry)
        store.clean_stale_builds(path)
        build_dir = store.new_build_dir(path)
        try:
            image = str(build_dir / layout.IMAGE)
            data, copied = run_bounded(lambda: _copy_in(directory, owner, path, root, entry, image),
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


@contextlib.contextmanager
def _source_lock_until(store: Store, path: str, deadline: float) -> Iterator[int]:
    """:meth:`Store.source_lock`, given up at ``deadline`` (polled: flock has no timeout)."""
    fd = os.open(store.path / layout.LOCKS / f"{source_key(path)}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise OvlrunError(f"a build or fetch of {path} is running here; gave up waiting for it") from None
                time.sleep(0.05)
        yield fd
    finally:
        os.close(fd)


def _reinstate(store: Store, path: str, rel: str, entry: Entry) -> Outcome:
    """The store still holds this version (fetched earlier, then replaced by a local
    build): check it and make it current again instead of copying it twice."""
    from ovlrun.store.build import file_sha256

    snap = store.load(rel)
    if snap.manifest.path != path or file_sha256(str(snap.image)) != entry.image_sha256:
        raise OvlrunError(f"{snap.directory} exists but is not the published version of {path}; "
                          "run 'ovlrun snapshot gc' and fetch again")
    with store.index_lock():
        index = store.read_index()
        index[path] = rel
        store.write_index(index)
    return Outcome(path, entry.snapshot, "reinstated")


def _check_manifest(m: Manifest, path: str, root: str | None, key: str, snap_id: str, entry: Entry,
                    what: str) -> None:
    """The manifest decides where a launch mounts (its source): only inside its tree."""
    def bad(why: str) -> OvlrunError:
        return refuse(what, why)

    # Typed as the store's own manifests are: a launch, list and gc trust these fields.
    typed = (all(isinstance(v, str) for v in (m.path, m.source, m.id, m.fingerprint, m.root, m.image_sha256))
             and all(is_int(v) for v in (m.max_redirect, m.long_redirects, m.redirect_max, m.image_bytes))
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
    tree_root = m.root or (root or "")
    if root is not None and tree_root != root:
        raise bad(f"its tree root {tree_root!r} is not the profile's {root!r}")
    for name, value in (("path", m.path), ("source", m.source), ("root", tree_root)):
        if not value.startswith("/") or "\0" in value or posixpath.normpath(value) != value:
            raise bad(f"its {name} {value!r} is not a normalised absolute path")
    if tree_root == "/":
        raise bad("its tree root is '/'")
    if not m.path.startswith(tree_root + "/"):
        raise bad(f"its path {m.path} is not inside its tree root {tree_root}")
    # The source is where a launch mounts.  A build records realpath(path) there
    # (check_within_root), so on a node with the same tree it must be exactly where the
    # path resolves here, inside the tree's real root: whatever the manifest says, the
    # mount lands where a local build of this path would have put it.
    real = os.path.realpath(m.path)
    if m.source != real:
        raise bad(f"its source {m.source} is not where {m.path} resolves on this node ({real})")
    if not real.startswith(os.path.realpath(tree_root).rstrip("/") + "/"):
        raise bad(f"its source {m.source} does not resolve inside the tree root {tree_root} on this node")


def _copy_in(directory: str, owner: Owner, path: str, root: str | None, entry: Entry,
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
        except (ValueError, TypeError, AttributeError) as e:
            raise OvlrunError(f"{where}/{layout.MANIFEST} is not a valid manifest: {e}") from None
        _check_manifest(manifest, path, root, key, snap_id, entry, f"{where}/{layout.MANIFEST}")
        what = f"{where}/{layout.IMAGE}"
        fds.append(open_checked(layout.IMAGE, version_fd, owner, what, directory=False))
        image_fd = fds[-1]
        if os.fstat(image_fd).st_size != manifest.image_bytes:
            raise refuse(what, f"its size is not the manifest's {manifest.image_bytes} bytes")
        os.posix_fadvise(image_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        copied = _copy_verified(image_fd, dest, manifest.image_sha256, what)
        return manifest.to_json(), copied
    except FileNotFoundError as e:
        raise OvlrunError(f"{e.strerror} (removed by 'ovlrun snapshot gc --published' meanwhile?)") from None
    finally:
        for fd in reversed(fds):
            os.close(fd)


def _copy_verified(src_fd: int, dest: str, sha256: str, what: str) -> int:
    digest = hashlib.sha256()
    total = 0
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        while chunk := os.read(src_fd, CHUNK):
            digest.update(chunk)
            write_all(out, chunk)
            total += len(chunk)
        if digest.hexdigest() != sha256:
            raise refuse(what, "its sha256 does not match the manifest (corrupt or tampered with)")
        os.fsync(out)
    finally:
        os.close(out)
    return total


def fetch_for_job(store: Store, profile: Profile, directory: str | None, owner: Owner, *,
                  timeout: float) -> list[Outcome] | None:
    """The Prolog's step: if some pattern of ``profile`` has no snapshot on this node,
    fetch the profile's published images within ``timeout``.  None if nothing was
    missing or no image directory is configured (then DIR is not contacted at all:
    2,000 nodes starting jobs must not each read DIR's index for nothing)."""
    if directory is None:
        return None
    if all(hits for _tree, _pattern, hits in profile.select(store.read_index())):
        return None
    return fetch(store, directory, owner, profile, timeout=timeout)
