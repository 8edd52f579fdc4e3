"""The launch plan cache.

Planning a launch means parsing the profile (tomllib), reading the store index and the
manifests it names (json), and matching patterns (re): with the interpreter imports they
pull in (typing, pathlib, ...) that is ~30 ms, more than everything else a launch does.
The result depends only on the profile file and the index, so it is cached per profile
in ``STORE/plans/`` (marshal: a builtin module, nothing to import) and reused while
both files are unchanged: same device, inode, size, mtime and ctime.  ``index.json`` is
replaced by rename on every publish and gc, so any store change is a new inode.

What the cache does *not* skip: the profile's trust check for sudo callers, every
snapshot directory's trust check, and everything about the mount itself.  The cache
file must be a root-owned regular file closed to other users, like the snapshots.
"""

from __future__ import annotations

import marshal
import os

from ovlrun.launch.plan import JobPlan, MountItem
from ovlrun.linux.files import PRIVATE, UntrustedError, open_trusted, write_atomic
from ovlrun.store.layout import index_file, plan_file

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal

    from ovlrun.profile.locate import ProfileFile
else:
    # signal's functions without its enum wrappers: importing enum costs a launch ~1 ms.
    import _signal

FORMAT = 2  # 2: items carry the source identity (source_root, source_ino)


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _index_key(store: str) -> tuple[int, int, int, int, int] | None:
    try:
        return _stat_key(os.stat(index_file(store)))
    except OSError:
        return None


class CacheKeys:
    """What a cached plan is valid for: the profile file (as opened: the fd the launch
    checked and would parse) and the index as they are now."""

    __slots__ = ("index", "profile", "profile_file", "store")

    def __init__(self, profile: ProfileFile, store: str) -> None:
        self.profile_file = os.path.abspath(profile.path)
        self.store = store
        self.profile: tuple[int, int, int, int, int] | None = _stat_key(profile.st)
        self.index = _index_key(store)

    def as_tuple(self) -> tuple[object, ...]:
        return (FORMAT, self.profile_file, self.profile, self.store, self.index)

    def cache_file(self) -> str | None:
        if self.profile is None:
            return None
        return plan_file(self.store, self.profile[0], self.profile[1])


def load_cached(profile: ProfileFile, store: str) -> JobPlan | None:
    """The cached plan for this profile file and store, if still valid and trustworthy."""
    keys = CacheKeys(profile, store)
    path = keys.cache_file()
    if path is None:
        return None
    try:
        fd = open_trusted(path, closed=PRIVATE)
    except (OSError, UntrustedError):
        return None  # none yet, or not written by us: ignored (and replaced on the next save)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = marshal.loads(f.read())
    except (OSError, ValueError, EOFError, TypeError):
        return None
    finally:
        os.close(fd)
    try:
        if not isinstance(data, dict) or data.get("keys") != keys.as_tuple():
            return None
        items = [MountItem(*item) for item in data["items"]]
        return JobPlan(data["name"], data["network"], data["missing_root"], items, list(data["missing"]))
    except (KeyError, TypeError):
        return None


def save_cached(plan: JobPlan, keys: CacheKeys) -> None:
    """Cache ``plan`` under ``keys``, taken *before* planning: if the profile or the index
    changed while we planned, the keys are already stale and the next launch replans
    (keys taken afterwards would bless a plan made from the old files).

    Best effort: a store we cannot write to (read-only, full) just means no cache.
    """
    target = keys.cache_file()
    if target is None or keys.index is None:
        return  # no index yet: nothing worth caching
    data = {"keys": keys.as_tuple(), "name": plan.name, "network": plan.network, "missing_root": plan.missing_root,
            "items": [(i.path, i.source, i.snapshot_dir, i.root, i.source_root, i.source_ino) for i in plan.items],
            "missing": plan.missing}
    # SIGTERM, SIGINT, SIGHUP held back while the file is written: write_atomic removes its
    # temporary file on any failure, but a signal's default action would end the process
    # between its creation and the rename, leaving it for ever (SIGKILL still can: gc
    # removes what that leaves, see ovlrun.store.lifecycle.clean_plans).  The job starts
    # a few milliseconds later either way; a pending signal is delivered right after.
    held = _signal.pthread_sigmask(_signal.SIG_BLOCK, _HELD_SIGNALS)
    try:
        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        write_atomic(target, marshal.dumps(data), 0o600)
    except OSError:
        pass
    finally:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, held)


_HELD_SIGNALS = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP)
