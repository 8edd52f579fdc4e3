"""Planning a launch: from a profile and the store's index to a :class:`JobPlan`.

This is the heavy half of a launch (tomllib, json, pattern matching) and reads only the
local store, never the shared tree.  :mod:`ovlrun.launch.execute` executes the plan;
:mod:`ovlrun.launch.plan` caches it so that most launches never import this module.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ovlrun.launch import execute
from ovlrun.launch.plan import CacheKeys, JobPlan, MountItem, save_cached
from ovlrun.profile.parse import Profile, parse_profile
from ovlrun.store.index import SnapshotMissing, Store

Warn = Callable[[str], None]


def plan(profile: Profile, store: Store) -> JobPlan:
    """Which localised paths this job gets, from the store index alone."""
    index = store.read_index()
    chosen: dict[str, str] = {}
    roots: dict[str, str] = {}
    missing: list[str] = []
    for tree in profile.trees:
        for pattern in tree.patterns:
            hits = tree.matches_in(pattern, index)
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
        items.append(MountItem(path, snapshot.manifest.source, str(snapshot.directory), roots[path]))
    return JobPlan(profile.name, profile.network, profile.missing_root, items, missing)


def plan_job(profile_file: str, store: str) -> JobPlan:
    """Parse the profile, plan against the store, and cache the plan for the next launch."""
    keys = CacheKeys(profile_file, store)  # before reading either file: see save_cached
    path = Path(profile_file)
    result = plan(parse_profile(path, path.stem), Store.open(store))
    save_cached(result, keys)
    return result


def mount_profile(profile: Profile, store: Store, *, strict: bool, warn: Warn) -> list[MountItem]:
    """Plan and mount the profile's overlays in the current (already private) namespace."""
    job_plan = plan(profile, store)
    execute.report_missing(job_plan, strict=strict, warn=warn)
    return execute.mount_items(job_plan.items, str(store.path), strict=strict, warn=warn,
                           missing_root=profile.missing_root)
