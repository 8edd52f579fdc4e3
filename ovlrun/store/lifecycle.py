"""Snapshot lifecycle: verify against the shared tree, refresh what changed, collect garbage.

verify
    Re-walks each current snapshot's source with the builder's own walk, writing
    nothing (:func:`ovlrun.store.walk.walk_records`: one readdir per directory, one lstat per
    entry; a symlink whose lstat is unchanged is not readlink'ed again), reads the
    snapshot image's records (local: the image carries exactly the fingerprint inputs)
    and compares the two record sets:
    entries *missing* in the source, entries whose metadata *changed*, *new* entries.
refresh
    Rebuilds the snapshots verify finds changed, each with the inline settings it was built
    with, and publishes each new one atomically (``rename(2)`` + index rewrite): running
    jobs keep the tree they mounted.
gc
    Removes snapshots that are no longer current (a newer one replaced them, or a killed
    publish orphaned them), current ones whose source is gone, and directory snapshots
    (retired by images; jobs no longer mount them), never one a running
    job has mounted (the caller says which: :func:`ovlrun.jobs.inuse.snapshot_ids_in_use`
    reads every live mount namespace; the store knows nothing of jobs), plus leftovers of
    killed builds and gcs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ovlrun.errors import OvlrunError
from ovlrun.profile.parse import Profile
from ovlrun.store import layout
from ovlrun.store.bounded import DEFAULT_TIMEOUT, run_bounded
from ovlrun.store.build import build_one, inline_of
from ovlrun.store.index import Snapshot, SnapshotMissing, Store
from ovlrun.store.walk import Record, image_records, walk_records

LISTED_MAX = 100  # names kept per category in a report (counts are always complete)
DEFAULT_GRACE = 60.0


def current_snapshots(store: Store, profile: Profile | None) -> dict[str, Snapshot]:
    """The current snapshot of every path the profile localises (all paths if None),
    from the index alone (as a launch plans)."""
    index = store.read_index()
    chosen: dict[str, str] = {}
    if profile is None:
        chosen = dict(index)
    else:
        for _tree, _pattern, hits in profile.select(index):
            chosen.update((p, index[p]) for p in hits)
    out = {}
    for path, rel in sorted(chosen.items()):
        with contextlib.suppress(SnapshotMissing):
            out[path] = store.load(rel)
    return out


# -- verify ------------------------------------------------------------------------------


@dataclass
class Drift:
    path: str
    source: str
    snapshot: str  # snapshot id
    status: str  # "clean", "changed", "source-missing", "error"
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"missing": 0, "changed": 0, "new": 0})
    message: str = ""

    @property
    def clean(self) -> bool:
        return self.status == "clean"

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _name(rel: bytes) -> str:
    return "/" + os.fsdecode(rel)


def compare(snapshot: dict[bytes, Record], source: dict[bytes, Record]) -> tuple[list[bytes], list[bytes],
                                                                              list[bytes]]:
    """(missing in source, changed, new in source), each sorted."""
    missing = sorted(snapshot.keys() - source.keys())
    new = sorted(source.keys() - snapshot.keys())
    changed = sorted(k for k in snapshot.keys() & source.keys() if snapshot[k] != source[k])
    return missing, changed, new


def verify_one(path: str, snapshot: Snapshot, *, timeout: float = DEFAULT_TIMEOUT) -> Drift:
    source = snapshot.manifest.source
    drift = Drift(path, source, snapshot.manifest.id, "clean")
    if not snapshot.is_image:
        drift.status = "error"
        drift.message = "a directory snapshot from before images: 'ovlrun snapshot build' replaces it"
        return drift
    try:
        ours = image_records(snapshot.image)
    except (OSError, ValueError) as e:
        drift.status, drift.message = "error", f"cannot read snapshot image {snapshot.image}: {e}"
        return drift
    manifest = snapshot.manifest
    try:
        # Opened as a launch opens it (no symlink below the tree root), so verify reports
        # what launches will find.
        summary = run_bounded(lambda: walk_records(source, known=ours, source_root=manifest.source_root),
                              timeout=timeout, what=f"verifying {path}")
        theirs = summary.records or {}
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR) and not os.path.lexists(source):
            drift.status, drift.message = "source-missing", f"{source} is gone from the shared tree"
            drift.missing, drift.counts["missing"] = ["/"], len(ours)
        elif e.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR):
            # Swapped for a symlink (or reached through one now): launches leave it
            # unlocalised; refresh tries to rebuild it (and says why it cannot).
            drift.status, drift.message = "changed", (f"{source} is now reached through a symlink or "
                                                      "another mount")
            drift.changed, drift.counts["changed"] = ["/"], 1
        else:
            drift.status, drift.message = "error", f"cannot walk {source}: {e}"
        return drift
    except OvlrunError as e:
        drift.status, drift.message = "error", e.message
        return drift
    if summary.root_ino != manifest.source_ino:
        # Another directory under the same name (or a snapshot from before identities were
        # recorded): launches leave it unlocalised until it is rebuilt.
        drift.status = "changed"
        drift.message = (f"{source} is not the directory the snapshot was built from" if manifest.source_ino
                         else "snapshot predates source identity checks; refresh rebuilds it")
    missing, changed, new = compare(ours, theirs)
    drift.counts = {"missing": len(missing), "changed": len(changed), "new": len(new)}
    drift.missing = [_name(r) for r in missing[:LISTED_MAX]]
    drift.changed = [_name(r) for r in changed[:LISTED_MAX]]
    drift.new = [_name(r) for r in new[:LISTED_MAX]]
    if missing or changed or new:
        drift.status = "changed"
    if drift.status == "changed" and summary.root_ino != manifest.source_ino and "/" not in drift.changed:
        drift.changed.insert(0, "/")
        drift.counts["changed"] += 1
    return drift


def verify(store: Store, profile: Profile | None, *, timeout: float = DEFAULT_TIMEOUT) -> list[Drift]:
    return [verify_one(path, snap, timeout=timeout) for path, snap in current_snapshots(store, profile).items()]


# -- refresh -----------------------------------------------------------------------------


@dataclass
class Refreshed:
    drift: Drift
    status: str  # "unchanged", "rebuilt", "source-missing", "failed"
    snapshot: str = ""
    message: str = ""


def refresh(store: Store, profile: Profile | None, *, timeout: float = DEFAULT_TIMEOUT) -> list[Refreshed]:
    """Rebuild every snapshot verify finds changed; publish atomically (old ones stay
    mounted by the jobs that use them until gc finds them unused)."""
    out = []
    current = current_snapshots(store, profile)
    for drift in verify(store, profile, timeout=timeout):
        if drift.status == "clean":
            out.append(Refreshed(drift, "unchanged"))
        elif drift.status == "source-missing":
            out.append(Refreshed(drift, "source-missing", message="source is gone; 'ovlrun snapshot gc' removes it"))
        elif drift.status == "error":
            out.append(Refreshed(drift, "failed", message=drift.message))
        else:
            try:
                # With the settings the snapshot was built with (inline patterns).
                snapshot = current.get(drift.path)
                result = build_one(store, drift.path, drift.source, rebuild=True, timeout=timeout,
                                   inline=inline_of(snapshot.manifest) if snapshot else None)
            except OvlrunError as e:
                out.append(Refreshed(drift, "failed", message=e.message))
                continue
            snap_id = result.snapshot.manifest.id if result.snapshot else ""
            status = "rebuilt" if result.status == "built" else "unchanged"
            out.append(Refreshed(drift, status, snap_id, result.message))
    return out


# -- gc ----------------------------------------------------------------------------------


@dataclass
class Collected:
    path: str
    directory: str
    reason: str  # "replaced", "orphaned", "source-gone", "retired" (a directory snapshot)
    action: str  # "removed", "would remove", "kept: in use", "kept: grace"


def source_gone(source: str, path: str, root: str) -> bool:
    """Is ``source`` really deleted, not just unreachable?

    ENOENT alone is not enough: an unmounted NFS tree makes every source look deleted, and
    gc must not then wipe the store.  So it counts as gone only if the profile tree's root
    (recorded in the manifest) is a non-empty directory, i.e. the tree is there and the
    release is not.  Without a recorded root (older manifests) the nearest existing
    ancestor below '/' must be non-empty instead.
    """
    for candidate in (source, path):
        try:
            os.lstat(candidate)
            return False
        except FileNotFoundError:
            pass
        except OSError:
            return False  # EIO, ESTALE, EACCES...: unknown, keep
    if root:
        try:
            return bool(os.listdir(root))
        except OSError:
            return False
    parent = os.path.dirname(path.rstrip("/"))
    while parent not in ("", "/"):
        try:
            return bool(os.listdir(parent))
        except FileNotFoundError:
            parent = os.path.dirname(parent)
        except OSError:
            return False
    return False


def _rmtree_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _sources_gone(store: Store, timeout: float) -> dict[str, bool]:
    """Probe: which current snapshots' sources are really deleted (see :func:`source_gone`).

    Asks the shared tree, so it runs bounded and before the index lock is taken: a
    stalled server must neither hang gc nor block builds from publishing.
    """
    sources = {path: (snap.manifest.source, path, snap.manifest.root)
               for path, snap in current_snapshots(store, None).items()}
    return run_bounded(lambda: {p: source_gone(*a) for p, a in sources.items()},
                       timeout=timeout, what="checking which snapshot sources are gone")


def _decide(store: Store, index: dict[str, str], gone: dict[str, bool], in_use: set[tuple[str, str]],
            *, grace: float, dry_run: bool, now: float) -> list[Collected]:
    """Decision, no action: what happens to every snapshot that is not plainly current."""
    current = {rel: path for path, rel in index.items()}
    built_current: dict[str, float] = {}  # when each current snapshot became current
    for path, rel in index.items():
        with contextlib.suppress(OvlrunError, OSError):
            snap = store.load(rel)
            # A fetched snapshot (ovlrun.store.fleet) keeps the build host's build time,
            # possibly hours old; its manifest.json was written here when it was
            # published into this store, which is when the grace period starts.
            published = os.stat(snap.directory / layout.MANIFEST).st_mtime
            built_current[path] = max(snap.manifest.built, published)
    report = []
    for snap in store.all_snapshots():
        rel = str(snap.directory.relative_to(store.path))
        m = snap.manifest
        if rel in current:
            if snap.is_image and not gone.get(m.path, False):
                continue
            reason = "source-gone" if snap.is_image else "retired"
        else:
            reason = "replaced" if m.path in index else "orphaned"
        if (snap.directory.parent.name, snap.directory.name) in in_use:
            action = "kept: in use"
        elif reason == "replaced" and now - built_current.get(m.path, 0.0) < grace:
            action = "kept: grace"
        else:
            action = "would remove" if dry_run else "removed"
        report.append(Collected(m.path, str(snap.directory), reason, action))
    return report


def _collect(store: Store, index: dict[str, str], report: list[Collected]) -> None:
    """Action: take every snapshot marked "removed" out of the index and out of
    ``snapshots/``; caller holds the index lock."""
    doomed = [c for c in report if c.action == "removed"]
    new_index = dict(index)
    for c in doomed:
        if c.reason in ("source-gone", "retired"):
            new_index.pop(c.path, None)
    if new_index != index:
        store.write_index(new_index)
    trash = store.path / layout.TMP
    for c in doomed:
        # Out of snapshots/ in one rename, so a gc killed while deleting leaves no
        # partial snapshot there, only a tmp/gc.* leftover for the next gc.
        os.rename(c.directory, trash / f"{layout.GC_TRASH_PREFIX}{secrets.token_hex(6)}")
    store.clean_index_leftovers()
    for key_dir in (store.path / layout.SNAPSHOTS).iterdir():
        with contextlib.suppress(OSError):
            key_dir.rmdir()  # only if empty; publish creates key dirs under this lock


def gc(store: Store, in_use: Callable[[], set[tuple[str, str]]], *, dry_run: bool = False,
       grace: float = DEFAULT_GRACE, timeout: float = DEFAULT_TIMEOUT) -> tuple[list[Collected], int]:
    """Collect unused snapshots; returns what was (or would be) done and how many build or
    gc leftovers in tmp/ were removed.

    ``in_use()`` names the (KEY, ID) of every snapshot a running job uses; it is called
    under the index lock, so no snapshot becomes current between it and the decision.

    ``grace``: a replaced snapshot is kept until its successor is that many seconds old.
    A launch reads the index and mounts a few milliseconds later; the grace covers a launch
    that read the old index just before the refresh, which mountinfo cannot show yet.
    """
    if not (store.path / layout.SNAPSHOTS).is_dir():
        return [], 0
    gone = _sources_gone(store, timeout)
    with store.index_lock():
        # Scanned under the lock: no snapshot becomes current meanwhile.  Launches do not
        # take the lock; the grace period covers them.
        used = in_use()
        index = store.read_index()
        report = _decide(store, index, gone, used, grace=grace, dry_run=dry_run, now=time.time())
        if not dry_run:
            _collect(store, index, report)
    leftovers = 0 if dry_run else clean_tmp(store)
    if not dry_run:
        clean_plans(store)
    return report, leftovers


def clean_plans(store: Store) -> None:
    """Remove temporary files of plan-cache writers killed (SIGKILL: other signals are
    held while one writes) between creating and renaming them.  One being written right
    now may go too: that launch then just caches nothing this time."""
    try:
        names = os.listdir(store.path / layout.PLANS)
    except OSError:
        return
    for name in names:
        if name.startswith(".") and name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.unlink(store.path / layout.PLANS / name)


def clean_tmp(store: Store) -> int:
    """Remove tmp/ leftovers: gc trash, and builds whose source lock nobody holds (counted)."""
    removed = 0
    tmp = store.path / layout.TMP
    if not tmp.is_dir():
        return 0
    for entry in tmp.iterdir():
        name = entry.name
        if name.startswith(layout.GC_TRASH_PREFIX):  # our own trash (or a killed gc's): not counted
            _rmtree_dir(str(entry))
            continue
        key, dot, _ = name.rpartition(".")
        if dot and not store.build_running(key):
            _rmtree_dir(str(entry))
            removed += 1
    return removed
