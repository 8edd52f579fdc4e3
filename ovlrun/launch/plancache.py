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
import stat

from ovlrun.launch.plan import JobPlan, MountItem
from ovlrun.linux.files import PRIVATE, trust_problem, write_atomic
from ovlrun.store.layout import index_file, plan_file

FORMAT = 2  # 2: items carry the source identity (source_root, source_ino)


def _stat_key(path: str) -> tuple[int, int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class CacheKeys:
    """What a cached plan is valid for: the profile file and the index as they are now."""

    __slots__ = ("index", "profile", "profile_file", "store")

    def __init__(self, profile_file: str, store: str) -> None:
        self.profile_file = os.path.abspath(profile_file)
        self.store = store
        self.profile = _stat_key(profile_file)
        self.index = _stat_key(index_file(store))

    def as_tuple(self) -> tuple[object, ...]:
        return (FORMAT, self.profile_file, self.profile, self.store, self.index)

    def cache_file(self) -> str | None:
        if self.profile is None:
            return None
        return plan_file(self.store, self.profile[0], self.profile[1])


def load_cached(profile_file: str, store: str) -> JobPlan | None:
    """The cached plan for this profile file and store, if still valid and trustworthy."""
    keys = CacheKeys(profile_file, store)
    path = keys.cache_file()
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or trust_problem(st, PRIVATE):
            return None  # not written by us: ignore it (it is replaced on the next save)
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
    try:
        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        write_atomic(target, marshal.dumps(data), 0o600)
    except OSError:
        pass
