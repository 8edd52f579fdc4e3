"""Every path of the snapshot store, and whether a snapshot in it may be trusted.

Layout (all root-owned; directories 0755 except where noted)::

    STORE/index.json                    which snapshot serves each path (atomic rename)
    STORE/index.lock                    flock serialising index updates and gc
    STORE/locks/KEY.lock                flock held while building one source
    STORE/tmp/KEY.RANDOM/               builds in progress (never listed or mounted)
    STORE/tmp/gc.RANDOM/                snapshots gc took out, being deleted
    STORE/snapshots/KEY/ID/             one snapshot, 0700 (its tree mirrors source modes)
    STORE/snapshots/KEY/ID/manifest.json
    STORE/snapshots/KEY/ID/tree/        the opaque metacopy tree (a lower layer)
    STORE/plans/DEV-INO.plan            cached launch plans, 0600 (ovlrun/launch/plancache.py)

KEY names a localised path (:func:`source_key`), ID one build of it.  Light on imports
(os and stat): a launch with a cached plan checks every snapshot it mounts through here.
"""

from __future__ import annotations

import os
import stat

from ovlrun.errors import OvlrunError
from ovlrun.linux.files import NOT_WRITABLE, PRIVATE, trust_problem

DEFAULT_STORE = "/var/lib/ovlrun"
INDEX = "index.json"
INDEX_LOCK = "index.lock"
MANIFEST = "manifest.json"
SNAPSHOTS = "snapshots"
TREE = "tree"
TMP = "tmp"
LOCKS = "locks"
PLANS = "plans"
GC_TRASH_PREFIX = "gc."


def store_dir(environ: dict[str, str] | None = None) -> str:
    """The store: ``OVLRUN_STORE`` (refused for sudo callers), else the default."""
    env = os.environ if environ is None else environ
    return env.get("OVLRUN_STORE") or DEFAULT_STORE


def source_key(path: str) -> str:
    """A directory name for a localised path: readable slug + hash (names may be any bytes)."""
    # Imported here, not at module level: only builders need them, and every import on
    # the launch path is paid by every job.
    import hashlib
    import re

    raw = os.fsencode(path)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", path.strip("/"))[-48:].strip("_") or "root"
    return f"{slug}-{hashlib.sha256(raw).hexdigest()[:12]}"


def index_file(store: str) -> str:
    return os.path.join(store, INDEX)


def snapshot_tree(snapshot_dir: str) -> str:
    return os.path.join(snapshot_dir, TREE)


def plan_file(store: str, dev: int, ino: int) -> str:
    """The cached plan of the profile file with this device and inode."""
    return os.path.join(store, PLANS, f"{dev}-{ino}.plan")


def snapshot_of_layer(layer: str) -> tuple[str, str] | None:
    """(KEY, ID) if ``layer`` is a snapshot's tree, by the layout's tail
    ``snapshots/KEY/ID/tree``: the store may be reached through a symlink or a path
    given differently to the mount.  IDs carry a timestamp and random bits, so a false
    match (which only keeps a snapshot longer) is as unlikely as it is harmless."""
    parts = layer.rstrip("/").split("/")
    if len(parts) >= 4 and parts[-1] == TREE and parts[-4] == SNAPSHOTS:
        return parts[-3], parts[-2]
    return None


def check_snapshot_trusted(store: str, snapshot_dir: str, trusted: set[str] | None = None) -> None:
    """Refuse a snapshot anyone but root could have written.

    ``trusted.overlay.*`` xattrs decide what an overlay serves (a redirect can point
    anywhere in the data layer), so every directory from the store root down to the
    snapshot's own directory must be root-owned and not writable by group or others,
    and the snapshot directory must be closed to them entirely (the tree inside keeps
    the source's modes, which may include world-writable directories).  ``trusted``
    remembers directories already checked in this launch (the store root and
    ``snapshots/`` are shared by all snapshots).
    """
    key_dir = os.path.dirname(snapshot_dir)
    for d in (store, os.path.join(store, SNAPSHOTS), key_dir, snapshot_dir):
        if trusted is not None and d in trusted:
            continue
        try:
            st = os.lstat(d)
        except OSError as e:
            raise OvlrunError(f"snapshot store path {d}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise OvlrunError(f"snapshot store path {d} is not a directory (symlink or tampering?)")
        problem = trust_problem(st, NOT_WRITABLE)
        if problem:
            raise OvlrunError(f"refusing snapshot store path {d}: it must be owned by root and not "
                              f"group/other-writable ({problem})")
        if d == snapshot_dir and trust_problem(st, PRIVATE):
            raise OvlrunError(f"refusing snapshot {d}: mode {stat.filemode(st.st_mode)} lets other users reach "
                              "its tree; it must be 0700 (ovlrun snapshot build tightens it)")
        if trusted is not None:
            trusted.add(d)
