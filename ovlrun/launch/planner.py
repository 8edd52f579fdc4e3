"""Planning a launch: from a profile and the store's index to a :class:`JobPlan`.

This is the heavy half of a launch (tomllib, json, pattern matching) and reads only the
local store, never the shared tree.  :mod:`ovlrun.launch.execute` executes the plan;
:mod:`ovlrun.launch.plancache` caches it so that most launches never import this module.
"""

from __future__ import annotations

from pathlib import Path

from ovlrun.errors import OvlrunError
from ovlrun.launch.plan import JobPlan, MountItem
from ovlrun.launch.plancache import CacheKeys, save_cached
from ovlrun.profile.locate import ProfileFile
from ovlrun.profile.parse import Profile, parse_profile
from ovlrun.store.index import SnapshotMissing, Store


def plan(profile: Profile, store: Store) -> JobPlan:
    """Which localised paths this job gets, from the store index alone."""
    index = store.read_index()
    chosen: dict[str, str] = {}
    roots: dict[str, str] = {}
    missing: list[str] = []
    for tree, pattern, hits in profile.select(index):
        if not hits:
            missing.append(tree.path_of(pattern.text))
        chosen.update((p, index[p]) for p in hits)
        roots.update((p, tree.root) for p in hits)
    items = []
    for path, relative in sorted(chosen.items()):
        try:
            snapshot = store.load(relative)
        except SnapshotMissing:
            # gc removed it after we read the index (its source was deleted): same as unbuilt.
            missing.append(path)
            continue
        if not snapshot.is_image:
            missing.append(path)  # a directory snapshot from before images: never mounted
            continue
        m = snapshot.manifest
        items.append(MountItem(path, m.source, str(snapshot.directory), roots[path], m.source_root, m.source_ino))
    return JobPlan(profile.name, profile.network, profile.missing_root, items, missing)


def plan_job(profile: ProfileFile, store: str, *, private: bool = False) -> JobPlan:
    """Parse the profile (from the fd that was opened and checked), plan against the
    store, and cache the plan for the next launch.

    ``private``: the caller may not read the profile file (a sudo caller, a profile only
    root reads).  Its parse errors quote what is in it, so they are not shown then: the
    caller learns only that it is invalid and where an administrator sees why.
    """
    keys = CacheKeys(profile, store)  # before reading either file: see save_cached
    path = Path(profile.path)
    try:
        parsed = parse_profile(path, path.stem, fd=profile.fd)
    except OvlrunError:
        if not private:
            raise
        raise OvlrunError(f"profile {path} is invalid; you may not read it, so why is not shown "
                          f"(an administrator sees it with: ovlrun profile check {path.stem})") from None
    result = plan(parsed, Store.open(store))
    save_cached(result, keys)
    return result
