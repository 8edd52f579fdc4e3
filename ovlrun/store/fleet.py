"""Fleets: build snapshot images once, publish them to a directory on the shared
filesystem, and let every node fetch them instead of walking the shared tree itself.

At 2,000 nodes, ``snapshot build`` on every node moves the metadata storm from job start
to build time.  Instead one build host builds, ``snapshot publish`` copies its current
images into DIR, and each node's ``snapshot fetch`` (or the Slurm Prolog, for a job whose
images are missing) copies the images it lacks: a few large sequential reads per release
instead of one request per entry.

Layout of DIR (owned by the image owner, see :mod:`ovlrun.store.siteconfig`)::

    DIR/index.json                 {"format": 1, "sources": {PATH: {"snapshot": "KEY/ID",
                                    "image_sha256", "image_bytes", "published"}}}, replaced
                                    atomically; names only complete KEY/ID directories
    DIR/KEY/ID/manifest.json       the build host's manifest, as in its store
    DIR/KEY/ID/image.erofs         the image (0644: node root is usually squashed to nobody)
    DIR/.lock                      flock serialising publishers and gc
    DIR/.stage.KEY.ID.RANDOM/      a version being written (renamed to KEY/ID when complete)
    DIR/.trash.RANDOM/             a version gc took out, being deleted

KEY and ID are those of the local store (``snapshots/KEY/ID``), so a fetched snapshot
lands exactly where a local build of the same snapshot would be.  Several versions of
one path coexist until ``snapshot gc --published DIR``; the index only ever names a
version whose directory was complete before the index was written, so a reader never
sees an index naming a missing image (gc removes only versions the index stopped
naming at least the grace period ago).

Trust: a node mounts what it fetches with root's trust (``trusted.overlay.*`` xattrs
decide what a job sees), so DIR, every directory and file read from it must be owned by
the image owner and not group/other-writable, checked with ``fstat`` on the very fd that
is read; every name is opened with ``O_NOFOLLOW`` relative to the fd of its directory,
so no symlink is ever followed; the image's sha256 must match the manifest's; and the
manifest may only localise a path under its tree root (and, with a profile, the root of
the profile's tree that selected it), whose source must resolve inside that root on this
node: an image owner can change what a release looks like, never mount over /etc.

Every access to DIR runs in a bounded worker (:func:`ovlrun.store.bounded.run_bounded`):
a stalled or unreachable DIR costs at most the timeout, and the node keeps what it has.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import posixpath
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from ovlrun.errors import OvlrunError
from ovlrun.linux.files import UntrustedError, open_trusted, write_atomic
from ovlrun.linux.privileges import Identity, drop_to
from ovlrun.profile.parse import Profile
from ovlrun.store import layout
from ovlrun.store.bounded import StallError, run_bounded
from ovlrun.store.index import Manifest, Store
from ovlrun.store.layout import source_key
from ovlrun.store.siteconfig import Owner

FORMAT = 1
INDEX = "index.json"
LOCK = ".lock"
STAGE_PREFIX = ".stage."
TRASH_PREFIX = ".trash."
INDEX_TMP_PREFIX = ".index.json."
CHUNK = 4 << 20  # large sequential reads: one NFS READ stream, few round trips
MAX_JSON = 16 << 20  # an index or manifest larger than this is not one of ours
DEFAULT_PUBLISHED_GRACE = 3600.0
# KEY and ID as the store makes them (source_key, new_snapshot_id); anything else in an
# index or a directory listing of DIR is not ours and is never opened.
_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class Entry(NamedTuple):
    """One path's current published version, as DIR/index.json names it."""

    snapshot: str  # "KEY/ID"
    image_sha256: str
    image_bytes: int
    published: float

    def to_json(self) -> dict[str, Any]:
        return self._asdict()


@dataclass
class Outcome:
    """What publish or fetch did for one localised path."""

    path: str
    snapshot: str  # KEY/ID
    status: str  # publish: "published", "unchanged", "made current", "skipped";
    #              fetch: "fetched", "up-to-date", "reinstated", "failed"
    bytes: int = 0  # image bytes copied
    message: str = ""


# ------------------------------------------------------------------ opening DIR safely


def _valid_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and name not in (".", "..") and not name.startswith(
        (STAGE_PREFIX, TRASH_PREFIX, INDEX_TMP_PREFIX, LOCK))


def _refuse(what: str, problem: str) -> OvlrunError:
    return OvlrunError(f"refusing {what}: {problem}")


def _open_checked(name: str, dir_fd: int | None, owner: Owner, what: str, *, directory: bool) -> int:
    """Open ``name`` (relative to ``dir_fd``) as root opens every file it trusts
    (:func:`ovlrun.linux.files.open_trusted`: no symlink followed, no FIFO waited for, the
    owner, mode and type checked on the fd that is then read), the owner being the image
    owner; ``what`` names it in the messages."""
    try:
        return open_trusted(name, dir_fd=dir_fd, directory=directory, uid=owner.uid,
                            owner=f"by the image owner {owner.name} (uid {owner.uid})")
    except UntrustedError as e:
        raise _refuse(what, e.problem) from None
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno == errno.ENOTDIR and directory and _is_symlink(name, dir_fd)):
            raise _refuse(what, "it is a symlink") from None
        if e.errno == errno.ENOENT:
            raise FileNotFoundError(e.errno, f"{what} does not exist") from None
        raise OvlrunError(f"cannot open {what}: {e.strerror}") from None


def _is_symlink(name: str, dir_fd: int | None) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _open_top(directory: str, owner: Owner) -> int:
    if not directory.startswith("/"):
        raise OvlrunError(f"published image directory {directory!r} must be an absolute path")
    # No trailing slash: with one, the last component would be resolved (symlinks
    # followed) before O_NOFOLLOW could refuse it.
    directory = posixpath.normpath(directory)
    try:
        return _open_checked(directory, None, owner, f"published image directory {directory}", directory=True)
    except FileNotFoundError:
        raise OvlrunError(f"published image directory {directory} does not exist (not mounted?)") from None


def _read_small(fd: int, what: str) -> bytes:
    chunks = []
    total = 0
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
        total += len(chunk)
        if total > MAX_JSON:
            raise OvlrunError(f"{what} is larger than {MAX_JSON} bytes: not an ovlrun file")
    return b"".join(chunks)


def _read_index(dir_fd: int, owner: Owner, directory: str) -> dict[str, Entry]:
    what = f"{directory}/{INDEX}"
    try:
        fd = _open_checked(INDEX, dir_fd, owner, what, directory=False)
    except FileNotFoundError:
        return {}  # nothing published yet
    try:
        raw = _read_small(fd, what)
    finally:
        os.close(fd)
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("sources"), dict):
            raise ValueError(f"not a format {FORMAT} index")
        out = {}
        for path, value in data["sources"].items():
            entry = Entry(**value)
            key, _, snap_id = entry.snapshot.partition("/")
            if not (isinstance(path, str) and isinstance(entry.snapshot, str) and _valid_name(key)
                    and _valid_name(snap_id) and isinstance(entry.image_sha256, str)
                    and _HEX64.fullmatch(entry.image_sha256) and _is_int(entry.image_bytes)
                    and isinstance(entry.published, (int, float)) and not isinstance(entry.published, bool)):
                raise ValueError(f"bad entry for {path!r}")
            out[path] = entry
        return out
    except (ValueError, TypeError) as e:
        raise OvlrunError(f"{what} is not a valid published index: {e}") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fsync_dir(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EROFS):  # some filesystems cannot fsync a directory
            raise


def _flock(dir_fd: int, directory: str) -> int:
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # NFS: emulated with a POSIX lock by the client
    except OSError as e:
        os.close(fd)
        raise OvlrunError(f"cannot lock {directory}/{LOCK}: {e.strerror}") from None
    return fd


def _become(owner: Owner) -> None:
    """In a worker: write DIR as the image owner (root is squashed on most NFS exports,
    and what root wrote there would be owned by nobody and refused by every node).  The
    one verified drop (:func:`ovlrun.linux.privileges.drop_to`: no supplementary groups,
    the owner's gid and uid, no capabilities, no_new_privs), which keeps the worker's
    parent-death signal armed."""
    if os.geteuid() != 0 or owner.uid == 0:
        return
    drop_to(Identity(owner.name, owner.uid, owner.gid, (), "/", "/bin/sh"))


# ---------------------------------------------------------------------------- publish


class _Item(NamedTuple):
    path: str
    key: str
    id: str
    manifest: bytes
    image_fd: int  # opened by the (root) parent: the store is root-only
    image_sha256: str
    image_bytes: int


def _manifest_bytes(manifest: Manifest) -> bytes:
    return json.dumps(manifest.to_json(), indent=1, sort_keys=True).encode()


def publish(store: Store, directory: str, profile: Profile | None, owner: Owner, *, timeout: float) -> list[Outcome]:
    """Copy the current image of every path ``profile`` localises (every path if None)
    from ``store`` into ``directory`` and make it the published version."""
    from ovlrun.store.lifecycle import current_snapshots

    outcomes: list[Outcome] = []
    items: list[_Item] = []
    try:
        for path, snap in current_snapshots(store, profile).items():
            m = snap.manifest
            rel = f"{snap.directory.parent.name}/{snap.directory.name}"
            if not snap.is_image or not m.root:
                why = ("a directory snapshot from before images" if not snap.is_image else
                       "its manifest records no tree root (built by an older ovlrun)")
                outcomes.append(Outcome(path, rel, "skipped", message=f"{why}: 'ovlrun snapshot build --rebuild' "
                                        "or a fresh build replaces it"))
                continue
            fd = os.open(snap.image, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            items.append(_Item(path, snap.directory.parent.name, snap.directory.name, _manifest_bytes(m), fd,
                               m.image_sha256, m.image_bytes))
        if items:
            outcomes += run_bounded(lambda: _publish_worker(directory, owner, items, time.time()), timeout=timeout,
                                    what=f"publishing to {directory}")
    finally:
        for item in items:
            os.close(item.image_fd)
    return outcomes


def _publish_worker(directory: str, owner: Owner, items: list[_Item], now: float) -> list[Outcome]:
    _become(owner)
    os.umask(0o022)
    dir_fd = _open_top(directory, owner)
    lock_fd = _flock(dir_fd, directory)
    try:
        index = _read_index(dir_fd, owner, directory)
        out = []
        changed = False
        for item in items:
            rel = f"{item.key}/{item.id}"
            complete = _complete(dir_fd, item.key, item.id)
            entry = index.get(item.path)
            if entry is not None and entry.snapshot == rel and complete:
                out.append(Outcome(item.path, rel, "unchanged"))
                continue
            copied = 0 if complete else _stage(dir_fd, item)
            index[item.path] = Entry(rel, item.image_sha256, item.image_bytes, now)
            changed = True
            out.append(Outcome(item.path, rel, "published" if copied else "made current", copied))
        if changed:
            _write_index(dir_fd, index)
        return out
    finally:
        os.close(lock_fd)
        os.close(dir_fd)


def _complete(dir_fd: int, key: str, snap_id: str) -> bool:
    try:
        for name in (layout.MANIFEST, layout.IMAGE):
            if not stat.S_ISREG(os.stat(f"{key}/{snap_id}/{name}", dir_fd=dir_fd, follow_symlinks=False).st_mode):
                return False
    except FileNotFoundError:
        return False
    return True


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _stage(dir_fd: int, item: _Item) -> int:
    """Write one version under a temporary name, fsync it, rename it to KEY/ID."""
    stage = f"{STAGE_PREFIX}{item.key}.{item.id}.{secrets.token_hex(4)}"
    os.mkdir(stage, 0o755, dir_fd=dir_fd)
    try:
        stage_fd = os.open(stage, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            copied = _copy_image_out(item, stage_fd)
            fd = os.open(layout.MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                         dir_fd=stage_fd)
            try:
                _write_all(fd, item.manifest)
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(stage_fd)
        finally:
            os.close(stage_fd)
        try:
            os.mkdir(item.key, 0o755, dir_fd=dir_fd)
        except FileExistsError:
            pass
        key_fd = os.open(item.key, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            os.rename(stage, item.id, src_dir_fd=dir_fd, dst_dir_fd=key_fd)
            _fsync_dir(key_fd)
        finally:
            os.close(key_fd)
        _fsync_dir(dir_fd)
    except BaseException:
        shutil.rmtree(stage, dir_fd=dir_fd, ignore_errors=True)
        raise
    return copied


def _copy_image_out(item: _Item, stage_fd: int) -> int:
    fd = os.open(layout.IMAGE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                 dir_fd=stage_fd)
    digest = hashlib.sha256()
    offset = 0
    try:
        while chunk := os.pread(item.image_fd, CHUNK, offset):
            digest.update(chunk)
            _write_all(fd, chunk)
            offset += len(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    if digest.hexdigest() != item.image_sha256 or offset != item.image_bytes:
        raise OvlrunError(f"the local image of {item.path} does not match its manifest (sha256 or size); "
                          "not published: rebuild it ('ovlrun snapshot build --rebuild')")
    return offset


def _write_index(dir_fd: int, index: dict[str, Entry]) -> None:
    data = json.dumps({"format": FORMAT, "sources": {p: e.to_json() for p, e in sorted(index.items())}},
                      indent=1, sort_keys=True).encode()
    write_atomic(INDEX, data, 0o644, dir_fd=dir_fd)  # temporary name: INDEX_TMP_PREFIX...
    _fsync_dir(dir_fd)


# ------------------------------------------------------------------------------ fetch


def read_published(directory: str, owner: Owner, *, timeout: float) -> dict[str, Entry]:
    """DIR's index (bounded: one open and a read or two)."""
    def read() -> dict[str, Entry]:
        dir_fd = _open_top(directory, owner)
        try:
            return _read_index(dir_fd, owner, directory)
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
        return _refuse(what, why)

    # Typed as the store's own manifests are: a launch, list and gc trust these fields.
    typed = (all(isinstance(v, str) for v in (m.path, m.source, m.id, m.fingerprint, m.root, m.image_sha256))
             and all(_is_int(v) for v in (m.max_redirect, m.long_redirects, m.redirect_max, m.image_bytes))
             and isinstance(m.built, (int, float)) and not isinstance(m.built, bool)
             and isinstance(m.counts, dict) and all(isinstance(k, str) and _is_int(v) for k, v in m.counts.items())
             and isinstance(m.warnings, list) and all(isinstance(w, str) for w in m.warnings))
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
        fds.append(_open_top(directory, owner))
        fds.append(_open_checked(key, fds[-1], owner, f"{directory}/{key}", directory=True))
        fds.append(_open_checked(snap_id, fds[-1], owner, where, directory=True))
        version_fd = fds[-1]
        fds.append(_open_checked(layout.MANIFEST, version_fd, owner, f"{where}/{layout.MANIFEST}", directory=False))
        raw = _read_small(fds[-1], f"{where}/{layout.MANIFEST}")
        try:
            data = json.loads(raw)
            manifest = Manifest.from_json(data)
        except (ValueError, TypeError, AttributeError) as e:
            raise OvlrunError(f"{where}/{layout.MANIFEST} is not a valid manifest: {e}") from None
        _check_manifest(manifest, path, root, key, snap_id, entry, f"{where}/{layout.MANIFEST}")
        what = f"{where}/{layout.IMAGE}"
        fds.append(_open_checked(layout.IMAGE, version_fd, owner, what, directory=False))
        image_fd = fds[-1]
        if os.fstat(image_fd).st_size != manifest.image_bytes:
            raise _refuse(what, f"its size is not the manifest's {manifest.image_bytes} bytes")
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
            _write_all(out, chunk)
            total += len(chunk)
        if digest.hexdigest() != sha256:
            raise _refuse(what, "its sha256 does not match the manifest (corrupt or tampered with)")
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


# --------------------------------------------------------------------------------- gc


@dataclass
class PublishedVersion:
    directory: str  # DIR/KEY/ID, or a leftover
    reason: str  # "replaced", "orphaned" (no index entry for its key), "leftover"
    action: str  # "removed", "would remove", "kept: grace"


def gc_published(directory: str, owner: Owner, *, grace: float, dry_run: bool,
                 timeout: float) -> list[PublishedVersion]:
    """Remove published versions the index no longer names, once they have not been
    current for ``grace`` seconds (a node that read the previous index may still be
    copying), and leftovers of killed publishes."""
    return run_bounded(lambda: _gc_worker(directory, owner, grace, dry_run, time.time()), timeout=timeout,
                       what=f"collecting old versions in {directory}")


def _gc_worker(directory: str, owner: Owner, grace: float, dry_run: bool, now: float) -> list[PublishedVersion]:
    if not dry_run:
        _become(owner)
    dir_fd = _open_top(directory, owner)
    lock_fd = _flock(dir_fd, directory) if not dry_run else -1
    try:
        index = _read_index(dir_fd, owner, directory)
        current = {e.snapshot for e in index.values()}
        replaced_at: dict[str, float] = {}  # KEY -> when its current version was published
        for e in index.values():
            key = e.snapshot.partition("/")[0]
            replaced_at[key] = max(replaced_at.get(key, 0.0), e.published)
        report = []
        action = "would remove" if dry_run else "removed"
        for name in sorted(os.listdir(dir_fd)):
            if name.startswith((STAGE_PREFIX, TRASH_PREFIX, INDEX_TMP_PREFIX)):
                # Under the lock no publish is running: these are a killed one's.
                report.append(PublishedVersion(f"{directory}/{name}", "leftover", action))
                if not dry_run:
                    _remove(dir_fd, name)
                continue
            if not _valid_name(name) or not stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                continue
            key_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                for snap_id in sorted(os.listdir(key_fd)):
                    if f"{name}/{snap_id}" in current:
                        continue
                    since = replaced_at.get(name)
                    reason = "replaced" if since is not None else "orphaned"
                    if since is None:
                        since = os.stat(snap_id, dir_fd=key_fd, follow_symlinks=False).st_mtime
                    if now - since < grace:
                        report.append(PublishedVersion(f"{directory}/{name}/{snap_id}", reason, "kept: grace"))
                        continue
                    report.append(PublishedVersion(f"{directory}/{name}/{snap_id}", reason, action))
                    if not dry_run:
                        # Out of KEY/ in one rename: a gc killed while deleting leaves a
                        # .trash leftover, never a partial version under its name.
                        trash = f"{TRASH_PREFIX}{secrets.token_hex(6)}"
                        os.rename(snap_id, trash, src_dir_fd=key_fd, dst_dir_fd=dir_fd)
                        _remove(dir_fd, trash)
                if not dry_run:
                    try:
                        os.rmdir(name, dir_fd=dir_fd)  # only if empty
                    except OSError:
                        pass
            finally:
                os.close(key_fd)
        return report
    finally:
        if lock_fd >= 0:
            os.close(lock_fd)
        os.close(dir_fd)


def _remove(dir_fd: int, name: str) -> None:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd, ignore_errors=True)  # fd-based: follows no symlink
    else:
        os.unlink(name, dir_fd=dir_fd)
